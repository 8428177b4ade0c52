"""Problems shaped like the online allocator's demotions: the shortcuts taken for them give the
allocation of the general passes."""

import numpy as np
import pytest

from sphkv.rdr import AllocationProblem
from sphkv.rdr.problem import _dense_ids
from sphkv.solvers import greedy, page_round, solve

_COST = np.array([0.0, 38.0, 54.0, 70.0, 134.0, 258.0])


def admission_problem(seed: int, groups: int = 8, new: int = 16) -> AllocationProblem:
    """New items (free), kept candidates capped at their tier and listed pool by pool, and each
    touched (group, tier)'s partial page as items forced there with no distortion, within a
    budget that makes the solve demote."""
    rng = np.random.default_rng(seed)
    t = len(_COST)
    n_new, n_cand = groups * new, 4 * groups * new
    cand_tier = np.sort(rng.integers(1, t, n_cand))
    d = rng.lognormal(0.0, 1.5, (n_new + n_cand, 1)) * np.array([1, 0.2, 0.08, 0.03, 0.002, 0])
    if seed % 2:  # ties: equal rows
        d[1::7] = d[0]
    dummy_group, dummy_tier = np.nonzero(rng.integers(0, 16, (groups, t)) * (rng.random(
        (groups, t)) < 0.6))
    dummies = rng.integers(1, 16, dummy_group.size)
    dummy_tier = np.where(dummy_tier == 0, 1, dummy_tier)
    group = np.concatenate([rng.integers(0, groups, n_cand), np.repeat(np.arange(groups), new),
                            np.repeat(dummy_group, dummies)])
    distortion = np.concatenate([d[n_new:], d[:n_new], np.zeros((dummies.sum(), t))])
    forced = np.concatenate([np.full(n_cand + n_new, -1), np.repeat(dummy_tier, dummies)])
    ceiling = np.concatenate([cand_tier, np.full(n_new + dummies.sum(), -1)])
    problem = AllocationProblem(distortion, _COST, 1e12, groups=group, page_size=16,
                                page_overhead=12, forced=forced, ceiling=ceiling)
    return problem.with_budget(0.6 * problem.full_cost())  # every item at its ceiling


def test_unstable_sort_is_taken_for_the_stable_order_only_without_ties():
    rng = np.random.default_rng(0)
    for key in (rng.integers(0, 1 << 40, 5000), rng.integers(0, 50, 5000),
                np.arange(300)[::-1].copy(), np.zeros(7, dtype=np.int64)):
        np.testing.assert_array_equal(page_round._stable_argsort(np, key),
                                      np.argsort(key, kind="stable"))


@pytest.mark.parametrize("seed", range(6))
def test_admissions_are_solved_as_with_the_stable_sort(monkeypatch, seed):
    problem = admission_problem(seed)
    fast = solve(problem, "greedy", polish=False, bound=False)
    monkeypatch.setattr(page_round, "_stable_argsort",
                        lambda xp, key: xp.argsort(key, stable=True))
    general = solve(problem, "greedy", polish=False, bound=False)
    np.testing.assert_array_equal(fast.tiers, general.tiers)
    assert (fast.price, fast.cost, fast.distortion) == (general.price, general.cost,
                                                        general.distortion)


@pytest.mark.parametrize("seed", range(4))
def test_admissions_on_numpy_and_torch_agree(seed):
    problem = admission_problem(seed)
    on_numpy = solve(problem, "greedy", backend="numpy", polish=False, bound=False)
    on_torch = solve(problem, "greedy", backend="torch", polish=False, bound=False)
    np.testing.assert_array_equal(on_numpy.tiers, on_torch.tiers)
    assert on_numpy.price == on_torch.price


def test_hull_skips_ranks_no_item_may_take():
    """Items whose ceilings leave the dear ranks unused (their pairs skipped) have the hull
    they have beside an item that may take every rank (no pair skipped)."""
    problem = admission_problem(3)
    low = np.flatnonzero((problem.forced < 0) & (problem.ceiling_tier <= 2))
    top = np.flatnonzero((problem.forced < 0) & (problem.ceiling_tier == len(_COST) - 1))[:1]
    cost = problem.amortized_cost()
    alone = greedy.HullSegments(problem.distortion[low], cost, allowed=problem.allowed(low))
    items = np.concatenate([low, top])
    beside = greedy.HullSegments(problem.distortion[items], cost,
                                 allowed=problem.allowed(items))
    for name in ("dc", "eff", "seg"):
        np.testing.assert_array_equal(getattr(alone, name),
                                      getattr(beside, name)[:, :low.size])
    np.testing.assert_array_equal(alone.base, beside.base[:low.size])


def test_dense_ids_are_those_of_unique():
    rng = np.random.default_rng(1)
    for ids in (rng.integers(0, 1024, 20_000), np.array([7, 3, 7, 0]), np.array([5]),
                np.array([10**12, 3, 10**12]), np.zeros(0, dtype=np.int64)):
        uniq, inverse = np.unique(ids, return_inverse=True)
        dense_uniq, dense_inverse = _dense_ids(ids)
        np.testing.assert_array_equal(dense_uniq, uniq)
        np.testing.assert_array_equal(dense_inverse, inverse.reshape(-1))
