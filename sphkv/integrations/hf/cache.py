"""A compressed KV cache for Hugging Face generation: a thin adapter over the online allocator.

:class:`SphkvCache` is a ``transformers`` :class:`~transformers.Cache`. Each layer
(:class:`CompressedLayer`) keeps its recent tokens dense (fp16) in a window; everything older
lives in the tier-homogeneous pages of :class:`sphkv.rdr.online.OnlineAllocator`, which decides
every token's tier within the byte budget. ``update`` appends the new keys and values to the
window and returns the layer itself as a handle; the attention function registered as
``"sphkv"`` (:func:`sphkv_attention`) reads logits from the key codes, decodes the values, adds
the window, and handles GQA, causality, left padding and the layer's attention layout. Positions
continue as if nothing were dropped: the cache reports every token it has seen as its length.

What the adapter does, with W the window (given, or chosen from the budget at the first
forward: :meth:`SphkvCache.budget_window`):

- the **layout** of each layer from the config
  (:func:`~sphkv.integrations.hf.config.attention_layout`): full, sliding or chunked; a
  sliding or chunked layer keeps only the tokens it can still attend to (its window trims, its
  pages are evicted as they fall out of view) and masks the rest;
- **left padding** from the 2-D attention mask (the mask function registered with the attention
  passes it through unchanged), read at the first forward;
- the **observed queries**: each layer's last queries (the prompt's last ``observation`` for the
  prefill, the last W for admissions) weigh the distortion rows, which the method computes
  (:meth:`sphkv.rdr.methods.Method.distortion`) with the layer's real attention pattern;
- **steps**: after the prefill forward, every token but the last W goes to
  :meth:`~sphkv.rdr.online.OnlineAllocator.prefill`; when the window holds 2W tokens, the oldest
  W are admitted (:meth:`~sphkv.rdr.online.OnlineAllocator.admit`), after the tokens that fell out
  of a layer's view have been evicted. A forward of more tokens after the prefill (a prompt fed
  in chunks: ``generate``'s ``prefill_chunk_size``; a question) admits all but the newest W in
  one admission, its distortion rows weighed by its last ``observation`` queries, as the
  prefill's are;
- **revisions** (a recalling method, :attr:`~sphkv.rdr.methods.Method.recall`): every token that
  leaves the window is also copied, fp16, to host memory (:attr:`CompressedLayer.host`,
  :meth:`SphkvCache.host_bytes`, outside the budget); every ``recall`` tokens the allocation
  is solved again over all of them with the last ``observation`` queries
  (:meth:`~sphkv.rdr.online.OnlineAllocator.revise`): dropped tokens come back, compressed
  ones rise, each encoded from its fp16 copy.

Bytes: the pages and their page tables, the windows and the per-sequence padding offsets
(:meth:`SphkvCache.nbytes`). The windows at their largest (2W tokens per layer and kv head, or a
sliding layer's window if smaller) are reserved from the budget; the allocator's store holds the
rest and never exceeds it, at any pool write. A budget below the reserve plus the sinks' pages
(:meth:`SphkvCache.minimum_bytes`) is refused when the first forward ends. A forward of several
new tokens (the prefill, a question fed at once) holds them at fp16 while it runs: attention over
them needs them; a long prompt fed in chunks holds one chunk at a time.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from sphkv.codec import Codec, Codes
from sphkv.integrations.hf.config import attention_layout, head_dim
from sphkv.integrations.hf.kernel_attention import kernel_attend, kernel_reads
from sphkv.kernels.encode_pack import KERNEL_CODECS, encode_codes
from sphkv.rdr.distortion import PAGE_TABLE_ENTRY
from sphkv.rdr.layout import LayerAttention
from sphkv.rdr.methods import METHODS, NO_DROP_PENALTY, Method, get_method
from sphkv.rdr.online import OnlineAllocator, Tokens
from sphkv.rdr.pages import slot_bytes
from sphkv.rdr.problem import InfeasibleBudgetError

__all__ = ["ATTENTION_NAME", "METHODS", "CompressedLayer", "Method", "SphkvCache",
           "get_method", "register_attention", "sphkv_attention"]

ATTENTION_NAME = "sphkv"
#: the windows a budget chooses from (``window=None``): the long one, unless its reserve of 2W
#: fp16 tokens per layer and kv-head would take more than WINDOW_SHARE of the budget; doubled,
#: up to WINDOW_MAX, while the doubled window's reserve takes at most WINDOW_GROW_SHARE of it
#: (fewer admissions of more tokens at long contexts: an admission on a GPU costs far less
#: than in proportion to the tokens it admits)
WINDOW_LONG, WINDOW_SHORT, WINDOW_SHARE = 16, 8, 1 / 6
WINDOW_MAX, WINDOW_GROW_SHARE = 256, 1 / 16
#: vectors decoded per codec call when a store write is read back (see SphkvCache.decode_pages)
_DECODE_ROWS = 1 << 15
#: (query, token) pairs per call of a method's distortion rows, per device type: on a CPU
#: larger calls measured slower (float64 intermediates of gigabytes); on a GPU each call is
#: hundreds of launches, so an admission's layers go in as few as its memory allows
_DISTORTION_PAIRS = {"cpu": 1 << 22, "cuda": 1 << 24}


def _pairs_per_call(device: torch.device) -> int:
    """:data:`_DISTORTION_PAIRS` for ``device`` (the CPU's for any other kind)."""
    return _DISTORTION_PAIRS.get(device.type, _DISTORTION_PAIRS["cpu"])


class CompressedLayer(CacheLayerMixin):
    """One layer of :class:`SphkvCache`: its fp16 window; its pages live in the allocator.

    The window lives at the front of buffers of fixed capacity (``buffer``): a decode step
    writes its token in place, so the buffers keep their address between admissions and a decode
    plan made over them serves every step in between. The capacity is what the window holds at
    most between admissions (2W tokens, or a sliding or chunked layer's size if smaller), more
    only while a forward brings more (the prefill).

    Attributes
    ----------
    keys, values : torch.Tensor
        fp16 ``[B, H_kv, w, d]``, the window: tokens at positions ``start … length-1`` (views of
        the buffers).
    buffer : tuple of torch.Tensor or None
        The key and value buffers ``[B, H_kv, C, d]`` (None until a forward writes one).
    length : int
        Tokens seen (padding included), kept or not.
    attention : LayerAttention
        The layer's pattern (full, sliding, chunked).
    mean : tuple of torch.Tensor or None
        A centred method's key and value means ``[B, H_kv, 1, d]`` fp16 (:meth:`centre`):
        the window and the pages hold offsets from them.
    scale : torch.Tensor or None
        A scaled method's key scales ``D`` ``[B, H_kv, 1, d]`` fp16 (:meth:`centre`): the
        window and the pages hold ``D (k − μ_k)``, and queries are read as ``q / D``.
    host : tuple of torch.Tensor or None
        A recalling method's copy of every token that left the window
        (:attr:`~sphkv.rdr.methods.Method.recall`), keys and values as the window holds them,
        fp16 ``[B, H_kv, n, d]`` in host memory (pinned beside a GPU): positions
        ``host_start … start-1``, at the front of buffers that double when full.
    host_start : int
        Position of the host copy's first token.
    """

    def __init__(self, cache: SphkvCache, index: int, attention: LayerAttention):
        super().__init__()
        self.cache, self.index, self.attention, self.length = cache, index, attention, 0
        self.is_sliding = not attention.is_full
        self.buffer: tuple[torch.Tensor, torch.Tensor] | None = None
        self.mean: tuple[torch.Tensor, torch.Tensor] | None = None
        self.scale: torch.Tensor | None = None
        self.host_start = 0
        self._host: tuple[torch.Tensor, torch.Tensor] | None = None  # the buffers
        self._host_tokens = 0
        self._decoded: tuple[int, tuple | None, dict] | None = None
        # the kernel path's page tables and decode plan (kernel_attention.py)
        self._runs: tuple | None = None
        self._plan: tuple | None = None

    def lazy_initialization(self, key_states, value_states) -> None:
        b, h, _, d = key_states.shape
        self.cache.choose_window(b)
        self.keys = torch.zeros(b, h, 0, d, dtype=torch.float16, device=key_states.device)
        self.values = torch.zeros_like(self.keys)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Append the new tokens to the window; return ``(self, self)`` as handles."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.cache.pad is not None and not self.attention.is_full:
            # the first new query sees nothing below its lowest visible position: nor will
            # any later one
            first = self.first_visible(torch.tensor([self.length])).min()
            self.trim(int(first))
        n, m = self.keys.shape[2], key_states.shape[2]
        if self.buffer is None or self.buffer[0].shape[2] < n + m:
            self._rebuffer(n + m)
        static = self.cache.static
        if self.mean is not None:
            key_states, value_states = (x - mu for x, mu in
                                        zip((key_states, value_states), self.mean, strict=True))
        if self.scale is not None:
            key_states = key_states * self.scale
        for buf, new in zip(self.buffer, (key_states, value_states), strict=True):
            if static is not None:  # a step captured in a CUDA graph: the slot is on the device
                buf.index_copy_(2, static.window_at, new.to(buf.dtype))
            else:
                buf[:, :, n:n + m].copy_(new)
        self.advance(m)
        return self, self

    def advance(self, m: int) -> None:
        """The host state after ``m`` new tokens were written behind the window."""
        n = self.keys.shape[2]
        self.keys, self.values = (buf[:, :, :n + m] for buf in self.buffer)
        self.length += m

    def _rebuffer(self, tokens: int) -> None:
        """New buffers for at least ``tokens`` tokens (the decode capacity at least), holding
        the window."""
        capacity = max(tokens, self.attention.held_tokens(2 * self.cache.window))
        b, h, n, d = self.keys.shape
        self.buffer = tuple(x.new_zeros(b, h, capacity, d) for x in (self.keys, self.values))
        for buf, x in zip(self.buffer, (self.keys, self.values), strict=True):
            buf[:, :, :n].copy_(x)
        self.keys, self.values = (buf[:, :, :n] for buf in self.buffer)

    def centre(self, real: torch.Tensor, queries: torch.Tensor | None = None) -> None:
        """Hold the window as offsets from each (sequence, kv-head)'s mean key and value over
        its real tokens (``real`` bool ``[B, w]``), as every later token too
        (:attr:`~sphkv.rdr.methods.Method.centred`); with ``queries`` ``[B, H_q, m, d]`` (a
        scaled method's, :attr:`~sphkv.rdr.methods.Method.scaled`), the key offsets also
        scaled per channel by ``D = (E q_c² / E k_c²)^¼`` (normalised to a geometric mean
        of 1). The window moves to buffers of its own (it may be shared with the deferred
        cache it was copied from)."""
        weight = real.to(self.keys.device, torch.float32)[:, None, :, None]
        count = weight.sum(dim=2, keepdim=True).clamp_min(1)
        self.mean = tuple((x.float() * weight).sum(dim=2, keepdim=True).div(count).half()
                          for x in (self.keys, self.values))
        keys, values = (x.float() - mu for x, mu in
                        zip((self.keys, self.values), self.mean, strict=True))
        if queries is not None:
            b, h, _, d = keys.shape
            query_energy = queries.float().reshape(b, h, -1, d).square().mean(dim=2, keepdim=True)
            key_energy = (keys.square() * weight).sum(dim=2, keepdim=True) / count
            log_scale = (query_energy / key_energy.clamp_min(1e-30)).clamp(1e-4, 1e4).log() / 4
            self.scale = (log_scale - log_scale.mean(dim=-1, keepdim=True)).exp().half()
            keys = keys * self.scale
        self.keys, self.values = keys.half(), values.half()
        self.buffer = None
        self._rebuffer(self.keys.shape[2])

    def stored_query(self, query: torch.Tensor) -> torch.Tensor:
        """``query`` ``[B, H_q, m, d]`` as the stored keys read it: ``q / D`` where the keys
        are scaled (:meth:`centre`), so that ``(q / D)·(D k) = q·k``."""
        if self.scale is None:
            return query
        scale = self.scale.repeat_interleave(query.shape[1] // self.scale.shape[1], dim=1)
        return (query.float() / scale.float()).to(query.dtype)

    def uncentre(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output ``[B, m, H_q, d]`` of offsets plus the value mean (kv-head h's to
        its query heads): ``Σ p (v − μ) + μ = Σ p v`` where the weights sum to 1."""
        if self.mean is None:
            return out
        mean = self.mean[1].repeat_interleave(out.shape[2] // self.mean[1].shape[1], dim=1)
        return (out.float() + mean.transpose(1, 2).float()).to(out.dtype)

    @property
    def start(self) -> int:
        """Position of the window's first token."""
        return self.length - self.keys.shape[-2]

    @property
    def host(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._host is None:
            return None
        return tuple(x[:, :, :self._host_tokens] for x in self._host)

    def _host_room(self, tokens: int) -> None:
        """Host buffers for at least ``tokens`` tokens, holding the copy: doubled when full,
        so that a copy of n tokens costs O(n) writes in all."""
        capacity = 0 if self._host is None else self._host[0].shape[2]
        if tokens <= capacity:
            return
        b, h, _, d = self.keys.shape
        pinned = self.keys.is_cuda
        bufs = tuple(torch.empty(b, h, max(tokens, 2 * capacity), d, dtype=torch.float16,
                                 pin_memory=pinned) for _ in range(2))
        if self._host is not None:
            for new, old in zip(bufs, self._host, strict=True):
                new[:, :, :self._host_tokens] = old[:, :, :self._host_tokens]
        self._host = bufs

    def keep_on_host(self, position: int) -> None:
        """Copy the window's tokens before ``position`` to the host copy (before a trim takes
        them), and drop from it what the next query cannot see (sliding and chunked layers)."""
        if self._host is None or self.host_start + self._host_tokens != self.start:
            # the first copy, or the window lost tokens no query could see since the last one
            # (a sliding layer's window trims itself): nothing held before them is seen either
            self.host_start, self._host_tokens = self.start, 0
        n, held = position - self.start, self._host_tokens
        self._host_room(held + n)
        for buf, x in zip(self._host, (self.keys, self.values), strict=True):
            buf[:, :, held:held + n] = x[:, :, :n]
        self._host_tokens += n
        if not self.attention.is_full:
            gone = int(self.first_visible(torch.tensor([self.length])).min()) - self.host_start
            if gone > 0:
                rest = self._host_tokens - gone
                for buf in self._host:
                    buf[:, :, :rest] = buf[:, :, gone:gone + rest].clone()
                self._host_tokens, self.host_start = rest, self.host_start + gone

    def seen(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Every token still held at fp16, the host copy's and the window's, on the host:
        ``(keys, values [B, H_kv, n, d], position of the first)``, views of the host buffers
        (the window copied behind the host copy, where the next copy overwrites it)."""
        if self._host is None or self.host_start + self._host_tokens != self.start:
            # the window lost unseen tokens since the last copy: nothing before it is seen
            self.host_start, self._host_tokens = self.start, 0
        held, w = self._host_tokens, self.keys.shape[2]
        self._host_room(held + w)
        for buf, x in zip(self._host, (self.keys, self.values), strict=True):
            buf[:, :, held:held + w] = x
        keys, values = (buf[:, :, :held + w] for buf in self._host)
        return keys, values, self.host_start

    def trim(self, position: int) -> None:
        """Drop the window's tokens before ``position``."""
        n = position - self.start
        if n <= 0:
            return
        rest = self.keys.shape[2] - n
        decode = self.attention.held_tokens(2 * self.cache.window)
        if self.buffer is None or self.buffer[0].shape[2] > max(rest, decode):
            # shared (a compressed copy's) or larger than decoding needs (after the prefill)
            self.keys, self.values = self.keys[:, :, n:], self.values[:, :, n:]
            self._rebuffer(rest)
            return
        # in place: the buffers keep their address (and the decode plan made over them)
        for buf in self.buffer:
            buf[:, :, :rest] = buf[:, :, n:n + rest].clone()
        self.keys, self.values = (buf[:, :, :rest] for buf in self.buffer)

    def first_visible(self, positions: torch.Tensor) -> torch.Tensor:
        """``[B, m]``: the lowest position the query at each of ``positions`` ``[m]`` sees in
        each sequence (padding excluded)."""
        return self.attention.first_visible(positions[None, :], self.cache.pad[:, None])

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("SphkvCache supports greedy and sampled decoding, not beam "
                                  "search: its pages are not reordered per beam (num_beams=1)")

    def held_window(self) -> tuple[torch.Tensor, ...]:
        """The tensors the window occupies: its buffers, or (a copy by
        :meth:`SphkvCache.compress` before its first write) the keys and values it shares; and
        a centred method's means and scales."""
        stats = (*(self.mean or ()), *(() if self.scale is None else (self.scale,)))
        if self.buffer is not None:
            return (*self.buffer, *stats)
        return (self.keys, self.values, *stats) if self.is_initialized else ()

    def window_bytes(self) -> int:
        """Bytes of the window's buffers (their whole capacity) and of a centred method's
        means and scales."""
        return sum(x.numel() * x.element_size() for x in self.held_window())

    def _decoded_pages(self, b: int, h: int):
        """The layer's pages decoded, every tier's run side by side: ``(k̂, v̂ [B, H_kv, n, d],
        bias [B, H_kv, 1, 1, n], positions [B, H_kv, n])``, ``bias`` 0 at kept tokens and −∞ at
        padding; None without pages. ``q·k̂`` equals the logits the key codes give, to rounding
        (:meth:`~sphkv.codec.Codec.logits`).

        Made again after each write of the store, for every layer at once
        (:meth:`SphkvCache.decode_pages`)."""
        store = self.cache.store
        version = store.version if store is not None else -1
        if self._decoded is None or self._decoded[0] != version:
            self.cache.decode_pages(b, h)
        return self._decoded[1]

    def attend(self, query: torch.Tensor, attention_mask: torch.Tensor | None,
               scaling: float) -> torch.Tensor:
        """Attention of the new queries over the pages and the window.

        Parameters
        ----------
        query : torch.Tensor
            ``[B, H_q, m, d]``, the last m positions; query head h reads kv-head
            ``h // (H_q // H_kv)``.
        attention_mask : torch.Tensor, optional
            The 2-D padding mask ``[B, length]`` (bool or 0/1); only read at the first forward.

        Returns
        -------
        torch.Tensor
            ``[B, m, H_q, d]``.
        """
        b, hq, m, d = query.shape
        cache = self.cache
        if cache.pad is None:
            cache.set_padding(attention_mask, b)
        if query.is_cuda and cache.kernel:  # the Triton kernels compute the same
            return self.uncentre(kernel_attend(self, query, scaling))
        h = self.keys.shape[1]
        g = hq // h
        q = query.float().reshape(b, h, g * m, d)  # the G query heads of a kv-head, head-major
        t = self.length - m + torch.arange(m)  # the queries' positions
        first = self.first_visible(t)  # [B, m]
        # window: the query at t sees positions first ≤ p ≤ t
        pos = self.start + torch.arange(self.keys.shape[-2])
        seen = (pos[None, None, :] >= first[:, :, None]) & (pos[None, None, :] <= t[None, :, None])
        seen = seen.to(q.device)
        pages = self._decoded_pages(b, h)
        if pages is None:  # the window alone (a prefill): torch's fused attention
            out = torch.nn.functional.scaled_dot_product_attention(
                query.float(), self.keys.float(), self.values.float(), seen[:, None],
                scale=scaling, enable_gqa=True)
            return self.uncentre(out.nan_to_num(0.0).transpose(1, 2).to(query.dtype))
        key, value, bias, positions = pages
        s = (q @ key.mT).view(b, h, g, m, -1) + bias
        if not self.attention.is_full:
            # a kept token is seen from its query's lowest visible position
            hidden = positions[:, :, None, :] < first[:, None, :, None]  # [B, H, m, n]
            s = s.masked_fill(hidden[:, :, None].to(q.device), -math.inf)
        w = (q @ self.keys.float().mT).view(b, h, g, m, -1)
        w = w.masked_fill(~seen[:, None, None], -math.inf)
        # softmax(q·k/√d) over the pages and the window; a padding query that sees no key gets
        # weights 0, not NaN
        p = torch.softmax(torch.cat([s, w], dim=-1) * scaling, dim=-1).nan_to_num(0.0)
        p = p.view(b, h, g * m, -1)
        n = key.shape[2]
        out = p[..., :n] @ value + p[..., n:] @ self.values.float()
        return self.uncentre(out.view(b, hq, m, d).transpose(1, 2).to(query.dtype))


class SphkvCache(Cache):
    """A KV cache compressed by the online allocator within a byte budget.

    Use with ``model.generate`` under :func:`sphkv.integrations.hf.sphkv_attention_for` (or
    :func:`~sphkv.integrations.hf.compressed_generate`).

    Parameters
    ----------
    config : transformers.PretrainedConfig
        The model's config: layers, kv-heads, head dim and each layer's attention layout.
    budget : float or None
        Bytes the cache may hold (pages, page tables, windows, padding offsets). None defers
        the allocator: the cache keeps the whole prompt at fp16 and every query, and
        :meth:`compress` makes compressed copies of it — one prefill shared by many methods
        and budgets.
    method : Method or str
        What to store and how to weigh it (:data:`METHODS`).
    window : int, optional
        W: tokens kept dense (between W and 2W), observation queries of each admission, and
        admission chunk. By default the budget chooses it at the first forward
        (:meth:`budget_window`): 16, or 8 where the 16-token window's reserve would take more
        than a sixth of the budget, and doubled up to 256 while the doubled window's reserve
        takes at most a sixteenth of it (long contexts).
    sinks : int
        The first ``sinks`` real tokens of each sequence take the method's dearest tier, or
        one their distortion chooses, never below :attr:`Method.sink_floor`
        (:attr:`Method.chosen_sinks`).
    page_size : int
        Slots per page.
    decay : float
        λ is multiplied by it after an admission that fits.
    observation : int, optional
        Prompt queries (the last ones) whose attention weighs the prefill allocation; the
        method's :attr:`~Method.observation`, else W, by default.
    offset_bytes : {2, 4}, optional
        Width of each slot's position offset from its page's first position. 16 bits serve
        positions below 2^16 (a page of a sparse tier can span the whole context); by default
        4 where the config's ``max_position_embeddings`` reaches 2^16, else 2.
    head_weights : array-like, optional
        ``[layers, query heads]``, positive: each head's sensitivity
        (:func:`~sphkv.integrations.hf.sensitivity.head_sensitivity`), which a ``sensitive``
        method's distortion needs (:attr:`~sphkv.rdr.Method.sensitive`); other methods ignore
        it, and :meth:`compress` passes it on.

    Attributes
    ----------
    allocator : OnlineAllocator or None
        Set at the end of the first forward.
    history : list of int
        :meth:`nbytes` after the first forward and after every write of an admission.
    timings : list of (str, float)
        Seconds of each allocator step: ``"prefill"`` (distortion rows and placement of the
        prompt), ``"admit"`` (evictions, distortion rows and admission of W tokens) and
        ``"revise"`` (a recalling method's revision).
    """

    def __init__(self, config, budget: float | None, method: Method | str = "rdr",
                 window: int | None = None, sinks: int = 4, page_size: int = 16,
                 decay: float = 0.8, observation: int | None = None,
                 offset_bytes: int | None = None, head_weights=None):
        for name, value, low in (("window", window, 1), ("sinks", sinks, 0),
                                 ("page_size", page_size, 1)):
            if name == "window" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}"
                                 f"{' or None' if name == 'window' else ''}, got {value!r}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay!r}")
        if observation is not None and observation < 1:
            raise ValueError(f"observation must be >= 1 queries or None, got {observation}")
        if budget is not None and not budget > 0:
            raise ValueError(f"budget must be > 0 bytes or None, got {budget!r}")
        text = config.get_text_config(decoder=True)
        if offset_bytes not in (None, 2, 4) or isinstance(offset_bytes, bool):
            raise ValueError(f"offset_bytes must be 2, 4 or None, got {offset_bytes!r}")
        #: bytes of each slot's position offset: 4 where the model's positions reach 2^16
        self.offset_bytes = offset_bytes or (
            4 if getattr(text, "max_position_embeddings", 0) >= 2**16 else 2)
        self.layout = attention_layout(config)
        self.n_layers = text.num_hidden_layers
        super().__init__(layers=[CompressedLayer(self, i, a) for i, a in enumerate(self.layout)])
        self.kv_heads = text.num_key_value_heads
        self.head_dim = head_dim(config)
        self.method = get_method(method) if isinstance(method, str) else method
        self.head_weights = _head_weights(head_weights, text, self.method)
        self.tiers = self.method.tier_set(self.head_dim, page_size)
        floor = self.method.sink_floor
        if floor is not None and floor not in self.tiers.names:
            raise ValueError(f"method {self.method.name!r}: sink_floor {floor!r} is not one of "
                             f"its tiers {', '.join(self.tiers.names[1:])}")
        #: the cheapest tier a chosen sink may take (:attr:`Method.sink_floor`)
        self.sink_floor_tier = 1 if floor is None else self.tiers.names.index(floor)
        #: on a GPU, whether attention runs in the Triton kernels (else in torch)
        self.kernel = kernel_reads(self.tiers)
        self.config = config
        self.budget = None if budget is None else float(budget)
        self._window = window  # as given: compress() passes it on
        #: W; a window chosen by the budget is set at the first forward (:meth:`choose_window`)
        self.window: int | None = window
        self.sinks = sinks
        self._observation = observation  # as given: compress() passes it on
        self.page_size, self.decay = page_size, decay
        self.allocator: OnlineAllocator | None = None
        self.admitted = 0  # positions below this are in pages (or dropped)
        self._revised = 0  # the length at the last revision (a recalling method's)
        self.history: list[int] = []
        self.timings: list[tuple[str, float]] = []
        self.pad: torch.Tensor | None = None
        self._pad_device: torch.Tensor | None = None
        self._queries: dict[int, torch.Tensor] = {}
        #: the device-side counters while a decode step is captured in a CUDA graph
        self.static = None
        #: the decode steps as CUDA graphs (graph.py), made at the first decode step on a GPU
        self.decode_graph = None
        # the kernel path's runs of every group per tier, made once per store write; the torch
        # path's (with every token's position), the same
        self._runs: tuple | None = None
        self._tables: tuple | None = None
        # the prefill's items per method (its repr names every field) and window, shared by
        # the copies :meth:`compress` makes (they depend on the budget only through a window
        # it chooses); None in a cache that prefilled itself, which must not keep a copy of its
        # prompt's keys and values
        self._prefill_items: dict[tuple[str, int], list[Tokens]] | None = None

    # --- accounting --------------------------------------------------------------------------
    @property
    def store(self):
        return self.allocator.store if self.allocator is not None else None

    @property
    def price(self) -> float:
        """λ, distortion per byte at the margin."""
        return self.allocator.price if self.allocator is not None else 0.0

    def _pad_bytes(self) -> int:
        return self.pad.numel() * self.pad.element_size() if self.pad is not None else 0

    def nbytes(self) -> int:
        """Accounted bytes: pages with their page tables, the windows, the padding offsets."""
        store = self.store.nbytes() if self.store is not None else 0
        return store + sum(layer.window_bytes() for layer in self.layers) + self._pad_bytes()

    def held_bytes(self) -> int:
        """Bytes of the tensors and page tables the cache really holds."""
        store = self.store.held_bytes() if self.store is not None else 0
        window = sum(t.numel() * t.element_size() for layer in self.layers
                     for t in layer.held_window())
        return store + window + self._pad_bytes()

    def host_bytes(self) -> int:
        """Bytes of a recalling method's host buffers (:attr:`CompressedLayer.host`, their
        whole capacity): host memory, outside the budget."""
        return sum(x.numel() * x.element_size() for layer in self.layers
                   for x in (layer._host or ()))

    def fp16_bytes(self) -> int:
        """Bytes the model's own fp16 cache holds now (a sliding or chunked layer: its window
        or chunk at most)."""
        layer = self.layers[0]
        per_token = layer.keys.shape[0] * self.kv_heads * 4 * self.head_dim
        return sum(per_token * a.held_tokens(layer.length) for a in self.layout)

    @property
    def peak_bytes(self) -> int:
        return max(self.history, default=0)

    def reserved_bytes(self, batch: int, window: int | None = None) -> int:
        """Bytes set aside from the budget for what the allocator does not place: every window
        at its largest (2W tokens, or a sliding or chunked layer's size if smaller), a centred
        method's means and scales, and the padding offsets; W is ``window``, by default this
        cache's (or the one its budget chooses for ``batch`` sequences)."""
        window = window or self.window or self.budget_window(batch)
        per_token = batch * self.kv_heads * 4 * self.head_dim
        # fp16 [B, H_kv, d] each: the key and value means, the key scales
        means = per_token // 2 * (self.method.centred * 2 + self.method.scaled) * self.n_layers
        return (sum(per_token * a.held_tokens(2 * window) for a in self.layout) + means
                + batch * 8)

    def budget_window(self, batch: int) -> int:
        """The window the budget chooses for ``batch`` sequences: :data:`WINDOW_SHORT` where
        the long window's reserve would take more than :data:`WINDOW_SHARE` of the budget, else
        :data:`WINDOW_LONG` doubled while the doubled window's reserve takes at most
        :data:`WINDOW_GROW_SHARE` of it, up to :data:`WINDOW_MAX`. At 1/8 of the fp16 bytes of
        N tokens a window's reserve takes 2W·8/N of it: 16 takes a fifth at N = 1280, a
        ninth at 2304; 32 a sixteenth at N = 8192, 64 at 16,384, 128 at 32,768, 256 at
        65,536. A deferred cache (no budget) holds its whole prompt; its copies choose their
        own."""
        if self.budget is None:
            return WINDOW_LONG
        def share(window: int) -> float:
            return self.reserved_bytes(batch, window) / self.budget

        if share(WINDOW_LONG) > WINDOW_SHARE:
            return WINDOW_SHORT
        window = WINDOW_LONG
        while window < WINDOW_MAX and share(2 * window) <= WINDOW_GROW_SHARE:
            window *= 2
        return window

    def choose_window(self, batch: int) -> None:
        """Set W, if the cache was not given one, from the budget of ``batch`` sequences (at
        the first forward, or when :meth:`compress` makes the cache)."""
        if self.window is None:
            self.window = self.budget_window(batch)

    @property
    def observation(self) -> int | None:
        """Prompt queries (the last ones) weighing the prefill allocation: as given, else the
        method's, else W (None before a window chosen by the budget is set)."""
        return self._observation or self.method.observation or self.window

    def minimum_bytes(self, batch: int) -> int:
        """The smallest budget accepted: the reserve and, in every (sequence, layer, kv-head),
        the pages of the sinks at the dearest tier (or at the sinks' floor, where the method
        chooses their tiers)."""
        pages = -(-self.sinks // self.page_size)
        tier = self.tiers[self.sink_floor_tier if self.method.chosen_sinks else len(self.tiers) - 1]
        sink = pages * (self.page_size * slot_bytes(tier, self.offset_bytes)
                        + PAGE_TABLE_ENTRY.itemsize)
        return self.reserved_bytes(batch) + sink * batch * self.n_layers * self.kv_heads

    # --- attention-side hooks ----------------------------------------------------------------
    def set_padding(self, attention_mask: torch.Tensor | None, batch: int) -> None:
        """Left padding per sequence from the 2-D mask ``[B, length]`` (0 or False at padding);
        none without a mask."""
        if attention_mask is None:
            self.pad = torch.zeros(batch, dtype=torch.long)
            return
        if attention_mask.dim() != 2:
            raise ValueError(f"the sphkv attention reads the 2-D padding mask [batch, length]; "
                             f"got a {attention_mask.dim()}-D mask of shape "
                             f"{tuple(attention_mask.shape)}")
        real = attention_mask.bool().cpu()
        pad = real.int().argmax(dim=-1).long()
        after = torch.arange(real.shape[-1])[None, :] >= pad[:, None]
        if not (real == after).all() or not real.any(dim=-1).all():
            raise ValueError("the attention mask must be left padding only (zeros, then ones, "
                             "each sequence with at least one real token)")
        self.pad = pad

    def pages(self, layer: int, batch: int, heads: int):
        """Per non-empty tier of ``layer``: ``(tier index, slots, valid, positions)``, each
        ``[B, H_kv, n]`` padded to the longest run: the pool's slots (padding repeats slot 0,
        :meth:`~sphkv.rdr.pages.PagedStore.codes` reads them), ``valid`` bool and ``positions``
        int64 (on the CPU, -1 at padding)."""
        store = self.store
        if store is None:
            return
        # every group's runs, built once per store write (one pass per tier) and sliced here
        if self._tables is None or self._tables[0] != store.version:
            self._tables = (store.version, {t: store.block_tables(t, positions=True)
                                            for t in store.pools})
        groups = np.array([self.group(b, layer, h) for b in range(batch) for h in range(heads)])
        rows, p = torch.from_numpy(groups).to(store.device), store.page_size
        for t, runs in self._tables[1].items():
            n = int(store.counts[groups, t].max(initial=0))
            if not n:
                continue
            lengths = runs.lengths[rows]
            slots = (runs.pages[rows, :-(-n // p)].long()[..., None] * p
                     + torch.arange(p, device=store.device)).flatten(1)[:, :n]
            valid = torch.arange(n, device=store.device) < lengths[:, None]
            positions = runs.positions[rows, :n].cpu().masked_fill(~valid.cpu(), -1)
            shape = (batch, heads, n)
            yield (t, slots.masked_fill(~valid, 0).view(shape), valid.view(shape),
                   positions.view(shape))

    def decode_pages(self, batch: int, heads: int) -> None:
        """Every layer's pages decoded (:meth:`CompressedLayer._decoded_pages`), decoding only
        what the store's writes encoded since each layer's last decode: a token that stayed in
        its tier kept its codes (the store moves codes, it does not re-encode them; a tier
        quantizing keys per page is decoded whole). The new tokens of every layer are decoded
        together, one codec call per tier."""
        store = self.store
        version = store.version if store is not None else -1
        layers = [layer for layer in self.layers
                  if layer._decoded is None or layer._decoded[0] != version]
        # per (layer, tier): its run's identities, its decodes reused, what is left to decode
        jobs = []
        for layer in layers:
            previous = {} if layer._decoded is None else layer._decoded[2]
            group = torch.tensor([[self.group(i, layer.index, j) for j in range(heads)]
                                  for i in range(batch)])
            for t, slots, valid, positions in self.pages(layer.index, batch, heads):
                ident = (group[..., None] << 32 | positions).flatten()  # one int64 per token
                flat = valid.cpu().flatten()
                k_hat = torch.zeros(*ident.shape, store.d, device=valid.device)
                v_hat = torch.zeros_like(k_hat)
                todo = flat.clone()
                if t in previous and not store.pools[t].paged_keys:
                    old_ident, old_row, old_k, old_v = previous[t]
                    at = torch.searchsorted(old_ident, ident).clamp(
                        max=max(len(old_ident) - 1, 0))
                    hit = flat & (old_ident[at] == ident) if len(old_ident) else flat & False
                    on, rows = hit.to(k_hat.device), old_row[at[hit].to(k_hat.device)]
                    k_hat[on], v_hat[on] = old_k[rows], old_v[rows]
                    todo &= ~hit
                jobs.append((layer, t, slots, valid, positions, ident, flat, k_hat, v_hat,
                             todo.to(k_hat.device)))
        # the new tokens of every layer, decoded together per tier in calls of about
        # _DECODE_ROWS vectors (the prefill's first decode has every token: its temporaries
        # stay small)
        for t in {job[1] for job in jobs}:
            mine = [(job, int(job[9].sum())) for job in jobs if job[1] == t]
            while mine:
                take, rows = [], 0
                while mine and (not take or rows + mine[0][1] <= _DECODE_ROWS):
                    take.append(mine.pop(0))
                    rows += take[-1][1]
                take = [(job, n) for job, n in take if n]
                if not take:
                    continue
                key, value = store.codes(
                    t, torch.cat([job[2].flatten()[job[9]] for job, _ in take]))
                tier, sizes = self.tiers[t], [n for _, n in take]
                for (job, _), k, v in zip(take, tier.key.decode(key).float().split(sizes),
                                          tier.value.decode(value).float().split(sizes),
                                          strict=True):
                    job[7][job[9]], job[8][job[9]] = k, v
        # each layer's tiers side by side, and what it keeps for the next decode
        for layer in layers:
            runs, kept = [], {}
            for _, t, _, valid, positions, ident, flat, k_hat, v_hat, _ in (
                    job for job in jobs if job[0] is layer):
                # the kept tokens' identities sorted, with their rows of k̂ and v̂
                order = torch.argsort(torch.where(flat, ident, torch.iinfo(torch.int64).max))
                keep = order[:int(flat.sum())]
                kept[t] = (ident[keep], keep.to(k_hat.device), k_hat, v_hat)
                shape = (*valid.shape, -1)
                runs.append((k_hat.view(shape), v_hat.view(shape), valid, positions))
            merged = None
            if runs:
                keys, values, valid, positions = (torch.cat(x, dim=2) for x in zip(*runs))
                bias = torch.zeros(valid.shape).masked_fill_(~valid.cpu(), -math.inf)
                merged = (keys, values, bias.to(keys.device)[:, :, None, None], positions)
            layer._decoded = (version, merged, kept)

    def pad_on(self, device: torch.device) -> torch.Tensor:
        """The left padding per sequence ``[B]`` on ``device`` (copied there once)."""
        if self._pad_device is None or self._pad_device.device != torch.device(device):
            self._pad_device = self.pad.to(device)
        return self._pad_device

    def observe(self, layer: int, query: torch.Tensor) -> None:
        """Keep the layer's last queries (every prefill query for a deferred cache or an
        estimator that reads them all); after the last layer, run a step."""
        if self.static is not None:
            self.static.queries[layer].index_copy_(2, self.static.query_at, query.detach().float())
            self.keep_static_queries(layer, self.static)
            if layer == self.n_layers - 1:
                self._step()
            return
        prev = self._queries.get(layer)
        keep_all = self.allocator is None and (self.budget is None or self.method.all_queries)
        keep = self._kept_queries(query.shape[2])
        q = query.detach()
        if not keep_all:
            # sliced before the copy: a view of the whole prefill's queries would hold them all
            q = q[:, :, -keep:]
        q = q.to(torch.float32, copy=True)
        q = q if prev is None else torch.cat([prev, q], dim=2)
        self._queries[layer] = q if keep_all else q[:, :, -keep:]
        if layer == self.n_layers - 1 and self.budget is not None:
            self._step()

    def keep_static_queries(self, layer: int, static) -> None:
        """The layer's kept queries after a step whose query went to ``static``'s buffers
        (:class:`~sphkv.integrations.hf.graph.StaticStep`)."""
        end = static.count + 1
        self._queries[layer] = static.queries[layer][:, :, max(end - self._kept_queries(), 0):end]

    def _kept_queries(self, new: int = 1) -> int:
        """Queries the next allocator step reads after a forward of ``new`` tokens: the
        prefill's observation (and the window); then an admission's, those of the window's 2W
        positions at most, or, after a forward of more tokens than that (a prompt fed in
        chunks), the observation, as for the prefill; a recalling method's, always the
        observation (its revisions read it) and the window's."""
        if self.method.recall:  # a revision reads the observation
            return max(2 * self.window, self.observation)
        if self.allocator is not None and new <= 2 * self.window:
            return 2 * self.window
        return max(2 * self.window, self.observation)

    def compress(self, method: Method | str, budget: float) -> SphkvCache:
        """A copy of this deferred cache (``budget=None``, after its prefill) compressed by
        ``method`` within ``budget`` bytes, as if it had been that method's cache all along.
        The windows are shared until a cache trims or writes one: it then moves the window to
        buffers of its own, so neither cache writes into the other's."""
        if self.budget is not None or self.allocator is not None:
            raise ValueError("compress() copies a deferred cache (budget=None) after its "
                             "prefill; this cache already has a budget")
        if self.pad is None:
            raise ValueError("compress() needs the prefill to have run through the cache")
        out = SphkvCache(self.config, budget, method, window=self._window, sinks=self.sinks,
                         page_size=self.page_size, decay=self.decay,
                         observation=self._observation, offset_bytes=self.offset_bytes,
                         head_weights=self.head_weights)
        for mine, theirs in zip(self.layers, out.layers, strict=True):
            theirs.keys, theirs.values, theirs.length = mine.keys, mine.values, mine.length
            theirs.is_initialized = True
            mine.buffer = None  # this cache too copies the shared window before writing
        out.pad = self.pad
        out.choose_window(self.pad.shape[0])
        if self._prefill_items is None:
            self._prefill_items = {}
        out._prefill_items = self._prefill_items
        out._queries = {i: q if out.method.all_queries else q[:, :, -out._kept_queries():]
                        for i, q in self._queries.items()}
        out._step()
        return out

    # --- steps -------------------------------------------------------------------------------
    def group(self, b: int, layer: int, h: int) -> int:
        """The page table of (sequence b, layer, kv-head h)."""
        return (b * self.n_layers + layer) * self.kv_heads + h

    @property
    def length(self) -> int:
        return self.layers[0].length

    def _step(self) -> None:
        if self.allocator is None:
            self._timed("prefill", self._start)
        while self.length - self.admitted >= 2 * self.window:
            self._timed("admit", self._admit)
        if self.method.recall and self.length - self._revised >= self.method.recall:
            self._timed("revise", self._revise)
        self.history.append(self.nbytes())
        if self.history[-1] > self.budget:
            raise RuntimeError(f"cache holds {self.history[-1]} bytes, above the budget of "
                               f"{self.budget:.0f}; this is a bug")

    def writes_after(self, new: int = 1) -> bool:
        """Whether the allocator writes after ``new`` more tokens: an admission, or a
        recalling method's revision."""
        length = self.length + new
        return (length - self.admitted >= 2 * self.window
                or 0 < self.method.recall <= length - self._revised)

    def _timed(self, kind: str, step) -> None:
        """Run an allocator step and add ``(kind, seconds)`` to :attr:`timings` (the device
        synchronized before and after: its work is counted, not just its launches)."""
        device = self.layers[0].keys.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.timings.append((kind, time.perf_counter() - start))

    def _start(self) -> None:
        """After the first forward: reserve, check the budget, place the prompt's old tokens."""
        first = self.layers[0]
        batch = first.keys.shape[0]
        reserve = self.reserved_bytes(batch)
        if self.budget < self.minimum_bytes(batch):
            raise InfeasibleBudgetError(self.budget, self.minimum_bytes(batch))
        # a sliding or chunked layer's kernel path bounds its runs by position
        sliding = np.array([not layer.attention.is_full for layer in self.layers])
        self.allocator = OnlineAllocator(
            self.tiers, batch * self.n_layers * self.kv_heads, self.budget - reserve,
            self.page_size, self.decay, device=first.keys.device, encode=_encode,
            ordered=np.tile(np.repeat(sliding, self.kv_heads), batch),
            offset_bytes=self.offset_bytes)
        if self.method.centred:
            for index, layer in enumerate(self.layers):
                pos = layer.start + torch.arange(layer.keys.shape[2])
                queries = self._queries[index]
                layer.centre(pos[None, :] >= self.pad[:, None],
                             queries if self.method.scaled else None)
                self._queries[index] = layer.stored_query(queries)
        old = self.length - self.window
        tokens = None
        if old > 0:
            shared, key = self._prefill_items, (repr(self.method), self.window)
            tokens = None if shared is None else shared.get(key)
            if tokens is None:
                tokens = self._tokens(0, old)
                if shared is not None:
                    shared[key] = tokens
            self.admitted = old
        # the old tokens leave the windows (the allocator holds them) before any write
        for layer in self.layers:
            if self.method.recall:
                layer.keep_on_host(self.admitted)
            layer.trim(self.admitted)
            if not layer.attention.is_full:
                layer.trim(int(layer.first_visible(torch.tensor([self.length])).min()))
        if tokens is not None:
            try:
                self._record(lambda: self.allocator.prefill(tokens))
            except InfeasibleBudgetError as exc:
                raise InfeasibleBudgetError(self.budget, exc.min_cost + reserve) from None
        self._queries = {i: q[:, :, -self._kept_queries():] for i, q in self._queries.items()}
        self._revised = self.length

    def _admit(self) -> None:
        """Evict what fell out of view, then admit every position but the window's newest W:
        the W oldest at a decode step; after a forward of many tokens (a prompt fed in chunks,
        a question) all of them in one admission."""
        end = self.length - self.window
        if not all(a.is_full for a in self.layout):
            self._record(lambda: self.allocator.evict(self._first_kept()))
        tokens = Tokens.cat(self._tokens(self.admitted, end))
        self.admitted = end
        for layer in self.layers:
            if self.method.recall:
                layer.keep_on_host(end)
            layer.trim(end)
        self._record(lambda: self.allocator.admit(tokens))

    def _revise(self) -> None:
        """Solve the allocation again over every token that left the window, its distortion
        rows weighed by the last ``observation`` queries, from the host copy
        (:meth:`~sphkv.rdr.online.OnlineAllocator.revise`): dropped tokens may come back and
        compressed ones rise, encoded from their fp16 vectors."""
        held = {layer.index: layer.seen() for layer in self.layers}
        self._record(lambda: self.allocator.revise(self._tokens(0, self.admitted, held)))
        self._revised = self.length
        # a token may be back in a tier it left since the last decode, with other codes: the
        # pages are decoded afresh (decode_pages reuses a token's decode while its tier holds it)
        for layer in self.layers:
            layer._decoded = None

    def _record(self, write) -> None:
        """Run an allocator step; add the cache's bytes after each of its pool writes to
        :attr:`history` (the windows are as they were during it)."""
        done = len(self.allocator.writes)
        write()
        rest = self.nbytes() - self.store.nbytes()
        self.history.extend(w + rest for w in self.allocator.writes[done:])

    def _first_kept(self) -> np.ndarray:
        """``[groups]``: each group's lowest position the next query sees."""
        batch = self.pad.shape[0]
        nxt = torch.tensor([self.length])
        first = torch.stack([layer.first_visible(nxt)[:, 0] for layer in self.layers], dim=1)
        # [B, L] → [B, L, H] in group order
        return first[:, :, None].expand(batch, self.n_layers, self.kv_heads).reshape(-1).numpy()

    def _tokens(self, lo: int, hi: int, held: dict | None = None) -> list[Tokens]:
        """The allocator's items for positions ``lo … hi-1`` of every (sequence, layer, kv-head):
        real tokens the next query can still see, with the method's distortion rows, measured
        with the layer's attention pattern over the window's tokens (or over ``held[layer]``,
        ``(keys, values, first position)`` as :meth:`CompressedLayer.seen` gives them: their
        rows computed on the queries' device, a call at a time, the items' vectors views of
        the host buffers, which must stay unchanged until the items are read). Sequences with
        the same left padding see the same positions: each layer's are one job, their heads
        stacked (sequence-major); jobs whose inputs have the same shapes and pattern are
        computed in one call. One part per job, holding the job's copy of its keys and values
        (a prefill's parts are not concatenated: at 128k tokens each copy of the prompt's KV
        is tens of GB), or its views of the host copy's."""
        # (layer, sequences, kept positions, their rows, k, v, q, first, q_all, value mean)
        jobs = []
        nxt = torch.tensor([self.length])
        for index, layer in enumerate(self.layers):
            keys, values, start = (held[index] if held is not None
                                   else (layer.keys, layer.values, layer.start))
            pos = start + torch.arange(keys.shape[-2])
            queries = self._queries[index]
            kept_from = layer.first_visible(nxt)[:, 0]
            for pad in torch.unique(self.pad).tolist():
                seqs = torch.nonzero(self.pad == pad).flatten()
                b = int(seqs[0])
                q_all = queries[b]
                # queries of real positions only (padding queries see nothing)
                real = min(q_all.shape[1], self.length - pad)
                q = q_all[:, -real:][:, -self.observation:]
                q_pos = self.length - q.shape[1] + torch.arange(q.shape[1])
                q_first = layer.first_visible(q_pos)[b]
                # the keys any of these queries sees in the window, and the queries whose
                # positions are among those keys'
                base = max(int(q_first.min()), pad, start)
                n_q = self.length - base
                sel = pos >= base
                p = pos[sel]
                take = (p >= lo) & (p < hi) & (p >= kept_from[b])
                if not take.any():
                    continue
                on = slice(int((~sel).sum()), None)  # positions increase: a suffix
                first = None if layer.attention.is_full else (q_first[-n_q:] - base).clamp_min(0)
                # sequences per job: the pairs of one call at most (below)
                pairs = queries.shape[1] * min(q.shape[1], n_q) * len(p)
                for chunk in seqs.split(max(1, _pairs_per_call(queries.device)
                                            // max(pairs, 1))):
                    k, v = (_rows(x, chunk)[:, :, on].flatten(0, 1) for x in (keys, values))
                    q_seq = queries[chunk.to(queries.device)][:, :, -real:]
                    mean = (None if layer.mean is None else
                            layer.mean[1][chunk.to(queries.device)].flatten(0, 1)[:, 0].float())
                    jobs.append((index, chunk.numpy(), p[take], take.numpy(), k, v,
                                 q_seq[:, :, -self.observation:][:, :, -n_q:].flatten(0, 1),
                                 first, q_seq[:, :, -n_q:].flatten(0, 1), mean))
        rows = self._distortion_rows(jobs)
        parts = []
        for i, d in enumerate(rows):
            index, seqs, p, take, k, v, *_ = jobs[i]
            jobs[i] = None  # its vectors live on in its part only
            h = self.kv_heads
            if not take.all():  # positions increase: a range
                on = np.flatnonzero(take)
                k, v, d = (x[:, on[0]:on[-1] + 1] for x in (k, v, d))
            sink = np.tile((p - self.pad[seqs[0]] < self.sinks).numpy(), len(seqs) * h)
            d = d.reshape(-1, d.shape[-1])
            if self.method.chosen_sinks:  # the floor tier or a dearer one
                if sink.any():
                    d[sink, :self.sink_floor_tier] = NO_DROP_PENALTY * max(d[:, 1:].max(), 1e-30)
                forced = np.full(len(sink), -1)
            else:
                forced = np.where(sink, len(self.tiers) - 1, -1)
            parts.append(Tokens(
                group=np.repeat([self.group(b, index, j) for b in seqs for j in range(h)],
                                len(p)),
                positions=p.repeat(len(seqs) * h),  # as the rows of k [B_job · H, n, d]
                keys=k if held is not None else _flat_copy(k),
                values=v if held is not None else _flat_copy(v),
                distortion=d, forced=forced))
        if not parts:
            d = self.head_dim
            empty = torch.zeros(0, d, dtype=torch.float16,
                                device=(held[0][0] if held else self.layers[0].keys).device)
            return [Tokens(np.zeros(0, np.int64), torch.zeros(0, dtype=torch.long), empty,
                           empty, np.zeros((0, len(self.tiers))))]
        return parts

    def _distortion_rows(self, jobs: list[tuple]) -> list[np.ndarray]:
        """The method's rows ``[B_job · H_kv, n, T]`` of each job: jobs with equal shapes and
        pattern stacked along the heads and computed in one call, each (layer, sequence)
        relative to itself."""
        buckets: dict[tuple, list[int]] = {}
        for i, (_, seqs, _, _, k, _v, q, first, q_all, _mean) in enumerate(jobs):
            key = (k.shape, q.shape, q_all.shape, len(seqs),
                   None if first is None else tuple(first.tolist()))
            buckets.setdefault(key, []).append(i)
        rows: list[np.ndarray | None] = [None] * len(jobs)
        chunks = []
        for key, members in buckets.items():
            # at most _DISTORTION_PAIRS (query, token) pairs per call: stacking spares launches
            # and calls where layers are small (admissions); a prefill's layer is one call
            n, (hq, w, _) = key[0][1], key[1]
            per_call = max(1, _pairs_per_call(jobs[members[0]][6].device) // max(hq * w * n, 1))
            chunks += [members[i:i + per_call] for i in range(0, len(members), per_call)]
        for members in chunks:
            k, v, q, first, q_all, mean = (
                [jobs[i][j] for i in members] for j in range(4, 10))
            # each job's query heads, sequence-major as its queries
            weights = (torch.cat([self.head_weights[jobs[i][0]].repeat(len(jobs[i][1]))
                                  for i in members]) if self.method.sensitive else None)
            device = q[0].device
            k, v = (_upload(x[0], device) if len(x) == 1
                    else torch.cat([_upload(y, device) for y in x]) for x in (k, v))
            d = self.method.distortion(
                k.float(), v.float(),
                torch.cat(q), self.tiers,
                first=first[0],
                score_queries=torch.cat(q_all) if self.method.all_queries else None,
                blocks=sum(len(jobs[i][1]) for i in members), head_weights=weights,
                value_mean=None if mean[0] is None else torch.cat(mean))
            for i, part in zip(members, np.split(d, len(members)), strict=True):
                rows[i] = part
        return rows


def _flat_copy(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[..., d]`` as ``[n, d]`` in memory of its own: a part's vectors must outlive the
    window (trimmed in place) and the host buffers they were read from."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        return flat.clone()
    return flat


def _upload(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``, in one copy of the memory span it covers where it is a strided
    view on the host (a layer's tokens in the host buffers, whose rows are apart by the
    buffers' capacity): the copy engine reads pinned memory as it lies, where ``.to`` would
    first gather the view into pageable memory on the CPU."""
    if x.device == device or x.is_contiguous() or not x.is_pinned():
        return x.to(device, non_blocking=True)
    span = 1 + sum((n - 1) * st for n, st in zip(x.shape, x.stride(), strict=True))
    flat = torch.empty(0, dtype=x.dtype).set_(x.untyped_storage(), x.storage_offset(), (span,))
    return flat.to(device, non_blocking=True).as_strided(x.shape, x.stride())


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` (int64 ``index``, increasing): a view where the indices are a range."""
    first, last = int(index[0]), int(index[-1])
    if last - first + 1 == len(index):
        return x[first:last + 1]
    return x[index.to(x.device)]


def _head_weights(weights, text_config, method: Method) -> torch.Tensor | None:
    """``weights`` as float32 ``[layers, query heads]``, checked; None where none are given
    (refused for a ``sensitive`` method)."""
    if weights is None:
        if method.sensitive:
            raise ValueError(f"method {method.name!r} weighs heads by their sensitivity: pass "
                             "head_weights=head_sensitivity(model, ids) "
                             "(sphkv.integrations.hf.sensitivity)")
        return None
    weights = torch.as_tensor(weights, dtype=torch.float32).cpu()
    shape = (text_config.num_hidden_layers, text_config.num_attention_heads)
    if tuple(weights.shape) != shape:
        raise ValueError(f"head_weights must have shape [layers, query heads] = {list(shape)}, "
                         f"got {list(weights.shape)}")
    if not (torch.isfinite(weights).all() and (weights > 0).all()):
        raise ValueError("head_weights must be finite and > 0")
    return weights


def _encode(codec: Codec, x: torch.Tensor) -> Codes:
    """``codec.encode`` of the vectors ``x [n, d]`` where they are: on a GPU by the Triton
    kernel (:func:`~sphkv.kernels.encode_pack.encode_codes`) where the codec has one, else by
    the codec's torch code on that device."""
    if x.is_cuda and isinstance(codec, KERNEL_CODECS):
        return encode_codes(x, codec)
    return codec.encode(x.float())


# keyword arguments of a model's attention call that change what attention computes
_REFUSED = ("softcap", "s_aux", "sinks")


def sphkv_attention(module, query: torch.Tensor, key, value, attention_mask, scaling=None,
                    dropout: float = 0.0, sliding_window: int | None = None, **kwargs):
    """Attention from the compressed cache's handles (``AttentionInterface`` signature).

    Parameters
    ----------
    module : torch.nn.Module
        The attention module (``layer_idx``).
    query : torch.Tensor
        ``[B, H_q, m, d]`` after RoPE.
    key, value : CompressedLayer
        The handles :meth:`CompressedLayer.update` returned.
    attention_mask : torch.Tensor, optional
        The 2-D padding mask ``[B, length]``; read at the first forward.
    sliding_window : int, optional
        The window the model passes for a sliding layer; it must match the config's.

    Returns
    -------
    tuple
        ``(out [B, m, H_q, d], None)``.
    """
    if not isinstance(key, CompressedLayer):
        raise TypeError("the sphkv attention reads a SphkvCache: pass SphkvCache(...) as the "
                        "model's cache and use_cache=True")
    refused = [k for k in _REFUSED if kwargs.get(k) is not None]
    if refused:
        raise ValueError(f"the model's attention passes {', '.join(refused)}; the sphkv cache "
                         f"computes plain softmax attention and does not support it")
    expected = key.attention.size if key.attention.kind == "sliding" else None
    if sliding_window is not None and sliding_window != expected:
        raise ValueError(f"layer {key.index} attends with sliding_window={sliding_window}, but "
                         f"its config gives {key.attention}; the cache would mask it wrongly")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    query = key.stored_query(query)
    out = key.attend(query, attention_mask, scaling)
    key.cache.observe(key.index, query)
    return out, None


def _padding_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """The mask transformers hands the sphkv attention: the 2-D padding mask, unchanged (the
    attention applies causality and each layer's layout itself)."""
    return attention_mask


def register_attention() -> str:
    """Register :func:`sphkv_attention` and its mask function as ``"sphkv"``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, sphkv_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _padding_mask)
    return ATTENTION_NAME
