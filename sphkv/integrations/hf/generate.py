"""Generation with the compressed cache: :func:`compressed_generate`, :class:`compress` and
:func:`compressed_attention`."""

from __future__ import annotations

import contextlib

import torch

from sphkv.integrations.hf.cache import SphkvCache, register_attention
from sphkv.integrations.hf.config import cache_argument, fp16_cache_bytes
from sphkv.integrations.hf.graph import graphed_forward

__all__ = ["budget_bytes", "compress", "compressed_attention", "compressed_generate",
           "fp16_cache_bytes"]


@contextlib.contextmanager
def compressed_attention(model, graphs: bool = True):
    """Switch ``model``'s attention to sphkv's while the block runs, then back.

    The model then reads its keys and values from a :class:`SphkvCache` passed as its cache::

        cache = SphkvCache(model.config, budget=2e6, method="rdr")
        with compressed_attention(model):
            model.generate(input_ids, max_new_tokens=64, **{cache_argument(model): cache})

    With ``graphs`` (the default), decode steps on a GPU between admissions replay a CUDA graph
    of the whole forward (:mod:`sphkv.integrations.hf.graph`; ``cache.decode_graph.steps``
    counts them); ``graphs=False`` runs every step eagerly.
    """
    previous = model.config._attn_implementation
    model.set_attn_implementation(register_attention())
    wrap = graphs and "forward" not in vars(model)  # not inside another such block
    if wrap:
        model.forward = graphed_forward(model.forward)
    try:
        yield model
    finally:
        if wrap:
            del model.forward
        model.set_attn_implementation(previous)


def budget_bytes(config, batch: int, tokens: int, fraction: float | None = None,
                 bytes: float | None = None) -> float:
    """The cache budget in bytes from exactly one of ``fraction`` (of what the model's own fp16
    cache holds after ``tokens`` tokens) or ``bytes``.

    Raises
    ------
    TypeError
        Neither or both given.
    ValueError
        A fraction outside (0, 1] or bytes <= 0.
    """
    if (fraction is None) == (bytes is None):
        raise TypeError("give the budget as exactly one of fraction= (of the fp16 cache, in "
                        "(0, 1]) or bytes=")
    if bytes is not None:
        if not bytes > 0:
            raise ValueError(f"bytes must be > 0, got {bytes}")
        return float(bytes)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1] (a share of the fp16 cache), got "
                         f"{fraction}; for a byte count pass bytes=")
    return fraction * fp16_cache_bytes(config, batch, tokens)


def compressed_generate(model, input_ids: torch.Tensor, *, fraction: float | None = None,
                        bytes: float | None = None, method: str = "rdr",
                        max_new_tokens: int = 32, attention_mask: torch.Tensor | None = None,
                        window: int | None = None, sinks: int = 4, page_size: int = 16,
                        head_weights=None,
                        **generate_kwargs) -> tuple[torch.Tensor, SphkvCache]:
    """Greedy ``model.generate`` through a :class:`SphkvCache` within a budget.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM whose attention dispatches through ``AttentionInterface``.
    input_ids : torch.Tensor
        int ``[B, n]``, left-padded when the prompts differ in length.
    fraction : float, optional
        The budget as a share, in (0, 1], of what the model's own fp16 cache holds after
        ``n + max_new_tokens`` tokens (sliding and chunked layers hold their window or chunk).
    bytes : float, optional
        The budget in bytes. Give exactly one of ``fraction`` and ``bytes``.
    method : str
        A key of :data:`sphkv.rdr.methods.METHODS`.
    attention_mask : torch.Tensor, optional
        ``[B, n]``, 0 at (left) padding.
    window, sinks, page_size, head_weights
        See :class:`SphkvCache` (a ``sensitive`` method needs ``head_weights``).
    **generate_kwargs
        Passed to ``model.generate``; beam search (``num_beams > 1``) is refused.

    Returns
    -------
    sequences : torch.Tensor
        ``[B, n + new]``.
    cache : SphkvCache
        With ``history`` (bytes after every write), ``peak_bytes`` and ``budget``.
    """
    if generate_kwargs.get("num_beams", 1) != 1:
        raise ValueError(f"num_beams must be 1: the compressed cache does not reorder its "
                         f"pages per beam (got num_beams={generate_kwargs['num_beams']})")
    input_ids = torch.as_tensor(input_ids).reshape(-1, input_ids.shape[-1])
    limit = budget_bytes(model.config, input_ids.shape[0], input_ids.shape[1] + max_new_tokens,
                         fraction, bytes)
    cache = SphkvCache(model.config, limit, method, window=window, sinks=sinks,
                       page_size=page_size, head_weights=head_weights)
    with torch.no_grad(), compressed_attention(model):
        out = model.generate(input_ids, attention_mask=attention_mask,
                             max_new_tokens=max_new_tokens, do_sample=False,
                             **{cache_argument(model): cache}, **generate_kwargs)
    return out, cache


class compress:
    """While the block runs, ``model.generate`` goes through a fresh :class:`SphkvCache` within
    the budget; afterwards the model is as before.

    ::

        with compress(model, fraction=0.25) as press:
            out = model.generate(input_ids, max_new_tokens=64)
        press.cache.peak_bytes, press.cache.fp16_bytes()

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM.
    fraction, bytes
        The budget of each ``generate`` call, exactly one of them (see
        :func:`compressed_generate`); a fraction is of the fp16 cache of that call's prompt plus
        ``max_new_tokens`` (or the generation config's).
    method, window, sinks, page_size
        See :class:`SphkvCache`.

    Attributes
    ----------
    cache : SphkvCache or None
        The cache of the last ``generate`` call in the block.
    """

    def __init__(self, model, *, fraction: float | None = None, bytes: float | None = None,
                 method: str = "rdr", window: int | None = None, sinks: int = 4,
                 page_size: int = 16):
        budget_bytes(model.config, 1, 1, fraction, bytes)  # checks the budget's arguments now
        self.model, self.fraction, self.bytes = model, fraction, bytes
        self.options = {"method": method, "window": window, "sinks": sinks,
                        "page_size": page_size}
        self.cache: SphkvCache | None = None
        self._attention = None

    def _generate(self, input_ids, max_new_tokens: int | None = None, **kwargs):
        if kwargs.get("num_beams", 1) != 1:
            raise ValueError(f"num_beams must be 1: the compressed cache does not reorder its "
                             f"pages per beam (got num_beams={kwargs['num_beams']})")
        new = max_new_tokens or self.model.generation_config.max_new_tokens or 20
        ids = torch.as_tensor(input_ids).reshape(-1, input_ids.shape[-1])
        limit = budget_bytes(self.model.config, ids.shape[0], ids.shape[1] + new,
                             self.fraction, self.bytes)
        self.cache = SphkvCache(self.model.config, limit, **self.options)
        kwargs.setdefault("do_sample", False)
        with torch.no_grad():
            return type(self.model).generate(self.model, ids, max_new_tokens=new,
                                             **{cache_argument(self.model): self.cache},
                                             **kwargs)

    def __enter__(self) -> compress:
        self._attention = compressed_attention(self.model)
        self._attention.__enter__()
        self.model.generate = self._generate
        return self

    def __exit__(self, *exc) -> None:
        del self.model.generate
        self._attention.__exit__(*exc)
