"""Mixed-tier decode (Triton ``ada_decode``) against SDPA fp16 and the dense paged baseline, and
the encode of a prefill against its attention, on a GPU.

``python -m benchmarks.run --op ada_decode [--batch 8] [--lengths 8192 32768] [--configs ...]``

Each config is a page table of one or several tiers of the default, fast or ADA ladder (shares
of the tokens per tier), plus a 16-token fp16 window. Pools hold fresh random codes (every byte a
valid code), random positive fp16 side information; each (sequence, kv head) holds L tokens,
pages of P = 16 scattered through the pools in random order. Correctness first (against
``ada_decode_naive`` at L = 2048, ragged runs), then timing (``do_bench`` median).
``bytes_MB`` counts what the kernel must read and write at least: codes with side information,
the window, q, the output and the page tables. ``vs_sdpa``/``vs_paged`` are speedups over the
best SDPA backend and over ``paged_decode`` on fp16 K/V of the same shape, timed in the same run.
The ``encode`` rows time the codecs' ``encode`` of a 32k-token prefill's keys and values (one
layer) against that layer's causal SDPA prefill attention.
"""

from __future__ import annotations

import argparse
import functools
import importlib

import torch
import torch.nn.functional as F

from benchmarks.common import gbps
from benchmarks.ops.paged_decode import SHAPES, device_ceilings, paged_case, time_op, time_sdpa
from sphkv.codec import Codes, Fp16Codec, Int8Codec
from sphkv.kernels.ada_decode import (
    AdaDecodePlan,
    TierPages,
    Window,
    ada_decode,
    ada_decode_naive,
)
from sphkv.kernels.paged_decode import paged_decode
from sphkv.rdr.tiers import ada_tiers, default_tiers, fast_tiers

# name -> (ladder, {tier: share of tokens}); "mixed" holds about turbo4's bytes per token
CONFIGS = {
    "turbo4": (default_tiers, {"turbo4": 1.0}),
    "turbo2": (default_tiers, {"turbo2": 1.0}),
    "turbo3": (default_tiers, {"turbo3": 1.0}),
    "ada4": (ada_tiers, {"ada4": 1.0}),
    "mixed": (default_tiers, {"turbo2": 0.3, "turbo3": 0.3, "turbo4": 0.25, "int8": 0.1,
                              "fp16": 0.05}),
    # shares of the kept tokens in a real allocation: see _solved_shares
    "solved": (default_tiers, None),
    # evenly spaced levels at 2 and 4 bits, decoded without a lookup
    "uniform4": (fast_tiers, {"uniform4": 1.0}),
    "uniform2": (fast_tiers, {"uniform2": 1.0}),
    # the solver's shares on that ladder (its 2- and 4-bit rungs in place of turbo2, turbo4)
    "solved-fast": (fast_tiers, None),
}
_FAST = {"turbo2": "uniform2", "turbo4": "uniform4"}
# the synthetic tiers' names in the default ladder
_SYNTHETIC = {"2bit": "turbo2", "3bit": "turbo3", "4bit": "turbo4", "int8": "int8",
              "fp16": "fp16"}


@functools.cache
def _solved_shares() -> dict[str, float]:
    """Tier shares of the kept tokens of ``solve(synthetic_problem(budget_fraction=0.25),
    "greedy")`` (30 layers × 3 kv heads × 1024 tokens, pages of 16; a quarter of the fp16 bytes,
    about turbo4's): about 22% turbo2, 26% turbo3, 39% turbo4, 9% int8, 3% fp16 (8% dropped)."""
    import numpy as np

    from sphkv.rdr.synthetic import synthetic_problem
    from sphkv.solvers import solve

    problem = synthetic_problem(budget_fraction=0.25)
    counts = np.bincount(solve(problem, "greedy").tiers, minlength=len(problem.tier_names))
    kept = {_SYNTHETIC[n]: int(c) for n, c in zip(problem.tier_names, counts, strict=True)
            if n != "drop"}
    return {n: c / sum(kept.values()) for n, c in kept.items()}
