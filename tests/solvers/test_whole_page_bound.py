"""The whole-page Lagrangian bound: below the exact Lagrangian dual function at every price (so
below the optimum), and above the slot dual where groups are small."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sphkv.rdr import AllocationProblem, synthetic_problem
from sphkv.solvers import solve
from sphkv.solvers.page_bound import _at_price, _Groups, whole_page_bound
from sphkv.solvers.page_repair import paged_dual_bound
from tests.solvers.helpers import brute_force_lagrangian, brute_force_optimum


def tiny(seed: int) -> AllocationProblem:
    """Up to 7 items in up to 3 groups: tier costs in any order (not always a free tier),
    forced tiers, ceilings, page sizes 1 to 3, overhead 0 to 2."""
    rng = np.random.default_rng(seed)
    n, t = int(rng.integers(1, 8)), int(rng.integers(1, 5))
    utility = rng.pareto(1.5, (n, 1)) + 0.01
    error = np.sort(rng.random((n, t)), axis=1)[:, ::-1]
    error[:, -1] = 0.0
    cost = np.concatenate([[0.0], np.sort(rng.integers(1, 12, t - 1)).astype(float)])
    if rng.random() < 0.3:
        cost = rng.permutation(cost) + rng.integers(0, 2)
    forced = np.where(rng.random(n) < 0.3, rng.integers(0, t, n), -1)
    ceiling = None
    if rng.random() < 0.5:
        ceiling = np.where(rng.random(n) < 0.3, rng.integers(0, t, n), -1)
        forced = np.where((ceiling >= 0) & (forced > ceiling), -1, forced)
    loose = AllocationProblem(utility * error, cost, 1e12, groups=rng.integers(0, 3, n),
                              page_size=int(rng.integers(1, 4)),
                              page_overhead=float(rng.integers(0, 3)), forced=forced,
                              ceiling=ceiling)
    low, high = loose.min_cost(), loose.max_useful_cost()
    return loose.with_budget(low + rng.random() * (high - low))


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(1e-3, 10.0))
def test_below_the_lagrangian_dual_function_at_any_price(seed, price):
    problem = tiny(seed)
    exact = brute_force_lagrangian(problem, price)
    for max_jumps in (0, 1, 8):
        bound = _at_price(_Groups(problem), price, max_jumps)
        assert bound <= exact + 1e-9 * max(1.0, abs(exact))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(1e-3, 10.0))
def test_below_the_optimum(seed, price):
    problem = tiny(seed)
    optimum = brute_force_optimum(problem)
    assert whole_page_bound(problem, price, evaluations=6) <= optimum + 1e-9 * max(1.0, optimum)


def test_counts_whole_pages_in_small_groups():
    # 64 groups of 244 tokens: the slot dual (page counts as fractions) is 7,543.9, HiGHS's
    # bound after 120 s 7,601.1, HiGHS's best allocation 7,617.7.
    problem = synthetic_problem(layers=8, kv_heads=8, tokens=244, page_size=16, sinks=4,
                                recent=8)
    price = solve(problem, "greedy", repair=False).price
    slot = paged_dual_bound(problem, price, evaluations=24)
    bound = whole_page_bound(problem, 1.3 * price, evaluations=8)
    assert slot < 7_550 < 7_600 < bound <= 7_617.7
    alloc = solve(problem, "greedy")
    assert alloc.lower_bound == pytest.approx(bound, rel=1e-3)
    assert alloc.gap <= 0.003


def test_without_pages_or_price_it_bounds_nothing():
    problem = synthetic_problem(layers=2, kv_heads=2, tokens=40, page_size=None, sinks=2,
                                recent=2)
    assert whole_page_bound(problem, 1.0) == -np.inf
    paged = synthetic_problem(layers=2, kv_heads=2, tokens=40, page_size=4, sinks=2, recent=2)
    assert whole_page_bound(paged, 0.0) == -np.inf


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_greedy_without_the_bound_keeps_a_valid_one(seed):
    # bound=False (the online allocator's solves): no slot dual, no whole-page bound, no
    # exchanges; the lower bound is the unpaged Lagrangian one, below the optimum and below the
    # full bound, and the allocation is feasible and the greedy's before its exchanges
    problem = tiny(seed)
    optimum = brute_force_optimum(problem)
    full, plain = solve(problem, "greedy"), solve(problem, "greedy", bound=False)
    assert problem.is_feasible(plain.tiers)
    assert plain.lower_bound <= full.lower_bound + 1e-9 * max(1.0, optimum)
    assert plain.lower_bound <= optimum + 1e-9 * max(1.0, optimum)
    assert plain.distortion >= full.distortion - 1e-9 * max(1.0, optimum)
