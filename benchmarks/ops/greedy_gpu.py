"""Greedy allocation with torch on a GPU: hulls, bucketed selection and fill, no pages.

``on_device_ms``: ``greedy_tiers`` on distortion and cost already on the device (what an online
allocator sees), median of ``triton.testing.do_bench`` (of 5 timed runs on the CPU).
``solve_ms``: the whole ``solve(problem, "greedy", backend="torch", device=...)`` from numpy
arrays on the host, transfers and the host-side feasibility check included. Same synthetic
instances as the ``solvers`` op, budget 1/8 of fp16. Allocations are checked equal to the numpy
backend's.
"""

from __future__ import annotations

import argparse
import functools
import time

import array_api_compat
import numpy as np
import torch

from benchmarks.ops.solvers import instance
from sphkv.solvers import solve
from sphkv.solvers.greedy import greedy_tiers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--device", default="cuda")


def _median_ms(fn, device: str) -> float:
    if device.startswith("cuda"):
        from triton.testing import do_bench

        fn()  # compile and cache before timing
        return do_bench(fn, warmup=100, rep=500)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def run(args: argparse.Namespace) -> list[dict]:
    xp = array_api_compat.array_namespace(torch.empty(0))
    rows = []
    for items in args.sizes:
        problem = instance(items, paged=False, budget=0.125)
        free = problem.forced < 0
        cost = problem.amortized_cost()
        room = (problem.budget - cost[problem.forced[~free]].sum()
                - cost.min() * free.sum())
        d = torch.as_tensor(problem.distortion[free], device=args.device)
        c = torch.as_tensor(cost, device=args.device)
        on_device = _median_ms(functools.partial(greedy_tiers, d, c, room, xp=xp), args.device)
        start = time.perf_counter()
        gpu = solve(problem, "greedy", backend="torch", device=args.device)
        solve_ms = (time.perf_counter() - start) * 1e3
        cpu = solve(problem, "greedy")
        rows.append({"items": problem.n_items, "tiers": problem.n_tiers,
                     "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                     "on_device_ms": on_device, "solve_ms": solve_ms,
                     "numpy_s": cpu.seconds, "same_as_numpy": bool(np.array_equal(cpu.tiers,
                                                                                  gpu.tiers)),
                     "gap": gpu.gap})
        print(rows[-1], flush=True)
    return rows
