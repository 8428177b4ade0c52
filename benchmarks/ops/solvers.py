"""Allocation solvers: greedy throughput and, with lp and ilp, time and gap to the best bound.

Instances are the synthetic SmolLM2-shaped problems of ``sphkv.rdr.synthetic_problem``
(90 page groups = 30 layers × 3 kv-heads, fewer layers below 20k items; six tiers,
heavy-tailed utilities, sinks and a recent window forced to fp16), with pages of 16 (16 bytes
of overhead each) or without pages, at a budget of 1/8 of the all-fp16 cache. For every
instance, ``best_bound`` is the largest proven lower bound any solver found, and ``vs_best`` is
each solver's distortion above it.

Run on one core for the single-core figures: ``OMP_NUM_THREADS=1 taskset -c 1 python -m
benchmarks.run --op solvers``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from sphkv.rdr import synthetic_problem
from sphkv.solvers import solve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--greedy-sizes", type=int, nargs="+",
                        default=[10_000, 100_000, 1_000_000, 10_000_000],
                        help="item counts for the greedy throughput rows")
    parser.add_argument("--exact-sizes", type=int, nargs="+", default=[1_000, 20_000, 200_000],
                        help="item counts at which lp and ilp also run")
    parser.add_argument("--budget", type=float, default=0.125,
                        help="budget as a fraction of the all-fp16 cache")
    parser.add_argument("--ilp-time-limit", type=float, default=60.0, help="seconds per ilp")
    parser.add_argument("--repeats", type=int, default=3,
                        help="greedy runs per row below 10M items (the fastest is reported)")


def _instance(items: int, paged: bool, budget: float):
    # 30 layers × 3 kv-heads once groups hold at least 222 tokens (the 20k-item instance);
    # fewer layers below that, so the forced fp16 page never eats the whole budget.
    layers = int(np.clip(items // (3 * 222), 1, 30))
    tokens = items // (3 * layers)
    return synthetic_problem(layers=layers, tokens=tokens, budget_fraction=budget,
                             page_size=16 if paged else None, sinks=min(4, tokens // 8),
                             recent=min(8, tokens // 8))


def _row(problem, alloc, backend: str, paged: bool, seconds: float) -> dict:
    return {"solver": alloc.method, "backend": backend, "items": problem.n_items,
            "tiers": problem.n_tiers, "pages": 16 if paged else None, "seconds": seconds,
            "Mitems_per_s": problem.n_items / seconds / 1e6, "distortion": alloc.distortion,
            "lower_bound": alloc.lower_bound, "gap": alloc.gap, "status": alloc.status,
            "cost_over_budget": alloc.cost / problem.budget}


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    sizes = sorted(set(args.greedy_sizes) | set(args.exact_sizes))
    for items in sizes:
        for paged in (False, True):
            problem = _instance(items, paged, args.budget)
            instance_rows = []
            runs = [("greedy", "numpy", {}), ("greedy", "torch", {"backend": "torch"})]
            if items in args.exact_sizes:
                runs += [("lp", "HIGHS", {}), ("ilp", "highs", {"time_limit": args.ilp_time_limit})]
            for method, backend, options in runs:
                repeats = args.repeats if method == "greedy" and items < 10_000_000 else 1
                best_seconds, alloc = np.inf, None
                for _ in range(repeats):
                    start = time.perf_counter()
                    alloc = solve(problem, method, **options)
                    best_seconds = min(best_seconds, time.perf_counter() - start)
                instance_rows.append(_row(problem, alloc, backend, paged, best_seconds))
                print(f"  {items:>10,} items  pages={paged!s:5}  {method:6} {backend:6} "
                      f"{best_seconds:8.3f} s  gap {alloc.gap:.3%}", flush=True)
            best_bound = max(r["lower_bound"] for r in instance_rows)
            for r in instance_rows:
                r["best_bound"] = best_bound
                r["vs_best"] = (r["distortion"] - best_bound) / r["distortion"]
            rows += instance_rows
    return rows


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2g}%"


def summarize(rows: list[dict]) -> str:
    """One line per instance: seconds and distance to the best bound of each solver."""
    lines = ["| items | pages | greedy numpy s | greedy torch s | greedy vs_best | lp s | "
             "lp vs_best | ilp s | ilp status | ilp vs_best |", "|" + "---|" * 10]
    instances = dict.fromkeys((r["items"], r["pages"]) for r in rows)
    for items, pages in instances:
        by = {(r["solver"], r["backend"]): r for r in rows
              if r["items"] == items and r["pages"] == pages}
        gn, gt = by[("greedy", "numpy")], by[("greedy", "torch")]
        lp, ilp = by.get(("lp", "HIGHS")), by.get(("ilp", "highs"))
        own = "" if ilp else " (own bound)"
        cells = [f"{items:,}", str(pages or "–"), f"{gn['seconds']:.3g}", f"{gt['seconds']:.3g}",
                 _pct(gn["vs_best"]) + own,
                 f"{lp['seconds']:.3g}" if lp else "", _pct(lp["vs_best"]) if lp else "",
                 f"{ilp['seconds']:.3g}" if ilp else "", ilp["status"] if ilp else "",
                 _pct(ilp["vs_best"]) if ilp else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
