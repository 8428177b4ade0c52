"""Per-item tier ceilings: a real constraint of every solver, never a change of distortions."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sphkv.rdr import AllocationProblem
from sphkv.solvers import SOLVERS, solve
from tests.solvers.helpers import brute_force_optimum, random_problem
from tests.solvers.test_known_optima import SOLVER_CASES, SOLVER_IDS


def with_ceiling(problem: AllocationProblem, rng: np.random.Generator) -> AllocationProblem:
    """The same problem with random ceilings (-1 for some items), never below a forced tier."""
    ceiling = rng.integers(-1, problem.n_tiers, problem.n_items)
    forced = problem.forced >= 0
    ceiling[forced] = np.maximum(ceiling[forced], problem.forced[forced])
    loose = AllocationProblem(problem.distortion, problem.cost, 1e12, groups=problem.groups,
                              page_size=problem.page_size, page_overhead=problem.page_overhead,
                              forced=problem.forced, ceiling=ceiling)
    return loose.with_budget(problem.budget if problem.budget >= loose.min_cost()
                             else loose.min_cost())


@pytest.mark.parametrize("method, options", SOLVER_CASES, ids=SOLVER_IDS)
@pytest.mark.parametrize("paged", [False, True], ids=["items", "pages"])
@pytest.mark.parametrize("seed", range(6))
def test_brute_forced_optima_with_ceilings(method, options, paged, seed):
    rng = np.random.default_rng(500 + seed)
    problem = with_ceiling(random_problem(rng, n=int(rng.integers(2, 7)),
                                          t=int(rng.integers(2, 5)), paged=paged,
                                          budget_fraction=float(rng.uniform(0.05, 0.95))), rng)
    optimum = brute_force_optimum(problem)
    alloc = solve(problem, method, **options)
    assert np.all(alloc.tiers <= problem.ceiling_tier)
    assert alloc.cost <= problem.budget * (1 + 1e-12)
    assert alloc.lower_bound <= optimum + 1e-7 * max(1.0, optimum)
    assert alloc.distortion >= optimum - 1e-9
    if SOLVERS[method].EXACT:
        assert alloc.distortion == pytest.approx(optimum, rel=1e-6, abs=1e-9)
    elif not paged:
        # greedy loses at most one item's largest gain among its allowed tiers
        d = np.where(problem.allowed(), problem.distortion, np.nan)
        worst = float(np.nanmax(np.nanmax(d, axis=1) - np.nanmin(d, axis=1)))
        assert alloc.distortion - alloc.lower_bound <= worst + 1e-9


def test_ceiling_binds_where_the_optimum_would_exceed_it():
    # Without ceilings item 2 would take fp16; capped at tier 1 it must settle for half.
    d = np.array([[4.0, 1.0, 0.0], [2.0, 1.0, 0.0], [9.0, 3.0, 0.0]])
    problem = AllocationProblem(d, [0.0, 1.0, 2.0], 3.0, ceiling=[-1, -1, 1])
    assert brute_force_optimum(problem) == 5.0  # every item at tier 1, or item 0 at fp16
    for method, options in SOLVER_CASES:
        alloc = solve(problem, method, **options)
        assert alloc.tiers[2] <= 1
        if SOLVERS[method].EXACT:
            assert alloc.distortion == pytest.approx(5.0)


@st.composite
def ceiling_problems(draw):
    n = draw(st.integers(0, 30))
    t = draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    distortion = rng.pareto(1.0, (n, t)) * rng.random((n, 1))
    cost = np.sort(rng.integers(0, 30, t)).astype(float)
    pages = {}
    if draw(st.booleans()):
        pages = {"groups": rng.integers(0, 3, n), "page_size": draw(st.integers(1, 4)),
                 "page_overhead": float(draw(st.integers(0, 6)))}
    forced = np.where(rng.random(n) < 0.2, rng.integers(0, t, n), -1)
    ceiling = rng.integers(-1, t, n)
    ceiling[forced >= 0] = np.maximum(ceiling[forced >= 0], forced[forced >= 0])
    loose = AllocationProblem(distortion, cost, 1e12, forced=forced, ceiling=ceiling, **pages)
    low, high = loose.min_cost(), loose.full_cost()
    return loose.with_budget(low + draw(st.floats(0, 1.1)) * max(high - low, 0.0))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ceiling_problems())
def test_no_solver_returns_a_tier_above_the_ceiling(problem):
    for method, options in [("greedy", {}), ("greedy", {"backend": "torch"}),
                            ("greedy", {"repair": False}), ("lp", {}), ("ilp", {})]:
        alloc = solve(problem, method, **options)
        assert np.all(alloc.tiers <= problem.ceiling_tier), method
        assert problem.is_feasible(alloc.tiers)
        assert alloc.cost <= problem.budget * (1 + 1e-12) + 1e-9
    assert np.all(problem.min_cost_tiers() <= problem.ceiling_tier)
    assert problem.cost_of(problem.min_cost_tiers()) == pytest.approx(problem.min_cost())


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 4), st.integers(1, 3))
def test_min_cost_is_the_brute_forced_minimum(seed, n, t, page_size):
    rng = np.random.default_rng(seed)
    cost = rng.integers(0, 4, t).astype(float)  # unsorted, with ties, drop not always free
    forced = np.where(rng.random(n) < 0.3, rng.integers(0, t, n), -1)
    ceiling = rng.integers(-1, t, n)
    ceiling[forced >= 0] = np.maximum(ceiling[forced >= 0], forced[forced >= 0])
    problem = AllocationProblem(rng.random((n, t)), cost, 1e12, groups=rng.integers(0, 2, n),
                                page_size=page_size, page_overhead=float(rng.integers(0, 3)),
                                forced=forced, ceiling=ceiling)
    brute = min(problem.cost_of(np.array(tiers)) for tiers in np.ndindex(*(t,) * n)
                if problem.is_feasible(np.array(tiers), rtol=np.inf))
    assert problem.min_cost() == pytest.approx(brute)
    assert problem.cost_of(problem.min_cost_tiers()) == pytest.approx(brute)


def test_equal_tier_costs_do_not_overstate_the_minimum():
    d = [[19, 11, 8, 3], [9, 11, 15, 9], [3, 3, 10, 12], [17, 16, 11, 2], [16, 10, 16, 14]]
    problem = AllocationProblem(d, [1, 1, 2, 2], 8, groups=[0, 1, 0, 1, 0], page_size=3,
                                page_overhead=1)
    assert problem.min_cost() == 8.0
    for method, options in SOLVER_CASES:
        assert solve(problem, method, **options).cost <= 8.0


@pytest.mark.parametrize("kwargs, field", [
    ({"ceiling": [0, 3, -1]}, "ceiling"),
    ({"ceiling": [0, -2, -1]}, "ceiling"),
    ({"ceiling": [0, 1]}, "ceiling"),
    ({"ceiling": [True, False, True]}, "ceiling"),
    ({"ceiling": [0.5, 1, 1]}, "ceiling"),
    ({"ceiling": [0, 1, 1], "forced": [-1, 2, -1]}, "forced.*ceiling"),
])
def test_bad_ceiling_names_the_argument(kwargs, field):
    d = np.ones((3, 3))
    with pytest.raises(ValueError, match=field):
        AllocationProblem(d, [0.0, 1.0, 2.0], 10.0, **kwargs)


def test_ceiling_is_saved_and_loaded(tmp_path):
    problem = AllocationProblem(np.ones((3, 3)), [0.0, 1.0, 2.0], 10.0, ceiling=[0, -1, 1])
    problem.save(tmp_path / "p.npz")
    loaded = AllocationProblem.load(tmp_path / "p.npz")
    np.testing.assert_array_equal(loaded.ceiling, [0, -1, 1])
    np.testing.assert_array_equal(problem.with_budget(5.0).ceiling, [0, -1, 1])
