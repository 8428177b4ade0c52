"""Allocation solvers at model scale: paged greedy against one argsort, and the ILP's time limit.

Instances are ``sphkv.rdr.synthetic_problem`` (six tiers, heavy-tailed utilities, 4 sinks and
8 recent tokens per group forced to fp16, pages of 16 with 16 bytes of overhead, a budget of 1/8
of the all-fp16 cache), shaped as 90 page groups (30 layers × 3 kv-heads, SmolLM2) or 4,096
(a batch of 8 on 16 layers × 32 kv-heads), at 1M and 8.4M items (Llama-3-8B at 32k tokens:
32 layers × 8 kv-heads × 32,768).

Each greedy row is timed next to one ``numpy.argsort`` of N·(T-1) fresh random float64 numbers
(as many as the greedy has hull slopes) in the same run: ``vs_argsort`` is the greedy's time over
that argsort's. Both are the fastest of ``--repeat`` runs (2): on a virtual machine the first run
at a new size also pays for faulting fresh memory in (kernel time, counted in ``cpu_s``).
``gap`` is the distortion above the greedy's own proven lower bound. The ilp rows give the wall
time of ``solve(method="ilp", time_limit=L)`` and the target ``1.1 L + 2 s``.
Torch rows run on the CPU, and on CUDA with ``--device cuda`` (the default ``auto``: when there is
one), timed between ``torch.cuda.synchronize()`` calls after one untimed warm-up solve. The
``cuda-resident`` rows solve the problem moved to the GPU beforehand (``AllocationProblem.to``,
not timed), as a caller whose distortion rows are computed there would hold it; the other CUDA
rows start from the host problem and include its transfer.

Run on one core: ``OMP_NUM_THREADS=1 taskset -c 1 python -m benchmarks.run --op solvers``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from sphkv.rdr import synthetic_problem
from sphkv.solvers import solve

_SHAPES = {90: (30, 3), 4096: (128, 32)}  # groups: (layers, kv_heads)
_BACKENDS = {"numpy": {}, "torch-cpu": {"backend": "torch"},
             "torch-cuda": {"backend": "torch", "device": "cuda"},
             "cuda-resident": {}}  # the problem on the GPU before the clock starts
_CUDA = ("torch-cuda", "cuda-resident")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 8_388_608],
                        help="item counts for the greedy rows")
    parser.add_argument("--groups", type=int, nargs="+", default=[90, 4096],
                        choices=sorted(_SHAPES), help="page groups per instance")
    parser.add_argument("--ilp-items", type=int, default=200_000,
                        help="items of the paged ilp time-limit instance (90 groups)")
    parser.add_argument("--ilp-time-limits", type=float, nargs="*", default=[1.0, 10.0],
                        help="seconds given to the ilp (none: no ilp rows)")
    parser.add_argument("--budget", type=float, default=0.125,
                        help="budget as a fraction of the all-fp16 cache")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="also run the torch rows on CUDA (auto: when available)")
    parser.add_argument("--backends", nargs="+", choices=list(_BACKENDS),
                        default=list(_BACKENDS),
                        help="greedy backends to time (torch-cuda and cuda-resident only where "
                             "--device allows)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs of each greedy row and its argsort; the fastest is kept")


def instance(items: int, groups: int = 90, paged: bool = True, budget: float = 0.125):
    """The benchmark's synthetic problem of about ``items`` items in ``groups`` page groups."""
    layers, kv_heads = _SHAPES[groups]
    return synthetic_problem(layers=layers, kv_heads=kv_heads, tokens=items // groups,
                             budget_fraction=budget, page_size=16 if paged else None,
                             sinks=4, recent=8)


def _argsort_seconds(n: int) -> float:
    x = np.random.default_rng().random(n)
    start = time.perf_counter()
    np.argsort(x)
    return time.perf_counter() - start


