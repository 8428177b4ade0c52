"""Dense fp16 paged decode attention in Triton: GQA, split-K over pages, log-sum-exp merge.

Stage 1 (``_kernel``): one program per (sequence, kv head, split). It loads the ``G`` query
heads that share the kv head once, then walks its split's tokens ``BLOCK_N`` at a time — each
token's page from the block table, its K and V rows read once for all ``G`` heads — with the
online softmax (running max ``m``, running sum ``l``, accumulator ``acc``, all in float32, in
base 2). It writes the split's normalized output ``acc / l`` and its log-sum-exp ``m + log2 l``.

Stage 2 (:mod:`sphkv.kernels.split_k`): one program per (sequence, query head) merges the
splits by their log-sum-exp weights; splits are sized from the block table's capacity.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sphkv.kernels import split_k

__all__ = ["paged_decode"]

@triton.jit
def _kernel(q, k_pages, v_pages, block_table, lengths, o_part, lse_part, qk_scale,
            split_len, num_splits,
            stride_qb, stride_qh,
            stride_kp, stride_ks, stride_kh,
            stride_vp, stride_vs, stride_vh,
            stride_bt,
            HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
            P: tl.constexpr, BLOCK_N: tl.constexpr):
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    length = tl.load(lengths + i_b)
    start = i_s * split_len
    end = tl.minimum(start + split_len, length)

    o_g = tl.arange(0, G_PAD)
    o_d = tl.arange(0, D)
    m_g = o_g < G
    # the G query heads of kv head i_h; rows G … G_PAD-1 are zero padding for tl.dot
    p_q = q + i_b * stride_qb + (i_h * G + o_g)[:, None] * stride_qh + o_d[None, :]
    b_q = tl.load(p_q, mask=m_g[:, None], other=0.0)

    b_m = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([G_PAD], dtype=tl.float32)
    b_acc = tl.zeros([G_PAD, D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < end
        # token n sits in slot n % P of page block_table[b, n // P]
        b_page = tl.load(block_table + i_b * stride_bt + o_n // P, mask=m_n, other=0)
        b_slot = o_n % P
        p_k = (k_pages + b_page[:, None].to(tl.int64) * stride_kp + b_slot[:, None] * stride_ks
               + i_h * stride_kh + o_d[None, :])
        p_v = (v_pages + b_page[:, None].to(tl.int64) * stride_vp + b_slot[:, None] * stride_vs
               + i_h * stride_vh + o_d[None, :])
        b_k = tl.load(p_k, mask=m_n[:, None], other=0.0)
        b_v = tl.load(p_v, mask=m_n[:, None], other=0.0)
        # s = q·k · scale · log2 e: logits in base 2, [G_PAD, BLOCK_N]
        b_s = tl.dot(b_q, tl.trans(b_k)) * qk_scale
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
        # online softmax; every block holds ≥ 1 valid token, so b_m_new is finite
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_alpha = tl.exp2(b_m - b_m_new)
        b_p = tl.exp2(b_s - b_m_new[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
        b_m = b_m_new

    # an empty split (start ≥ length) leaves l = 0: lse = −∞, output 0
    b_nonempty = b_l > 0
    b_o = tl.where(b_nonempty[:, None], b_acc / tl.where(b_nonempty, b_l, 1.0)[:, None], 0.0)
    b_lse = tl.where(b_nonempty, b_m + tl.log2(tl.where(b_nonempty, b_l, 1.0)), float("-inf"))
    # partials are [B·Hq, num_splits, D] and [B·Hq, num_splits]
    i_row = i_b * HKV * G + i_h * G + o_g
    p_o = o_part + (i_row[:, None] * num_splits + i_s) * D + o_d[None, :]
    tl.store(p_o, b_o, mask=m_g[:, None])
    tl.store(lse_part + i_row * num_splits + i_s, b_lse, mask=m_g)


def _launch(q, k_pages, v_pages, block_table, lengths, scale, block_n, num_splits, num_warps,
            num_stages):
    B, Hq, D = q.shape
    P, Hkv = k_pages.shape[1], k_pages.shape[2]
    group = Hq // Hkv
    capacity = block_table.shape[1] * P
    if num_splits is None:
        num_splits = split_k.num_splits(B * Hkv, capacity, block_n, q.device)
    split_len = split_k.split_length(capacity, num_splits, block_n)
    num_splits = triton.cdiv(capacity, split_len)

    o_part = torch.empty(B * Hq, num_splits, D, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(B * Hq, num_splits, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    _kernel[(B * Hkv, num_splits)](
        q, k_pages, v_pages, block_table, lengths, o_part, lse_part, scale * split_k.LOG2E,
        split_len, num_splits,
        q.stride(0), q.stride(1),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        v_pages.stride(0), v_pages.stride(1), v_pages.stride(2),
        block_table.stride(0),
        HKV=Hkv, G=group, G_PAD=max(16, triton.next_power_of_2(group)), D=D, P=P,
        BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    split_k.merge_kernel[(B * Hq,)](
        o_part, lse_part, out, num_splits, out.stride(0), out.stride(1),
        HQ=Hq, D=D, num_warps=4)
    return out


def paged_decode(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                 block_table: torch.Tensor, lengths: torch.Tensor, scale: float | None = None,
                 *, block_n: int = 64, num_splits: int | None = None, num_warps: int = 4,
                 num_stages: int = 2) -> torch.Tensor:
    """Decode attention of one query token per sequence over a paged fp16 KV cache.

    Parameters
    ----------
    q : [B, Hq, D] fp16 or bf16, last dim contiguous
    k_pages, v_pages : [num_pages, P, Hkv, D], same dtype, last dim contiguous
    block_table : [B, max_pages] int32, page ids in token order
    lengths : [B] int32, 1 ≤ lengths[b] ≤ max_pages · P (not checked: that would synchronize)
    scale : logit scale, default 1/√D
    block_n : tokens per inner step (a power of two ≥ 16; may span several pages)
    num_splits : splits per (sequence, kv head); default about 4 programs per multiprocessor
    num_warps, num_stages : Triton launch options

    Returns
    -------
    [B, Hq, D], the dtype of ``q``: ``softmax(q·Kᵀ·scale)·V`` over tokens ``0 … lengths[b]-1``.
    D is a power of two ≥ 16; Hq is a multiple of Hkv; query head h reads kv head h // (Hq/Hkv).
    """
    B, Hq, D = q.shape
    if k_pages.shape != v_pages.shape or k_pages.ndim != 4 or k_pages.shape[3] != D:
        raise ValueError(f"k_pages and v_pages must both be [num_pages, P, Hkv, {D}], got "
                         f"{tuple(k_pages.shape)} and {tuple(v_pages.shape)}")
    Hkv = k_pages.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads Hq={Hq} must be a multiple of kv heads Hkv={Hkv}")
    if D < 16 or D & (D - 1):
        raise ValueError(f"head dim D={D} must be a power of two ≥ 16")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n={block_n} must be a power of two ≥ 16")
    if block_table.shape[0] != B or lengths.shape != (B,):
        raise ValueError(f"block_table must be [{B}, max_pages] and lengths [{B}], got "
                         f"{tuple(block_table.shape)} and {tuple(lengths.shape)}")
    if q.stride(-1) != 1 or k_pages.stride(-1) != 1 or v_pages.stride(-1) != 1:
        raise ValueError("q, k_pages and v_pages must be contiguous in the head dim")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    return _launch(q, k_pages, v_pages, block_table, lengths, scale, block_n, num_splits,
                   num_warps, num_stages)
