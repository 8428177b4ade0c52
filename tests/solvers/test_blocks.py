"""Blockwise passes (hull, selection, rounding, slot dual) give the answer of one block."""

import numpy as np
import pytest

from sphkv.rdr import AllocationProblem, synthetic_problem
from sphkv.solvers import page_round, solve


def _ceiling(problem: AllocationProblem) -> AllocationProblem:
    ceiling = np.where(np.arange(problem.n_items) % 3 == 0, 2, -1)
    ceiling[problem.forced >= 0] = -1
    return AllocationProblem(problem.distortion, problem.cost, problem.budget,
                             groups=problem.groups, page_size=problem.page_size,
                             page_overhead=problem.page_overhead, forced=problem.forced,
                             ceiling=ceiling)


@pytest.mark.parametrize("case", ["pages", "no-pages", "ceiling", "per-item-cost"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_small_blocks_give_the_same_allocation(monkeypatch, case, backend):
    problem = synthetic_problem(layers=3, kv_heads=5, tokens=97, page_size=None if
                                case == "no-pages" else 16, sinks=4, recent=8, seed=5,
                                budget_fraction=0.3)
    if case == "ceiling":
        problem = _ceiling(problem)
    if case == "per-item-cost":
        cost = np.broadcast_to(problem.cost, problem.distortion.shape).copy()
        cost[:, 1:] += (np.arange(problem.n_items) % 4)[:, None]
        problem = AllocationProblem(problem.distortion, cost, problem.budget * 1.1)
    whole = solve(problem, "greedy", backend=backend, polish=False)
    monkeypatch.setattr(page_round, "_CPU_BLOCK", 37)
    blocks = solve(problem, "greedy", backend=backend, polish=False)
    np.testing.assert_array_equal(blocks.tiers, whole.tiers)
    assert blocks.lower_bound == pytest.approx(whole.lower_bound, rel=1e-12)
