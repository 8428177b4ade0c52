"""Encode + pack of new tokens' vectors into pool slots, in Triton.

One program takes ``BLOCK_M`` vectors at a time (a grid-stride loop, so that the rotation matrix
is loaded once per program) and writes each one's codes straight into its slot row:

    TurboQuant   y = R x, n = ‖y‖, z = √D y / n, c_j = #{t : z_j > thr_t} (torch.bucketize),
                 codes packed little-endian, n stored fp16 (unbiased: n · D / ⟨level[c], z⟩)
    int8         s = fp16(max|x| / 127), c = round_half_even(x / s) clipped to ±127
    fp16         x rounded to fp16

The rotation is a matmul on the tensor cores with exact operands: ``R = H diag(s) / √D`` with H
a Hadamard matrix, so ``√D Rᵀ`` holds only ±1 (exact in fp16), and ``y' = x (√D Rᵀ) = √D y``
is an fp16 dot with float32 accumulation whose products are exact when x is fp16 (the cache's
window is); other inputs are split ``x = x_hi + x_lo`` into two fp16 parts and two dots (float32
accuracy for ``|x| ≳ 1e-3``, below which ``x_lo`` turns subnormal). z does not see the scale:
``z = √D y'/‖y'‖``; ``n = ‖y'‖ / √D``.

Packing: ``CODES = 8 / gcd(bits, 8)`` consecutive codes fill ``GROUP = bits·CODES/8`` whole
bytes (8 codes → 5 bytes at 5 bits), so every bit depth is one int64 word per group, split
into bytes; no code is assembled across groups. 3-bit codes are the codec's two planes
instead: their low two bits four to a byte, then their high bits eight to a byte.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from sphkv.codec import Codec, Codes, Fp16Codec, Int8Codec, KernelKind, TurboQuantCodec

__all__ = ["KERNEL_CODECS", "encode_codes", "encode_pack"]

#: the codecs :func:`encode_pack` encodes
KERNEL_CODECS = (Fp16Codec, Int8Codec, TurboQuantCodec)


@triton.jit
def _round_half_even(v):
    """torch.round: to the nearest integer, ties to even (|v| < 2^23)."""
    r = tl.floor(v)
    f = v - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return r + tl.where((f > 0.5) | ((f == 0.5) & odd), 1.0, 0.0)


@triton.jit(do_not_specialize=["n"])  # n changes with every admission
def _kernel(x, signs, thr, lev, payload, side, slots, n, stride_x, sqrt_d,
            KIND: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, NBYTES: tl.constexpr,
            CODES: tl.constexpr, GROUP: tl.constexpr, SPLIT: tl.constexpr,
            UNBIASED: tl.constexpr, BLOCK_M: tl.constexpr):
    i_p, n_p = tl.program_id(0), tl.num_programs(0)
    o_d = tl.arange(0, D)
    for i_m in range(i_p, tl.cdiv(n, BLOCK_M), n_p):
        o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_m = o_m < n
        b_x = tl.load(x + o_m[:, None].to(tl.int64) * stride_x + o_d[None, :],
                      mask=m_m[:, None], other=0.0).to(tl.float32)
        b_slot = tl.load(slots + o_m, mask=m_m, other=0).to(tl.int64)
        if KIND == 0:  # KernelKind.FP16 rows
            tl.store(payload + b_slot[:, None] * D + o_d[None, :], b_x.to(tl.float16),
                     mask=m_m[:, None])
        elif KIND == 1:  # KernelKind.INT8 rows, per-vector fp16 scale
            b_scale = tl.math.div_rn(tl.max(tl.abs(b_x), 1), 127.0).to(tl.float16)
            b_s = b_scale.to(tl.float32)
            b_c = _round_half_even(tl.math.div_rn(b_x, tl.where(b_s > 0, b_s, 1.0)[:, None]))
            b_c = tl.minimum(tl.maximum(b_c, -127.0), 127.0).to(tl.int8)
            tl.store(payload + b_slot[:, None] * D + o_d[None, :], b_c, mask=m_m[:, None])
            tl.store(side + b_slot, b_scale, mask=m_m)
        else:  # TurboQuant
            # √D Rᵀ as [D_in, D_out], entries ±1: x @ signs = √D (R x)ᵀ
            b_h = tl.load(signs + o_d[:, None] * D + o_d[None, :])
            b_xh = b_x.to(tl.float16)
            b_y = tl.dot(b_xh, b_h)
            if SPLIT:  # the rest of x, exact to float32 rounding
                b_y += tl.dot((b_x - b_xh.to(tl.float32)).to(tl.float16), b_h)
            b_norm = tl.sqrt(tl.sum(b_y * b_y, 1))
            # z = √D y / ‖y‖ has coordinates of unit variance (the √D of y' cancels)
            b_z = tl.math.div_rn(b_y, tl.where(b_norm > 0, b_norm, 1.0)[:, None]) * sqrt_d
            b_c = tl.zeros([BLOCK_M, D], dtype=tl.int64)
            for t in tl.static_range((1 << BITS) - 1):
                b_c += (b_z > tl.load(thr + t)).to(tl.int64)
            if UNBIASED:
                # the norm that makes ⟨x̂, x⟩ = ‖x‖²: ‖y‖ · D / ⟨ẑ, z⟩ (the codec's _quantize)
                b_dot = tl.sum(tl.load(lev + b_c) * b_z, 1)
                b_norm = tl.where(b_dot > 0, b_norm * tl.math.div_rn(sqrt_d * sqrt_d, b_dot),
                                  b_norm)
            p_row = payload + b_slot[:, None] * NBYTES
            if BITS == 3:
                # the codec's two planes: low two bits 4 codes to a byte, then high bits 8 to
                # a byte
                b_lo = tl.reshape(b_c & 3, [BLOCK_M, D // 4, 4])
                b_lo = tl.sum(b_lo << (tl.arange(0, 4) * 2).to(tl.int64)[None, None, :], 2)
                tl.store(p_row + tl.arange(0, D // 4)[None, :], b_lo.to(tl.uint8),
                         mask=m_m[:, None])
                b_hi = tl.reshape(b_c >> 2, [BLOCK_M, D // 8, 8])
                b_hi = tl.sum(b_hi << tl.arange(0, 8).to(tl.int64)[None, None, :], 2)
                tl.store(p_row + D // 4 + tl.arange(0, D // 8)[None, :], b_hi.to(tl.uint8),
                         mask=m_m[:, None])
            else:
                # CODES codes → one little-endian word of GROUP bytes
                b_c = tl.reshape(b_c, [BLOCK_M, D // CODES, CODES])
                b_w = tl.sum(b_c << (tl.arange(0, CODES) * BITS).to(tl.int64)[None, None, :],
                             2)
                p_g = p_row + tl.arange(0, D // CODES)[None, :] * GROUP
                for j in tl.static_range(GROUP):
                    tl.store(p_g + j, ((b_w >> (8 * j)) & 255).to(tl.uint8),
                             mask=m_m[:, None])
            tl.store(side + b_slot, tl.math.div_rn(b_norm, sqrt_d).to(tl.float16), mask=m_m)


@functools.lru_cache(maxsize=64)
def _turbo_tables(d: int, bits: int, seed: int, levels: str, device: torch.device):
    """(√D Rᵀ fp16 [D, D] of ±1, thresholds float32 [2^bits − 1], levels float32 [2^bits])
    of a TurboQuant codec."""
    codec = TurboQuantCodec(d=d, bits=bits, seed=seed, levels=levels)
    signs = torch.round(codec.rotation.matrix("cpu").double() * math.sqrt(d))
    if not (signs.abs() == 1).all():
        raise ValueError("the rotation is not a signed Hadamard matrix")
    return (signs.half().contiguous().to(device),
            torch.as_tensor(codec.quantizer.thresholds, dtype=torch.float32, device=device),
            torch.as_tensor(codec.quantizer.levels, dtype=torch.float32, device=device))


@functools.lru_cache(maxsize=8)
def _num_programs(device: torch.device) -> int:
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count \
        if device.type == "cuda" else 4


def encode_pack(x: torch.Tensor, codec: Codec, pool: Codes, slots: torch.Tensor, *,
                block_m: int = 32, num_warps: int = 4) -> None:
    """Encode ``x`` with ``codec`` into the rows ``slots`` of ``pool``, in place.

    Parameters
    ----------
    x : [N, D] float (fp16, bf16 or fp32), unit stride in D
    codec : TurboQuantCodec (any bits 1–8), Int8Codec or Fp16Codec; D a power of two ≥ 16
    pool : flat codes of the pool on ``x``'s device: payload uint8 ``[rows, bytes]``, side
        ``[rows]`` fp16 (``norm`` or ``scale``), contiguous
    slots : int ``[N]``, distinct rows of the pool
    block_m : vectors per step, a power of two ≥ 16

    Afterwards ``pool[slots]`` equals :func:`encode_pack_naive`'s, except for TurboQuant codes
    of coordinates whose rotated value sits on a threshold to within float32 rounding (the
    matmul's summation order differs), and fp16 norms by one ulp where the float32 norm sits
    on an fp16 rounding tie.
    """
    n, d = x.shape
    if d < 16 or d & (d - 1) or d != codec.d:
        raise ValueError(f"x must be [N, D] with D = codec.d a power of two ≥ 16, got "
                         f"{tuple(x.shape)} for d={codec.d}")
    if slots.shape != (n,):
        raise ValueError(f"slots must be [{n}], got {tuple(slots.shape)}")
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m={block_m} must be a power of two ≥ 16")
    if n == 0:
        return
    dev = x.device
    x = x if x.stride(-1) == 1 else x.contiguous()
    slots = slots.to(device=dev, dtype=torch.int64).contiguous()
    bits, nbytes, signs, thr, lev = 0, d, x, x, x
    side = next(iter(pool.side.values()), None)
    kind = codec.KERNEL
    if kind == KernelKind.FP16:
        payload = pool.payload.view(torch.float16)
    elif kind == KernelKind.INT8:
        payload = pool.payload.view(torch.int8)
    elif kind == KernelKind.TURBO:
        payload, bits = pool.payload, codec.bits
        nbytes = payload.shape[-1]
        signs, thr, lev = _turbo_tables(d, bits, codec.seed, codec.levels, dev)
    else:
        raise ValueError(f"codec {type(codec).__name__} has no encode kernel (TurboQuant, int8 "
                         f"and fp16 do)")
    if not payload.is_contiguous() or (side is not None and not side.is_contiguous()):
        raise ValueError("the pool's payload and side tensors must be contiguous")
    codes = 8 // math.gcd(bits, 8) if bits else 1
    grid = (min(triton.cdiv(n, block_m), _num_programs(dev)),)
    _kernel[grid](x, signs, thr, lev, payload, side if side is not None else x, slots, n,
                  x.stride(0), math.sqrt(d), KIND=int(kind), D=d, BITS=bits, NBYTES=nbytes,
                  CODES=codes, GROUP=bits * codes // 8 if bits else 1,
                  SPLIT=x.dtype != torch.float16,
                  UNBIASED=kind == KernelKind.TURBO and codec.unbiased, BLOCK_M=block_m,
                  num_warps=num_warps)


def encode_codes(x: torch.Tensor, codec: Codec) -> Codes:
    """``codec.encode(x)`` of ``x [N, D]`` by :func:`encode_pack`: new flat codes of N vectors
    on ``x``'s device (slot i holds vector i), equal to the codec's own up to the ties
    :func:`encode_pack` names."""
    # shapes and dtypes of one vector's codes
    one = codec.encode(torch.zeros(1, codec.d))
    n, dev = x.shape[0], x.device
    pool = Codes(torch.empty(n, *one.payload.shape[1:], dtype=one.payload.dtype, device=dev),
                 {k: torch.empty(n, *v.shape[1:], dtype=v.dtype, device=dev)
                  for k, v in one.side.items()},
                 torch.Size((n, codec.d)))
    encode_pack(x, codec, pool, torch.arange(n, device=dev))
    return pool
