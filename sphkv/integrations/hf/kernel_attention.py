"""The compressed cache's attention through the Triton kernels (the GPU path).

:func:`kernel_attend` computes what :meth:`CompressedLayer.attend` computes — attention of the
new queries over the layer's pages (every tier, from the codes) and its fp16 window, with GQA,
causality, left padding and the layer's attention layout — with
:func:`sphkv.kernels.ada_decode` reading the store's pools and page tables directly. A sliding
or chunked layer's hidden tokens are a prefix of each tier's run (its runs are kept sorted by
position), passed as the kernel's per-query lower bounds. The prefill (no pages yet, the whole
prompt in the window) goes through SDPA; more new queries than one launch holds, over pages (a
prompt fed in chunks, a question), through the kernel in blocks of queries. A ladder with a
tier the kernel does not read (:func:`kernel_reads`: KIVI, PolarQuant, FibQuant, int2/int4
scalar) attends in torch on the GPU instead.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from sphkv.codec import KernelKind
from sphkv.kernels.ada_decode import MAX_ROWS, AdaDecodePlan, TierPages, Window

__all__ = ["kernel_attend", "kernel_reads", "layer_pages"]


def kernel_reads(tiers) -> bool:
    """Whether :func:`sphkv.kernels.ada_decode` reads every non-drop tier of ``tiers``: keys
    fp16, int8, TurboQuant or ADA; values fp16, int8 or TurboQuant."""
    keys = {KernelKind.FP16, KernelKind.INT8, KernelKind.TURBO, KernelKind.ADA}
    values = keys - {KernelKind.ADA}
    return all(t.key.KERNEL in keys and t.value.KERNEL in values for t in tiers if not t.is_drop)


def layer_pages(cache, layer, batch: int, heads: int,
                device: torch.device) -> list[tuple[TierPages, torch.Tensor | None]]:
    """The pages of ``layer`` per non-drop tier: the tier's pool and a page table per
    (sequence, kv head), its run in position order (all pages full but the last), with each
    run token's position ``[B, H_kv, n]`` for a sliding or chunked layer (None for a full one).

    Every non-drop tier comes, its runs empty or not (an empty pool as one zeroed page): the
    kernel is compiled for the segments it reads, so a layer's segments stay the ladder's
    whatever the allocation, and one compilation serves every layer and step.

    Built once per write of the store (an admission) and kept on the layer: the steps in
    between reuse the tables, on the device.
    """
    store = cache.store
    version = (store.version, batch, heads, device)
    if layer._runs is not None and layer._runs[0] == version:
        return layer._runs[1]
    # every layer's runs in one pass per tier on the store's device, made by the first layer
    # to need them (groups are (sequence, layer, kv-head) in that order: all of them)
    if cache._runs is None or cache._runs[0] != version:
        sliding = not all(a.is_full for a in cache.layout)
        cache._runs = (version, {t: store.block_tables(t, positions=sliding)
                                 for t in store.pools})
    rows = ((np.arange(batch)[:, None] * cache.n_layers + layer.index) * heads
            + np.arange(heads)).flatten()
    on = torch.from_numpy(rows).to(store.device)
    out = []
    for t, pool in store.pools.items():
        runs = cache._runs[1][t]
        # as wide as the layer's longest run
        width = max(-(-int(store.counts[rows, t].max(initial=0)) // store.page_size), 1)
        tier = store.tiers[t]
        table = runs.pages[on, :width].view(batch, heads, -1).to(device)
        lengths = runs.lengths[on].view(batch, heads).to(device)
        positions = None if layer.attention.is_full else \
            runs.positions[on, :width * store.page_size].view(batch, heads, -1).to(device)
        key, value = (c.to(device) for c in pool.readable())
        out.append((TierPages(tier.key, tier.value, key, value, table, lengths,
                              store.page_size), positions))
    layer._runs = (version, out)
    return out


def kernel_attend(layer, query: torch.Tensor, scaling: float) -> torch.Tensor:
    """:meth:`CompressedLayer.attend` through the kernels.

    A decode step reuses the layer's plan (:class:`~sphkv.kernels.ada_decode.AdaDecodePlan`)
    until the store is written again: the plan reads the window where the layer keeps it (the
    front of buffers of fixed capacity, :attr:`CompressedLayer.buffer`) and the step's
    visibility bounds and window length are written into it in place, so a step between
    admissions does no host work per tier and makes no new tensors but its outputs.

    Parameters
    ----------
    layer : CompressedLayer
        The layer handle (its window ``keys``/``values`` ``[B, H_kv, w, d]`` fp16, its cache's
        store, padding and the layer's attention layout).
    query : torch.Tensor
        ``[B, H_q, m, d]``, the last m positions.
    scaling : float
        Logit scale.

    Returns
    -------
    torch.Tensor
        ``[B, m, H_q, d]`` in the dtype of ``query``.
    """
    b, hq, m, d = query.shape
    h = layer.keys.shape[1]
    cache = layer.cache
    dev = query.device
    # [B, m]: each query's lowest visible position, computed where the queries are
    first = layer.attention.first_visible(
        torch.arange(layer.length - m, layer.length, device=dev)[None, :],
        cache.pad_on(dev)[:, None])
    pages, bounds = [], []
    if cache.store is not None:
        for tier_pages, positions in layer_pages(cache, layer, b, h, dev):
            pages.append(tier_pages)
            # the run tokens each query cannot see are a prefix of its run
            bounds.append(None if positions is None else torch.searchsorted(
                positions, first[:, None, :].expand(b, h, m).contiguous()))
    # window token n is at position start + n
    window_first, n = first - layer.start, layer.keys.shape[2]
    if hq // h * m > MAX_ROWS:
        if pages:
            return _blocks(layer, pages, bounds, query, window_first, scaling).transpose(1, 2)
        return _dense(query, Window(layer.keys.to(dev), layer.values.to(dev), window_first),
                      scaling).transpose(1, 2)
    plan = _decode_plan(layer, pages, bounds, query)
    # a step captured in a CUDA graph reads the window's length from the device
    plan.set_bounds(bounds, window_first, n if cache.static is None else cache.static.window_length)
    return plan.run(query, scaling).transpose(1, 2)


def _decode_plan(layer, pages: list[TierPages], bounds: list,
                 query: torch.Tensor) -> AdaDecodePlan:
    """The layer's plan over its pages and its window's buffers (the window is the front of
    them), made again only when the store was written, the buffers moved or the query's shape
    changed."""
    b, hq, m, d = query.shape
    keys, values = layer.buffer
    key = (layer.cache.store.version if layer.cache.store is not None else -1, query.shape,
           query.device, keys.data_ptr(), keys.shape)
    if layer._plan is not None and layer._plan[0] == key:
        return layer._plan[1]
    window = Window(keys, values, torch.zeros(b, dtype=torch.int32, device=query.device),
                    length=layer.keys.shape[2])
    # tiers with bounds are planned with them (set_bounds writes the step's)
    pages = [p if f is None else dataclasses.replace(p, first=torch.zeros_like(f))
             for p, f in zip(pages, bounds, strict=True)]
    layer._plan = (key, AdaDecodePlan(pages, window, hq, m, d, device=query.device))
    return layer._plan[1]


def _blocks(layer, pages: list[TierPages], bounds: list, query: torch.Tensor,
            window_first: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of more new queries than one launch holds (a prompt fed after the cache has
    pages: a chunk of a chunked prefill, a question), ``[B, H_q, m, d]``: the kernel over
    blocks of ``MAX_ROWS // G`` queries, each block the last queries of the window cut at its
    end (its queries see the window up to themselves); one plan per block size, each block's
    bounds and window length written into it."""
    b, hq, m, d = query.shape
    h, n = layer.keys.shape[1], layer.keys.shape[2]
    rows = MAX_ROWS // (hq // h)
    window = Window(layer.keys, layer.values,
                    torch.zeros(b, dtype=torch.int32, device=query.device), length=n)
    out, plans = torch.empty_like(query), {}
    for lo in range(0, m, rows):
        hi = min(lo + rows, m)
        if hi - lo not in plans:
            planned = [p if f is None else dataclasses.replace(p, first=f[:, :, lo:hi])
                       for p, f in zip(pages, bounds, strict=True)]
            plans[hi - lo] = AdaDecodePlan(planned, window, hq, hi - lo, d, device=query.device)
        plan = plans[hi - lo]
        plan.set_bounds([None if f is None else f[:, :, lo:hi] for f in bounds],
                        window_first[:, lo:hi], n - m + hi)
        out[:, :, lo:hi] = plan.run(query[:, :, lo:hi].contiguous(), scaling)
    return out


def _dense(query: torch.Tensor, window: Window, scaling: float) -> torch.Tensor:
    """Attention over the window alone (the prefill) by SDPA, ``[B, H_q, m, d]``."""
    m, w = query.shape[2], window.keys.shape[2]
    keys, values = window.keys.to(query.dtype), window.values.to(query.dtype)
    if bool((window.first <= 0).all()) and m == w:
        return F.scaled_dot_product_attention(query, keys, values, is_causal=True,
                                              scale=scaling, enable_gqa=True)
    n = torch.arange(w, device=query.device)
    i = torch.arange(m, device=query.device)
    seen = (n[None, None, :] >= window.first[:, :, None]) & \
        (n[None, None, :] <= w - m + i[None, :, None])
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=seen[:, None],
                                         scale=scaling, enable_gqa=True)
    # a padding query that sees no key gets 0, as in CompressedLayer.attend
    return out.nan_to_num(0.0)
