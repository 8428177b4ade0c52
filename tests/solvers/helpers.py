"""Small instances and their brute-forced optima."""

from __future__ import annotations

import itertools

import numpy as np

from sphkv.rdr import AllocationProblem


def brute_force_optimum(problem: AllocationProblem) -> float:
    """The least distortion over every feasible assignment (T^N of them)."""
    best = np.inf
    for tiers in itertools.product(range(problem.n_tiers), repeat=problem.n_items):
        tiers = np.array(tiers)
        if problem.is_feasible(tiers):
            best = min(best, problem.distortion_of(tiers))
    return best


def random_problem(rng: np.random.Generator, n: int, t: int, paged: bool,
                   budget_fraction: float, forced_rate: float = 0.2,
                   page_size: int = 2) -> AllocationProblem:
    """A random instance: heavy-tailed utilities, increasing tier costs, drop costs nothing."""
    utility = rng.pareto(1.5, (n, 1)) + 0.01
    error = np.sort(rng.random((n, t)), axis=1)[:, ::-1]  # cheaper tiers distort more
    error[:, -1] = 0.0
    distortion = utility * error
    cost = np.concatenate([[0.0], np.sort(rng.integers(1, 12, t - 1)).astype(float)])
    forced = np.where(rng.random(n) < forced_rate, rng.integers(0, t, n), -1)
    pages = {"groups": rng.integers(0, 2, n), "page_size": page_size,
             "page_overhead": 1.0} if paged else {}
    loose = AllocationProblem(distortion, cost, 1e12, forced=forced, **pages)
    low, high = loose.min_cost(), loose.max_useful_cost()
    return loose.with_budget(low + budget_fraction * (high - low))


def brute_force_lagrangian(problem: AllocationProblem, price: float) -> float:
    """``min_x Σ D + price · (paged bytes(x) - budget)``, each group's assignments enumerated:
    the Lagrangian dual function of the paged problem, exact."""
    total = -price * problem.budget
    for g in range(problem.n_groups):
        items = np.flatnonzero(problem.group_index == g)
        forced, ceiling = problem.forced[items], problem.ceiling_tier[items]
        best = np.inf
        for tiers in itertools.product(range(problem.n_tiers), repeat=items.size):
            tiers = np.array(tiers, dtype=np.int64)
            if np.any((forced >= 0) & (tiers != forced)) or np.any(tiers > ceiling):
                continue
            pages = -(-np.bincount(tiers, minlength=problem.n_tiers) // problem.page_size)
            value = (problem.distortion[items, tiers].sum()
                     + price * (pages * problem.page_bytes[g]).sum())
            best = min(best, value)
        total += best
    return total
