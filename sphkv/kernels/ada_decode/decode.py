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
                 each angle decoded once per row: the top levels' product built top-down,
                 the last two levels (one at D = 64) multiplied into quarter (half) field
                 tiles, no interleave; (cos, sin) as one fp16 pair per code, gathered in
                 registers where a level's codes fill whole words

so q is rotated once per key rotation, and value sums are kept in two domains (plain and
rotated), each rotated back once per output row.

``_kernel`` handles one segment (a tier's pages or the window) for a grid of
(sequence, kv head, split): the R = G·M query rows of its kv head are loaded once and every K and
V tile is decoded once for all of them (GQA); online softmax in base 2. Every segment writes its
splits into one shared partial buffer, so the segments are just more splits of the same
split-K: :func:`sphkv.kernels.split_k.merge_two_domains_kernel` combines all of them with the
log-sum-exp weights ``2^(lse_s − max lse)``, summing plain and rotated splits separately.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from sphkv.codec import KernelKind, SphericalCodec, TurboQuantCodec
from sphkv.kernels import split_k
from sphkv.kernels.ada_decode.lookup import (
    even_odd_levels,
    plane_levels,
    prmt_enabled,
    prmt_lookup_asm,
    prmt_planes_asm,
    quarter_levels,
    uniform_levels_asm,
)
from sphkv.kernels.ada_decode.naive import TierPages, Window, row_bounds

__all__ = ["MAX_ROWS", "AdaDecodePlan", "ada_decode"]

FP16, INT8, TURBO, ADA = KernelKind.FP16, KernelKind.INT8, KernelKind.TURBO, KernelKind.ADA
MAX_ROWS = 128  # G·M query rows per kv head the kernel holds in registers
# programs per multiprocessor of the one launch (H200, 32k: 16 beat 4 by 1.2–1.3× at d = 128)
_PROGRAMS_PER_SM = 16
# registers per thread at 4 warps: four programs resident per multiprocessor (65536 registers)
# instead of two. The kernel holds every segment, and left alone the allocator takes more than
# the largest one needs; ADA keys need more and are left uncapped (capped, they spill)
_MAX_REGISTERS = 128


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
def _cos_sin(t):
    """(cos θ, sin θ) float32 from the angle table's entries: fp16 cos in the low half-word,
    fp16 sin in the high one."""
    b_cos = (t & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
    b_sin = ((t >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
    return b_cos.to(tl.float32), b_sin.to(tl.float32)


@triton.jit
def _ada_words(p_rows, OFF: tl.constexpr, BITS: tl.constexpr, NODES: tl.constexpr,
               CODES: tl.constexpr):
    """The ``NODES`` ``BITS``-bit codes of a level that start at bit ``OFF`` (a whole byte), as
    words of ``CODES`` codes in ``BITS·CODES/8`` whole bytes: ``[BLOCK_N, NODES/CODES]``, one
    byte load per byte instead of two per code."""
    GROUP: tl.constexpr = BITS * CODES // 8
    WORD: tl.constexpr = tl.int32 if GROUP <= 3 else tl.int64
    o_g = OFF // 8 + tl.arange(0, NODES // CODES) * GROUP
    b_w = tl.load(p_rows + o_g[None, :]).to(WORD)
    for j in tl.static_range(1, GROUP):
        b_w = b_w | (tl.load(p_rows + (o_g + j)[None, :]).to(WORD) << (8 * j))
    return b_w


@triton.jit
def _word_angles(b_w, ada_trig, LEVEL: tl.constexpr, BITS: tl.constexpr, CODES: tl.constexpr,
                 STEP: tl.constexpr, PARITY: tl.constexpr, BLOCK_N: tl.constexpr):
    """(cos θ, sin θ) float32 of the nodes ``STEP·i + PARITY`` of ``LEVEL`` from its words
    (:func:`_ada_words`): ``[BLOCK_N, nodes / STEP]``, the level's table gathered in
    registers."""
    NL: tl.constexpr = 1 << BITS
    o_k = tl.arange(0, CODES // STEP) * STEP + PARITY
    b_c = ((b_w[:, :, None] >> (o_k * BITS)[None, None, :]) & (NL - 1)).to(tl.int32)
    b_c = tl.reshape(b_c, [BLOCK_N, b_w.shape[1] * (CODES // STEP)])
    b_tab = tl.load(ada_trig + (LEVEL - 1) * 256 + tl.arange(0, NL))
    return _cos_sin(tl.gather(tl.broadcast_to(b_tab[None, :], [BLOCK_N, NL]), b_c, 1))


@triton.jit
def _ada_split(b_u, p_rows, ada_trig, I: tl.constexpr, BITS: tl.constexpr,
               NBYTES: tl.constexpr, D: tl.constexpr, LOG2D: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """One level down the top-down product: the weights ``b_u [BLOCK_N, 2^I]`` of level
    ``LOG2D − I``'s nodes, each split into (u cos θ, u sin θ) by its angle: ``[BLOCK_N,
    2^(I+1)]``. ``BITS``: level ℓ's bits in nibble ℓ − 1; level ℓ's codes follow those of the
    levels below it (D ≤ 256: at most 7 below)."""
    LV: tl.constexpr = LOG2D - I
    B: tl.constexpr = (BITS >> (4 * (LV - 1))) & 15
    OFF: tl.constexpr = ((D >> 1) * (BITS & 15) * (LV > 1)
                         + (D >> 2) * ((BITS >> 4) & 15) * (LV > 2)
                         + (D >> 3) * ((BITS >> 8) & 15) * (LV > 3)
                         + (D >> 4) * ((BITS >> 12) & 15) * (LV > 4)
                         + (D >> 5) * ((BITS >> 16) & 15) * (LV > 5)
                         + (D >> 6) * ((BITS >> 20) & 15) * (LV > 6)
                         + (D >> 7) * ((BITS >> 24) & 15) * (LV > 7))
    CODES: tl.constexpr = 8 // (B & (-B))  # 8 / gcd(bits, 8)
    if (OFF % 8 == 0) and ((1 << I) >= CODES):
        b_cos, b_sin = _word_angles(_ada_words(p_rows, OFF, B, 1 << I, CODES), ada_trig, LV, B,
                                    CODES, 1, 0, BLOCK_N)
    else:  # a few codes: each from its (one or two) bytes, its entry from the table
        b_c = _code(p_rows, (OFF + tl.arange(0, 1 << I) * B)[None, :], (1 << B) - 1, NBYTES,
                    True)
        b_cos, b_sin = _cos_sin(tl.load(ada_trig + (LV - 1) * 256 + b_c))
    return tl.reshape(tl.join(b_u * b_cos, b_u * b_sin), [BLOCK_N, 2 << I])


@triton.jit
def _ada_top(p_rows, ada_trig, BITS: tl.constexpr, LEVELS: tl.constexpr,
             NBYTES: tl.constexpr, D: tl.constexpr, LOG2D: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """The product of the top ``LEVELS`` levels' factors of ADA keys, top-down: float32
    ``[BLOCK_N, 2^LEVELS]``, entry i the weight of node i of level ``LOG2D − LEVELS`` (1 at
    the root); each angle decoded once (:func:`_ada_split`)."""
    b_u = tl.full([BLOCK_N, 1], 1.0, dtype=tl.float32)
    for i in tl.static_range(LEVELS):
        b_u = _ada_split(b_u, p_rows, ada_trig, i, BITS, NBYTES, D, LOG2D, BLOCK_N)
    return b_u


@triton.jit
def _ada_fields(p_rows, ada_trig, NF: tl.constexpr, BITS: tl.constexpr,
                NBYTES: tl.constexpr, D: tl.constexpr, LOG2D: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """ADA keys' u as NF = 2 or 4 fp16 field tiles ``[BLOCK_N, D/NF]`` (field f holds
    coordinates NF·i + f), so the last levels need no interleave (``BITS`` as
    :func:`_ada_top`; D ≥ 64). NF = 2: u_2i+α = W_i · (cos, sin)(θ¹_i)[α], W the top levels'
    product over the level-1 nodes. NF = 4: with W over the level-2 nodes,
    (a, b) = W · (cos, sin)(θ²_i), u_4i+2β+α = (a, b)[β] · (cos, sin)(θ¹_2i+β)[α]."""
    B1: tl.constexpr = BITS & 15
    ONE: tl.constexpr = 8 // (B1 & (-B1))
    C1: tl.constexpr = 2 if ONE == 1 else ONE  # at least two: even and odd nodes of one word
    b_w1 = _ada_words(p_rows, 0, B1, D // 2, C1)
    if NF == 2:
        b_w = _ada_top(p_rows, ada_trig, BITS, LOG2D - 1, NBYTES, D, LOG2D, BLOCK_N)
        b_cos, b_sin = _word_angles(b_w1, ada_trig, 1, B1, C1, 1, 0, BLOCK_N)
        # (the last two tiles only fill the return's shape: NF = 2 reads two)
        return ((b_w * b_cos).to(tl.float16), (b_w * b_sin).to(tl.float16),
                b_w.to(tl.float16), b_w.to(tl.float16))
    else:
        B2: tl.constexpr = (BITS >> 4) & 15
        C2: tl.constexpr = 8 // (B2 & (-B2))
        b_w = _ada_top(p_rows, ada_trig, BITS, LOG2D - 2, NBYTES, D, LOG2D, BLOCK_N)
        # level 2's codes start after level 1's D/2 codes: a whole byte for D ≥ 16
        b_cos, b_sin = _word_angles(_ada_words(p_rows, D // 2 * B1, B2, D // 4, C2), ada_trig,
                                    2, B2, C2, 1, 0, BLOCK_N)
        b_a, b_b = b_w * b_cos, b_w * b_sin
        b_cos, b_sin = _word_angles(b_w1, ada_trig, 1, B1, C1, 2, 0, BLOCK_N)
        b_cos1, b_sin1 = _word_angles(b_w1, ada_trig, 1, B1, C1, 2, 1, BLOCK_N)
        return ((b_a * b_cos).to(tl.float16), (b_a * b_sin).to(tl.float16),
                (b_b * b_cos1).to(tl.float16), (b_b * b_sin1).to(tl.float16))


@triton.jit
def _tile(p_rows, levels, ada_trig, KIND: tl.constexpr, BITS: tl.constexpr,
          CODES: tl.constexpr, GROUP: tl.constexpr, NBYTES: tl.constexpr, D: tl.constexpr,
          LOG2D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The rows' vectors in their codec's domain, unscaled: fp16 [BLOCK_N, D]."""
    o_d = tl.arange(0, D)
    if KIND == 0:  # KernelKind.FP16
        b_x = tl.load(p_rows + o_d[None, :])
    elif KIND == 1:  # KernelKind.INT8: c
        b_x = tl.load(p_rows + o_d[None, :]).to(tl.float16)
    elif KIND == 2:  # KernelKind.TURBO: lev[c], the levels gathered in registers
        NL: tl.constexpr = 1 << BITS
        if BITS == 3:
            # two planes (TurboQuantCodec): low two bits 4 to a byte, high bits 8 to a byte
            b_lo = tl.load(p_rows + (o_d // 4)[None, :]).to(tl.int32)
            b_hi = tl.load(p_rows + (D // 4 + o_d // 8)[None, :]).to(tl.int32)
            b_c = ((b_lo >> ((o_d % 4) * 2)[None, :]) & 3) | (((b_hi >> (o_d % 8)[None, :]) & 1)
                                                             << 2)
        elif GROUP == 1:
            # whole bytes, loaded contiguously; field s of byte i is coordinate i·(8/BITS) + s
            b_bytes = tl.load(p_rows + tl.arange(0, NBYTES)[None, :]).to(tl.int32)
            b_c = (b_bytes[:, :, None] >> (tl.arange(0, CODES) * BITS)[None, None, :]) & (NL - 1)
        else:
            # CODES codes fill GROUP whole bytes (8 codes in 5 bytes at 5 bits): the GROUP bytes
            # of every group are loaded as GROUP strided tiles and joined into one word
            o_g = tl.arange(0, D // CODES) * GROUP
            WORD: tl.constexpr = tl.int32 if GROUP <= 3 else tl.int64
            b_w = tl.load(p_rows + o_g[None, :]).to(WORD)
            for j in tl.static_range(1, GROUP):
                b_w = b_w | (tl.load(p_rows + (o_g + j)[None, :]).to(WORD) << (8 * j))
            b_c = ((b_w[:, :, None] >> (tl.arange(0, CODES) * BITS)[None, None, :])
                   & (NL - 1)).to(tl.int32)
        if BITS != 3:
            b_c = tl.reshape(b_c, [BLOCK_N, D])
        b_lev = tl.load(levels + tl.arange(0, NL)).to(tl.float16)
        b_x = tl.gather(tl.broadcast_to(b_lev[None, :], [BLOCK_N, NL]), b_c, 1)
    else:  # ADA at D < 64 (D ≥ 64 reads field tiles, _ada_fields; the join/reshape path
        # gave wrong results at D = 16 on the H100): u_j = Π_ℓ trig[ℓ, c_ℓ(j >> ℓ), bit ℓ−1
        # of j], every angle decoded per coordinate (BITS as _ada_top)
        b_u = tl.full([BLOCK_N, D], 1.0, dtype=tl.float32)
        OFF = 0
        for lv in tl.static_range(1, LOG2D + 1):
            B = (BITS >> (4 * (lv - 1))) & 15
            b_c = _code(p_rows, (OFF + (o_d >> lv) * B)[None, :], (1 << B) - 1, NBYTES, True)
            b_cos, b_sin = _cos_sin(tl.load(ada_trig + (lv - 1) * 256 + b_c))
            b_u *= tl.where(((o_d >> (lv - 1)) & 1)[None, :] == 0, b_cos, b_sin)
            OFF += (D >> lv) * B
        b_x = b_u.to(tl.float16)
    return b_x


@triton.jit
def _segment(q, k_rows, k_side, v_rows, v_side, k_levels, v_levels, ada_trig,
             block_table, lengths, first, o_part, lse_part, i_bh, i_s,
             qk_scale, k_mult, v_mult, split_len, split_base, num_splits,
             stride_btb, stride_bth, stride_wb, stride_wh, stride_wn,
             HKV: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, M: tl.constexpr,
             D: tl.constexpr, LOG2D: tl.constexpr, P: tl.constexpr, WINDOW: tl.constexpr,
             BOUND: tl.constexpr,
             K_KIND: tl.constexpr, K_BITS: tl.constexpr, K_BYTES: tl.constexpr,
             V_KIND: tl.constexpr, V_BITS: tl.constexpr, V_BYTES: tl.constexpr,
             K_CODES: tl.constexpr, K_GROUP: tl.constexpr, V_CODES: tl.constexpr,
             V_GROUP: tl.constexpr, K_ASM: tl.constexpr, V_ASM: tl.constexpr,
             K_NF: tl.constexpr, V_NF: tl.constexpr, BLOCK_N: tl.constexpr):
    """Split ``i_s`` of one segment (a tier's runs or the window) for (sequence, kv head)
    ``i_bh``: its partial output and log-sum-exp, written at split ``split_base + i_s``."""
    i_b, i_h = i_bh // HKV, i_bh % HKV
    length = tl.load(lengths + i_bh)
    start = i_s * split_len
    end = tl.minimum(start + split_len, length)

    o_r = tl.arange(0, R_PAD)
    m_r = o_r < R
    # q [B, HKV, R, D] in the segment's key domain: row r is query head i_h·G + r // M at
    # query position r % M; rows R … R_PAD−1 are zero padding for tl.dot.
    # Codes by the register lookup come as NF field tiles (NF = 2, 4 at 4, 2 bits): field
    # f holds coordinates NF·i + f and is dotted with q's matching coordinates; NF = 1 is the
    # whole tile in coordinate order.
    o_kw = tl.arange(0, D // K_NF)
    p_q = q + (i_bh * R + o_r[:, None]) * D + K_NF * o_kw[None, :]
    b_q0 = tl.load(p_q, mask=m_r[:, None], other=0.0)
    if K_NF >= 2:
        b_q1 = tl.load(p_q + 1, mask=m_r[:, None], other=0.0)
    if K_NF >= 4:
        b_q2 = tl.load(p_q + 2, mask=m_r[:, None], other=0.0)
        b_q3 = tl.load(p_q + 3, mask=m_r[:, None], other=0.0)
    if WINDOW:
        # query position i sees window tokens n ≤ W − M + i
        b_hi = length - M + o_r % M
    if BOUND:
        # … and tokens n ≥ first[b, h, i]; blocks hidden from every row are skipped
        b_lo = tl.load(first + i_bh * M + o_r % M)
        lo_min = tl.min(tl.where(m_r, b_lo, end), 0)
        start += tl.maximum(lo_min - start, 0) // BLOCK_N * BLOCK_N

    VW: tl.constexpr = D // V_NF
    o_vw = tl.arange(0, VW)
    b_m = tl.full([R_PAD], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([R_PAD], dtype=tl.float32)
    b_acc0 = tl.zeros([R_PAD, VW], dtype=tl.float32)
    b_acc1 = tl.zeros([R_PAD, VW], dtype=tl.float32)
    b_acc2 = tl.zeros([R_PAD, VW], dtype=tl.float32)
    b_acc3 = tl.zeros([R_PAD, VW], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < end
        if WINDOW:
            # rows start at multiples of 8 elements (checked on the host): 16-byte loads
            o_w = tl.multiple_of(i_b * stride_wb + i_h * stride_wh
                                 + tl.where(m_n, o_n, 0) * stride_wn, 8)
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
        if K_KIND == 3 and K_NF == 2:  # KernelKind.ADA in field tiles
            b_k0, b_k1, _, _ = _ada_fields(p_k, ada_trig, 2, K_BITS, K_BYTES, D,
                                           LOG2D, BLOCK_N)
            b_s = tl.dot(b_q0, tl.trans(b_k0)) + tl.dot(b_q1, tl.trans(b_k1))
        elif K_KIND == 3 and K_NF == 4:
            b_k0, b_k1, b_k2, b_k3 = _ada_fields(p_k, ada_trig, 4, K_BITS, K_BYTES,
                                                 D, LOG2D, BLOCK_N)
            b_s = tl.dot(b_q0, tl.trans(b_k0)) + tl.dot(b_q1, tl.trans(b_k1)) + \
                tl.dot(b_q2, tl.trans(b_k2)) + tl.dot(b_q3, tl.trans(b_k3))
        elif K_NF == 2:
            b_k0, b_k1 = even_odd_levels(p_k, o_kw, m_n, K_ASM)
            b_s = tl.dot(b_q0, tl.trans(b_k0)) + tl.dot(b_q1, tl.trans(b_k1))
        elif K_NF == 4:
            if K_BITS == 3:
                b_k0, b_k1, b_k2, b_k3 = plane_levels(p_k, o_kw, m_n, D // 4, K_ASM)
            else:
                b_k0, b_k1, b_k2, b_k3 = quarter_levels(p_k, o_kw, m_n, K_ASM)
            b_s = tl.dot(b_q0, tl.trans(b_k0)) + tl.dot(b_q1, tl.trans(b_k1)) + \
                tl.dot(b_q2, tl.trans(b_k2)) + tl.dot(b_q3, tl.trans(b_k3))
        else:
            b_k = _tile(p_k, k_levels, ada_trig, K_KIND, K_BITS, K_CODES, K_GROUP,
                        K_BYTES, D, LOG2D, BLOCK_N)
            b_s = tl.dot(b_q0, tl.trans(b_k))
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
        b_alpha = b_alpha[:, None]
        b_pv = (b_p * (b_vs * v_mult)[None, :]).to(tl.float16)
        if V_NF == 2:
            b_v0, b_v1 = even_odd_levels(p_v, o_vw, m_n, V_ASM)
            b_acc0 = b_acc0 * b_alpha + tl.dot(b_pv, b_v0)
            b_acc1 = b_acc1 * b_alpha + tl.dot(b_pv, b_v1)
        elif V_NF == 4:
            if V_BITS == 3:
                b_v0, b_v1, b_v2, b_v3 = plane_levels(p_v, o_vw, m_n, D // 4, V_ASM)
            else:
                b_v0, b_v1, b_v2, b_v3 = quarter_levels(p_v, o_vw, m_n, V_ASM)
            b_acc0 = b_acc0 * b_alpha + tl.dot(b_pv, b_v0)
            b_acc1 = b_acc1 * b_alpha + tl.dot(b_pv, b_v1)
            b_acc2 = b_acc2 * b_alpha + tl.dot(b_pv, b_v2)
            b_acc3 = b_acc3 * b_alpha + tl.dot(b_pv, b_v3)
        else:
            b_v = _tile(p_v, v_levels, ada_trig, V_KIND, V_BITS, V_CODES, V_GROUP,
                        V_BYTES, D, LOG2D, BLOCK_N)
            b_acc0 = b_acc0 * b_alpha + tl.dot(b_pv, b_v)
        b_m = b_m_new

    # a split that saw nothing (l = 0) has lse = −∞ and output 0
    b_nonempty = b_l > 0
    b_inv = tl.where(b_nonempty, 1.0 / tl.where(b_nonempty, b_l, 1.0), 0.0)[:, None]
    b_lse = tl.where(b_nonempty, b_m + tl.log2(tl.where(b_nonempty, b_l, 1.0)), float("-inf"))
    i_row = i_bh * R + o_r
    # field f of the value sum is output coordinates NF·i + f
    p_o = o_part + (i_row[:, None] * num_splits + split_base + i_s) * D + V_NF * o_vw[None, :]
    m_o = m_r[:, None]
    tl.store(p_o, b_acc0 * b_inv, mask=m_o)
    if V_NF >= 2:
        tl.store(p_o + 1, b_acc1 * b_inv, mask=m_o)
    if V_NF >= 4:
        tl.store(p_o + 2, b_acc2 * b_inv, mask=m_o)
        tl.store(p_o + 3, b_acc3 * b_inv, mask=m_o)
    tl.store(lse_part + i_row * num_splits + split_base + i_s, b_lse, mask=m_r)


# the split length and count change with every allocation: specialised on their values (Triton
# compiles a variant per "is 1" and "divisible by 16" pattern of each integer) they would compile
# the kernel again after admissions, up to a minute each; the per-segment integers come in
# device tensors (the docstring says why)
@triton.jit(do_not_specialize=["split_len", "num_splits"])
def _kernel(q, k_rows, k_side, v_rows, v_side, k_levels, v_levels, ada_trig,
            block_table, lengths, first, k_mult, v_mult, split_base, strides,
            o_part, lse_part, qk_scale, split_len, num_splits,
            NSEG: tl.constexpr, HKV: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr,
            M: tl.constexpr, D: tl.constexpr, LOG2D: tl.constexpr,
            P: tl.constexpr, WINDOW: tl.constexpr, BOUND: tl.constexpr,
            K_KIND: tl.constexpr, K_BITS: tl.constexpr, K_BYTES: tl.constexpr,
            V_KIND: tl.constexpr, V_BITS: tl.constexpr, V_BYTES: tl.constexpr,
            K_CODES: tl.constexpr, K_GROUP: tl.constexpr, V_CODES: tl.constexpr,
            V_GROUP: tl.constexpr, K_ASM: tl.constexpr, V_ASM: tl.constexpr,
            K_NF: tl.constexpr, V_NF: tl.constexpr, BLOCK_N: tl.constexpr):
    """Every segment of a layer in one launch: program (i_bh, i_x) runs split
    ``i_x − split_base[t]`` of the segment t with ``split_base[t] ≤ i_x < split_base[t + 1]``.

    Triton takes flat arguments: each parameter named in :class:`_SegmentArgs` (run time) or
    :class:`_SegmentConsts` (constexpr) is a tuple over the segments, built on the host from
    one named tuple per segment (:func:`_by_parameter`) and passed by name; the others (the
    partial buffers, the logit scale, the shapes) are shared. The integers that change with
    the pages — each segment's first split (``split_base``, int32 ``[NSEG + 1]``) and its
    block-table and window strides (``strides``, int32 ``[NSEG, 5]``) — are read from device
    tensors: Triton specializes every integer inside a tuple argument (``do_not_specialize``
    does not reach them), so as tuples each new admission's values would compile the kernel
    again."""
    i_bh, i_x = tl.program_id(0), tl.program_id(1)
    for t in tl.static_range(NSEG):
        lo = tl.load(split_base + t)
        if (i_x >= lo) & (i_x < tl.load(split_base + t + 1)):
            _segment(q[t], k_rows[t], k_side[t], v_rows[t], v_side[t], k_levels[t],
                     v_levels[t], ada_trig[t], block_table[t], lengths[t],
                     first[t], o_part, lse_part, i_bh, i_x - lo, qk_scale,
                     k_mult[t], v_mult[t], split_len, lo, num_splits,
                     tl.load(strides + 5 * t), tl.load(strides + 5 * t + 1),
                     tl.load(strides + 5 * t + 2), tl.load(strides + 5 * t + 3),
                     tl.load(strides + 5 * t + 4),
                     HKV, R, R_PAD, M, D, LOG2D, P[t], WINDOW[t], BOUND[t], K_KIND[t],
                     K_BITS[t], K_BYTES[t], V_KIND[t], V_BITS[t], V_BYTES[t], K_CODES[t],
                     K_GROUP[t], V_CODES[t], V_GROUP[t],
                     # a string out of a constexpr tuple comes back as a plain str
                     tl.constexpr(K_ASM[t]), tl.constexpr(V_ASM[t]), K_NF[t], V_NF[t], BLOCK_N)


@functools.lru_cache(maxsize=64)
def _rotation(d: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The randomized Hadamard rotation of ``seed`` as matrices acting on rows, float32:
    ``x @ fwd = (R x)ᵀ`` and ``y @ inv = (Rᵀ y)ᵀ``."""
    from sphkv.codec.rotation import RandomizedHadamard

    rot, eye = RandomizedHadamard(d, seed), torch.eye(d)
    return rot.forward(eye).to(device), rot.inverse(eye).to(device)


@functools.lru_cache(maxsize=64)
def _levels(d: int, bits: int, levels: str, device: torch.device) -> torch.Tensor:
    """The TurboQuant codebook of (d, bits, levels), float32 [2^bits]."""
    codec = TurboQuantCodec(d=d, bits=bits, levels=levels)
    return torch.as_tensor(codec.quantizer.levels, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=64)
def _ada_trig(d: int, bits: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Each code's angle of each level of the ADA codec (d, bits) as int32 [L, 256]: fp16
    cos θ in the low half-word, fp16 sin θ in the high one (one load or register gather gives
    both)."""
    codec = SphericalCodec(d=d, bits=bits, rotate=False)
    trig = np.zeros((len(codec.bits), 256, 2), np.float16)
    for i, quant in enumerate(codec.quantizers):
        lev = np.asarray(quant.levels, dtype=np.float64)
        trig[i, :len(lev), 0], trig[i, :len(lev), 1] = np.cos(lev), np.sin(lev)
    return torch.from_numpy(trig.view(np.int32)[..., 0].copy()).to(device)


def _bounds(first: torch.Tensor, shape: tuple[int, ...], M: int,
            device: torch.device) -> torch.Tensor:
    """A visibility bound ``[*shape]`` or ``[*shape, M]`` as contiguous int32 ``[*shape, M]``."""
    if first.shape not in (shape, (*shape, M)):
        raise ValueError(f"first must be {list(shape)} or {[*shape, M]}, got {list(first.shape)}")
    return row_bounds(first, shape, M).to(device=device, dtype=torch.int32).contiguous()


class _Side:
    """How the kernel reads one codec's rows (a tier's keys or values, or the window's).

    Attributes: ``kind`` (:class:`~sphkv.codec.KernelKind`), ``bits``, ``rows`` (payload or
    fp16 rows), ``side`` (the per-row factor: norm, scale or radius; None for fp16), ``mult``
    (the factor's constant, 1/√D for TurboQuant), ``seed`` (the rotation of its domain, or
    None), ``levels`` (the TurboQuant codebook), ``ada_trig`` (ADA keys' angle tables; their
    levels' bits are ``bits``, a nibble per level), ``codes`` and ``group`` (TurboQuant
    packing: ``codes`` codes fill ``group`` bytes), ``asm`` (the register lookup of 2- and
    4-bit levels; ``""`` without it) and ``fields`` (the field tiles a key or value tile comes
    in: the lookup's, ADA keys' at D ≥ 64, else 1). A table the kind does not read is None.
    """

    def __init__(self, codec, codes, d: int, device: torch.device, role: str, rows=None):
        self.levels = self.ada_trig = None
        self.seed, self.mult, self.bits = None, 1.0, 0
        self.asm = ""  # the register lookup of 2- and 4-bit levels (lookup.py)
        self.side = None if codes is None else next(iter(codes.side.values()), None)
        payload = None if codes is None else codes.payload
        kind = FP16 if role == "window" else getattr(codec, "KERNEL", None)
        if role == "window":
            self.kind = FP16
        elif kind == FP16:
            self.kind, rows = FP16, payload.view(torch.float16)
        elif kind == INT8:
            self.kind, rows = INT8, payload.view(torch.int8)
        elif kind == TURBO:
            self.kind, rows, self.bits = TURBO, payload, codec.bits
            self.seed, self.mult = codec.seed, 1.0 / math.sqrt(d)
            self.levels = _levels(d, codec.bits, codec.levels, device)
            # the register lookup gives 8/bits field tiles of D·bits/8 coordinates (2, 4 bits),
            # each a dot operand: at least 16, and at 2 bits 32 (16-wide quarter tiles took
            # 1.8× the gather's time at d = 64 on the H200)
            nf = {2: 4, 4: 2}.get(codec.bits, 0)
            if nf and d // nf >= (32 if nf == 4 else 16) and prmt_enabled(device):
                if codec.levels == "uniform":
                    # the tiles hold 2c − (2^bits − 1); the level is that times half the step
                    self.asm = uniform_levels_asm(codec.bits)
                    lev = codec.quantizer.levels
                    self.mult *= float(lev[1] - lev[0]) / 2
                else:
                    self.asm = prmt_lookup_asm(torch.as_tensor(codec.quantizer.levels))
            elif codec.bits == 3 and d // 4 >= 32 and prmt_enabled(device):
                # the 2-bit plane as quarter tiles, as at 2 bits (at d = 64 the gather)
                self.asm = prmt_planes_asm(torch.as_tensor(codec.quantizer.levels))
        elif kind == ADA and role == "key":
            self.kind, rows = ADA, payload
            self.seed = codec.seed if codec.rotate else None
            self.ada_trig = _ada_trig(d, codec.bits, device)
            self.bits = sum(b << 4 * i for i, b in enumerate(codec.bits))
            # D ≥ 64: the last two levels (one at D = 64) into field tiles of D/4 (D/2)
            # coordinates, by register gathers, no interleave
            self.fields = 4 if d >= 128 else 2 if d >= 64 else 1
        else:
            raise ValueError(f"{role} codec {type(codec).__name__} has no kernel (fp16, int8, "
                             f"TurboQuant, and SphericalCodec keys do)")
        if self.kind != ADA:
            self.fields = {2: 4, 3: 4, 4: 2}[self.bits] if self.asm else 1
        # TurboQuant packing: CODES consecutive codes fill GROUP whole bytes
        self.codes = 8 // math.gcd(self.bits, 8) if self.kind == TURBO else 1
        self.group = self.bits * self.codes // 8 if self.kind == TURBO else 1
        if role != "window" and not rows.is_contiguous():
            rows = rows.contiguous()
        self.rows, self.nbytes = rows, rows.shape[-1]


class _SegmentArgs(NamedTuple):
    """One segment's run-time arguments of :func:`_kernel`, named as its parameters (the kernel
    takes each parameter as a tuple over the segments: :func:`_by_parameter`). A tensor the
    segment does not read is a one-element placeholder."""

    q: torch.Tensor | None  # the query rows in the key domain, fp16 [B, Hkv, R, D]; per run
    k_rows: torch.Tensor  # key rows: the tier's pool payload [rows, bytes], or window keys
    k_side: torch.Tensor  # per-row key factor [rows] (norm, scale, radius)
    v_rows: torch.Tensor
    v_side: torch.Tensor
    k_levels: torch.Tensor  # TurboQuant codebook of the keys [2^bits]
    v_levels: torch.Tensor
    ada_trig: torch.Tensor  # ADA keys: each level's codes' fp16 (cos, sin), int32 [L, 256]
    block_table: torch.Tensor  # int32 [B, Hkv, max_pages]; unread by the window
    lengths: torch.Tensor  # int32 [B, Hkv]: tokens of each run (the window: W)
    first: torch.Tensor  # int32 [B, Hkv, M]: first visible token per query row; read if BOUND
    k_mult: float  # constant of the per-row key factor (1/√D for TurboQuant)
    v_mult: float


class _SegmentConsts(NamedTuple):
    """One segment's compile-time (constexpr) parameters of :func:`_kernel`, named as its
    parameters; ``K_`` of the key reader, ``V_`` of the value reader (:class:`_Side`)."""

    P: int  # page size (the window: 1)
    WINDOW: bool  # the fp16 window: dense rows, causal upper bound per query position
    BOUND: bool  # lower bounds ``first`` per query row (sliding window)
    K_KIND: int  # KernelKind
    K_BITS: int
    K_BYTES: int  # row length of k_rows (bytes; elements for fp16 and int8)
    K_CODES: int
    K_GROUP: int
    K_ASM: str
    K_NF: int
    V_KIND: int
    V_BITS: int
    V_BYTES: int
    V_CODES: int
    V_GROUP: int
    V_ASM: str
    V_NF: int


def _by_parameter(segments) -> dict[str, tuple]:
    """Per-segment named tuples as :func:`_kernel` takes them: one tuple over the segments per
    parameter name."""
    return {name: tuple(getattr(s, name) for s in segments) for name in segments[0]._fields}


@dataclass
class _Segment:
    """One launch slot: a tier's runs or the window, with its key and value readers, its
    capacity in tokens (what its splits are sized from) and its kernel arguments."""

    key: _Side
    value: _Side
    capacity: int
    args: _SegmentArgs
    consts: _SegmentConsts
    #: block table strides over (B, Hkv) (0 for the window), window strides over (B, Hkv, W)
    #: (0 for a tier)
    strides: tuple[int, int, int, int, int]


def _slot(key: _Side, value: _Side, *, block_table, lengths, first, capacity: int,
          page_size: int, window: bool, device: torch.device,
          window_strides=(0, 0, 0)) -> _Segment:
    """The one place a segment's kernel arguments are built from its readers and tables."""
    dummy = torch.zeros(1, device=device)

    def or_placeholder(t):
        return dummy if t is None else t

    args = _SegmentArgs(
        q=None, k_rows=key.rows, k_side=or_placeholder(key.side), v_rows=value.rows,
        v_side=or_placeholder(value.side), k_levels=or_placeholder(key.levels),
        v_levels=or_placeholder(value.levels),
        ada_trig=or_placeholder(key.ada_trig), block_table=block_table, lengths=lengths,
        first=lengths if first is None else first, k_mult=key.mult, v_mult=value.mult)
    consts = _SegmentConsts(
        P=page_size, WINDOW=window, BOUND=first is not None,
        K_KIND=int(key.kind), K_BITS=key.bits, K_BYTES=key.nbytes, K_CODES=key.codes,
        K_GROUP=key.group, K_ASM=key.asm, K_NF=key.fields,
        V_KIND=int(value.kind), V_BITS=value.bits, V_BYTES=value.nbytes, V_CODES=value.codes,
        V_GROUP=value.group, V_ASM=value.asm, V_NF=value.fields)
    strides = ((0, 0) if window else block_table.stride()[:2]) + tuple(window_strides)
    return _Segment(key, value, capacity, args, consts, strides)


def _tier_segment(tp: TierPages, B: int, Hkv: int, M: int, D: int,
                  device: torch.device) -> _Segment:
    """The launch slot of one tier's pages."""
    first = None if tp.first is None else _bounds(tp.first, (B, Hkv), M, device)
    return _slot(_Side(tp.key_codec, tp.key, D, device, "key"),
                 _Side(tp.value_codec, tp.value, D, device, "value"),
                 block_table=tp.block_table, lengths=tp.lengths.contiguous(), first=first,
                 capacity=tp.block_table.shape[2] * tp.page_size, page_size=tp.page_size,
                 window=False, device=device)


def _window_segment(window: Window, B: int, Hkv: int, M: int, D: int,
                    device: torch.device) -> _Segment:
    """The launch slot of the fp16 window (nonempty capacity, checked); its splits cover the
    capacity, its ``lengths`` say how much of it is the window."""
    keys, values = window.keys, window.values
    if keys.dtype != torch.float16 or keys.stride() != values.stride() or keys.stride(-1) != 1:
        raise ValueError("window keys and values must be fp16 with equal strides and unit "
                         "stride in D")
    if any(st % 8 for st in keys.stride()[:3]) or (keys.data_ptr() | values.data_ptr()) % 16:
        raise ValueError(f"window rows must start on 16-byte boundaries (the kernel loads them "
                         f"16 bytes at a time): strides {keys.stride()[:3]} must be multiples "
                         f"of 8 and the tensors 16-byte aligned")
    capacity = keys.shape[2]
    if not 0 <= window.tokens <= capacity:
        raise ValueError(f"window length {window.tokens} outside 0 … {capacity} (its capacity)")
    first = _bounds(window.first, (B,), M, device)[:, None].expand(B, Hkv, M).contiguous()
    lengths = torch.full((B, Hkv), window.tokens, dtype=torch.int32, device=device)
    return _slot(_Side(None, None, D, device, "window", rows=keys),
                 _Side(None, None, D, device, "window", rows=values),
                 block_table=lengths, lengths=lengths, first=first, capacity=capacity,
                 page_size=1, window=True, device=device, window_strides=keys.stride()[:3])


class AdaDecodePlan:
    """Everything of one layer's decode that does not depend on q: the readers of each tier's
    codes, one launch slot per segment, the split layout, the partial buffers.

    Made once (``ada_decode(..., plan=plan)`` then only rotates q, launches the kernel and the
    merge: no host work per segment, nothing that synchronizes). Reuse rule: valid while the
    pages and the window hold the same tensors with the same shapes (codes, block tables,
    lengths change in place; splits are sized from capacities); q may change, its shape may
    not. The visibility bounds and the window's length are the plan's own copies:
    :meth:`set_bounds` writes new ones, so that with a window buffer of fixed capacity one plan
    serves every decode step until the pages change.

    Parameters
    ----------
    pages, window : as :func:`ada_decode`
    Hq, M, D : query heads, query positions per sequence, head dim
    block_n, num_splits, num_warps, num_stages : as :func:`ada_decode`
    """

    def __init__(self, pages: list[TierPages], window: Window | None, Hq: int, M: int,
                 D: int, *, device: torch.device, block_n: int = 64,
                 num_splits: int | None = None, num_warps: int = 4, num_stages: int = 2):
        if not pages and window is None:
            raise ValueError("nothing to attend to: no pages and no window")
        Hkv = pages[0].block_table.shape[1] if pages else window.keys.shape[1]
        B = pages[0].block_table.shape[0] if pages else window.keys.shape[0]
        if Hq % Hkv:
            raise ValueError(f"query heads Hq={Hq} must be a multiple of kv heads Hkv={Hkv}")
        R = Hq // Hkv * M
        if R > MAX_ROWS:
            raise ValueError(f"G·M = {R} query rows per kv head; the kernel holds at most "
                             f"{MAX_ROWS}")
        if D < 16 or D & (D - 1):
            raise ValueError(f"head dim D={D} must be a power of two ≥ 16")
        if block_n < 32 or block_n & (block_n - 1):
            raise ValueError(f"block_n={block_n} must be a power of two ≥ 32")
        if block_n < 8 * num_warps:
            # Triton 3.6 on the H100: the register gather of the levels fails to compile
            # (setOptimizedGatherLayout: isWarpLocal) at block_n = 32 with 8 warps
            raise ValueError(f"block_n={block_n} must be ≥ 8·num_warps = {8 * num_warps}")
        self.B, self.Hq, self.Hkv, self.M, self.D, self.R = B, Hq, Hkv, M, D, R
        self.device = dev = torch.device(device)
        segments = []
        self._page_segment: dict[int, int] = {}  # index in pages -> its segment
        for i, tp in enumerate(pages):
            if tp.key_codec is None or tp.value_codec is None:
                raise ValueError(f"pages[{i}] has no codecs: a drop tier stores nothing")
            if tp.block_table.shape[:2] != (B, Hkv) or tp.lengths.shape != (B, Hkv):
                raise ValueError(f"pages[{i}]: block_table must be [{B}, {Hkv}, "
                                 f"max_pages] and lengths [{B}, {Hkv}], got "
                                 f"{tuple(tp.block_table.shape)}, {tuple(tp.lengths.shape)}")
            if tp.key.payload.shape[0] == 0 or tp.block_table.shape[2] == 0:
                continue
            self._page_segment[i] = len(segments)
            segments.append(_tier_segment(tp, B, Hkv, M, D, dev))
        v_seeds = {s.value.seed for s in segments} - {None}
        if len(v_seeds) > 1:
            raise ValueError(f"value codecs rotate with different seeds {sorted(v_seeds)}; "
                             f"the kernel keeps one rotated value sum")
        self.v_seed = next(iter(v_seeds), None)
        self._window_segment = None
        if window is not None and window.keys.shape[2] > 0:
            self._window_segment = len(segments)
            segments.append(_window_segment(window, B, Hkv, M, D, dev))
        if not segments:
            raise ValueError("nothing to attend to: every tier is empty and no window")
        self.segments = segments

        # one split length for every segment: about num_splits splits per (sequence, kv head)
        # over all segments together, each segment at least one split
        capacity = sum(s.capacity for s in segments)
        n = num_splits or split_k.num_splits(B * Hkv, capacity, block_n, dev, _PROGRAMS_PER_SM)
        self.split_len = split_k.split_length(capacity, n, block_n)
        bases = [0]
        for s in segments:
            bases.append(bases[-1] + triton.cdiv(s.capacity, self.split_len))
        self.total = bases[-1]
        ints = [bases, [x for seg in segments for x in seg.strides]]
        if max(max(v) for v in ints) >= 2**31:
            raise ValueError("split bases or strides past int32; the kernel reads them as int32")
        self.split_base, self.strides = (torch.tensor(v, dtype=torch.int32, device=dev)
                                         for v in ints)
        rotated = [int(s.value.seed is not None)
                   for s, a, b in zip(segments, bases, bases[1:], strict=False)
                   for _ in range(a, b)]
        self.rotated = torch.tensor(rotated, dtype=torch.int32, device=dev)
        self.o_part = torch.empty(B * Hkv * R, self.total, D, device=dev, dtype=torch.float32)
        self.lse_part = torch.empty(B * Hkv * R, self.total, device=dev, dtype=torch.float32)
        self.out2 = torch.empty(B * Hkv * R, 2, D, device=dev, dtype=torch.float32)
        self.options = dict(
            NSEG=len(segments), HKV=Hkv, R=R, R_PAD=max(16, triton.next_power_of_2(R)), M=M,
            D=D, LOG2D=D.bit_length() - 1, BLOCK_N=block_n, num_warps=num_warps,
            # ADA's per-level code loads, staged twice, overflow shared memory at D = 128
            num_stages=1 if any(s.key.kind == ADA for s in segments) else num_stages,
            **({"maxnreg": _MAX_REGISTERS} if dev.type == "cuda" and num_warps == 4
               and not any(s.key.kind == ADA for s in segments) else {}),
            **_by_parameter([s.consts for s in segments]))
        # the run-time arguments but q, by name: their tensors change in place between runs
        self._arguments = _by_parameter([s.args for s in segments])

    def set_bounds(self, pages_first: list[torch.Tensor | None] | None = None,
                   window_first: torch.Tensor | None = None,
                   window_length: int | None = None) -> None:
        """Write new visibility bounds into the plan, in place where they live (no new tensors,
        nothing that synchronizes).

        Parameters
        ----------
        pages_first : list, optional
            Per tier of the plan's ``pages``, a new ``first`` as :class:`TierPages` takes it
            (None leaves it); a tier planned without bounds takes none.
        window_first : torch.Tensor, optional
            The window's new ``first``, as :class:`Window` takes it.
        window_length : int or torch.Tensor, optional
            The window's new length, within the capacity it was planned with; or an int32
            ``[1]`` tensor on the device holding it (not checked: read where it lies, as a
            CUDA graph needs).
        """
        B, Hkv, M = self.B, self.Hkv, self.M
        for i, first in enumerate(pages_first or []):
            if first is None or i not in self._page_segment:
                continue
            segment = self.segments[self._page_segment[i]]
            if not segment.consts.BOUND:
                raise ValueError(f"pages[{i}] was planned without bounds; plan it with first")
            segment.args.first.copy_(row_bounds(first, (B, Hkv), M))
        if window_first is None and window_length is None:
            return
        if self._window_segment is None:
            raise ValueError("the plan has no window")
        window = self.segments[self._window_segment]
        if window_first is not None:
            window.args.first.copy_(row_bounds(window_first, (B,), M)[:, None].expand(B, Hkv, M))
        if isinstance(window_length, torch.Tensor):
            window.args.lengths.copy_(window_length.expand_as(window.args.lengths))
        elif window_length is not None:
            if not 0 <= window_length <= window.capacity:
                raise ValueError(f"window length {window_length} outside 0 … "
                                 f"{window.capacity} (the capacity planned)")
            window.args.lengths.fill_(window_length)

    def run(self, q: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """Attention of ``q [B, Hq, M, D]`` (the plan's shape): as :func:`ada_decode`."""
        B, Hq, M, D = q.shape
        if (B, Hq, M, D) != (self.B, self.Hq, self.M, self.D):
            raise ValueError(f"q is {list(q.shape)}, the plan was made for "
                             f"{[self.B, self.Hq, self.M, self.D]}")
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        dev, segs = self.device, self.segments
        # the R = G·M query rows of each kv head, head-major, in each key domain: [B, Hkv, R, D]
        q_rows = q.float().reshape(B, self.Hkv, self.R, D)
        q_dom = {}
        for s in segs:
            if s.key.seed not in q_dom:
                x = q_rows if s.key.seed is None else q_rows @ _rotation(D, s.key.seed, dev)[0]
                q_dom[s.key.seed] = x.half().contiguous()

        _kernel[(B * self.Hkv, self.total)](
            **dict(self._arguments, q=tuple(q_dom[s.key.seed] for s in segs)),
            split_base=self.split_base, strides=self.strides, o_part=self.o_part,
            lse_part=self.lse_part, qk_scale=scale * split_k.LOG2E, split_len=self.split_len,
            num_splits=self.total, **self.options)
        split_k.merge_two_domains_kernel[(B * self.Hkv * self.R,)](
            self.o_part, self.lse_part, self.rotated, self.out2, self.total, D=D, num_warps=4)
        out = self.out2[:, 0]
        if self.v_seed is not None:
            # the rotated value sum back to coordinates, once per output row
            out = out + self.out2[:, 1] @ _rotation(D, self.v_seed, dev)[1]
        return out.view(B, Hq, M, D).to(q.dtype)


def ada_decode(q: torch.Tensor, pages: list[TierPages], window: Window | None,
               scale: float | None = None, *, block_n: int = 64, num_splits: int | None = None,
               num_warps: int = 4, num_stages: int = 2,
               plan: AdaDecodePlan | None = None) -> torch.Tensor:
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
    num_splits : splits per (sequence, kv head), all segments together (each at least one);
        default about 16 programs per multiprocessor
    num_warps, num_stages : Triton launch options
    plan : an :class:`AdaDecodePlan` of these pages and window (then the launch options above
        are the plan's); made here when None

    Returns
    -------
    [B, Hq, M, D], the dtype of ``q``: equals :func:`ada_decode_naive` to rounding.
    Value codecs that rotate must share one rotation seed.
    """
    if plan is None:
        plan = AdaDecodePlan(pages, window, q.shape[1], q.shape[2], q.shape[3],
                             device=q.device, block_n=block_n, num_splits=num_splits,
                             num_warps=num_warps, num_stages=num_stages)
    return plan.run(q, scale)