WINDOW = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--block-n", type=int, nargs="+", default=[64])
    parser.add_argument("--num-warps", type=int, nargs="+", default=[4])
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--encode", action="store_true", help="also time the prefill encode")
    parser.add_argument("--graph", action="store_true",
                        help="also time CUDA-graph replays (the device time, no host launch work)")
    parser.add_argument("--splits", type=int, nargs="+", default=[0],
                        help="splits per (sequence, kv head), 0: the launcher's default")
    parser.add_argument("--baseline", default=None,
                        help="a module with another ada_decode(q, pages, window, block_n=, "
                             "num_warps=) to time in the same run (rows impl=baseline)")
    parser.add_argument("--profile", action="store_true",
                        help="only run each config's decode three times at the first length and "
                             "shape (no check, no timing, no rows): one launch for a profiler, "
                             "e.g. ncu --kernel-name regex:'^_kernel$' --launch-skip 2 "
                             "--launch-count 1")
    parser.add_argument("--seed", type=int, default=0)


def _profile(args, gen) -> None:
    """Each config's plan run three times (the first compiles) at the first shape and length."""
    Hq, Hkv, D = SHAPES[args.shapes[0]]
    for config in args.configs:
        pages, window, _ = make_case(config, args.batch, Hkv, D, args.lengths[0],
                                     args.page_size, gen)
        q = torch.randn(args.batch, Hq, 1, D, generator=gen, device="cuda").half()
        plan = AdaDecodePlan(pages, window, Hq, 1, D, device=q.device, block_n=args.block_n[0],
                             num_warps=args.num_warps[0])
        for _ in range(3):
            plan.run(q)
        torch.cuda.synchronize()
        print(f"{config}: ran {args.shapes[0]} L={args.lengths[0]} block_n={args.block_n[0]}")


def _codes(codec, rows: int, gen) -> Codes:
    """Random codes of ``rows`` vectors shaped as ``codec`` encodes them."""
    template = codec.encode(torch.zeros(1, codec.d))
    width = template.payload.shape[-1]
    if isinstance(codec, Fp16Codec):
        payload = torch.randn(rows, codec.d, generator=gen, device="cuda").half().view(
            torch.uint8)
    elif isinstance(codec, Int8Codec):
        payload = torch.randint(-127, 128, (rows, codec.d), generator=gen, device="cuda",
                                dtype=torch.int8).view(torch.uint8)
    else:
        payload = torch.randint(0, 256, (rows, width), generator=gen, device="cuda",
                                dtype=torch.uint8)
    # a side value per vector: norm/radius ≈ √d, int8 scale ≈ 3/127
    typical = 3 / 127 if isinstance(codec, Int8Codec) else codec.d**0.5
    side = {k: (typical * (0.5 + torch.rand(rows, generator=gen, device="cuda"))).half()
            for k in template.side}
    return Codes(payload, side, torch.Size((rows, codec.d)))


