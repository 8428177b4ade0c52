"""Decode steps through the compressed cache as CUDA graphs.

Between two admissions a decode step launches the same kernels on the same tensors: the
store's pools and page tables change only at an admission, each window sits at the front of a
buffer of fixed capacity, the layers' decode plans are made once per admission. What changes
from step to step is the token, its position and three counters: the window slot the step's
key and value go to, the window's length after the write, and the slot of the step's query
among the kept ones. Kept on the device (:class:`StaticStep`), they let one CUDA graph replay
the whole forward — the model's layers and the attention over every tier — where an eager step
pays the host work of a few hundred launches.

:func:`graphed_forward` wraps a model's ``forward`` (``compressed_attention`` installs it on a
GPU): the first decode step after an admission (or the prefill) runs eagerly and builds the
page tables and plans on the device; the next is captured and replayed; the steps after it
write their inputs and counters into the graph's tensors, replay it, then advance the cache's
host state as the eager forward would (window views and lengths, the kept queries, the
allocator's step, which admits every W steps outside the graph). A forward the graph cannot
serve — several new tokens, a layer that is not full attention, a ladder the kernels do not
read, gradients on, inputs of another shape — runs eagerly and drops the graph.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field

import torch

__all__ = ["DecodeGraph", "StaticStep", "graphed_forward"]


@dataclass
class StaticStep:
    """The device-side counters of a captured decode step and the buffers of kept queries.

    Attributes
    ----------
    window_at : torch.Tensor
        int64 ``[1]``: the window slot the step's key and value are written to.
    window_length : torch.Tensor
        int32 ``[1]``: the window's tokens after the write (what the decode plan reads).
    query_at : torch.Tensor
        int64 ``[1]``: the slot of the step's query in :attr:`queries`.
    queries : list of torch.Tensor
        Per layer, float32 ``[B, H_q, capacity, d]``: the kept queries at the front.
    count : int
        Queries held at the front of each buffer before the step.
    """

    window_at: torch.Tensor
    window_length: torch.Tensor
    query_at: torch.Tensor
    queries: list[torch.Tensor] = field(default_factory=list)
    count: int = 0

    def point(self, window: int) -> None:
        """Set the counters for a step that finds ``window`` tokens in the window."""
        self.window_at.fill_(window)
        self.window_length.fill_(window + 1)
        self.query_at.fill_(self.count)


class DecodeGraph:
    """The decode step of one :class:`~sphkv.integrations.hf.SphkvCache` as a CUDA graph.

    Attributes
    ----------
    steps : dict
        How many decode steps ran ``eager``, were ``captured`` or ``replayed``.
    disabled : str or None
        Why graphs were turned off for this cache (a capture that failed), else None.
    """

    def __init__(self, cache):
        self.cache = cache
        self.steps = {"eager": 0, "captured": 0, "replayed": 0}
        self.disabled: str | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._key = None  # what the captured graph was made for
        self._eager_key = None  # the state the last eager step left the plans built for
        self._inputs: dict[str, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None
        self._output = None
        self._static: StaticStep | None = None

    # --- when a graph serves -----------------------------------------------------------------
    def _state(self, kwargs: dict):
        """What a graph depends on: the store's version, the window buffers' addresses, the
        inputs' shapes and the other arguments; None where no graph can serve the step."""
        cache = self.cache
        ids = kwargs.get("input_ids")
        layers = cache.layers
        if (self.disabled is not None or torch.is_grad_enabled() or cache.store is None
                or not cache.kernel or ids is None or not ids.is_cuda or ids.shape[1] != 1
                or kwargs.get("inputs_embeds") is not None
                or not all(layer.attention.is_full for layer in layers)
                or any(layer.buffer is None for layer in layers)
                or len({layer.keys.shape[2] for layer in layers}) != 1
                or len({q.shape[2] for q in cache._queries.values()}) != 1):
            return None
        shapes = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(kwargs.items())
                       if isinstance(v, torch.Tensor) and k != "attention_mask")
        others = tuple((k, repr(v)) for k, v in sorted(kwargs.items())
                       if not isinstance(v, torch.Tensor) and v is not cache)
        buffers = tuple(layer.buffer[0].data_ptr() for layer in layers)
        return cache.store.version, buffers, shapes, others

    def step(self, forward, kwargs: dict):
        """One decode step: replayed, captured or eager (see the module's text)."""
        state = self._state(kwargs)
        cache = self.cache
        if state is not None and state == self._key and self._room():
            return self._replay(kwargs)
        self._drop()
        # capture only a step after which the allocator does not write (an admission or a
        # revision synchronizes the device)
        if (state is not None and state == self._eager_key and not cache.writes_after(1)):
            out = self._capture(forward, kwargs, state)
            if out is not None:
                return out
        out = forward(**kwargs)
        self.steps["eager"] += 1
        # the plans are built for this state unless the step changed it (an admission)
        self._eager_key = state if state is not None and self._state(kwargs) == state else None
        return out

    def _room(self) -> bool:
        return self._static.count < self._static.queries[0].shape[2]

    def _drop(self) -> None:
        # the graph's memory (its own pool) is freed with it
        self._graph, self._key, self._output = None, None, None

    # --- capture and replay ------------------------------------------------------------------
    def _capture(self, forward, kwargs: dict, state):
        cache = self.cache
        static = self._make_static()
        self._inputs = {k: v.clone() for k, v in kwargs.items()
                        if isinstance(v, torch.Tensor) and k != "attention_mask"}
        # the padding mask is read at the first forward only; the graph keeps the one it saw
        self._mask = kwargs.get("attention_mask")
        args = {**kwargs, **self._inputs}
        static.point(cache.layers[0].keys.shape[2])
        saved = ([(layer.keys, layer.values, layer.length) for layer in cache.layers],
                 dict(cache._queries), len(cache.history))
        graph = torch.cuda.CUDAGraph()
        cache.static = static
        try:
            with torch.cuda.graph(graph):
                output = forward(**args)
        except RuntimeError as exc:
            # the host state the capture advanced goes back; this cache decodes eagerly
            for layer, (keys, values, length) in zip(cache.layers, saved[0], strict=True):
                layer.keys, layer.values, layer.length = keys, values, length
            cache._queries = saved[1]
            del cache.history[saved[2]:]
            self.disabled = f"capture failed: {exc}"
            warnings.warn(f"sphkv: decoding without CUDA graphs ({self.disabled})",
                          stacklevel=3)
            return None
        finally:
            cache.static = None
        # the capture advanced the host state by this step; the replay does its device work
        static.count += 1
        graph.replay()
        self._graph, self._key, self._output = graph, state, output
        self.steps["captured"] += 1
        return _with_logits(output)

    def _make_static(self) -> StaticStep:
        """Counters, and query buffers holding the kept queries at their front, with room for
        the steps until the next admission."""
        cache = self.cache
        queries = [cache._queries[i] for i in range(cache.n_layers)]
        b, hq, kept, d = queries[0].shape
        capacity = kept + 2 * cache.window + 1
        static = self._static
        dev = queries[0].device
        if static is None or static.queries[0].shape != (b, hq, capacity, d):
            static = StaticStep(torch.zeros(1, dtype=torch.long, device=dev),
                                torch.zeros(1, dtype=torch.int32, device=dev),
                                torch.zeros(1, dtype=torch.long, device=dev),
                                [torch.zeros(b, hq, capacity, d, device=dev)
                                 for _ in queries])
        for buf, q in zip(static.queries, queries, strict=True):
            buf[:, :, :kept] = q.clone()  # q may be a view of buf itself
        static.count = kept
        self._static = static
        return static

    def _replay(self, kwargs: dict):
        cache, static = self.cache, self._static
        for k, buf in self._inputs.items():
            buf.copy_(kwargs[k])
        static.point(cache.layers[0].keys.shape[2])
        self._graph.replay()
        # the host state as the eager forward leaves it
        for layer in cache.layers:
            layer.advance(1)
        for index in range(cache.n_layers):
            cache.keep_static_queries(index, static)
        static.count += 1
        cache._step()
        self.steps["replayed"] += 1
        return _with_logits(self._output)


def _with_logits(output):
    """The captured output with its logits copied out of the graph's buffer (the next replay
    overwrites it)."""
    out = type(output)(**output)
    out["logits"] = output.logits.clone()
    return out


def _sphkv_cache(kwargs: dict):
    from sphkv.integrations.hf.cache import SphkvCache

    return next((v for v in kwargs.values() if isinstance(v, SphkvCache)), None)


def graphed_forward(forward):
    """``forward`` whose decode steps through a :class:`~sphkv.integrations.hf.SphkvCache`
    on a GPU run as CUDA graphs (:class:`DecodeGraph`, one per cache); other calls pass
    through."""

    @functools.wraps(forward)
    def run(*args, **kwargs):
        cache = _sphkv_cache(kwargs)
        if args or cache is None:
            return forward(*args, **kwargs)
        if cache.decode_graph is None:
            cache.decode_graph = DecodeGraph(cache)
        return cache.decode_graph.step(forward, kwargs)

    return run
