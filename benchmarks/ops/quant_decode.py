"""Decode over pages of one TurboQuant tier (Triton) against SDPA fp16 and the dense paged
baseline, on a GPU.

``python -m benchmarks.run --op quant_decode [--batch 8] [--lengths 8192 32768] [--tiers ...]``

Same shapes and timing as the ``paged_decode`` op. The pool holds fresh uniform random codes
(every byte is a valid code of a 2- or 4-bit tier) and random fp16 norms; correctness first,
against ``quant_decode_naive`` with ragged lengths per (sequence, kv head), then every (sequence,
kv head) at length L is timed. ``bytes_MB`` counts what the kernel must read and write at least:
key and value codes with their norms, q, the output and the page tables. ``vs_sdpa`` and
``vs_paged`` are speedups over the best SDPA backend and over the dense Triton paged decode
(default launch), both timed in the same run on fp16 K/V of the same shape.
"""

from __future__ import annotations

import argparse
import functools

import torch

from benchmarks.common import gbps
from benchmarks.ops.paged_decode import SHAPES, device_ceilings, paged_case, time_op, time_sdpa
from sphkv.kernels.paged_decode import paged_decode
from sphkv.kernels.quant_decode import quant_decode, quant_decode_naive
from sphkv.rdr.tiers import default_tiers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tiers", nargs="+", default=["turbo4", "turbo2"])
    parser.add_argument("--block-n", type=int, nargs="+", default=[32, 64],
                        help="tokens per inner step of the kernel, each timed")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)


def _pool(tier, num_pages: int, P: int, gen) -> list[torch.Tensor]:
    """Random codes and norms of ``num_pages · P`` keys and values of ``tier``."""
    out = []
    for codec in (tier.key, tier.value):
        width = codec.d * codec.bits // 8
        out.append(torch.randint(0, 256, (num_pages, P, width), generator=gen, device="cuda",
                                 dtype=torch.uint8))
        # ‖x‖ of a Gaussian vector of dimension d is about √d
        out.append((codec.d**0.5 * (0.5 + torch.rand(num_pages, P, generator=gen,
                                                       device="cuda"))).half())
    return out


def _measure(name, B, L, P, tiers, block_ns, gen, copy_bw) -> list[dict]:
    Hq, Hkv, D = SHAPES[name]
    label = f"{name} L={L}"
    q, k, v, bt = paged_case(B, Hq, Hkv, D, L, P, gen)
    full = torch.full((B,), L, device="cuda", dtype=torch.int32)
    t_paged = time_op(functools.partial(paged_decode, q, k, v, bt, full))
    qd = torch.randn(B, Hq, 1, D, generator=gen, device="cuda").half()
    kd = torch.randn(B, Hkv, L, D, generator=gen, device="cuda").half()
    vd = torch.randn(B, Hkv, L, D, generator=gen, device="cuda").half()
    t_sdpa = min((t for t, _ in time_sdpa(qd, kd, vd, label)), default=float("nan"))

    rows = []
    ladder = default_tiers(D)
    max_pages = (L + P - 1) // P
    num_pages = B * Hkv * max_pages
    fp16_bytes = 2 * B * L * Hkv * D * 2
    for tier_name in tiers:
        tier = ladder[ladder.index(tier_name)]
        q = torch.randn(B, Hq, D, generator=gen, device="cuda").half()
        pool = _pool(tier, num_pages, P, gen)
        bt = torch.randperm(num_pages, generator=gen, device="cuda").int().view(B, Hkv, -1)
        ragged = torch.randint(1, L + 1, (B, Hkv), generator=gen, device="cuda").int()
        ragged[0, 0] = L
        ref = quant_decode_naive(q, *pool, bt, ragged, tier.key, tier.value).double()
        out = quant_decode(q, *pool, bt, ragged, tier.key, tier.value).double()
        rel_err = ((out - ref).norm() / ref.norm()).item()
        assert not out.isnan().any() and rel_err < 3e-3, f"{label} {tier_name}: error {rel_err}"

        full = torch.full((B, Hkv), L, device="cuda", dtype=torch.int32)
        code_bytes = B * Hkv * L * tier.bytes_per_token_head
        nbytes = code_bytes + 2 * B * Hq * D * 2 + bt.numel() * 4
        for block_n in block_ns:
            t = time_op(functools.partial(quant_decode, q, *pool, bt, full, tier.key, tier.value,
                                         block_n=block_n))
            rows.append({"shape": name, "B": B, "L": L, "tier": tier_name, "block_n": block_n,
                         "kv_bytes_vs_fp16": fp16_bytes / code_bytes, "bytes_MB": nbytes / 1e6,
                         "floor_us": nbytes / copy_bw * 1e6, "us": t * 1e6,
                         "GB_s": gbps(nbytes, t), "pct_copy": 100 * nbytes / t / copy_bw,
                         "sdpa_us": t_sdpa * 1e6, "paged_us": t_paged * 1e6,
                         "vs_sdpa": t_sdpa / t, "vs_paged": t_paged / t, "rel_err": rel_err})
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    copy_bw, _ = device_ceilings()
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    rows = []
    for name in args.shapes:
        for L in args.lengths:
            rows += _measure(name, args.batch, L, args.page_size, args.tiers, args.block_n, gen,
                             copy_bw)
            torch.cuda.empty_cache()
    for r in rows:
        r["copy_GB_s"] = copy_bw / 1e9
    return rows
