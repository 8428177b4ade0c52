"""The ILP under a time limit returns at least greedy's allocation, with an honest bound."""

import pytest

from sphkv.rdr import synthetic_problem
from sphkv.solvers import solve


@pytest.mark.parametrize("budget", [0.0625, 0.125])
def test_ilp_at_a_tiny_time_limit_is_no_worse_than_greedy(budget):
    # 57,600 paged items: more than the ILP once polished its warm start for under a limit.
    problem = synthetic_problem(layers=30, kv_heads=3, tokens=640, budget_fraction=budget,
                                sinks=4, recent=8)
    greedy = solve(problem, "greedy")
    ilp = solve(problem, "ilp", time_limit=0.2)
    assert ilp.status in ("time_limit", "optimal")
    assert problem.is_feasible(ilp.tiers)
    assert ilp.distortion <= greedy.distortion
    assert ilp.lower_bound <= ilp.distortion
    assert ilp.lower_bound >= greedy.lower_bound * (1 - 1e-9)
