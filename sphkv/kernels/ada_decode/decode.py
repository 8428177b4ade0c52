"""Decode attention over mixed-tier pages plus the fp16 window, in Triton.

Every tier of the default and ADA ladders is read from its codes: TurboQuant-style codes of any
bit depth 1–8 (codes may straddle bytes), int8 with a per-vector scale, fp16, and ADA keys
(radius + angle codes per level). Each kind is decoded tile by tile into an fp16 block
``[BLOCK_N, D]`` in its codec's domain and fed to full-width dots:

    TurboQuant   x̂ = Rᵀ (‖x‖/√D) lev[c]          logits with R q, values summed rotated;
                 at 2 and 4 bits on a GPU, lev[c] by a register lookup into quarter or
                 half tiles (:mod:`sphkv.kernels.ada_decode.lookup`)
    int8         x̂ = s · c
    fp16         x̂ = x
    ADA          x̂ = Rᵀ r u,  u_j = Π_ℓ (cos θ_ℓ,j>>ℓ  or  sin θ_ℓ,j>>ℓ as bit ℓ−1 of j is 0 or 1),
                 built top-down, each angle decoded once per row

so q is rotated once per key rotation, and value sums are kept in two domains (plain and
rotated), each rotated back once per output row.

``_kernel`` handles one segment (a tier's pages or the window) for a grid of
(sequence, kv head, split): the R = G·M query rows of its kv head are loaded once and every K and
V tile is decoded once for all of them (GQA); online softmax in base 2. Every segment writes its
splits into one shared partial buffer, so the segments are just more splits of the same
split-K: ``_merge_kernel`` combines all of them with the log-sum-exp weights
``2^(lse_s − max lse)``, summing plain and rotated splits separately.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import triton
import triton.language as tl

from sphkv.codec import Fp16Codec, Int8Codec, SphericalCodec, TurboQuantCodec
from sphkv.kernels.ada_decode.lookup import (
    even_odd_levels,
    prmt_enabled,
    prmt_lookup_asm,
    quarter_levels,
)
from sphkv.kernels.ada_decode.naive import TierPages, Window, row_bounds
from sphkv.kernels.paged_decode.decode import LOG2E, _num_splits

__all__ = ["ada_decode"]

# kinds of rows a segment holds
FP16, INT8, TURBO, ADA = 0, 1, 2, 3
_MAX_ROWS = 128  # G·M query rows per kv head the kernel holds in registers


@triton.jit
def _code(p_rows, bitpos, mask, NBYTES: tl.constexpr, STRADDLE: tl.constexpr):
    """Codes at bit positions ``bitpos`` [1, D] of the rows ``p_rows`` [BLOCK_N, 1] (uint8):
    little-endian bit stream, ``mask = 2^bits − 1``; a code may straddle two bytes."""
    byte = bitpos >> 3
    x = tl.load(p_rows + tl.minimum(byte, NBYTES - 1)).to(tl.int32)
    if STRADDLE:
        x = x | (tl.load(p_rows + tl.minimum(byte + 1, NBYTES - 1)).to(tl.int32) << 8)
    return (x >> (bitpos & 7)) & mask


@triton.jit
def _tile(p_rows, levels, ada_meta, ada_trig, KIND: tl.constexpr, BITS: tl.constexpr,
          CODES: tl.constexpr, GROUP: tl.constexpr, NBYTES: tl.constexpr, D: tl.constexpr,
          LOG2D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The rows' vectors in their codec's domain, unscaled: fp16 [BLOCK_N, D]."""
    o_d = tl.arange(0, D)
    if KIND == 0:  # fp16
        b_x = tl.load(p_rows + o_d[None, :])
    elif KIND == 1:  # int8: c
        b_x = tl.load(p_rows + o_d[None, :]).to(tl.float16)
    elif KIND == 2:  # TurboQuant: lev[c], the levels gathered in registers
        NL: tl.constexpr = 1 << BITS
        if GROUP == 1:
            # whole bytes, loaded contiguously; field s of byte i is coordinate i·(8/BITS) + s
            b_bytes = tl.load(p_rows + tl.arange(0, NBYTES)[None, :]).to(tl.int32)
            b_c = (b_bytes[:, :, None] >> (tl.arange(0, CODES) * BITS)[None, None, :]) & (NL - 1)
        else:
            # CODES codes fill GROUP whole bytes (8 codes in 3 bytes at 3 bits): the GROUP bytes
            # of every group are loaded as GROUP strided tiles and joined into one word
            o_g = tl.arange(0, D // CODES) * GROUP
            WORD: tl.constexpr = tl.int32 if GROUP <= 3 else tl.int64
            b_w = tl.load(p_rows + o_g[None, :]).to(WORD)
            for j in tl.static_range(1, GROUP):
                b_w = b_w | (tl.load(p_rows + (o_g + j)[None, :]).to(WORD) << (8 * j))
            b_c = ((b_w[:, :, None] >> (tl.arange(0, CODES) * BITS)[None, None, :])
                   & (NL - 1)).to(tl.int32)
        b_c = tl.reshape(b_c, [BLOCK_N, D])
        b_lev = tl.load(levels + tl.arange(0, NL)).to(tl.float16)
        b_x = tl.gather(tl.broadcast_to(b_lev[None, :], [BLOCK_N, NL]), b_c, 1)
    elif D >= 64:  # ADA, top-down: a node's weight u splits into (u cos θ, u sin θ)
        b_u = tl.full([BLOCK_N, 1], 1.0, dtype=tl.float32)
        for i in tl.static_range(LOG2D):
            # level LOG2D − i holds 2^i angles, each decoded once per row
            off = tl.load(ada_meta + 2 * (LOG2D - i - 1))
            bits = tl.load(ada_meta + 2 * (LOG2D - i - 1) + 1)
            b_c = _code(p_rows, (off + tl.arange(0, 1 << i) * bits)[None, :], (1 << bits) - 1,
                        NBYTES, True)
            p_t = ada_trig + ((LOG2D - i - 1) * 256 + b_c) * 2
            b_u = tl.reshape(tl.join(b_u * tl.load(p_t), b_u * tl.load(p_t + 1)),
                             [BLOCK_N, 2 << i])
        b_x = b_u.to(tl.float16)
    else:  # ADA, small D (the join/reshape path gave wrong results at D = 16 on the H100):
        # u_j = Π_ℓ trig[ℓ, c_ℓ(j >> ℓ), bit ℓ−1 of j], every angle decoded per coordinate
        b_u = tl.full([BLOCK_N, D], 1.0, dtype=tl.float32)
        for lv in tl.static_range(1, LOG2D + 1):
            off = tl.load(ada_meta + 2 * (lv - 1))
            bits = tl.load(ada_meta + 2 * (lv - 1) + 1)
            b_c = _code(p_rows, (off + (o_d >> lv) * bits)[None, :], (1 << bits) - 1, NBYTES,
                        True)
            b_u *= tl.load(ada_trig + ((lv - 1) * 256 + b_c) * 2 + ((o_d >> (lv - 1)) & 1)[None, :])
        b_x = b_u.to(tl.float16)
    return b_x


@triton.jit
def _kernel(q, k_rows, k_side, v_rows, v_side, k_levels, v_levels, ada_meta, ada_trig,
            block_table, lengths, first, o_part, lse_part,
            qk_scale, k_mult, v_mult, split_len, split_base, num_splits,
            stride_btb, stride_bth, stride_wb, stride_wh, stride_wn, stride_fb, stride_fh,
            HKV: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, M: tl.constexpr,
            D: tl.constexpr, LOG2D: tl.constexpr, P: tl.constexpr, WINDOW: tl.constexpr,
            BOUND: tl.constexpr,
            K_KIND: tl.constexpr, K_BITS: tl.constexpr, K_BYTES: tl.constexpr,
            V_KIND: tl.constexpr, V_BITS: tl.constexpr, V_BYTES: tl.constexpr,
            K_CODES: tl.constexpr, K_GROUP: tl.constexpr, V_CODES: tl.constexpr,
            V_GROUP: tl.constexpr, K_ASM: tl.constexpr, V_ASM: tl.constexpr,
            K_PRMT: tl.constexpr, V_PRMT: tl.constexpr,
            BLOCK_N: tl.constexpr):
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // HKV, i_bh % HKV
    length = tl.load(lengths + i_bh)
    start = i_s * split_len
    end = tl.minimum(start + split_len, length)

    o_r = tl.arange(0, R_PAD)
    o_d = tl.arange(0, D)
    m_r = o_r < R
    # q [B, HKV, R, D] in the segment's key domain: row r is query head i_h·G + r // M at
    # query position r % M; rows R … R_PAD−1 are zero padding for tl.dot
    b_q = tl.load(q + (i_bh * R + o_r[:, None]) * D + o_d[None, :], mask=m_r[:, None], other=0.0)
    # TurboQuant by the register lookup (K_PRMT/V_PRMT = bits): at 4 bits byte i holds
    # coordinates 2i and 2i + 1, decoded into an even and an odd half tile; at 2 bits it holds
    # 4i … 4i + 3, decoded into four quarter tiles; each is dotted with q's matching coordinates
    o_h, o_f = tl.arange(0, D // 2), tl.arange(0, D // 4)
    p_q = q + (i_bh * R + o_r[:, None]) * D
    if K_PRMT == 4:
        b_q_e = tl.load(p_q + 2 * o_h[None, :], mask=m_r[:, None], other=0.0)
        b_q_o = tl.load(p_q + 2 * o_h[None, :] + 1, mask=m_r[:, None], other=0.0)
    if K_PRMT == 2:
        b_q0 = tl.load(p_q + 4 * o_f[None, :], mask=m_r[:, None], other=0.0)
        b_q1 = tl.load(p_q + 4 * o_f[None, :] + 1, mask=m_r[:, None], other=0.0)
        b_q2 = tl.load(p_q + 4 * o_f[None, :] + 2, mask=m_r[:, None], other=0.0)
        b_q3 = tl.load(p_q + 4 * o_f[None, :] + 3, mask=m_r[:, None], other=0.0)
    if WINDOW:
        # query position i sees window tokens n ≤ W − M + i
        b_hi = length - M + o_r % M
    if BOUND:
        # … and tokens n ≥ first[b, (h,) i]; blocks hidden from every row are skipped
        b_lo = tl.load(first + i_b * stride_fb + i_h * stride_fh + o_r % M)
        lo_min = tl.min(tl.where(m_r, b_lo, end), 0)
        start += tl.maximum(lo_min - start, 0) // BLOCK_N * BLOCK_N

    b_m = tl.full([R_PAD], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([R_PAD], dtype=tl.float32)
    b_acc = tl.zeros([R_PAD, D], dtype=tl.float32)
    b_acc_e = tl.zeros([R_PAD, D // 2], dtype=tl.float32)
    b_acc_o = tl.zeros([R_PAD, D // 2], dtype=tl.float32)
    b_acc0 = tl.zeros([R_PAD, D // 4], dtype=tl.float32)
    b_acc1 = tl.zeros([R_PAD, D // 4], dtype=tl.float32)
    b_acc2 = tl.zeros([R_PAD, D // 4], dtype=tl.float32)
    b_acc3 = tl.zeros([R_PAD, D // 4], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < end
        if WINDOW:
            o_w = i_b * stride_wb + i_h * stride_wh + tl.where(m_n, o_n, 0) * stride_wn
            p_k = k_rows + o_w[:, None]
            p_v = v_rows + o_w[:, None]
            b_ks = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
            b_vs = b_ks
        else:
            # pool row of run token n: page · P + slot
            b_page = tl.load(block_table + i_b * stride_btb + i_h * stride_bth + o_n // P,
                             mask=m_n, other=0)
            b_row = b_page.to(tl.int64) * P + o_n % P
            p_k = k_rows + b_row[:, None] * K_BYTES
            p_v = v_rows + b_row[:, None] * V_BYTES
            if K_KIND == 0:
                b_ks = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
            else:
                b_ks = tl.load(k_side + b_row).to(tl.float32)
            if V_KIND == 0:
                b_vs = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
            else:
                b_vs = tl.load(v_side + b_row).to(tl.float32)
        # s = q·k̂ · scale · log2 e, the per-row factor (norm/√D, scale, radius) applied after
        if K_PRMT == 4:
            b_k_e, b_k_o = even_odd_levels(p_k, o_h, m_n, K_ASM)
            b_s = tl.dot(b_q_e, tl.trans(b_k_e)) + tl.dot(b_q_o, tl.trans(b_k_o))
        elif K_PRMT == 2:
            b_k0, b_k1, b_k2, b_k3 = quarter_levels(p_k, o_f, m_n, K_ASM)
            b_s = tl.dot(b_q0, tl.trans(b_k0)) + tl.dot(b_q1, tl.trans(b_k1)) + \
                tl.dot(b_q2, tl.trans(b_k2)) + tl.dot(b_q3, tl.trans(b_k3))
        else:
            b_k = _tile(p_k, k_levels, ada_meta, ada_trig, K_KIND, K_BITS, K_CODES, K_GROUP,
                        K_BYTES, D, LOG2D, BLOCK_N)
            b_s = tl.dot(b_q, tl.trans(b_k))
        b_s = b_s * (b_ks * (k_mult * qk_scale))[None, :]
        m_s = m_n[None, :]
        if WINDOW:
            m_s = m_s & (o_n[None, :] <= b_hi[:, None])
        if BOUND:
            m_s = m_s & (o_n[None, :] >= b_lo[:, None])
        b_s = tl.where(m_s, b_s, float("-inf"))
        # online softmax; a row may see nothing yet (window masks): keep its exponents finite
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_m_use = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_alpha = tl.exp2(b_m - b_m_use)
        b_p = tl.exp2(b_s - b_m_use[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_pv = (b_p * (b_vs * v_mult)[None, :]).to(tl.float16)
        if V_PRMT == 4:
            b_v_e, b_v_o = even_odd_levels(p_v, o_h, m_n, V_ASM)
            b_acc_e = b_acc_e * b_alpha[:, None] + tl.dot(b_pv, b_v_e)
            b_acc_o = b_acc_o * b_alpha[:, None] + tl.dot(b_pv, b_v_o)
        elif V_PRMT == 2:
            b_v0, b_v1, b_v2, b_v3 = quarter_levels(p_v, o_f, m_n, V_ASM)
            b_acc0 = b_acc0 * b_alpha[:, None] + tl.dot(b_pv, b_v0)
            b_acc1 = b_acc1 * b_alpha[:, None] + tl.dot(b_pv, b_v1)
            b_acc2 = b_acc2 * b_alpha[:, None] + tl.dot(b_pv, b_v2)
            b_acc3 = b_acc3 * b_alpha[:, None] + tl.dot(b_pv, b_v3)
        else:
            b_v = _tile(p_v, v_levels, ada_meta, ada_trig, V_KIND, V_BITS, V_CODES, V_GROUP,
                        V_BYTES, D, LOG2D, BLOCK_N)
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_pv, b_v)
        b_m = b_m_new

    # a split that saw nothing (l = 0) has lse = −∞ and output 0
    b_nonempty = b_l > 0
    b_inv = tl.where(b_nonempty, 1.0 / tl.where(b_nonempty, b_l, 1.0), 0.0)
    b_lse = tl.where(b_nonempty, b_m + tl.log2(tl.where(b_nonempty, b_l, 1.0)), float("-inf"))
    i_row = i_bh * R + o_r
    p_o = o_part + (i_row[:, None] * num_splits + split_base + i_s) * D
    if V_PRMT == 4:
        tl.store(p_o + 2 * o_h[None, :], b_acc_e * b_inv[:, None], mask=m_r[:, None])
        tl.store(p_o + 2 * o_h[None, :] + 1, b_acc_o * b_inv[:, None], mask=m_r[:, None])
    elif V_PRMT == 2:
        tl.store(p_o + 4 * o_f[None, :], b_acc0 * b_inv[:, None], mask=m_r[:, None])
        tl.store(p_o + 4 * o_f[None, :] + 1, b_acc1 * b_inv[:, None], mask=m_r[:, None])
        tl.store(p_o + 4 * o_f[None, :] + 2, b_acc2 * b_inv[:, None], mask=m_r[:, None])
        tl.store(p_o + 4 * o_f[None, :] + 3, b_acc3 * b_inv[:, None], mask=m_r[:, None])
    else:
        tl.store(p_o + o_d[None, :], b_acc * b_inv[:, None], mask=m_r[:, None])
    tl.store(lse_part + i_row * num_splits + split_base + i_s, b_lse, mask=m_r)


@triton.jit
def _merge_kernel(o_part, lse_part, rotated, out, num_splits, D: tl.constexpr,
                  S_PAD: tl.constexpr):
    """out[row] = (Σ_plain w_s o_s, Σ_rotated w_s o_s) / Σ_s w_s, w_s = 2^(lse_s − max lse)."""
    i_row = tl.program_id(0)
    o_s = tl.arange(0, S_PAD)
    o_d = tl.arange(0, D)
    m_s = o_s < num_splits
    b_lse = tl.load(lse_part + i_row * num_splits + o_s, mask=m_s, other=float("-inf"))
    b_max = tl.max(b_lse, 0)
    b_w = tl.exp2(b_lse - tl.where(b_max == float("-inf"), 0.0, b_max))
    b_sum = tl.sum(b_w, 0)
    b_inv = tl.where(b_sum > 0, 1.0 / tl.where(b_sum > 0, b_sum, 1.0), 0.0)
    b_rot = tl.load(rotated + o_s, mask=m_s, other=0)
    b_o = tl.load(o_part + (i_row * num_splits + o_s[:, None]) * D + o_d[None, :],
                  mask=m_s[:, None], other=0.0)
    b_wp = tl.where(b_rot == 0, b_w, 0.0)
    b_wr = tl.where(b_rot == 1, b_w, 0.0)
    tl.store(out + i_row * 2 * D + o_d, tl.sum(b_wp[:, None] * b_o, 0) * b_inv)
    tl.store(out + i_row * 2 * D + D + o_d, tl.sum(b_wr[:, None] * b_o, 0) * b_inv)


@functools.lru_cache(maxsize=64)
def _rotation(d: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The randomized Hadamard rotation of ``seed`` as matrices acting on rows, float32:
    ``x @ fwd = (R x)ᵀ`` and ``y @ inv = (Rᵀ y)ᵀ``."""
    from sphkv.codec.rotation import RandomizedHadamard

    rot, eye = RandomizedHadamard(d, seed), torch.eye(d)
    return rot.forward(eye).to(device), rot.inverse(eye).to(device)


@functools.lru_cache(maxsize=64)
def _levels(d: int, bits: int, device: torch.device) -> torch.Tensor:
    """The TurboQuant codebook of (d, bits), float32 [2^bits]."""
    codec = TurboQuantCodec(d=d, bits=bits)
    return torch.as_tensor(codec.quantizer.levels, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=64)
def _ada_tables(d: int, bits: tuple[int, ...], device: torch.device):
    """Per level of the ADA codec (d, bits): (bit offset of its field, bits) int32 [L, 2], and
    (cos, sin) of each code's angle float32 [L, 256, 2]."""
    codec = SphericalCodec(d=d, bits=bits, rotate=False)
    meta, trig, offset = [], np.zeros((len(codec.bits), 256, 2)), 0
    for i, ((m, b), quant) in enumerate(zip(codec.layout, codec.quantizers, strict=True)):
        meta.append((offset, b))
        offset += m * b
        lev = np.asarray(quant.levels, dtype=np.float64)
        trig[i, :len(lev), 0], trig[i, :len(lev), 1] = np.cos(lev), np.sin(lev)
    return (torch.tensor(meta, dtype=torch.int32, device=device),
            torch.as_tensor(trig, dtype=torch.float32, device=device))


def _bounds(first: torch.Tensor, shape: tuple[int, ...], M: int,
            device: torch.device) -> torch.Tensor:
    """A visibility bound ``[*shape]`` or ``[*shape, M]`` as contiguous int32 ``[*shape, M]``."""
    if first.shape not in (shape, (*shape, M)):
        raise ValueError(f"first must be {list(shape)} or {[*shape, M]}, got {list(first.shape)}")
    return row_bounds(first, shape, M).to(device=device, dtype=torch.int32).contiguous()


class _Side:
    """How the kernel reads one codec's rows: kind, bits, row tensor, side tensor, per-row
    factor, domain (rotation seed or None), tables."""

    def __init__(self, codec, codes, d: int, device: torch.device, role: str):
        self.levels = self.meta = self.trig = None
        self.seed, self.mult, self.bits = None, 1.0, 0
        self.asm = ""  # the register lookup of 4-bit levels (lookup.py), where it runs
        side = next(iter(codes.side.values()), None)
        payload = codes.payload
        if isinstance(codec, Fp16Codec):
            self.kind, rows = FP16, payload.view(torch.float16)
        elif isinstance(codec, Int8Codec):
            self.kind, rows = INT8, payload.view(torch.int8)
        elif isinstance(codec, TurboQuantCodec):
            self.kind, rows, self.bits = TURBO, payload, codec.bits
            self.seed, self.mult = codec.seed, 1.0 / math.sqrt(d)
            self.levels = _levels(d, codec.bits, device)
            # the register lookup at 4 and 2 bits; its tiles of D/2 or D/4 coordinates are dot
            # operands, so D·bits/8 ≥ 16
            if codec.bits in (2, 4) and d * codec.bits >= 128 and prmt_enabled(device):
                self.asm = prmt_lookup_asm(torch.as_tensor(codec.quantizer.levels))
        elif isinstance(codec, SphericalCodec) and role == "key":
            self.kind, rows = ADA, payload
            self.seed = codec.seed if codec.rotate else None
            self.meta, self.trig = _ada_tables(d, codec.bits, device)
        else:
            raise ValueError(f"{role} codec {type(codec).__name__} has no kernel (fp16, int8, "
                             f"TurboQuant, and SphericalCodec keys do)")
        # TurboQuant packing: CODES consecutive codes fill GROUP whole bytes
        self.codes = 8 // math.gcd(self.bits, 8) if self.kind == TURBO else 1
        self.group = self.bits * self.codes // 8 if self.kind == TURBO else 1
        self.rows = rows if rows.is_contiguous() else rows.contiguous()
        self.nbytes = self.rows.shape[-1]
        self.side = side
        self.dummy = torch.zeros(1, device=device)

    def tables(self):
        return (self.levels if self.levels is not None else self.dummy,
                self.meta if self.meta is not None else self.dummy.int(),
                self.trig if self.trig is not None else self.dummy)


def ada_decode(q: torch.Tensor, pages: list[TierPages], window: Window | None,
               scale: float | None = None, *, block_n: int = 64, num_splits: int | None = None,
               num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """Decode attention over a page table of mixed-tier pages plus the fp16 recent window.

    Parameters
    ----------
    q : [B, Hq, M, D] float; G·M ≤ 128 with G = Hq / Hkv
    pages : list of :class:`TierPages` on ``q``'s device, one per tier (pools contiguous,
        block tables int32 ``[B, Hkv, max_pages]``, lengths int32 ``[B, Hkv]`` ≥ 0, optional
        lower bounds ``first`` ``[B, Hkv]`` or ``[B, Hkv, M]``)
    window : :class:`Window`, fp16 ``[B, Hkv, W, D]`` with unit stride in D, ``first``
        ``[B]`` or ``[B, M]``; or None
    scale : logit scale, default 1/√D
    block_n : tokens per inner step, a power of two ≥ 32 (may span pages of one tier)
    num_splits : splits per (sequence, kv head) of each tier; default about 4 programs per
        multiprocessor per tier
    num_warps, num_stages : Triton launch options

    Returns
    -------
    [B, Hq, M, D], the dtype of ``q``: equals :func:`ada_decode_naive` to rounding.
    Value codecs that rotate must share one rotation seed.
    """
    B, Hq, M, D = q.shape
    if not pages and window is None:
        raise ValueError("nothing to attend to: no pages and no window")
    Hkv = pages[0].block_table.shape[1] if pages else window.keys.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads Hq={Hq} must be a multiple of kv heads Hkv={Hkv}")
    R = Hq // Hkv * M
    if R > _MAX_ROWS:
        raise ValueError(f"G·M = {R} query rows per kv head; the kernel holds at most "
                         f"{_MAX_ROWS}")
    if D < 16 or D & (D - 1):
        raise ValueError(f"head dim D={D} must be a power of two ≥ 16")
    if block_n < 32 or block_n & (block_n - 1):
        raise ValueError(f"block_n={block_n} must be a power of two ≥ 32")
    if block_n < 8 * num_warps:
        # Triton 3.6 on the H100: the register gather of the levels fails to compile
        # (setOptimizedGatherLayout: isWarpLocal) at block_n = 32 with 8 warps
        raise ValueError(f"block_n={block_n} must be ≥ 8·num_warps = {8 * num_warps}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dev = q.device
    # the R = G·M query rows of each kv head, head-major: [B, Hkv, R, D]
    q_rows = q.float().reshape(B, Hkv, R, D)
    q_dom: dict = {}

    def q_in(seed):
        if seed not in q_dom:
            x = q_rows if seed is None else q_rows @ _rotation(D, seed, dev)[0]
            q_dom[seed] = x.half().contiguous()
        return q_dom[seed]

    # one launch per segment: (q, key side, value side, table, lengths, capacity, is window)
    segments = []
    for tp in pages:
        if tp.tier.is_drop:
            raise ValueError(f"tier {tp.tier.name!r} stores nothing")
        if tp.block_table.shape[:2] != (B, Hkv) or tp.lengths.shape != (B, Hkv):
            raise ValueError(f"tier {tp.tier.name!r}: block_table must be [{B}, {Hkv}, "
                             f"max_pages] and lengths [{B}, {Hkv}], got "
                             f"{tuple(tp.block_table.shape)}, {tuple(tp.lengths.shape)}")
        if tp.key.payload.shape[0] == 0 or tp.block_table.shape[2] == 0:
            continue
        key = _Side(tp.tier.key, tp.key, D, dev, "key")
        value = _Side(tp.tier.value, tp.value, D, dev, "value")
        segments.append((q_in(key.seed), key, value, tp.block_table, tp.lengths,
                         tp.block_table.shape[2] * tp.page_size, tp.page_size,
                         None if tp.first is None else _bounds(tp.first, (B, Hkv), M, dev)))
    v_seeds = {s[2].seed for s in segments} - {None}
    if len(v_seeds) > 1:
        raise ValueError(f"value codecs rotate with different seeds {sorted(v_seeds)}; the "
                         f"kernel keeps one rotated value sum")
    v_seed = next(iter(v_seeds), None)

    plans, total = [], 0
    for seg in segments:
        capacity = seg[5]
        n = num_splits or _num_splits(B * Hkv, capacity, block_n, dev)
        split_len = triton.cdiv(triton.cdiv(capacity, n), block_n) * block_n
        n = triton.cdiv(capacity, split_len)
        plans.append((seg, split_len, total, n))
        total += n
    if window is not None and window.keys.shape[2] > 0:
        W = window.keys.shape[2]
        n = num_splits or _num_splits(B * Hkv, W, block_n, dev)
        split_len = triton.cdiv(triton.cdiv(W, n), block_n) * block_n
        n = triton.cdiv(W, split_len)
        plans.append((None, split_len, total, n))
        total += n

    o_part = torch.empty(B * Hkv * R, total, D, device=dev, dtype=torch.float32)
    lse_part = torch.empty(B * Hkv * R, total, device=dev, dtype=torch.float32)
    rotated = torch.zeros(total, dtype=torch.int32, device=dev)
    common = dict(HKV=Hkv, R=R, R_PAD=max(16, triton.next_power_of_2(R)), M=M, D=D,
                  LOG2D=D.bit_length() - 1,
                  BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    for seg, split_len, base, n in plans:
        if seg is None:
            keys, values = window.keys, window.values
            if keys.dtype != torch.float16 or keys.stride() != values.stride() or \
                    keys.stride(-1) != 1:
                raise ValueError("window keys and values must be fp16 with equal strides and "
                                 "unit stride in D")
            lengths = torch.full((B, Hkv), keys.shape[2], dtype=torch.int32, device=dev)
            first = _bounds(window.first, (B,), M, dev)
            _kernel[(B * Hkv, n)](
                q_in(None), keys, keys, values, values, q_rows, q_rows, lengths, q_rows,
                lengths, lengths, first, o_part, lse_part, scale * LOG2E, 1.0, 1.0, split_len,
                base, total, 0, 0, keys.stride(0), keys.stride(1), keys.stride(2), M, 0,
                P=1, WINDOW=True, BOUND=True, K_KIND=FP16, K_BITS=0, K_BYTES=D, V_KIND=FP16,
                V_BITS=0, V_BYTES=D, K_CODES=1, K_GROUP=1, V_CODES=1, V_GROUP=1, K_ASM="",
                V_ASM="", K_PRMT=0, V_PRMT=0, **common)
            continue
        q_seg, key, value, table, lengths, _, page_size, first = seg
        if value.seed is not None:
            rotated[base:base + n] = 1
        k_lev, k_meta, k_trig = key.tables()
        v_lev, _, _ = value.tables()
        _kernel[(B * Hkv, n)](
            q_seg, key.rows, key.side if key.side is not None else key.dummy,
            value.rows, value.side if value.side is not None else value.dummy,
            k_lev, v_lev, k_meta, k_trig, table, lengths.contiguous(),
            lengths if first is None else first,
            o_part, lse_part, scale * LOG2E, key.mult, value.mult, split_len, base, total,
            table.stride(0), table.stride(1), 0, 0, 0, Hkv * M, M,
            P=page_size, WINDOW=False, BOUND=first is not None, K_KIND=key.kind,
            K_BITS=key.bits, K_BYTES=key.nbytes,
            V_KIND=value.kind, V_BITS=value.bits, V_BYTES=value.nbytes,
            K_CODES=key.codes, K_GROUP=key.group, V_CODES=value.codes, V_GROUP=value.group,
            K_ASM=key.asm, V_ASM=value.asm, K_PRMT=key.bits if key.asm else 0,
            V_PRMT=value.bits if value.asm else 0,
            # ADA's per-level code loads, staged twice, overflow shared memory at D = 128
            **{**common, "num_stages": 1 if key.kind == ADA else num_stages})

    out2 = torch.empty(B * Hkv * R, 2, D, device=dev, dtype=torch.float32)
    _merge_kernel[(B * Hkv * R,)](o_part, lse_part, rotated, out2, total, D=D,
                                  S_PAD=max(2, triton.next_power_of_2(total)), num_warps=4)
    out = out2[:, 0]
    if v_seed is not None:
        # the rotated value sum back to coordinates, once per output row
        out = out + out2[:, 1] @ _rotation(D, v_seed, dev)[1]
    return out.view(B, Hq, M, D).to(q.dtype)
