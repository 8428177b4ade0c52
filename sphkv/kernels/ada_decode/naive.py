"""Decode attention over mixed-tier pages plus the fp16 window, in plain torch: the definition.

The pages of a layer come per tier (:class:`TierPages`): the tier's pool of flat slot rows
``page · P + slot`` (key and value :class:`~sphkv.codec.Codes` as :class:`sphkv.rdr.PagedStore`
holds them) and a page table per (sequence, kv head) listing that tier's pages in order, the
run packed densely (token n of the run is slot ``n % P`` of page ``block_table[b, h, n // P]``).
The window (:class:`Window`) is the dense fp16 recent tokens. Attention is
``softmax(q·K̂ᵀ·scale)·V̂`` over every kept token of every tier and the window's visible tokens,
with K̂, V̂ the tier codecs' ``decode``; query head h reads kv head ``h // G``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sphkv.codec import Codec, Codes

__all__ = ["TierPages", "Window", "ada_decode_naive"]


@dataclass
class TierPages:
    """The pages of one tier for a batch.

    Attributes
    ----------
    key_codec, value_codec : Codec
        The codecs that wrote the key and the value rows (a tier's ``key`` and ``value``).
    key, value : Codes
        Flat codes of the pool's ``[rows]`` slots (payload ``[rows, bytes]``, side ``[rows]``).
    block_table : torch.Tensor
        int32 ``[B, Hkv, max_pages]``: page ids of the tier's run per (sequence, kv head).
    lengths : torch.Tensor
        int32 ``[B, Hkv]``: tokens of the run, ``0 ≤ lengths ≤ max_pages · P``.
    page_size : int
        P.
    first : torch.Tensor or None
        int ``[B, Hkv]`` or ``[B, Hkv, M]``: query position i does not see run tokens
        ``n < first[b, h, i]`` (a sliding window hides a prefix of each run, which is sorted by
        position); None: every run token is seen.
    """

    key_codec: Codec
    value_codec: Codec
    key: Codes
    value: Codes
    block_table: torch.Tensor
    lengths: torch.Tensor
    page_size: int
    first: torch.Tensor | None = None


@dataclass
class Window:
    """The fp16 recent tokens: ``keys``, ``values`` ``[B, Hkv, C, D]``, of which the first
    ``length`` are the window (all C by default); query position i of M (the last M of the
    window) sees window tokens ``first[b, i] ≤ n ≤ length − M + i`` (``first``: int ``[B]``, the
    same bound for every query, or ``[B, M]``; the left padding or a sliding window's start, may
    be ≤ 0). A buffer of fixed capacity C with a ``length`` lets one decode plan serve every
    step (:meth:`~sphkv.kernels.ada_decode.AdaDecodePlan.set_bounds`)."""

    keys: torch.Tensor
    values: torch.Tensor
    first: torch.Tensor
    length: int | None = None

    @property
    def tokens(self) -> int:
        """The window's tokens: ``length``, or the whole capacity."""
        return self.keys.shape[2] if self.length is None else self.length


def row_bounds(first: torch.Tensor, shape: tuple[int, ...], M: int) -> torch.Tensor:
    """A visibility bound ``[*shape]`` or ``[*shape, M]`` as ``[*shape, M]``."""
    return first.unsqueeze(-1).expand(*shape, M) if first.dim() == len(shape) else first


def _run(pages: TierPages, b: int, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded keys and values ``[n, D]`` of the run of (b, h)."""
    n, p = int(pages.lengths[b, h]), pages.page_size
    ids = pages.block_table[b, h, :(n + p - 1) // p].long()
    rows = (ids[:, None] * p + torch.arange(p, device=ids.device)).flatten()[:n]
    return (pages.key_codec.decode(pages.key.rows(rows)),
            pages.value_codec.decode(pages.value.rows(rows)))


def ada_decode_naive(q: torch.Tensor, pages: list[TierPages], window: Window | None,
                     scale: float | None = None) -> torch.Tensor:
    """Attention of M query positions per sequence over mixed-tier pages and the window.

    Parameters
    ----------
    q : [B, Hq, M, D]
    pages : the tiers' pages (any number, any order)
    window : the fp16 recent tokens, or None
    scale : logit scale, default 1/√D

    Returns
    -------
    [B, Hq, M, D] in the dtype of ``q``; a query that sees no token gets 0.
    """
    B, Hq, M, D = q.shape
    Hkv = pages[0].block_table.shape[1] if pages else window.keys.shape[1]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.empty_like(q)
    for b in range(B):
        for h in range(Hkv):
            runs = [_run(p, b, h) for p in pages]
            keys = [k for k, _ in runs]
            values = [v for _, v in runs]
            seen = []
            for p, k in zip(pages, keys, strict=True):
                n = torch.arange(len(k), device=q.device)
                if p.first is None:
                    seen.append(torch.ones(M, len(k), dtype=torch.bool, device=q.device))
                else:
                    lo = row_bounds(p.first, tuple(p.lengths.shape), M)[b, h]
                    seen.append(n[None, :] >= lo[:, None].to(q.device))
            if window is not None:
                w = window.tokens
                n = torch.arange(w, device=q.device)
                i = torch.arange(M, device=q.device)
                lo = row_bounds(window.first, (B,), M)[b].to(q.device)
                seen.append((n[None, :] >= lo[:, None]) & (n[None, :] <= w - M + i[:, None]))
                keys.append(window.keys[b, h, :w].float())
                values.append(window.values[b, h, :w].float())
            k, v, seen = torch.cat(keys), torch.cat(values), torch.cat(seen, dim=1)
            heads = slice(h * group, (h + 1) * group)
            logits = (q[b, heads].float() @ k.T * scale).masked_fill(~seen, -math.inf)
            p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
            out[b, heads] = (p @ v).to(q.dtype)
    return out
