"""Decode attention over pages of one TurboQuant tier in Triton: logits and values from codes.

A TurboQuant-style code of a vector x is its rotated, normalized coordinates
``z = √D · R x / ‖x‖`` each quantized to a Lloyd–Max level ``lev[c_j]``, plus ``‖x‖`` (fp16):
``x̂ = Rᵀ (‖x‖/√D) lev[c]``. Since R is orthogonal,

    q · k̂ = (‖k‖/√D) Σ_j (R q)_j lev_k[c_j]         (rotate q once, not every key back)
    Σ_n p_n v̂_n = R_vᵀ (1/√D) Σ_n p_n ‖v_n‖ lev_v[c_n]   (accumulate rotated, rotate back once)

``_kernel`` is the paged decode of ``sphkv.kernels.paged_decode`` (one program per sequence,
kv head and split; GQA; online softmax in base 2) with K and V rows replaced by their codes: a
block of ``BLOCK_N`` tokens' payload bytes is loaded, each bit field of the bytes looked up in
the codebook in registers and fed to the dots (one per field: no reordering of the codes). The
splits are merged by ``paged_decode``'s log-sum-exp merge; rotating q and rotating the output
back are one matmul each with the rotation's matrix, once per call. The codebook lookup uses
``tl.gather`` (Triton ≥ 3.2).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from sphkv.codec import Codec, KernelKind, TurboQuantCodec
from sphkv.kernels import split_k

__all__ = ["quant_decode"]


@triton.jit
def _field(b_bytes, s: tl.constexpr, BITS: tl.constexpr):
    """Codes i·(8/BITS) + s of every byte i: code j sits at stream bits j·BITS … j·BITS+BITS-1,
    little-endian in each byte, so byte i holds codes i·(8/BITS) + s at shift s·BITS."""
    return ((b_bytes >> (s * BITS)) & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _lookup(levels, b_bytes, s: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """lev[c] of the codes of field s, fp16 [BLOCK_N, bytes]: a gather from the 2^BITS levels
    held in registers (a gather from global memory ran 2-3x slower on the H100)."""
    NL: tl.constexpr = 1 << BITS
    b_lev = tl.load(levels + tl.arange(0, NL)).to(tl.float16)
    return tl.gather(tl.broadcast_to(b_lev[None, :], [BLOCK_N, NL]), _field(b_bytes, s, BITS), 1)


@triton.jit
def _q_part(p_q, o_b, m_g, s: tl.constexpr, PER: tl.constexpr):
    """Coordinates i·PER + s of R q, [G_PAD, D/PER] fp16 (zero rows past G)."""
    return tl.load(p_q + (o_b * PER + s)[None, :], mask=m_g[:, None], other=0.0).to(tl.float16)


@triton.jit
def _kernel(q_rot, k_codes, k_norm, v_codes, v_norm, k_levels, v_levels, block_table, lengths,
            o_part, lse_part, qk_scale, split_len, num_splits,
            stride_qb, stride_qh, stride_btb, stride_bth, stride_lb,
            HKV: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
            P: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr,
            BLOCK_N: tl.constexpr):
    # The codes are never put back in coordinate order: with PER = 8/BITS codes per byte,
    # field s of the payload bytes holds coordinates i·PER + s, so
    #   q̃ · lev[c] = Σ_s (R q)[s::PER] · lev[c_s]          (PER dots of width D/PER)
    # and the value sum is kept as PER accumulators acc_s = coordinates i·PER + s.
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    length = tl.load(lengths + i_b * stride_lb + i_h)
    start = i_s * split_len
    end = tl.minimum(start + split_len, length)

    K_PER: tl.constexpr = 8 // K_BITS
    V_PER: tl.constexpr = 8 // V_BITS
    K_BYTES: tl.constexpr = D // K_PER
    V_BYTES: tl.constexpr = D // V_PER
    o_g = tl.arange(0, G_PAD)
    o_kb = tl.arange(0, K_BYTES)
    o_vb = tl.arange(0, V_BYTES)
    m_g = o_g < G
    # R q of the G query heads of kv head i_h, split into its K_PER fields (unused fields
    # repeat field 0 and are never read)
    p_q = q_rot + i_b * stride_qb + (i_h * G + o_g)[:, None] * stride_qh
    b_q0 = _q_part(p_q, o_kb, m_g, 0, K_PER)
    b_q1 = _q_part(p_q, o_kb, m_g, 1, K_PER) if K_PER > 1 else b_q0
    b_q2 = _q_part(p_q, o_kb, m_g, 2, K_PER) if K_PER > 2 else b_q0
    b_q3 = _q_part(p_q, o_kb, m_g, 3, K_PER) if K_PER > 2 else b_q0

    b_m = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([G_PAD], dtype=tl.float32)
    b_acc0 = tl.zeros([G_PAD, V_BYTES], dtype=tl.float32)
    b_acc1 = tl.zeros([G_PAD, V_BYTES], dtype=tl.float32)
    b_acc2 = tl.zeros([G_PAD, V_BYTES], dtype=tl.float32)
    b_acc3 = tl.zeros([G_PAD, V_BYTES], dtype=tl.float32)
    p_bt = block_table + i_b * stride_btb + i_h * stride_bth
    for n0 in range(start, end, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < end
        # pool row of token n: page · P + slot
        b_row = (tl.load(p_bt + o_n // P, mask=m_n, other=0).to(tl.int64) * P + o_n % P)
        b_kbytes = tl.load(k_codes + b_row[:, None] * K_BYTES + o_kb[None, :],
                           mask=m_n[:, None], other=0)
        b_vbytes = tl.load(v_codes + b_row[:, None] * V_BYTES + o_vb[None, :],
                           mask=m_n[:, None], other=0)
        b_knorm = tl.load(k_norm + b_row, mask=m_n, other=0.0).to(tl.float32)
        b_vnorm = tl.load(v_norm + b_row, mask=m_n, other=0.0).to(tl.float32)
        # Σ_s (R q)[s::PER] · lev_k[c_s]: [G_PAD, BLOCK_N]
        b_s = tl.dot(b_q0, tl.trans(_lookup(k_levels, b_kbytes, 0, K_BITS, BLOCK_N)))
        if K_PER > 1:
            b_s += tl.dot(b_q1, tl.trans(_lookup(k_levels, b_kbytes, 1, K_BITS, BLOCK_N)))
        if K_PER > 2:
            b_s += tl.dot(b_q2, tl.trans(_lookup(k_levels, b_kbytes, 2, K_BITS, BLOCK_N)))
            b_s += tl.dot(b_q3, tl.trans(_lookup(k_levels, b_kbytes, 3, K_BITS, BLOCK_N)))
        # times ‖k‖ · scale/√D · log2 e: logits in base 2
        b_s = b_s * (b_knorm * qk_scale)[None, :]
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_alpha = tl.exp2(b_m - b_m_new)
        b_p = tl.exp2(b_s - b_m_new[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        # Σ_n p_n ‖v_n‖ lev_v[c_n]: the value sum in the rotated domain, without the 1/√D
        b_pv = (b_p * b_vnorm[None, :]).to(tl.float16)
        b_acc0 = b_acc0 * b_alpha[:, None] + tl.dot(
            b_pv, _lookup(v_levels, b_vbytes, 0, V_BITS, BLOCK_N))
        if V_PER > 1:
            b_acc1 = b_acc1 * b_alpha[:, None] + tl.dot(
                b_pv, _lookup(v_levels, b_vbytes, 1, V_BITS, BLOCK_N))
        if V_PER > 2:
            b_acc2 = b_acc2 * b_alpha[:, None] + tl.dot(
                b_pv, _lookup(v_levels, b_vbytes, 2, V_BITS, BLOCK_N))
            b_acc3 = b_acc3 * b_alpha[:, None] + tl.dot(
                b_pv, _lookup(v_levels, b_vbytes, 3, V_BITS, BLOCK_N))
        b_m = b_m_new

    # an empty split (start ≥ length) leaves l = 0: lse = −∞, output 0
    b_nonempty = b_l > 0
    b_inv_l = tl.where(b_nonempty, 1.0 / tl.where(b_nonempty, b_l, 1.0), 0.0)[:, None]
    b_lse = tl.where(b_nonempty, b_m + tl.log2(tl.where(b_nonempty, b_l, 1.0)), float("-inf"))
    i_row = i_b * HKV * G + i_h * G + o_g
    # field s of the value sum is coordinates i·V_PER + s of the split's output
    p_o = o_part + (i_row[:, None] * num_splits + i_s) * D + o_vb[None, :] * V_PER
    tl.store(p_o, b_acc0 * b_inv_l, mask=m_g[:, None])
    if V_PER > 1:
        tl.store(p_o + 1, b_acc1 * b_inv_l, mask=m_g[:, None])
    if V_PER > 2:
        tl.store(p_o + 2, b_acc2 * b_inv_l, mask=m_g[:, None])
        tl.store(p_o + 3, b_acc3 * b_inv_l, mask=m_g[:, None])
    tl.store(lse_part + i_row * num_splits + i_s, b_lse, mask=m_g)


def _launch(q_rot, k_payload, k_norm, v_payload, v_norm, k_levels, v_levels, block_table,
            lengths, qk_scale, k_bits, v_bits, block_n, num_splits, num_warps, num_stages):
    B, Hq, D = q_rot.shape
    P, Hkv = k_payload.shape[1], block_table.shape[1]
    group = Hq // Hkv
    capacity = block_table.shape[2] * P
    if num_splits is None:
        num_splits = split_k.num_splits(B * Hkv, capacity, block_n, q_rot.device)
    split_len = split_k.split_length(capacity, num_splits, block_n)
    num_splits = triton.cdiv(capacity, split_len)

    o_part = torch.empty(B * Hq, num_splits, D, device=q_rot.device, dtype=torch.float32)
    lse_part = torch.empty(B * Hq, num_splits, device=q_rot.device, dtype=torch.float32)
    out_rot = torch.empty(B, Hq, D, device=q_rot.device, dtype=torch.float32)
    _kernel[(B * Hkv, num_splits)](
        q_rot, k_payload, k_norm, v_payload, v_norm, k_levels, v_levels, block_table, lengths,
        o_part, lse_part, qk_scale, split_len, num_splits,
        q_rot.stride(0), q_rot.stride(1), block_table.stride(0), block_table.stride(1),
        lengths.stride(0),
        HKV=Hkv, G=group, G_PAD=max(16, triton.next_power_of_2(group)), D=D, P=P,
        K_BITS=k_bits, V_BITS=v_bits, BLOCK_N=block_n, num_warps=num_warps,
        num_stages=num_stages)
    split_k.merge_kernel[(B * Hq,)](
        o_part, lse_part, out_rot, num_splits, out_rot.stride(0), out_rot.stride(1),
        HQ=Hq, D=D, num_warps=4)
    return out_rot


@functools.lru_cache(maxsize=64)
def _constants(d: int, bits: int, seed: int, levels: str, device: torch.device):
    """For the TurboQuant codec (d, bits, seed, levels): the rotation R as a matrix acting on rows
    (``x @ rt = (R x)ᵀ``), ``Rᵀ/√D`` likewise (decode's scale and rotation back), and the
    codebook levels, all float32 on ``device``; one matmul per call instead of a launched
    Walsh–Hadamard transform."""
    codec = TurboQuantCodec(d=d, bits=bits, seed=seed, levels=levels)
    eye = torch.eye(d)
    rt = codec.rotation.forward(eye)  # row i: R e_i, so q @ rt = Σ_i q_i R e_i = R q
    inv = codec.rotation.inverse(eye) / math.sqrt(d)
    levels = torch.as_tensor(codec.quantizer.levels, dtype=torch.float32)
    return rt.to(device), inv.to(device), levels.to(device)


def _check_codec(name: str, codec: Codec | None, d: int) -> TurboQuantCodec:
    if getattr(codec, "KERNEL", None) != KernelKind.TURBO:
        raise ValueError(f"{name} must be a TurboQuantCodec, got {type(codec).__name__}")
    if codec.bits not in (2, 4, 8):
        raise ValueError(f"{name}.bits={codec.bits}: the kernel unpacks 2, 4 or 8 bits "
                         f"(codes that do not straddle bytes)")
    if codec.d != d:
        raise ValueError(f"{name}.d={codec.d} differs from the query's head dim {d}")
    return codec


def quant_decode(q: torch.Tensor, k_payload: torch.Tensor, k_norm: torch.Tensor,
                 v_payload: torch.Tensor, v_norm: torch.Tensor, block_table: torch.Tensor,
                 lengths: torch.Tensor, key_codec: Codec, value_codec: Codec,
                 scale: float | None = None, *,
                 block_n: int = 64, num_splits: int | None = None, num_warps: int = 4,
                 num_stages: int = 2) -> torch.Tensor:
    """Decode attention over pages of one TurboQuant tier, reading only the codes.

    Parameters
    ----------
    q : [B, Hq, D] float
    k_payload, v_payload : [num_pages, P, D·bits/8] uint8, contiguous: the packed codes
    k_norm, v_norm : [num_pages, P] fp16, contiguous: the codecs' ``norm`` side information
    block_table : [B, Hkv, max_pages] int32, page ids in token order per (sequence, kv head)
    lengths : [B, Hkv] int32, 1 ≤ lengths[b, h] ≤ max_pages · P (not checked on the device)
    key_codec, value_codec : the :class:`~sphkv.codec.TurboQuantCodec` of 2, 4 or 8 bits that
        wrote the keys and the values (those of ``turbo2``, ``turbo4`` of the default ladder)
    scale : logit scale, default 1/√D
    block_n : tokens per inner step, a power of two ≥ 32
    num_splits, num_warps, num_stages : as in :func:`sphkv.kernels.paged_decode`

    Returns
    -------
    [B, Hq, D], the dtype of ``q``: equals ``quant_decode_naive`` (attention over
    ``key_codec.decode`` and ``value_codec.decode`` of the rows) to rounding.
    """
    B, Hq, D = q.shape
    key = _check_codec("key_codec", key_codec, D)
    value = _check_codec("value_codec", value_codec, D)
    Hkv = block_table.shape[1]
    if block_table.ndim != 3 or block_table.shape[0] != B or lengths.shape != (B, Hkv):
        raise ValueError(f"block_table must be [{B}, Hkv, max_pages] and lengths [{B}, Hkv], "
                         f"got {tuple(block_table.shape)} and {tuple(lengths.shape)}")
    if Hq % Hkv:
        raise ValueError(f"query heads Hq={Hq} must be a multiple of kv heads Hkv={Hkv}")
    num_pages, P = k_norm.shape
    for name, t, width in (("k_payload", k_payload, D * key.bits // 8),
                           ("v_payload", v_payload, D * value.bits // 8)):
        if t.shape != (num_pages, P, width) or t.dtype != torch.uint8 or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous uint8 [{num_pages}, {P}, {width}], got "
                             f"{t.dtype} {tuple(t.shape)}")
    if v_norm.shape != k_norm.shape or not (k_norm.is_contiguous() and v_norm.is_contiguous()):
        raise ValueError("k_norm and v_norm must be contiguous [num_pages, P]")
    # at 16 tokens the register gather of 2-bit codes fails to compile (Triton 3.6, H100)
    if block_n < 32 or block_n & (block_n - 1):
        raise ValueError(f"block_n={block_n} must be a power of two ≥ 32")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    k_rt, _, k_levels = _constants(D, key.bits, key.seed, key.levels, q.device)
    _, v_inv, v_levels = _constants(D, value.bits, value.seed, value.levels, q.device)
    q_rot = q.float() @ k_rt
    # ‖k‖/√D of the code's scale folded into the logit scale, with 1/ln 2 for exp2
    out_rot = _launch(q_rot, k_payload, k_norm, v_payload, v_norm, k_levels, v_levels,
                      block_table, lengths, scale / math.sqrt(D) * split_k.LOG2E, key.bits,
                      value.bits, block_n, num_splits, num_warps, num_stages)
    # x̂ = Rᵀ (‖x‖/√D) lev[c]: the 1/√D and the rotation back, once per output row
    return (out_rot @ v_inv).to(q.dtype)
