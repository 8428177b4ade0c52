"""Encode + pack of a prefill's keys and values into pool pages (Triton ``encode_pack``) against
the codecs' torch ``encode`` and against the prefill's attention, on a GPU.

``python -m benchmarks.run --op encode_pack [--length 32768] [--tiers turbo4 ...]``

One layer of an L-token prefill, B = 1, per shape: keys and values ``[Hkv · L, D]`` fp16
(fresh Gaussian, a per-channel offset on keys), written into pools of pages of P = 16 slots
whose order is a random permutation (slot ``page · P + i``). Correctness first on the full
data: TurboQuant codes that differ from the reference (with how close their rotated value sits
to the threshold), int8/fp16 bytes that differ. Then ``do_bench`` medians of: the kernel (keys
and values, 2 launches), the torch path (``encode`` + writing the rows), and causal SDPA of the
layer's prefill (``is_causal``, GQA). ``bytes_MB``: fp16 input read once, codes and side
information written once, slots read.
"""

from __future__ import annotations

import argparse
import functools
import math

import torch
import torch.nn.functional as F

from benchmarks.common import gbps
from benchmarks.ops.paged_decode import SHAPES, device_ceilings, time_op
from sphkv.codec import Codes, TurboQuantCodec
from sphkv.codec.packing import unpack
from sphkv.kernels.encode_pack import encode_pack, encode_pack_naive
from sphkv.rdr.tiers import default_tiers

P = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tiers", nargs="+", default=["turbo2", "turbo3", "turbo4", "int8",
                                                        "fp16"])
    parser.add_argument("--block-m", type=int, nargs="+", default=[32])
    parser.add_argument("--num-warps", type=int, nargs="+", default=[4])
    parser.add_argument("--seed", type=int, default=0)


def _pool(codec, rows: int) -> Codes:
    t = codec.encode(torch.zeros(1, codec.d))
    return Codes(torch.zeros(rows, t.payload.shape[1], dtype=torch.uint8, device="cuda"),
                 {k: torch.zeros(rows, dtype=v.dtype, device="cuda") for k, v in t.side.items()},
                 torch.Size((rows, codec.d)))


def _differ(codec, x, ref: Codes, out: Codes, slots) -> tuple[int, float]:
    """(codes or bytes that differ, largest |z − threshold| among differing TurboQuant codes)."""
    if not isinstance(codec, TurboQuantCodec):
        return int((ref.payload != out.payload).sum()), 0.0
    rc = unpack(ref.payload[slots], [(codec.d, codec.bits)])[0]
    oc = unpack(out.payload[slots], [(codec.d, codec.bits)])[0]
    diff = rc != oc
    if not diff.any():
        return 0, 0.0
    y = x.double() @ codec.rotation.matrix("cuda").double()
    z = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-300) * math.sqrt(codec.d)
    thr = torch.as_tensor(codec.quantizer.thresholds, dtype=torch.float64, device="cuda")
    gap = (z[diff] - thr[torch.minimum(rc, oc)[diff]]).abs().max().item()
    return int(diff.sum()), gap


def _both(fn, keys, values, tier, pools, slots, **kwargs) -> None:
    """``fn`` on the keys and on the values of a tier."""
    fn(keys, tier.key, pools[0], slots, **kwargs)
    fn(values, tier.value, pools[1], slots, **kwargs)


def run(args: argparse.Namespace) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    copy_bw, _ = device_ceilings()
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    rows, L = [], args.length
    for name in args.shapes:
        Hq, Hkv, D = SHAPES[name]
        q = torch.randn(1, Hq, L, D, generator=gen, device="cuda").half()
        k = torch.randn(1, Hkv, L, D, generator=gen, device="cuda").half()
        v = torch.randn(1, Hkv, L, D, generator=gen, device="cuda").half()
        k += torch.randn(D, generator=gen, device="cuda").half()
        t_attn = time_op(functools.partial(F.scaled_dot_product_attention, q, k, v,
                                          is_causal=True, enable_gqa=True))
        n = Hkv * L
        xk, xv = k.reshape(n, D), v.reshape(n, D)
        pages = torch.randperm(n // P, generator=gen, device="cuda")
        slots = (pages[:, None] * P + torch.arange(P, device="cuda")).reshape(-1)
        tiers = default_tiers(D)
        for tname in args.tiers:
            tier = tiers[tiers.index(tname)]
            pools = {w: (_pool(tier.key, n), _pool(tier.value, n)) for w in ("ref", "out")}
            torch_path = functools.partial(_both, encode_pack_naive, xk, xv, tier, pools["ref"],
                                           slots)
            torch_path()
            t_torch = time_op(torch_path)
            nbytes = 2 * n * D * 2 + n * 8 + n * (tier.bytes_per_token_head)
            for nw in args.num_warps:
                for bm in args.block_m:
                    kernel = functools.partial(_both, encode_pack, xk, xv, tier, pools["out"],
                                               slots, num_warps=nw, block_m=bm)
                    kernel()
                    torch.cuda.synchronize()
                    dk, gk = _differ(tier.key, xk.float(), pools["ref"][0], pools["out"][0],
                                     slots)
                    dv, gv = _differ(tier.value, xv.float(), pools["ref"][1], pools["out"][1],
                                     slots)
                    side_diff = sum(int((pools["ref"][i].side[s] != pools["out"][i].side[s])
                                        .sum()) for i in (0, 1) for s in pools["ref"][i].side)
                    t = time_op(kernel)
                    rows.append({"shape": name, "L": L, "tier": tname, "warps": nw,
                                 "block_m": bm, "vectors": 2 * n,
                                 "codes_differ": dk + dv, "of": 2 * n * D,
                                 "max_gap": max(gk, gv), "side_differ": side_diff,
                                 "bytes_MB": nbytes / 1e6, "floor_us": nbytes / copy_bw * 1e6,
                                 "us": t * 1e6, "GB_s": gbps(nbytes, t),
                                 "pct_copy": 100 * nbytes / t / copy_bw,
                                 "torch_us": t_torch * 1e6, "vs_torch": t_torch / t,
                                 "attn_us": t_attn * 1e6, "pct_attn": 100 * t / t_attn,
                                 "torch_pct_attn": 100 * t_torch / t_attn,
                                 "copy_GB_s": copy_bw / 1e9})
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def summarize(rows: list[dict]) -> str:
    cols = ("shape", "tier", "warps", "block_m", "codes_differ", "side_differ", "us",
            "pct_copy", "torch_us", "attn_us", "pct_attn", "torch_pct_attn")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(
            f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)