def make_case(config: str, B: int, Hkv: int, D: int, L: int, P: int, gen):
    """Pages of each tier of ``config`` (its share of L tokens per (sequence, kv head)) and a
    window; token counts are multiples of P except the last tier's."""
    ladder, shares = CONFIGS[config]
    if shares is None:
        rename = _FAST if ladder is fast_tiers else {}
        shares = {rename.get(n, n): x for n, x in _solved_shares().items()}
    tiers = ladder(D)
    counts, left = {}, L
    for i, (name, share) in enumerate(shares.items()):
        n = left if i == len(shares) - 1 else min(left, round(share * L / P) * P)
        counts[name], left = n, left - n
    pages, nbytes = [], 0
    for name, n in counts.items():
        tier = tiers[tiers.index(name)]
        max_pages = (n + P - 1) // P
        num_pages = B * Hkv * max_pages
        table = torch.randperm(num_pages, generator=gen, device="cuda").int().view(B, Hkv, -1)
        lengths = torch.full((B, Hkv), n, device="cuda", dtype=torch.int32)
        pages.append(TierPages(tier.key, tier.value, _codes(tier.key, num_pages * P, gen),
                               _codes(tier.value, num_pages * P, gen), table, lengths, P))
        nbytes += B * Hkv * n * tier.bytes_per_token_head + table.numel() * 4
    keys = torch.randn(B, Hkv, WINDOW, D, generator=gen, device="cuda").half()
    values = torch.randn(B, Hkv, WINDOW, D, generator=gen, device="cuda").half()
    window = Window(keys, values, torch.zeros(B, dtype=torch.int32, device="cuda"))
    nbytes += keys.numel() * 4
    return pages, window, nbytes


def _check(config, B, Hq, Hkv, D, P, gen) -> float:
    pages, window, _ = make_case(config, B, Hkv, D, 2048, P, gen)
    for tp in pages:  # ragged runs, one of them empty
        tp.lengths = torch.randint(0, int(tp.lengths[0, 0]) + 1, (B, Hkv), generator=gen,
                                   device="cuda").int()
    q = torch.randn(B, Hq, 1, D, generator=gen, device="cuda").half()
    ref = ada_decode_naive(q, pages, window).double()
    out = ada_decode(q, pages, window).double()
    err = ((out - ref).norm() / ref.norm()).item()
    assert not out.isnan().any() and err < 3e-3, f"{config} {Hq}/{Hkv}/{D}: error {err}"
    return err


def _graphed(fn):
    """``fn`` captured in a CUDA graph (after two warm-up calls on a side stream): its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _variants(q, pages, window, block_ns, warps, splits, baseline):
    """(impl, block_n, warps, splits, fn) for each timed variant: the current kernel with its
    plan made once, and the baseline module's ``ada_decode`` if given."""
    for block_n in block_ns:
        for nw in warps:
            if block_n < 8 * nw:  # refused by ada_decode (a Triton 3.6 gather limit)
                continue
            for n in splits:
                plan = AdaDecodePlan(pages, window, q.shape[1], q.shape[2], q.shape[3],
                                     device=q.device, block_n=block_n, num_warps=nw,
                                     num_splits=n or None)
                yield "current", block_n, nw, n, functools.partial(ada_decode, q, pages, window,
                                                                   plan=plan)
            if baseline is not None:
                yield "baseline", block_n, nw, 0, functools.partial(baseline.ada_decode, q,
                                                                    pages, window,
                                                                    block_n=block_n,
                                                                    num_warps=nw)


