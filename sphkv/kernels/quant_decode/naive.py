"""Decode attention over pages of one TurboQuant tier, in plain torch: the definition.

The pool of the tier holds flat rows ``page · P + slot`` (as :class:`sphkv.rdr.PagedStore` lays
them out): key and value payloads ``[num_pages, P, bytes]`` and fp16 norms ``[num_pages, P]``.
A page table per (sequence, kv head) lists its pages in token order; ``lengths[b, h]`` tokens
are kept. Keys and values are the tier's codecs' ``decode`` of those rows, and attention is
``softmax(q·K̂ᵀ·scale)·V̂`` with query head ``h`` reading kv head ``h // G``.
"""

from __future__ import annotations

import math

import torch

from sphkv.codec import Codec, Codes

__all__ = ["quant_decode_naive"]


def quant_decode_naive(q: torch.Tensor, k_payload: torch.Tensor, k_norm: torch.Tensor,
                       v_payload: torch.Tensor, v_norm: torch.Tensor, block_table: torch.Tensor,
                       lengths: torch.Tensor, key_codec: Codec, value_codec: Codec,
                       scale: float | None = None) -> torch.Tensor:
    """Attention of one query token per sequence over decoded keys and values, in float32.

    Parameters
    ----------
    q : [B, Hq, D]
    k_payload, v_payload : [num_pages, P, bytes] uint8, the codecs' packed codes
    k_norm, v_norm : [num_pages, P] fp16, the codecs' ``norm`` side information
    block_table : [B, Hkv, max_pages] int, page ids in token order per (sequence, kv head)
    lengths : [B, Hkv] int, 1 ≤ lengths[b, h] ≤ max_pages · P
    key_codec, value_codec : the codecs that wrote the keys and the values
    scale : logit scale, default 1/√D

    Returns
    -------
    [B, Hq, D] in the dtype of ``q``.
    """
    B, Hq, D = q.shape
    P, Hkv = k_payload.shape[1], block_table.shape[1]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.empty_like(q)
    for b in range(B):
        for h in range(Hkv):
            n = int(lengths[b, h])
            pages = block_table[b, h, :(n + P - 1) // P].long()
            rows = (pages[:, None] * P + torch.arange(P, device=q.device)).flatten()[:n]
            key = Codes(k_payload.flatten(0, 1)[rows], {"norm": k_norm.flatten()[rows]},
                        torch.Size((n, D)))
            value = Codes(v_payload.flatten(0, 1)[rows], {"norm": v_norm.flatten()[rows]},
                          torch.Size((n, D)))
            k, v = key_codec.decode(key), value_codec.decode(value)  # [n, D] each
            heads = slice(h * group, (h + 1) * group)
            logits = q[b, heads].float() @ k.T * scale
            out[b, heads] = (logits.softmax(-1) @ v).to(q.dtype)
    return out
