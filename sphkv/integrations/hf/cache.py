"""A compressed KV cache for Hugging Face generation, driven by the greedy online allocator.

:class:`SphkvCache` is a ``transformers`` :class:`~transformers.Cache` whose layers keep the
recent tokens dense (fp16) in a window and everything older in tier-homogeneous pages
(:class:`sphkv.rdr.pages.PagedStore`). ``update`` appends the new keys and values to the window
and returns the layer itself as a handle; the attention function registered as ``"sphkv"``
(:func:`sphkv_attention`) reads logits straight from the key codes (the codec's ``logits``),
decodes the values, adds the window densely, and handles GQA, causality within the new tokens
and left padding. Positions continue as if nothing were dropped: the cache reports every token
it has seen as its length, so RoPE and masks advance as usual.

The allocator (DESIGN.md §4), with W the observation window:

- **after prefill**, every token but the last W gets a distortion row ``D[i, :]`` from the
  layer's last ``observation`` queries (W unless the method or cache says otherwise; RDR
  reads 256) (:func:`sphkv.rdr.distortion.layer_distortion`, with the method's
  utility estimator), and one greedy solve over all layers, heads and sequences picks its tier
  within the budget (pages and page-table entries counted); its λ is the price of a byte;
- **during decode** new tokens enter the window; when it holds 2W tokens, the oldest W are
  admitted at the current price, ``argmin_t D[i, t] + λ c_t`` (their rows are measured with the
  last W queries over the window's tokens only, so the attention weights are those of the
  window's softmax, larger than over the whole cache); when that overflows the budget,
  a greedy solve over everything kept (tiers may only go down) demotes or drops tokens and
  sets λ to its price; when it does not, λ is lowered by ``decay`` so that later tokens may take
  the room.

Bytes: the pages, their page tables, the window (2W tokens at most, reserved from the budget)
and the per-sequence padding offsets; :meth:`SphkvCache.nbytes` never exceeds the budget after
prefill. During the prefill forward itself the window holds the whole prompt at fp16 (attention
over the prompt needs it); it is compressed before the forward returns.

Every method of :mod:`sphkv.integrations.hf.methods` (a tier ladder restriction plus a utility
estimator) runs through this one code path at equal bytes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from sphkv.codec import Codec, Codes
from sphkv.integrations.hf.kernel_attention import kernel_attend
from sphkv.integrations.hf.methods import METHODS, Method, get_method
from sphkv.kernels.encode_pack import KERNEL_CODECS, encode_codes
from sphkv.rdr.distortion import PAGE_TABLE_ENTRY, layer_distortion
from sphkv.rdr.pages import PagedStore, cat_codes
from sphkv.rdr.problem import AllocationProblem, InfeasibleBudgetError
from sphkv.solvers import solve

__all__ = ["METHODS", "CompressedLayer", "Method", "SphkvCache", "get_method",
           "register_attention", "sphkv_attention"]

ATTENTION_NAME = "sphkv"
# distortion of dropping an item under a method that never drops: dropping happens only when
# nothing else holds the budget (relative to the largest distortion of the same items)
_NO_DROP_PENALTY = 1e6


class CompressedLayer(CacheLayerMixin):
    """One layer of :class:`SphkvCache`: its fp16 window; its pages live in the cache's store.

    Attributes
    ----------
    keys, values : torch.Tensor
        fp16 ``[B, H_kv, w, d]``, the window: tokens at positions ``start … length-1``.
    length : int
        Tokens seen (padding included), kept or not.
    """

    is_sliding = False

    def __init__(self, cache: SphkvCache, index: int):
        super().__init__()
        self.cache, self.index, self.length = cache, index, 0
        self._decoded: tuple[int, list] | None = None

    def lazy_initialization(self, key_states, value_states) -> None:
        b, h, _, d = key_states.shape
        self.keys = torch.zeros(b, h, 0, d, dtype=torch.float16, device=key_states.device)
        self.values = torch.zeros_like(self.keys)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Append the new tokens to the window; return ``(self, self)`` as handles."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states.half()], dim=-2)
        self.values = torch.cat([self.values, value_states.half()], dim=-2)
        self.length += key_states.shape[-2]
        return self, self

    @property
    def start(self) -> int:
        """Position of the window's first token."""
        return self.length - self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("SphkvCache supports greedy and sampled decoding, not beam "
                                  "search: its pages are not reordered per beam")

    def window_bytes(self) -> int:
        return (self.keys.numel() + self.values.numel()) * 2 if self.is_initialized else 0

    def _decoded_pages(self, b: int, h: int) -> list:
        """``(k̂, v̂ [B, H_kv, n, d], valid [B, H_kv, n])`` per non-empty tier of the layer's
        pages, decoded again only after the store changed. ``q·k̂`` equals the logits the key
        codes give, to rounding (:meth:`~sphkv.codec.Codec.logits`); between admissions,
        decoding steps reuse the decoded pages."""
        version = self.cache.store.version if self.cache.store is not None else -1
        if self._decoded is None or self._decoded[0] != version:
            self._decoded = (version, [(tier.key.decode(key), tier.value.decode(value), valid)
                                       for tier, key, value, valid
                                       in self.cache.pages(self.index, b, h)])
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
            ``[B, 1, m, length]`` (bool, or additive float); only read at the first forward,
            for the left padding.

        Returns
        -------
        torch.Tensor
            ``[B, m, H_q, d]``.
        """
        if query.is_cuda:  # the Triton kernels (sphkv.kernels.ada_decode) compute the same
            return kernel_attend(self, query, attention_mask, scaling)
        b, hq, m, d = query.shape
        h = self.keys.shape[1]
        g = hq // h
        cache = self.cache
        if cache.pad is None:
            cache.set_padding(attention_mask, b)
        q = query.float().reshape(b, h, g * m, d)  # the G query heads of a kv-head, head-major
        # window: token at position p is seen by query position t iff pad_b <= p <= t
        pos = self.start + torch.arange(self.keys.shape[-2], device=q.device)
        t = self.length - m + torch.arange(m, device=q.device)
        pad = cache.pad.to(q.device)
        seen = (pos[None, None, :] >= pad[:, None, None]) & (pos[None, None, :]
                                                             <= t[None, :, None])
        pages = self._decoded_pages(b, h)
        if not pages:  # the window alone (a prefill): torch's fused attention
            out = torch.nn.functional.scaled_dot_product_attention(
                query.float(), self.keys.float(), self.values.float(), seen[:, None],
                scale=scaling, enable_gqa=True)
            return out.nan_to_num(0.0).transpose(1, 2).to(query.dtype)
        logits, values = [], []
        for key, value, valid in pages:
            s = (q @ key.mT).view(b, h, g, m, -1)
            logits.append(s.masked_fill(~valid[:, :, None, None], -math.inf))
            values.append(value)
        s = (q @ self.keys.float().mT).view(b, h, g, m, -1)
        logits.append(s.masked_fill(~seen[:, None, None], -math.inf))
        values.append(self.values.float())
        # softmax(q·k/√d); a padding query that sees no key gets weights 0, not NaN
        p = torch.softmax(torch.cat(logits, dim=-1) * scaling, dim=-1).nan_to_num(0.0)
        out = p.view(b, h, g * m, -1) @ torch.cat(values, dim=2)
        return out.view(b, hq, m, d).transpose(1, 2).to(query.dtype)


class SphkvCache(Cache):
    """A KV cache compressed by the greedy online allocator within a byte budget.

    Use with ``model.generate(..., past_key_values=cache)`` on a model whose attention
    implementation is ``"sphkv"`` (:func:`register_attention`); see
    :func:`sphkv.integrations.hf.generate.compressed_generate`.

    Parameters
    ----------
    config : transformers.PretrainedConfig
        The model's config (layers, kv-heads, head dim).
    budget : float or None
        Bytes the cache may hold (pages, page tables, window, padding offsets). None defers
        the allocator: the cache keeps the whole prompt at fp16 and every query, and
        :meth:`compress` makes compressed copies of it — one prefill shared by many methods
        and budgets.
    method : Method or str
        Tier ladder restriction and estimator (:data:`METHODS`).
    window : int
        W: tokens kept dense (between W and 2W), observation queries of each admission, and
        admission chunk.
    observation : int, optional
        Queries (the prompt's last ones) whose attention weighs the distortion of the prefill
        allocation; the method's :attr:`~Method.observation`, else W, by default.
    sinks : int
        The first ``sinks`` tokens of each sequence take the method's dearest tier.
    page_size : int
        Slots per page.
    decay : float
        λ is multiplied by it after an admission that fits.

    Attributes
    ----------
    price : float
        λ, distortion per byte at the margin.
    history : list of int
        :meth:`nbytes` at every step: before and after each admission.
    """

    def __init__(self, config, budget: float | None, method: Method | str = "rdr",
                 window: int = 16, sinks: int = 4, page_size: int = 16, decay: float = 0.8,
                 observation: int | None = None):
        text = config.get_text_config(decoder=True)
        self.n_layers = text.num_hidden_layers
        super().__init__(layers=[CompressedLayer(self, i) for i in range(self.n_layers)])
        if window < 1 or sinks < 0 or page_size < 1 or not 0 < decay <= 1:
            raise ValueError(f"need window >= 1, sinks >= 0, page_size >= 1, 0 < decay <= 1; "
                             f"got {window}, {sinks}, {page_size}, {decay}")
        if observation is not None and observation < 1:
            raise ValueError(f"observation must be >= 1 queries or None, got {observation}")
        self.kv_heads = text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or \
            text.hidden_size // text.num_attention_heads
        self.method = get_method(method) if isinstance(method, str) else method
        self.tiers = self.method.tier_set(self.head_dim, page_size)
        self.estimator = self.method.get_estimator()
        self.config = config
        self.budget = None if budget is None else float(budget)
        self.window, self.sinks = window, sinks
        self._observation = observation  # as given: compress() passes it on
        self.observation = observation or self.method.observation or window
        self.page_size, self.decay = page_size, decay
        self.price = 0.0
        self.history: list[int] = []
        self.store: PagedStore | None = None
        self.pad: torch.Tensor | None = None
        self._queries: dict[int, torch.Tensor] = {}
        # the prefill's distortion rows per method (its repr names every field), shared by the
        # copies :meth:`compress` makes: they do not depend on the budget
        self._prefill_items: dict[str, list] = {}

    # --- accounting --------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Accounted bytes: pages with their page tables, the window, the padding offsets."""
        store = self.store.nbytes() if self.store is not None else 0
        pad = self.pad.numel() * self.pad.element_size() if self.pad is not None else 0
        return store + sum(layer.window_bytes() for layer in self.layers) + pad

    def held_bytes(self) -> int:
        """Bytes of the tensors and page tables the cache really holds."""
        store = self.store.held_bytes() if self.store is not None else 0
        window = sum(t.numel() * t.element_size() for layer in self.layers
                     if layer.is_initialized for t in (layer.keys, layer.values))
        pad = self.pad.numel() * self.pad.element_size() if self.pad is not None else 0
        return store + window + pad

    def fp16_bytes(self) -> int:
        """Bytes of an uncompressed fp16 cache of every token seen."""
        layer = self.layers[0]
        return self.n_layers * layer.keys.shape[0] * self.kv_heads * layer.length \
            * 4 * self.head_dim

    @property
    def peak_bytes(self) -> int:
        return max(self.history, default=0)

    # --- attention-side hooks ----------------------------------------------------------------
    def set_padding(self, attention_mask: torch.Tensor | None, batch: int) -> None:
        """Left padding per sequence from the first forward's mask ``[B, 1, m, m]`` (the last
        query sees every real token); none without a mask."""
        if attention_mask is None:
            self.pad = torch.zeros(batch, dtype=torch.long)
            return
        mask = attention_mask[:, 0, -1]
        seen = mask if mask.dtype == torch.bool else mask == 0
        # on the host, beside the page tables and positions the allocator compares it with
        self.pad = seen.int().argmax(dim=-1).long().cpu()

    def pages(self, layer: int, batch: int, heads: int):
        """Per non-empty tier of ``layer``: ``(tier, key Codes, value Codes, valid)``, codes
        ``[B, H_kv, n]`` padded to the longest run, ``valid`` bool ``[B, H_kv, n]``."""
        if self.store is None:
            return
        groups = [self._group(b, layer, h) for b in range(batch) for h in range(heads)]
        for t in self.store.pools:
            if not any(self.store.count(g, t) for g in groups):
                continue
            key, value, valid = self.store.gather(t, groups)
            shape = (batch, heads, valid.shape[-1])
            yield (self.tiers[t], _reshape(key, shape), _reshape(value, shape),
                   valid.view(shape))

    def observe(self, layer: int, query: torch.Tensor) -> None:
        """Keep the layer's last queries (every prefill query for a deferred cache or an
        estimator that reads them all); after the last layer, run the allocator."""
        prev = self._queries.get(layer)
        q = query.detach().float()
        q = q if prev is None else torch.cat([prev, q], dim=2)
        keep_all = self.store is None and (self.budget is None or self._all_queries())
        self._queries[layer] = q if keep_all else q[:, :, -self._kept_queries():]
        if layer == self.n_layers - 1 and self.budget is not None:
            self._step()

    def _all_queries(self) -> bool:
        return getattr(self.estimator, "all_queries", False)

    def _kept_queries(self) -> int:
        """Queries the prefill allocation reads: the observation and the admissions' window."""
        return max(self.window, self.observation)

    def compress(self, method: Method | str, budget: float) -> SphkvCache:
        """A copy of this deferred cache (``budget=None``, after its prefill) compressed by
        ``method`` within ``budget`` bytes, as if it had been that method's cache all along.
        Tensors are shared: the cache replaces its tensors and never writes into them."""
        if self.budget is not None or self.store is not None:
            raise ValueError("compress() copies a deferred cache (budget=None) after its "
                             "prefill; this cache already has a budget")
        if self.pad is None:
            raise ValueError("compress() needs the prefill to have run through the cache")
        out = SphkvCache(self.config, budget, method, window=self.window, sinks=self.sinks,
                         page_size=self.page_size, decay=self.decay,
                         observation=self._observation)
        for mine, theirs in zip(self.layers, out.layers, strict=True):
            theirs.keys, theirs.values, theirs.length = mine.keys, mine.values, mine.length
            theirs.is_initialized = True
        out.pad = self.pad
        out._prefill_items = self._prefill_items
        out._queries = {i: q if out._all_queries() else q[:, :, -out._kept_queries():]
                        for i, q in self._queries.items()}
        out._step()
        return out

    # --- the allocator -----------------------------------------------------------------------
    def _group(self, b: int, layer: int, h: int) -> int:
        return (b * self.n_layers + layer) * self.kv_heads + h

    def _step(self) -> None:
        first = self.store is None
        if first:
            b = self.layers[0].keys.shape[0]
            self.store = PagedStore(self.tiers, b * self.n_layers * self.kv_heads,
                                    self.page_size, device=self.layers[0].keys.device)
            old = self.layers[0].keys.shape[-2] - self.window
            if old > 0:
                self._prefill(old)
            self._queries = {i: q[:, :, -self.window:] for i, q in self._queries.items()}
        while self.layers[0].keys.shape[-2] >= 2 * self.window:
            self.history.append(self.nbytes())
            self._admit(self.window)
        self.history.append(self.nbytes())
        if self.history[-1] > self.budget:
            raise RuntimeError(f"cache holds {self.history[-1]} bytes, above the budget of "
                               f"{self.budget:.0f}; this is a bug")

    def _reserve(self) -> int:
        """Bytes kept for the window at its largest (2W tokens) and the padding offsets."""
        b = self.layers[0].keys.shape[0]
        return self.n_layers * b * self.kv_heads * 2 * self.window * 4 * self.head_dim \
            + self.pad.numel() * self.pad.element_size()

    def _items(self, n: int):
        """Distortion rows of the window's n oldest real tokens, per (b, layer).

        Yields ``(b, layer, positions [n'], keys, values [H, n', d], D [H, n', T])``; padding
        tokens are left out (they are never kept).
        """
        for layer_idx, layer in enumerate(self.layers):
            pos = layer.start + torch.arange(layer.keys.shape[-2])
            for b in range(layer.keys.shape[0]):
                real = pos >= self.pad[b]
                # the allocator runs on the host (distortion rows, solver); the tokens are
                # encoded where they are (:meth:`_write`)
                k, v = layer.keys[b][:, real], layer.values[b][:, real]
                q_all = self._queries[layer_idx][b].cpu()
                q_all = q_all[:, -min(q_all.shape[1], k.shape[1]):]
                # the prefill's observation; after it only the window's queries are kept
                q = q_all[:, -self.observation:]
                d = layer_distortion(k.float().cpu(), v.float().cpu(), q, self.tiers,
                                     self.estimator, q_all if self._all_queries() else None,
                                     self.method.floor, self.method.relative)
                old = pos[real] < layer.start + n
                if not old.any():
                    continue
                d = d[:, old.numpy()]
                if not self.method.drop:
                    d[..., 0] = _NO_DROP_PENALTY * max(d[..., 1:].max(), 1e-30)
                on = old.to(k.device)
                yield b, layer_idx, pos[real][old], k[:, on], v[:, on], d

    def _sink_tier(self) -> int:
        return len(self.tiers) - 1

    def _is_sink(self, b: int, positions: torch.Tensor) -> torch.Tensor:
        return positions - self.pad[b] < self.sinks

    def _put(self, items: list, tiers: list[np.ndarray]) -> None:
        """Add the items of :meth:`_items` to the store at ``tiers`` (``[H, n]`` each): each
        tier's new keys and values encoded in one call and its pool rewritten once."""
        group, pos, keys, values, dist, tier = [], [], [], [], [], []
        for (b, layer, p, k, v, d), t in zip(items, tiers, strict=True):
            h = k.shape[0]
            group.append(np.repeat([self._group(b, layer, j) for j in range(h)], len(p)))
            pos.append(p.repeat(h))  # head-major, as the rows of k [H, n, d]
            keys.append(k.reshape(-1, k.shape[-1]))
            values.append(v.reshape(-1, v.shape[-1]))
            dist.append(d.reshape(-1, d.shape[-1]))
            tier.append(t.reshape(-1))
        if not items:
            return
        group, pos, tier = np.concatenate(group), torch.cat(pos), np.concatenate(tier)
        keys, values = torch.cat(keys), torch.cat(values)
        dist = torch.from_numpy(np.concatenate(dist))
        for t in self.store.pools:
            sel = tier == t
            if not sel.any():
                continue
            on, host = torch.from_numpy(sel).to(keys.device), torch.from_numpy(sel)
            new = (group[sel], pos[host], self._key_part(t, keys[on]),
                   _encode(self.tiers[t].value, values[on]), dist[host])
            self._replace(t, [self.store.contents(t), new])

    def _replace(self, tier: int, parts: list[tuple]) -> None:
        """Rewrite ``tier``'s pool as the union of ``parts``, each ``(group, positions, key
        Codes, value Codes, distortion)`` as :meth:`PagedStore.contents` returns them."""
        group, pos, key, value, dist = zip(*parts, strict=True)
        if self.store.pools[tier].paged_keys:  # the store encodes whole pages from vectors
            key = torch.cat([k if isinstance(k, torch.Tensor) else self.tiers[tier].key.decode(k)
                             for k in key])
        else:
            key = cat_codes(list(key))
        self.store.replace(tier, np.concatenate(group), torch.cat(pos), key,
                           cat_codes(list(value)),
                           torch.cat([x.to(self.store.device) for x in dist]))

    def _key_part(self, tier: int, keys: torch.Tensor):
        """New keys ``[n, d]`` for :meth:`_replace`: encoded, or as they are for a tier whose
        pages are quantized whole."""
        if self.store.pools[tier].paged_keys:
            return keys
        return _encode(self.tiers[tier].key, keys)

    def _trim(self, n: int) -> None:
        for layer in self.layers:
            layer.keys, layer.values = layer.keys[:, :, n:].clone(), layer.values[:, :, n:].clone()

    def _page_problem(self, d, forced, groups, budget) -> AllocationProblem:
        return AllocationProblem(
            distortion=d, cost=self.store.slot_costs, budget=budget, groups=groups,
            page_size=self.page_size, page_overhead=PAGE_TABLE_ENTRY.itemsize, forced=forced,
            tier_names=self.tiers.names)

    def _prefill(self, n: int) -> None:
        """One greedy solve over the n oldest tokens of every layer, head and sequence."""
        key = repr(self.method)
        if key not in self._prefill_items:
            self._prefill_items[key] = list(self._items(n))
        items = self._prefill_items[key]
        if not items:
            self._trim(n)
            return
        rows, forced, groups = [], [], []
        for b, layer, pos, k, _, d in items:
            h = k.shape[0]
            rows.append(d.reshape(-1, len(self.tiers)))
            sink = np.tile(self._is_sink(b, pos).numpy(), h)
            forced.append(np.where(sink, self._sink_tier(), -1))
            groups.append(np.repeat([self._group(b, layer, j) for j in range(h)], len(pos)))
        page_budget = self.budget - self._reserve()
        try:
            problem = self._page_problem(np.concatenate(rows), np.concatenate(forced),
                                         np.concatenate(groups), max(page_budget, 0.0))
        except InfeasibleBudgetError as exc:
            raise InfeasibleBudgetError(self.budget, exc.min_cost + self._reserve()) from None
        alloc = solve(problem, "greedy")
        self.price = float(alloc.price or 0.0)
        sizes = np.cumsum([k.shape[0] * len(pos) for _, _, pos, k, _, _ in items])[:-1]
        self._put(items, [t.reshape(k.shape[0], -1) for t, (*_, k, _, _) in
                          zip(np.split(alloc.tiers, sizes), items, strict=True)])
        self._trim(n)

    def _admit(self, n: int) -> None:
        """Admit the window's n oldest tokens at price λ; demote when over the budget."""
        # amortized bytes per item: its slot and its share of a page-table entry
        cost = self.store.slot_costs
        cost = np.where(cost > 0, cost + PAGE_TABLE_ENTRY.itemsize / self.page_size, 0.0)
        items = list(self._items(n))
        tiers = []
        for b, _, pos, _, _, d in items:
            tiers.append(np.argmin(d + self.price * cost, axis=-1))
            tiers[-1][:, self._is_sink(b, pos).numpy()] = self._sink_tier()
        self._put(items, tiers)
        self._trim(n)
        page_budget = self.budget - self._reserve()
        if self.store.nbytes() > page_budget:
            self._demote(page_budget)
        else:
            self.price *= self.decay

    def _demote(self, budget: float) -> None:
        """Greedy over every kept item, tiers only going down, within ``budget`` bytes."""
        kept = {t: self.store.contents(t) for t in self.store.pools}
        group = np.concatenate([c[0] for c in kept.values()])
        pos = torch.cat([c[1] for c in kept.values()])
        d = torch.cat([c[4] for c in kept.values()]).double().cpu().numpy()
        cur = np.concatenate([np.full(len(c[0]), t) for t, c in kept.items()])
        # a token's lost precision cannot come back: above its tier it only loses, by a hair,
        # so that no upgrade is ever worth a byte (page repair included)
        above = np.arange(d.shape[1])[None, :] > cur[:, None]
        d_cur = d[np.arange(len(d)), cur][:, None]
        d = np.where(above, d_cur * (1 + 1e-6) + 1e-9 * d.max(initial=0.0), d)
        b = torch.from_numpy(group // (self.n_layers * self.kv_heads))
        sink = (pos - self.pad[b] < self.sinks).numpy()
        alloc = solve(self._page_problem(d, np.where(sink, cur, -1), group, budget), "greedy",
                      repair=False)
        self.price = float(alloc.price or 0.0)
        # each pool: the tokens that stay, then those moved in (decoded from their old tier
        # and encoded at the new one)
        parts: dict[int, list] = {t: [] for t in kept}
        changed = set()
        start = 0
        for t, (g, p, key, value, dist) in kept.items():
            to = alloc.tiers[start:start + len(g)]
            start += len(g)
            if (to == t).all():
                parts[t].append((g, p, key, value, dist))
                continue
            changed.add(t)
            stay, moved = np.flatnonzero(to == t), np.flatnonzero(to != t)
            parts[t].append(_select(g, p, key, value, dist, stay))
            g, p, key, value, dist = _select(g, p, key, value, dist, moved)
            k_hat, v_hat = self.tiers[t].key.decode(key), self.tiers[t].value.decode(value)
            for dest in np.unique(to[moved]):
                if self.tiers[int(dest)].is_drop:
                    continue
                m = np.flatnonzero(to[moved] == dest)
                on = torch.from_numpy(m).to(k_hat.device)
                parts[int(dest)].append((g[m], p[m], self._key_part(int(dest), k_hat[on]),
                                         _encode(self.tiers[int(dest)].value, v_hat[on]),
                                         dist[on]))
                changed.add(int(dest))
        for t in changed:
            self._replace(t, parts[t])


def _encode(codec: Codec, x: torch.Tensor) -> Codes:
    """``codec.encode`` of the vectors ``x [n, d]``: on a GPU by the Triton kernel
    (:func:`~sphkv.kernels.encode_pack.encode_codes`) where the codec has one, else on the
    host (the store copies the codes into its pools)."""
    if x.is_cuda and isinstance(codec, KERNEL_CODECS):
        return encode_codes(x, codec)
    return codec.encode(x.float().cpu())


def _rows(codes: Codes, index: torch.Tensor) -> Codes:
    """The vectors ``index [n]`` of flat codes."""
    return Codes(codes.payload[index], {k: v[index] for k, v in codes.side.items()},
                 torch.Size((len(index), codes.shape[-1])))


def _select(group, positions, key, value, dist, index: np.ndarray) -> tuple:
    """Rows ``index`` of :meth:`PagedStore.contents`'s ``(group, positions, key, value,
    distortion)``."""
    on = torch.from_numpy(index).to(dist.device)
    return (group[index], positions[torch.from_numpy(index)], _rows(key, on), _rows(value, on),
            dist[on])


def _reshape(codes: Codes, shape: tuple[int, int, int]) -> Codes:
    """Codes of ``[N, n]`` vectors viewed as ``[*shape]`` (shape ``(B, H, n)``)."""
    return Codes(codes.payload.reshape(*shape, -1),
                 {k: v.reshape(*shape, *v.shape[2:]) for k, v in codes.side.items()},
                 torch.Size((*shape, codes.shape[-1])))


def sphkv_attention(module, query: torch.Tensor, key, value, attention_mask, scaling=None,
                    dropout: float = 0.0, **kwargs):
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
        ``[B, 1, m, length]``; read at prefill for left padding.

    Returns
    -------
    tuple
        ``(out [B, m, H_q, d], None)``.
    """
    if not isinstance(key, CompressedLayer):
        raise TypeError("the sphkv attention reads a SphkvCache: call the model with "
                        "past_key_values=SphkvCache(...) and use_cache=True")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = key.attend(query, attention_mask, scaling)
    key.cache.observe(key.index, query)
    return out, None


def register_attention() -> str:
    """Register :func:`sphkv_attention` (and SDPA's mask, for left padding) as ``"sphkv"``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, sphkv_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
