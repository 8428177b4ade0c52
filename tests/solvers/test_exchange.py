"""Exchanges between the tiers of a group along cycles: no page count grows, never more
distortion, forced tiers and ceilings kept; with cycles of every length, the min-cost flow's
optimum."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sphkv.rdr import synthetic_problem
from sphkv.solvers import solve
from sphkv.solvers.page_repair import _cycles, exchange_tiers, reassign
from tests.solvers.test_whole_page_bound import tiny


def _random_tiers(problem, seed):
    rng = np.random.default_rng(seed)
    tiers = problem.forced.copy()
    free = tiers < 0
    tiers[free] = rng.integers(0, problem.ceiling_tier[free] + 1)
    return tiers


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(2, 5))
def test_exchanges_keep_pages_and_never_add_distortion(seed, rounds, longest):
    problem = tiny(seed)
    tiers = _random_tiers(problem, seed)
    out = exchange_tiers(problem, tiers, rounds=rounds, longest=longest)
    paged = problem.page_bytes > 0
    pages = -(-problem.counts(tiers) // problem.page_size)
    assert np.all((-(-problem.counts(out) // problem.page_size) <= pages) | ~paged)
    assert problem.cost_of(out) <= problem.cost_of(tiers)
    free = problem.forced < 0
    np.testing.assert_array_equal(out[~free], problem.forced[~free])
    assert np.all(out <= problem.ceiling_tier)
    assert problem.distortion_of(out) <= problem.distortion_of(tiers) + 1e-12


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_every_cycle_cancelled_is_the_min_cost_flow(seed):
    # No negative cycle of any length left: the least distortion with those pages.
    problem = tiny(seed)
    tiers = _random_tiers(problem, seed)
    out = exchange_tiers(problem, tiers, rounds=100, longest=problem.n_tiers + 1)
    flow = problem.distortion_of(reassign(problem, tiers))
    scale = max(1.0, float(problem.distortion.max()))
    assert problem.distortion_of(out) == pytest.approx(flow, abs=1e-9 * scale * problem.n_items)


def test_cycles_are_each_directed_simple_cycle_once():
    # Of 4 nodes: 6 of two arcs, 8 of three, 6 of four.
    src, dst = _cycles(4, 4)
    assert src.shape == (20, 4)
    cycles = {tuple(sorted(zip(s, d))) for s, d in zip(src.tolist(), dst.tolist())}
    assert len(cycles) == 20
    for s, d in zip(src, dst):
        real = s != d
        assert sorted(s[real].tolist()) == sorted(d[real].tolist())  # each node in and out once


def test_exchanges_reach_the_reassignment_in_small_groups():
    # 64 groups of 244 tokens: cycles of up to three tiers leave the greedy's allocation where
    # the min-cost-flow reassignment of its pages is.
    problem = synthetic_problem(layers=8, kv_heads=8, tokens=244, page_size=16, sinks=4,
                                recent=8)
    alloc = solve(problem, "greedy", polish=False)
    flow = problem.distortion_of(reassign(problem, alloc.tiers))
    assert alloc.distortion <= flow * (1 + 1e-9)


def test_groups_too_unequal_to_pad_are_left_as_they_are():
    # 5,000 groups of one item and one of 20,000: padding to the largest would take 25,000
    # slots per item; the exchanges and the whole-page bound step aside.
    from sphkv.rdr import AllocationProblem
    from sphkv.solvers.page_bound import whole_page_bound

    rng = np.random.default_rng(0)
    n = 25_000
    groups = np.concatenate([np.arange(5_000), np.full(20_000, 5_000)])
    distortion = np.sort(rng.random((n, 3)), axis=1)[:, ::-1]
    problem = AllocationProblem(distortion, [0.0, 1.0, 2.0], 1e12, groups=groups, page_size=4,
                                page_overhead=1.0)
    tiers = rng.integers(0, 3, n)
    np.testing.assert_array_equal(exchange_tiers(problem, tiers), tiers)
    assert whole_page_bound(problem, 1.0) == -np.inf
