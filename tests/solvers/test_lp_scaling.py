"""The LP on distortions spanning many orders of magnitude: its bound stays a bound."""

import pytest

from sphkv.rdr import AllocationProblem, synthetic_problem
from sphkv.solvers import solve


def _wide_range_problem(paged: bool, seed: int) -> AllocationProblem:
    """A synthetic problem whose first (forced) item distorts 1e9 times more at its other tiers:
    the largest distortion, which sets the unit solvers work in, dwarfs every free item's."""
    base = synthetic_problem(layers=2, kv_heads=1, tokens=1000, budget_fraction=0.125,
                             page_size=16 if paged else None, sinks=4, recent=8, seed=seed)
    distortion = base.distortion.copy()
    distortion[0, :-1] *= 1e9
    return AllocationProblem(distortion, base.cost, base.budget, groups=base.groups,
                             page_size=base.page_size, page_overhead=base.page_overhead,
                             forced=base.forced)


@pytest.mark.parametrize("paged", [False, True], ids=["items", "pages"])
@pytest.mark.parametrize("seed", [0, 1])
def test_lp_bound_and_allocation_with_a_huge_largest_distortion(paged, seed):
    problem = _wide_range_problem(paged, seed)
    greedy = solve(problem, "greedy")
    lp = solve(problem, "lp")
    # A lower bound: below every feasible allocation's distortion, greedy's included.
    assert lp.lower_bound <= greedy.distortion * (1 + 1e-9)
    assert lp.lower_bound <= lp.distortion
    # The LP is solved to its optimum, not to the solver's tolerance in the largest's units:
    # the rounded LP is close to greedy here (its page repair rounds a little worse than
    # greedy's rounding by options: 2-3% on these two groups).
    assert lp.distortion <= greedy.distortion * 1.04
    if not paged:  # greedy's bound is then the LP optimum, and so is the LP's dual bound
        assert lp.lower_bound == pytest.approx(greedy.lower_bound, rel=1e-6)
