"""Where the time of a 4-bit decode goes: one split-K decode-attention kernel over contiguous
(unpaged) codes, with the decoding of the codes swapped one piece at a time, on a GPU.

``python -m benchmarks.run --op decode_anatomy [--batch 8] [--lengths 32768] [--modes ...]``

Keys and values are 4-bit codes of D coordinates plus an fp16 norm per token (``x = n · lev[c]``,
the shape of a TurboQuant tier in its rotated domain), except in ``fp16``. Modes:

- ``fp16``: K and V in fp16, the dense kernel (the bandwidth reference).
- ``interleaved-lut``: byte i holds coordinates 2i (low nibble) and 2i + 1; the codes are
  split into ``[N, D/2, 2]``, reshaped to ``[N, D]`` and looked up, ``lev[c]`` by ``tl.gather``
  (the decode of ``sphkv.kernels.ada_decode``).
- ``split-lut``: byte i holds coordinates i (low nibble) and i + D/2 (high): two ``[N, D/2]``
  tiles with no reshape and two half-width dots; ``lev[c]`` by ``tl.gather``.
- ``split-affine``: as ``split-lut`` with uniform levels ``lev[c] = a·c + b``: the tiles are
  ``c`` converted to fp16, ``a`` and ``b`` applied to the logits and the value sums
  (``q·lev(c) = a q·c + b Σq``), so no lookup.
- ``split-magic``: as ``split-affine``, ``c`` made fp16 without a conversion instruction: the
  bits ``0x6400 | c`` read as fp16 are ``1024 + c``.
- ``bytes``: the code bytes themselves as fp16, one half-width dot (loads and one conversion).
- ``interleaved-prmt``: the codes of ``interleaved-lut`` decoded without ``tl.gather`` or a
  reshape: low nibbles (even coordinates) and high nibbles (odd) make two ``[N, D/2]`` tiles,
  dotted with q's even and odd coordinates, and ``lev[c]`` is looked up in registers by PTX
  byte permutes (``prmt``), four codes at a time, in inline assembly
  (:func:`sphkv.kernels.ada_decode.lookup.prmt_lookup_asm`; GPU only: the interpreter runs no
  assembly).

Each mode is checked against :func:`anatomy_naive` (decode the codes in torch, attend in float64)
first; then every mode is timed at each ``block_n`` × warps and the best is reported with its
bandwidth on the bytes it must read, against SDPA fp16 (flash) on the same shape.
"""

from __future__ import annotations

import argparse
import functools
import math

import torch
import triton
import triton.language as tl

from benchmarks.common import gbps
from benchmarks.ops.paged_decode import device_ceilings, time_op, time_sdpa
from sphkv.kernels import split_k
from sphkv.kernels.ada_decode.lookup import even_odd_levels, prmt_lookup_asm

MODES = ("fp16", "interleaved-lut", "split-lut", "split-affine", "split-magic", "bytes",
         "interleaved-prmt")
ASM_MODES = ("interleaved-prmt",)
# uniform levels of the affine modes: a·c + b spans ±3.75 like 4-bit Gaussian levels
AFFINE = (0.5, -3.75)