def _timed(problem, cuda: bool, **options):
    """The greedy's allocation, its wall and CPU seconds (CUDA: after a warm-up, synchronised)."""
    if cuda:
        solve(problem, "greedy", **options)
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    alloc = solve(problem, "greedy", **options)
    if cuda:
        torch.cuda.synchronize()
    return alloc, time.perf_counter() - start, time.process_time() - cpu


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(1)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    backends = [(name, _BACKENDS[name]) for name in args.backends
                if name not in _CUDA or cuda]
    if not backends:
        raise SystemExit(f"--backends {' '.join(args.backends)} need --device cuda (or auto "
                         "with a GPU)")
    rows = []
    for items in args.sizes:
        for groups in args.groups:
            for paged in (False, True):
                problem = instance(items, groups, paged, args.budget)
                for name, options in backends:
                    if not paged and name != "numpy":
                        continue
                    sort_s = min(_argsort_seconds(problem.n_items * (problem.n_tiers - 1))
                                 for _ in range(args.repeat))
                    placed = problem.to("cuda") if name == "cuda-resident" else problem
                    alloc, seconds, cpu_s = min((_timed(placed, name in _CUDA, **options)
                                                 for _ in range(args.repeat)),
                                                key=lambda run: run[1])
                    del placed
                    rows.append({
                        "solver": "greedy", "backend": name, "items": problem.n_items,
                        "groups": problem.n_groups, "pages": 16 if paged else None,
                        "seconds": seconds, "cpu_s": cpu_s, "argsort_s": sort_s,
                        "vs_argsort": seconds / sort_s,
                        "distortion": alloc.distortion, "lower_bound": alloc.lower_bound,
                        "gap": alloc.gap, "cost_over_budget": alloc.cost / problem.budget})
                    print(f"  {problem.n_items:>10,} items {problem.n_groups:>5} groups "
                          f"pages={paged!s:5} {name:10} {seconds:8.3f} s "
                          f"({seconds / sort_s:5.2f}x argsort)  gap {alloc.gap:.4%}", flush=True)
                del problem
    problem = instance(args.ilp_items, 90, True, args.budget)
    for limit in args.ilp_time_limits:
        start = time.perf_counter()
        alloc = solve(problem, "ilp", time_limit=limit)
        wall = time.perf_counter() - start
        rows.append({"solver": "ilp", "backend": "highs", "items": problem.n_items,
                     "groups": problem.n_groups, "pages": 16, "time_limit": limit,
                     "seconds": wall, "target_s": 1.1 * limit + 2.0,
                     "distortion": alloc.distortion, "lower_bound": alloc.lower_bound,
                     "gap": alloc.gap, "status": alloc.status,
                     "cost_over_budget": alloc.cost / problem.budget})
        print(f"  ilp {problem.n_items:,} items, time_limit {limit:g} s: {wall:.2f} s wall "
              f"(target {1.1 * limit + 2:.2f}), {alloc.status}, gap {alloc.gap:.4%}", flush=True)
    return rows


def summarize(rows: list[dict]) -> str:
    """The greedy rows against their argsort, then the ilp's wall times."""
    lines = ["| items | groups | pages | backend | s | cpu s | × argsort | gap |",
             "|" + "---|" * 8]
    for r in rows:
        if r["solver"] == "greedy":
            cpu = f"{r['cpu_s']:.3g}" if "cpu_s" in r else "–"
            lines.append(f"| {r['items']:,} | {r['groups']} | {r['pages'] or '–'} | "
                         f"{r['backend']} | {r['seconds']:.3g} | {cpu} | {r['vs_argsort']:.2f} | "
                         f"{r['gap']:.4%} |")
    ilp = [r for r in rows if r["solver"] == "ilp"]
    if ilp:
        lines += ["", "| ilp items | time_limit s | wall s | target s | status | gap |",
                  "|" + "---|" * 6]
    for r in ilp:
        lines.append(f"| {r['items']:,} | {r['time_limit']:g} | {r['seconds']:.2f} | "
                     f"{r['target_s']:.2f} | {r['status']} | {r['gap']:.4%} |")
    return "\n".join(lines)
