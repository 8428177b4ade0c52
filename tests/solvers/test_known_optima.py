"""Every solver on the same small cases with known or brute-forced optima (as cvxpy's tests do)."""

import numpy as np
import pytest

from sphkv.rdr import AllocationProblem
from sphkv.solvers import SOLVERS, solve
from tests.solvers.helpers import brute_force_optimum, random_problem

# (method, options): each solver and backend.
SOLVER_CASES = [
    ("greedy", {}),
    ("greedy", {"backend": "torch"}),
    ("lp", {}),
    ("lp", {"backend": "clarabel"}),
    ("ilp", {}),
    ("ilp", {"backend": "scip"}),
    ("ilp", {"backend": "cpsat"}),
]
SOLVER_IDS = [m + ("-" + o["backend"] if o else "") for m, o in SOLVER_CASES]


def hand_cases():
    """Small instances whose optimum was worked out by hand."""
    d = np.array([[4.0, 1.0, 0.0], [2.0, 1.0, 0.0], [9.0, 3.0, 0.0]])
    c = np.array([0.0, 1.0, 2.0])
    # Item 2 at full (saves 9), item 0 at half (saves 3): 1 + 2 + 0.
    yield "three-items", AllocationProblem(d, c, 3.0), 3.0
    # Item 2 forced to full uses 2 bytes; 1 byte left buys item 0's half tier.
    yield "forced", AllocationProblem(d, c, 3.0, forced=[-1, -1, 2]), 3.0
    # One group, pages of 2 items, 1 byte of overhead: a page of fp16 costs 5 bytes.
    d_pages = np.array([[5.0, 0.0], [4.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    pages = {"page_size": 2, "page_overhead": 1.0}
    yield "pages-one", AllocationProblem(d_pages, [0.0, 2.0], 9.0, **pages), 2.0
    yield "pages-two", AllocationProblem(d_pages, [0.0, 2.0], 10.0, **pages), 0.0
    # Two groups; the forced item in group 1 leaves a free slot that item 3 fills for free.
    yield "pages-forced-slot", AllocationProblem(
        d_pages, [0.0, 2.0], 10.0, groups=[0, 0, 1, 1], forced=[-1, -1, 1, -1], **pages), 0.0


HAND = list(hand_cases())


@pytest.mark.parametrize("method, options", SOLVER_CASES, ids=SOLVER_IDS)
@pytest.mark.parametrize("name, problem, optimum", HAND, ids=[h[0] for h in HAND])
def test_hand_cases(method, options, name, problem, optimum):
    assert brute_force_optimum(problem) == pytest.approx(optimum)
    alloc = solve(problem, method, **options)
    assert alloc.cost <= problem.budget
    assert alloc.lower_bound <= optimum + 1e-9
    assert alloc.distortion >= optimum - 1e-9
    if SOLVERS[method].EXACT:
        assert alloc.distortion == pytest.approx(optimum, abs=1e-9)
        assert alloc.status == "optimal"


def _greedy_guarantee(problem: AllocationProblem) -> float:
    """Greedy without pages loses at most one item's largest gain against the LP bound."""
    return float((problem.distortion.max(axis=1) - problem.distortion.min(axis=1)).max())


@pytest.mark.parametrize("method, options", SOLVER_CASES, ids=SOLVER_IDS)
@pytest.mark.parametrize("paged", [False, True], ids=["items", "pages"])
@pytest.mark.parametrize("seed", range(8))
def test_brute_forced_random_cases(method, options, paged, seed):
    rng = np.random.default_rng(seed)
    problem = random_problem(rng, n=int(rng.integers(2, 7)), t=int(rng.integers(2, 5)),
                             paged=paged, budget_fraction=float(rng.uniform(0.05, 0.95)))
    optimum = brute_force_optimum(problem)
    alloc = solve(problem, method, **options)
    assert alloc.cost <= problem.budget * (1 + 1e-12)
    assert np.all(alloc.tiers[problem.forced >= 0] == problem.forced[problem.forced >= 0])
    assert alloc.lower_bound <= optimum + 1e-7 * max(1.0, optimum)
    assert alloc.distortion >= optimum - 1e-9
    if SOLVERS[method].EXACT:
        assert alloc.distortion == pytest.approx(optimum, rel=1e-6, abs=1e-9)
    elif not paged:
        assert alloc.distortion - alloc.lower_bound <= _greedy_guarantee(problem) + 1e-9


@pytest.mark.parametrize("seed", range(4))
def test_lp_optimum_equals_greedy_bound(seed):
    rng = np.random.default_rng(100 + seed)
    paged = seed % 2 == 1
    problem = random_problem(rng, n=200, t=5, paged=paged, budget_fraction=0.3)
    greedy, lp = solve(problem, "greedy"), solve(problem, "lp")
    if paged:
        # Greedy adds a dual bound that credits forced pages' free slots: never weaker.
        assert greedy.lower_bound >= lp.lower_bound * (1 - 1e-6)
    else:
        # Both are the optimum of the same LP relaxation.
        assert lp.lower_bound == pytest.approx(greedy.lower_bound, rel=1e-6)


def test_ilp_time_limit_returns_best_feasible():
    rng = np.random.default_rng(7)
    n, t = 6000, 6
    utility = rng.pareto(1.2, (n, 1)) + 0.01
    distortion = utility * np.array([1.0, 0.3, 0.1, 0.03, 0.004, 0.0]) * rng.uniform(
        0.5, 1.5, (n, t))
    problem = AllocationProblem(distortion, [0, 10, 14, 18, 34, 128], 0.2 * n * 128,
                                groups=np.arange(n) % 30, page_size=16, page_overhead=16)
    alloc = solve(problem, "ilp", time_limit=0.5)
    greedy = solve(problem, "greedy")
    assert alloc.status in ("time_limit", "optimal")
    assert alloc.cost <= problem.budget
    assert alloc.distortion <= greedy.distortion  # never worse than its warm start
    assert alloc.lower_bound >= greedy.lower_bound  # the better of the two bounds


def test_registry_states_capabilities():
    assert list(SOLVERS)[0] == "greedy"  # preference order: the default first
    info = {name: cls.describe() for name, cls in SOLVERS.items()}
    assert info["ilp"]["exact"] and info["ilp"]["pages"] == "exact"
    assert not info["greedy"]["exact"] and info["greedy"]["pages"] == "repair"
    assert "cvxpy" in info["lp"]["required_modules"]
    assert all(i["available"] for i in info.values())


def test_unknown_method_and_bad_options():
    problem = HAND[0][1]
    with pytest.raises(ValueError, match="method must be one of"):
        solve(problem, "simplex")
    with pytest.raises(ValueError, match="backend"):
        solve(problem, "greedy", backend="jax")
    with pytest.raises(ValueError, match="bad options"):
        solve(problem, "greedy", colour="red")
    with pytest.raises(ValueError, match="time_limit"):
        solve(problem, "ilp", time_limit=-1)