@triton.jit
def _split_tiles(p_rows, o_h, m_n, b_lev, MODE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tiles ``[BLOCK_N, D/2]`` fp16 of coordinates 0 … D/2−1 (low nibbles) and D/2 … D−1."""
    b_b = tl.load(p_rows + o_h[None, :], mask=m_n[:, None], other=0).to(tl.int32)
    if MODE == 5:  # bytes
        return b_b.to(tl.float16), b_b.to(tl.float16)
    lo, hi = b_b & 15, b_b >> 4
    if MODE == 2:  # split-lut
        b_t = tl.broadcast_to(b_lev[None, :], [BLOCK_N, 16])
        return tl.gather(b_t, lo, 1), tl.gather(b_t, hi, 1)
    if MODE == 3:  # split-affine
        return lo.to(tl.float16), hi.to(tl.float16)
    # split-magic: the fp16 bits 0x6400 | c are 1024 + c
    return ((lo | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0,
            (hi | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0)


@triton.jit
def _interleaved_tile(p_rows, o_h, m_n, b_lev, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile ``[BLOCK_N, D]`` fp16: byte i's nibbles are coordinates 2i and 2i + 1."""
    b_b = tl.load(p_rows + o_h[None, :], mask=m_n[:, None], other=0).to(tl.int32)
    b_c = tl.reshape((b_b[:, :, None] >> (tl.arange(0, 2) * 4)[None, None, :]) & 15,
                     [BLOCK_N, D])
    return tl.gather(tl.broadcast_to(b_lev[None, :], [BLOCK_N, 16]), b_c, 1)


@triton.jit
def _kernel(q, k_x, k_n, v_x, v_n, lev, o_part, lse_part, length, split_len, qk_scale, a, b,
            S: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, D: tl.constexpr,
            MODE: tl.constexpr, BLOCK_N: tl.constexpr, ASM: tl.constexpr):
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    start = i_s * split_len
    end = tl.minimum(start + split_len, length)
    NB: tl.constexpr = D // 2
    HALVES: tl.constexpr = MODE >= 2
    AFF: tl.constexpr = (MODE == 3) or (MODE == 4)
    o_r, o_d, o_h = tl.arange(0, R_PAD), tl.arange(0, D), tl.arange(0, NB)
    # the coordinates of the two half tiles: even and odd (prmt), else first and second half
    if MODE == 6:
        o_lo, o_hi = 2 * o_h, 2 * o_h + 1
    else:
        o_lo, o_hi = o_h, NB + o_h
    m_r = o_r < R
    p_q = q + (i_bh * R + o_r[:, None]) * D
    b_q = tl.load(p_q + o_d[None, :], mask=m_r[:, None], other=0.0)
    b_q_lo = tl.load(p_q + o_lo[None, :], mask=m_r[:, None], other=0.0)
    b_q_hi = tl.load(p_q + o_hi[None, :], mask=m_r[:, None], other=0.0)
    b_qsum = tl.sum(b_q.to(tl.float32), 1)
    b_lev = tl.load(lev + tl.arange(0, 16)).to(tl.float16)

    b_m = tl.full([R_PAD], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([R_PAD], dtype=tl.float32)
    b_acc = tl.zeros([R_PAD, D], dtype=tl.float32)
    b_acc_lo = tl.zeros([R_PAD, NB], dtype=tl.float32)
    b_acc_hi = tl.zeros([R_PAD, NB], dtype=tl.float32)
    b_shift = tl.zeros([R_PAD], dtype=tl.float32)  # Σ p n b of the affine modes
    for n0 in range(start, end, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < end
        row = (i_bh * length + o_n).to(tl.int64)
        if MODE == 0:
            b_k = tl.load(k_x + row[:, None] * D + o_d[None, :], mask=m_n[:, None], other=0.0)
            b_s = tl.dot(b_q, tl.trans(b_k))
        else:
            b_kn = tl.load(k_n + row, mask=m_n, other=0.0).to(tl.float32)
            if MODE == 1:
                b_k = _interleaved_tile(k_x + row[:, None] * NB, o_h, m_n, b_lev, D, BLOCK_N)
                b_s = tl.dot(b_q, tl.trans(b_k))
            else:
                if MODE == 6:
                    b_k_lo, b_k_hi = even_odd_levels(k_x + row[:, None] * NB, o_h, m_n, ASM)
                else:
                    b_k_lo, b_k_hi = _split_tiles(k_x + row[:, None] * NB, o_h, m_n, b_lev,
                                                  MODE, BLOCK_N)
                b_s = tl.dot(b_q_lo, tl.trans(b_k_lo))
                if MODE != 5:
                    b_s += tl.dot(b_q_hi, tl.trans(b_k_hi))
                if AFF:
                    b_s = a * b_s + b * b_qsum[:, None]
            b_s = b_s * b_kn[None, :]
        b_s = tl.where(m_n[None, :], b_s * qk_scale, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_alpha = tl.exp2(b_m - b_m_new)
        b_p = tl.exp2(b_s - b_m_new[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_m = b_m_new
        if MODE == 0:
            b_v = tl.load(v_x + row[:, None] * D + o_d[None, :], mask=m_n[:, None], other=0.0)
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(tl.float16), b_v)
        else:
            b_pn = b_p * tl.load(v_n + row, mask=m_n, other=0.0).to(tl.float32)[None, :]
            if MODE == 1:
                b_v = _interleaved_tile(v_x + row[:, None] * NB, o_h, m_n, b_lev, D, BLOCK_N)
                b_acc = b_acc * b_alpha[:, None] + tl.dot(b_pn.to(tl.float16), b_v)
            else:
                if MODE == 6:
                    b_v_lo, b_v_hi = even_odd_levels(v_x + row[:, None] * NB, o_h, m_n, ASM)
                else:
                    b_v_lo, b_v_hi = _split_tiles(v_x + row[:, None] * NB, o_h, m_n, b_lev,
                                                  MODE, BLOCK_N)
                if AFF:
                    b_shift = b_shift * b_alpha + b * tl.sum(b_pn, 1)
                    b_pn = b_pn * a
                b_pn16 = b_pn.to(tl.float16)
                b_acc_lo = b_acc_lo * b_alpha[:, None] + tl.dot(b_pn16, b_v_lo)
                if MODE != 5:
                    b_acc_hi = b_acc_hi * b_alpha[:, None] + tl.dot(b_pn16, b_v_hi)

    # a split with no tokens keeps l = 0: lse −∞ and output 0
    b_nonempty = b_l > 0
    b_inv = tl.where(b_nonempty, 1.0 / tl.where(b_nonempty, b_l, 1.0), 0.0)
    b_lse = tl.where(b_nonempty, b_m + tl.log2(tl.where(b_nonempty, b_l, 1.0)), float("-inf"))
    p_o = o_part + ((i_bh * S + i_s) * R + o_r[:, None]) * D
    if HALVES:
        tl.store(p_o + o_lo[None, :], (b_acc_lo + b_shift[:, None]) * b_inv[:, None],
                 mask=m_r[:, None])
        tl.store(p_o + o_hi[None, :], (b_acc_hi + b_shift[:, None]) * b_inv[:, None],
                 mask=m_r[:, None])
    else:
        tl.store(p_o + o_d[None, :], b_acc * b_inv[:, None], mask=m_r[:, None])
    tl.store(lse_part + (i_bh * S + i_s) * R + o_r, b_lse, mask=m_r)


def make_case(mode: str, bh: int, group: int, length: int, d: int, lev: torch.Tensor, gen,
              device) -> dict:
    """Random q ``[BH, G, D]`` and random K/V of ``mode`` (codes, norms, or fp16)."""
    case = {"q": torch.randn(bh, group, d, generator=gen).half().to(device), "lev": lev}
    for name in ("k", "v"):
        if mode == "fp16":
            case[f"{name}_x"] = (torch.randn(bh, length, d, generator=gen) * 0.3).half()
            case[f"{name}_n"] = torch.ones(1).half()
        else:
            case[f"{name}_x"] = torch.randint(0, 256, (bh, length, d // 2), generator=gen,
                                              dtype=torch.uint8)
            case[f"{name}_n"] = (0.05 + 0.1 * torch.rand(bh, length, generator=gen)).half()
        case[f"{name}_x"] = case[f"{name}_x"].to(device)
        case[f"{name}_n"] = case[f"{name}_n"].to(device)
    return case


def decode_naive(mode: str, x: torch.Tensor, n: torch.Tensor, lev: torch.Tensor) -> torch.Tensor:
    """The vectors ``[BH, L, D]`` (float64) that ``mode``'s codes stand for."""
    if mode == "fp16":
        return x.double()
    x = x.long()
    lo, hi = x & 15, x >> 4
    if mode == "bytes":
        vec = torch.cat([x.double(), torch.zeros_like(x, dtype=torch.float64)], -1)
    elif mode in ("interleaved-lut", "interleaved-prmt"):
        vec = lev.double()[torch.stack([lo, hi], -1).flatten(-2)]
    elif mode == "split-lut":
        vec = lev.double()[torch.cat([lo, hi], -1)]
    else:  # affine modes
        vec = AFFINE[0] * torch.cat([lo, hi], -1).double() + AFFINE[1]
    return vec * n.double()[..., None]


def anatomy_naive(mode: str, case: dict, scale: float) -> torch.Tensor:
    """Attention output ``[BH, G, D]`` (float64) of ``mode``'s decoded K/V."""
    k = decode_naive(mode, case["k_x"], case["k_n"], case["lev"])
    v = decode_naive(mode, case["v_x"], case["v_n"], case["lev"])
    p = torch.softmax(case["q"].double() @ k.mT * scale, -1)
    return p @ v


def anatomy_decode(mode: str, case: dict, scale: float, *, splits: int, block_n: int = 64,
                   num_warps: int = 4) -> torch.Tensor:
    """The kernel's split-K partials merged with their log-sum-exp weights: ``[BH, G, D]``."""
    q = case["q"]
    bh, group, d = q.shape
    length = case["k_x"].shape[1]
    split_len = split_k.split_length(length, splits, block_n)
    o_part = torch.empty(bh, splits, group, d, device=q.device)
    lse = torch.empty(bh, splits, group, device=q.device)
    _launch(mode, case, scale, o_part, lse, split_len, splits, block_n, num_warps)
    w = torch.exp2(lse - lse.amax(1, keepdim=True))
    return (w[..., None] * o_part).sum(1) / w.sum(1)[..., None]


def _launch(mode, case, scale, o_part, lse, split_len, splits, block_n, num_warps):
    q = case["q"]
    bh, group, d = q.shape
    _kernel[(bh, splits)](q, case["k_x"], case["k_n"], case["v_x"], case["v_n"], case["lev"],
                          o_part, lse, case["k_x"].shape[1], split_len, scale * split_k.LOG2E,
                          AFFINE[0], AFFINE[1], S=splits, R=group,
                          R_PAD=max(16, triton.next_power_of_2(group)), D=d,
                          MODE=MODES.index(mode), BLOCK_N=block_n,
                          ASM=prmt_lookup_asm(case["lev"].cpu()) if mode in ASM_MODES else "",
                          num_warps=num_warps)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, nargs=3, default=[32, 8, 128],
                        metavar=("HQ", "HKV", "D"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--seed", type=int, default=0)


def _nbytes(mode: str, bh: int, length: int, d: int) -> int:
    per_token = 2 * d if mode == "fp16" else d // 2 + 2
    return 2 * bh * length * per_token


def run(args) -> list[dict]:
    from sphkv.codec import TurboQuantCodec

    hq, hkv, d = args.heads
    bh, group = args.batch * hkv, hq // hkv
    gen = torch.Generator().manual_seed(args.seed)
    lev = torch.as_tensor(TurboQuantCodec(d=d, bits=4).quantizer.levels,
                          dtype=torch.float32).cuda()
    scale = 1 / math.sqrt(d)
    copy_bw, _ = device_ceilings()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = max(1, triton.cdiv(4 * sms, bh))
    rows = []
    for mode in args.modes:  # correctness first, ragged to the block: L not a multiple of 64
        case = make_case(mode, 4, group, 1000, d, lev, gen, "cuda")
        ref = anatomy_naive(mode, case, scale)
        out = anatomy_decode(mode, case, scale, splits=3)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        print(f"{mode}: relative error {err:.2e}")
        if not err < 2e-2:
            raise AssertionError(f"{mode}: relative error {err:.3g} against the reference")
    for length in args.lengths:
        qd = torch.randn(args.batch, hq, 1, d, generator=gen).half().cuda()
        kd = torch.randn(args.batch, hkv, length, d, generator=gen).half().cuda()
        vd = torch.randn(args.batch, hkv, length, d, generator=gen).half().cuda()
        sdpa = min(time_sdpa(qd, kd, vd, f"L={length}"), default=(float("nan"), "none"))
        del qd, kd, vd
        for mode in args.modes:
            case = make_case(mode, bh, group, length, d, lev, gen, "cuda")
            timed = []
            for block_n in args.block_n:
                for warps in args.warps:
                    split_len = split_k.split_length(length, splits, block_n)
                    o_part = torch.empty(bh, splits, group, d, device="cuda")
                    lse = torch.empty(bh, splits, group, device="cuda")
                    fn = functools.partial(_launch, mode, case, scale, o_part, lse, split_len,
                                           splits, block_n, warps)
                    try:
                        timed.append((time_op(fn), block_n, warps))
                    except Exception as err:  # a configuration Triton cannot compile
                        print(f"{mode} block_n={block_n} warps={warps}: not run "
                              f"({str(err).splitlines()[0][:80]})")
            t, block_n, warps = min(timed)
            nbytes = _nbytes(mode, bh, length, d)
            rows.append({"L": length, "mode": mode, "block_n": block_n, "warps": warps,
                         "MB": nbytes / 1e6, "us": t * 1e6,
                         "floor_us": nbytes / copy_bw * 1e6,
                         "pct_copy": 100 * gbps(nbytes, t) * 1e9 / copy_bw,
                         "sdpa_us": sdpa[0] * 1e6, "vs_sdpa": sdpa[0] / t})
            del case
    return rows
