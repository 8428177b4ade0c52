"""Inputs users really pass: scaled distortions, empty problems, silent-looking bad arguments."""

import numpy as np
import pytest

from sphkv.rdr import AllocationProblem, InfeasibleBudgetError
from sphkv.solvers import solve
from tests.solvers.helpers import brute_force_optimum, random_problem
from tests.solvers.test_known_optima import SOLVER_CASES, SOLVER_IDS

D = np.array([[4.0, 1.0, 0.0], [2.0, 1.0, 0.0], [9.0, 3.0, 0.0]])
C = np.array([0.0, 1.0, 2.0])


def _rescaled(problem: AllocationProblem, factor: float) -> AllocationProblem:
    return AllocationProblem(problem.distortion * factor, problem.cost, problem.budget,
                             groups=problem.groups, page_size=problem.page_size,
                             page_overhead=problem.page_overhead, forced=problem.forced)


@pytest.mark.parametrize("method, options", SOLVER_CASES, ids=SOLVER_IDS)
@pytest.mark.parametrize("factor", [1e-30, 2.0**-100, 1e30])
@pytest.mark.parametrize("paged", [False, True], ids=["items", "pages"])
def test_answers_do_not_depend_on_the_distortion_unit(method, options, factor, paged):
    rng = np.random.default_rng(11)
    base = random_problem(rng, n=40, t=4, paged=paged, budget_fraction=0.4, page_size=3)
    ref = solve(base, method, **options)
    alloc = solve(_rescaled(base, factor), method, **options)
    np.testing.assert_array_equal(alloc.tiers, ref.tiers)
    assert alloc.status == ref.status
    assert alloc.distortion == pytest.approx(ref.distortion * factor, rel=1e-9)
    assert alloc.lower_bound == pytest.approx(ref.lower_bound * factor, rel=1e-6)
    assert alloc.gap == pytest.approx(ref.gap, abs=1e-6)


@pytest.mark.parametrize("method", ["greedy", "lp", "ilp"])
def test_optimal_is_claimed_only_within_a_relative_gap(method):
    rng = np.random.default_rng(3)
    problem = _rescaled(random_problem(rng, n=60, t=5, paged=True, budget_fraction=0.3,
                                       page_size=4), 1e-30)
    alloc = solve(problem, method)
    if alloc.status == "optimal":  # within the ilp's mip_gap (1e-6), or proven by the bound
        assert alloc.gap <= 1e-6


@pytest.mark.parametrize("method, options", SOLVER_CASES, ids=SOLVER_IDS)
@pytest.mark.parametrize("pages", [{}, {"page_size": 4, "page_overhead": 2.0}],
                         ids=["items", "pages"])
def test_empty_problem(method, options, pages):
    problem = AllocationProblem(np.zeros((0, 3)), C, 0.0, groups=np.zeros(0, dtype=int),
                                **pages)
    alloc = solve(problem, method, **options)
    assert alloc.tiers.shape == (0,) and alloc.cost == 0.0 and alloc.distortion == 0.0
    assert alloc.status == "optimal"


@pytest.mark.parametrize("kwargs, field", [
    ({"forced": np.array([True, False, False])}, "forced"),
    ({"groups": np.array([True, False, False])}, "groups"),
    ({"page_size": True}, "page_size"),
    ({"page_size": np.float64(2.0)}, "page_size"),
    ({"tier_names": "abc"}, "tier_names"),
    ({"tier_names": ["drop", 4, "fp16"]}, "tier_names"),
    ({"distortion": D + 1j}, "distortion"),
    ({"cost": C + 0j}, "cost"),
    ({"budget": True}, "budget"),
    ({"page_size": 2, "page_overhead": True}, "page_overhead"),
])
def test_silently_wrong_arguments_are_refused(kwargs, field):
    args = {"distortion": D, "cost": C, "budget": 3.0} | kwargs
    with pytest.raises(ValueError, match=field):
        AllocationProblem(**args)


def test_inputs_are_copied_at_construction():
    d, c, forced = D.copy(), C.copy(), np.array([-1, -1, 2])
    problem = AllocationProblem(d, c, 3.0, forced=forced)
    d[0, 0], c[1], forced[0] = np.nan, -5.0, 1
    assert np.isfinite(problem.distortion).all() and problem.cost[1] == 1.0
    assert problem.forced[0] == -1
    with pytest.raises(ValueError):
        problem.distortion[0, 0] = np.nan  # read-only
    alloc = solve(problem, "greedy")
    assert np.isfinite(alloc.distortion)


def test_issue_min_cost_example_is_feasible_at_its_true_minimum():
    d = [[19, 11, 8, 3], [9, 11, 15, 9], [3, 3, 10, 12], [17, 16, 11, 2], [16, 10, 16, 14]]
    kwargs = {"groups": [0, 1, 0, 1, 0], "page_size": 3, "page_overhead": 1}
    AllocationProblem(d, [1, 1, 2, 2], 8, **kwargs)  # no InfeasibleBudgetError
    with pytest.raises(InfeasibleBudgetError, match="at least 8"):
        AllocationProblem(d, [1, 1, 2, 2], 7.5, **kwargs)


def test_ilp_under_a_time_limit_returns_a_feasible_answer_and_its_bound():
    rng = np.random.default_rng(5)
    problem = random_problem(rng, n=20_000, t=6, paged=True, budget_fraction=0.2,
                             page_size=16)
    alloc = solve(problem, "ilp", time_limit=0.2)
    assert alloc.status in ("time_limit", "optimal")
    assert problem.is_feasible(alloc.tiers)
    assert alloc.lower_bound <= alloc.distortion


@pytest.mark.parametrize("seed", range(5))
def test_slot_dual_bound_holds_at_any_price_a_solver_reports(seed):
    # an LP backend may report the budget's dual as slightly negative
    from sphkv.solvers.page_repair import paged_dual_bound

    rng = np.random.default_rng(seed)
    problem = random_problem(rng, n=6, t=3, paged=True, budget_fraction=0.5, forced_rate=0.4)
    optimum = brute_force_optimum(problem)
    for price in (-1.0, -1e-12, 0.0, 0.1, 10.0):
        assert paged_dual_bound(problem, price) <= optimum + 1e-9