def _measure(name, B, L, P, configs, block_ns, warps, gen, copy_bw, graph=False, splits=(0,),
             baseline=None) -> list[dict]:
    Hq, Hkv, D = SHAPES[name]
    label = f"{name} L={L}"
    q, k, v, bt = paged_case(B, Hq, Hkv, D, L, P, gen)
    full = torch.full((B,), L, device="cuda", dtype=torch.int32)
    t_paged = time_op(functools.partial(paged_decode, q, k, v, bt, full))
    del q, k, v, bt
    qd = torch.randn(B, Hq, 1, D, generator=gen, device="cuda").half()
    kd = torch.randn(B, Hkv, L, D, generator=gen, device="cuda").half()
    vd = torch.randn(B, Hkv, L, D, generator=gen, device="cuda").half()
    t_sdpa = min((t for t, _ in time_sdpa(qd, kd, vd, label)), default=float("nan"))
    del kd, vd
    torch.cuda.empty_cache()
    fp16_bytes = 2 * B * L * Hkv * D * 2
    rows = []
    for config in configs:
        err = _check(config, 3, Hq, Hkv, D, P, gen)
        pages, window, nbytes = make_case(config, B, Hkv, D, L, P, gen)
        nbytes += 2 * B * Hq * D * 2
        q = torch.randn(B, Hq, 1, D, generator=gen, device="cuda").half()
        for impl, block_n, nw, n, fn in _variants(q, pages, window, block_ns, warps, splits,
                                                  baseline):
            t = time_op(fn)
            t_graph = time_op(_graphed(fn)) if graph else float("nan")
            rows.append({"graph_us": t_graph * 1e6, "vs_sdpa_graph": t_sdpa / t_graph,
                         "pct_copy_graph": 100 * nbytes / t_graph / copy_bw,
                         "shape": name, "B": B, "L": L, "config": config, "impl": impl,
                         "block_n": block_n, "warps": nw, "splits": n,
                         "kv_bytes_vs_fp16": fp16_bytes / nbytes, "bytes_MB": nbytes / 1e6,
                         "floor_us": nbytes / copy_bw * 1e6, "us": t * 1e6,
                         "GB_s": gbps(nbytes, t), "pct_copy": 100 * nbytes / t / copy_bw,
                         "sdpa_us": t_sdpa * 1e6, "paged_us": t_paged * 1e6,
                         "vs_sdpa": t_sdpa / t, "vs_paged": t_paged / t, "rel_err": err})
        del pages, window
        torch.cuda.empty_cache()
    return rows


def _encode_rows(gen) -> list[dict]:
    """One layer of a 32k-token prefill (B = 1, 32q/8kv, d = 128): encode of its keys and values
    at turbo4 / int8 against its causal SDPA attention."""
    rows = []
    L, Hq, Hkv, D = 32768, 32, 8, 128
    q = torch.randn(1, Hq, L, D, generator=gen, device="cuda").half()
    k = torch.randn(1, Hkv, L, D, generator=gen, device="cuda").half()
    v = torch.randn(1, Hkv, L, D, generator=gen, device="cuda").half()
    t_attn = time_op(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                           enable_gqa=True))
    x = k.float().reshape(-1, D)
    for name in ("turbo4", "turbo2", "int8"):
        tier = default_tiers(D)[default_tiers(D).index(name)]
        t_enc = time_op(lambda tier=tier: (tier.key.encode(x), tier.value.encode(x)))
        rows.append({"shape": "prefill 32q/8kv/d128", "B": 1, "L": L, "config": f"encode {name}",
                     "us": t_enc * 1e6, "sdpa_us": t_attn * 1e6,
                     "encode_pct_of_attention": 100 * t_enc / t_attn})
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    if args.profile:
        _profile(args, gen)
        return []
    baseline = None if args.baseline is None else importlib.import_module(args.baseline)
    copy_bw, _ = device_ceilings()
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    rows = []
    for name in args.shapes:
        for L in args.lengths:
            if name.startswith("9q") and L > 32768:
                continue
            rows += _measure(name, args.batch, L, args.page_size, args.configs, args.block_n,
                             args.num_warps, gen, copy_bw, args.graph, args.splits, baseline)
            torch.cuda.empty_cache()
    for r in rows:
        r["copy_GB_s"] = copy_bw / 1e9
    if args.encode:
        rows += _encode_rows(gen)
    return rows


def summarize(rows: list[dict]) -> str:
    cols = ("shape", "L", "config", "impl", "block_n", "warps", "splits", "kv_bytes_vs_fp16",
            "us", "pct_copy", "graph_us", "pct_copy_graph", "sdpa_us", "vs_sdpa",
            "vs_sdpa_graph", "vs_paged")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "pct_copy" in r:
            lines.append("| " + " | ".join(
                f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
        else:
            lines.append(f"| {r['config']}: {r['us']:.0f} us = {r['encode_pct_of_attention']:.1f}% "
                         f"of the prefill's attention ({r['sdpa_us']:.0f} us) |")
    return "\n".join(lines)
