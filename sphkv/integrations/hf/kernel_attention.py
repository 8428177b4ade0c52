"""The compressed cache's attention through the Triton kernels (the GPU path).

:func:`kernel_attend` computes what :meth:`CompressedLayer.attend` computes — attention of the
new queries over the layer's pages (every tier, from the codes) and its fp16 window, with GQA,
causality, left padding and the layer's attention layout — with
:func:`sphkv.kernels.ada_decode` reading the store's pools and page tables directly. A sliding
or chunked layer's hidden tokens are a prefix of each tier's run (runs are sorted by position),
passed as the kernel's per-query lower bounds. The prefill (no pages yet, the whole prompt in the
window) goes through SDPA.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sphkv.kernels.ada_decode import MAX_ROWS, TierPages, Window, ada_decode, ada_decode_naive

__all__ = ["kernel_attend", "layer_pages"]


def layer_pages(cache, layer, batch: int, heads: int, first: torch.Tensor | None,
                device: torch.device) -> list[TierPages]:
    """The pages of ``layer`` per non-empty tier: the tier's pool and a page table per
    (sequence, kv head), its run in position order (all pages full but the last).

    ``first`` (int ``[B, M]``, positions, or None) is each query's lowest visible position; it
    becomes each run's count of hidden tokens ``[B, H_kv, M]``.
    """
    store, p = cache.store, cache.store.page_size
    out = []
    positions: dict[int, dict] = {}  # per group, its kept positions per tier (read once)
    for t, pool in store.pools.items():
        runs = np.empty((batch, heads), dtype=object)
        lengths = np.zeros((batch, heads), dtype=np.int32)
        hidden = None if first is None else torch.zeros(batch, heads, first.shape[1],
                                                        dtype=torch.int32)
        for b in range(batch):
            for h in range(heads):
                group = cache.group(b, layer.index, h)
                table = store.tables[group]
                run = table[table["tier"] == t]
                run = run[np.argsort(run["first_position"], kind="stable")]
                if (run["valid"][:-1] != p).any():
                    raise RuntimeError(f"tier {t} of group ({b}, {layer.index}, {h}) has a "
                                       f"partial page before its last; the kernel reads packed "
                                       f"runs")
                runs[b, h], lengths[b, h] = run["page_id"], run["valid"].sum()
                if hidden is not None and lengths[b, h]:
                    if group not in positions:
                        positions[group] = store.positions(group)
                    hidden[b, h] = torch.searchsorted(positions[group][t], first[b]).int()
        if not lengths.any():
            continue
        table = np.zeros((batch, heads, max(len(r) for r in runs.flat)), dtype=np.int32)
        for (b, h), run in np.ndenumerate(runs):
            table[b, h, :len(run)] = run
        tier = store.tiers[t]
        out.append(TierPages(tier.key, tier.value, pool.key.to(device), pool.value.to(device),
                             torch.from_numpy(table).to(device),
                             torch.from_numpy(lengths).to(device), p,
                             None if hidden is None else hidden.to(device)))
    return out


def kernel_attend(layer, query: torch.Tensor, scaling: float) -> torch.Tensor:
    """:meth:`CompressedLayer.attend` through the kernels.

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
    first = layer.first_visible(layer.length - m + torch.arange(m))  # [B, m] positions
    pages = []
    if cache.store is not None:
        pages = layer_pages(cache, layer, b, h, None if layer.attention.is_full else first, dev)
    # window token n is at position start + n
    window = Window(layer.keys.to(dev), layer.values.to(dev), (first - layer.start).to(dev))
    if hq // h * m <= MAX_ROWS:
        out = ada_decode(query, pages, window, scale=scaling)
    elif pages:
        out = ada_decode_naive(query, pages, window, scale=scaling)
    else:
        out = _dense(query, window, scaling)
    return out.transpose(1, 2)


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
