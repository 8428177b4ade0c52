"""Paged decode attention in plain torch: the definition the Triton kernel is checked against.

One new query token per sequence attends to the first ``lengths[b]`` tokens of its cache. Token
``n`` of sequence ``b`` sits in slot ``n % P`` of page ``block_table[b, n // P]``. Query head
``h`` reads kv head ``h // G`` with ``G = Hq / Hkv`` (grouped-query attention, the order of
``torch.repeat_interleave`` and of SDPA's ``enable_gqa``).
"""

from __future__ import annotations

import math

import torch

__all__ = ["paged_decode_naive"]


def paged_decode_naive(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                       block_table: torch.Tensor, lengths: torch.Tensor,
                       scale: float | None = None) -> torch.Tensor:
    """softmax(q·Kᵀ·scale)·V per sequence over its paged cache, computed in float32.

    Parameters
    ----------
    q : [B, Hq, D]
    k_pages, v_pages : [num_pages, P, Hkv, D]
    block_table : [B, max_pages] int, page ids in token order
    lengths : [B] int, 1 ≤ lengths[b] ≤ max_pages · P
    scale : logit scale, default 1/√D

    Returns
    -------
    [B, Hq, D] in the dtype of ``q``.
    """
    B, Hq, D = q.shape
    P, Hkv = k_pages.shape[1], k_pages.shape[2]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.empty_like(q)
    for b in range(B):
        n = int(lengths[b])
        pages = block_table[b, :(n + P - 1) // P].long()
        # [pages, P, Hkv, D] -> [n, Hkv, D] -> [Hq, n, D] (kv head h // G for query head h)
        k = k_pages[pages].flatten(0, 1)[:n].float().transpose(0, 1)
        v = v_pages[pages].flatten(0, 1)[:n].float().transpose(0, 1)
        k = k.repeat_interleave(group, dim=0)
        v = v.repeat_interleave(group, dim=0)
        logits = torch.einsum("hd,hnd->hn", q[b].float(), k) * scale
        out[b] = torch.einsum("hn,hnd->hd", logits.softmax(-1), v).to(q.dtype)
    return out
