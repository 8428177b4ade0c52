"""LP relaxation of the MCKP with cvxpy, rounded.

Variables x[i, t] ∈ [0, 1] (item i's share of tier t), one-hot rows Σ_t x[i, t] = 1, forced items
fixed, Σ_i,t c[i, t] x[i, t] ≤ B. At a vertex at most one item is fractional (two constraints
beyond the rows), so rounding loses at most one item. The objective is solved in units of the
median item's distortion range, where the solver's tolerances are small against the
coefficients. The reported bound is not the solver's value but the Lagrangian dual
``Σ_i min_t (D_it + λ c_it) − λ B`` evaluated at its budget dual λ: a lower bound for any λ >= 0,
equal to the LP optimum at the optimal λ, so an inaccurate solve can weaken it but never
overstate it.

Pages: the LP is solved on the amortized cost ``c + h/P`` (a relaxation of the paged cost, so its
optimum is still a lower bound), then its rounding goes through the same page repair as greedy,
and its budget dual λ seeds the same slot-crediting Lagrangian bound.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from sphkv.rdr.problem import Allocation, AllocationProblem
from sphkv.solvers.base import Solver, finish, register
from sphkv.solvers.page_bound import whole_page_bound
from sphkv.solvers.page_repair import paged_dual_bound, repair_pages

__all__ = ["LPSolver"]


class _QuietSolverProbe(logging.Filter):
    """Drop cvxpy's notice that it cannot use OR-Tools' GLOP/PDLP: we use OR-Tools directly."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Encountered unexpected exception importing solver")
                    and ("GLOP" in msg or "PDLP" in msg))


logging.getLogger("__cvxpy__").addFilter(_QuietSolverProbe())

# cvxpy solver name -> its options for a time limit in seconds (or none).
_TIME_LIMIT_OPTION = {
    # HiGHS's interior point (with crossover to a vertex) is ~15x faster than its simplex here.
    "HIGHS": lambda s: {"highs_options": {"solver": "ipm"} | ({} if s is None else
                                                               {"time_limit": float(s)})},
    "SCIPY": lambda s: {"scipy_options": {"method": "highs"} | ({} if s is None else
                                                                {"time_limit": float(s)})},
    "CLARABEL": lambda s: {} if s is None else {"time_limit": float(s)},
}


def _round_within(problem: AllocationProblem, x: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Round x to one tier per item, then demote fractional items until the item cost fits."""
    tiers = np.argmax(x, axis=1)
    tiers[problem.forced >= 0] = problem.forced[problem.forced >= 0]
    rows = np.arange(problem.n_items)
    over = cost[rows, tiers].sum() - problem.budget
    if over <= 0:
        return tiers
    # Demote the most fractional items first, each to its cheapest tier that lowers cost least
    # harmfully; a vertex has at most one, so this loop is short.
    fractional = np.flatnonzero((x.max(axis=1) < 1 - 1e-6) & (problem.forced < 0))
    for i in fractional[np.argsort(x[fractional].max(axis=1))]:
        cheaper = np.flatnonzero((cost[i] < cost[i, tiers[i]])
                                 & (np.arange(problem.n_tiers) <= problem.ceiling_tier[i]))
        if cheaper.size == 0:
            continue
        # Least distortion among tiers that repay the overrun, else the cheapest.
        enough = cheaper[cost[i, tiers[i]] - cost[i, cheaper] >= over]
        pick = enough[np.argmin(problem.distortion[i, enough])] if enough.size else cheaper[
            np.argmin(cost[i, cheaper])]
        over -= cost[i, tiers[i]] - cost[i, pick]
        tiers[i] = pick
        if over <= 0:
            return tiers
    return problem.min_cost_tiers()


def _unit(distortion: np.ndarray, allowed: np.ndarray) -> float:
    """The median over items of their allowed distortions' range (else their mean, else 1)."""
    d = np.where(allowed, distortion, np.nan)
    spread = np.nanmax(d, axis=1) - np.nanmin(d, axis=1)
    for value in (np.median(spread), spread.mean(), np.nanmax(np.abs(d))):
        if np.isfinite(value) and value > 0:
            return float(value)
    return 1.0


def _lagrangian_bound(distortion: np.ndarray, cost: np.ndarray, allowed: np.ndarray,
                      price: float, room: float) -> float:
    """``Σ_i min_t (D_it + λ c_it) − λ room`` over the allowed tiers: for any λ >= 0 a lower bound
    on the distortion of the items within ``room`` bytes (at cost ``c``), less the rounding of
    the λ·bytes terms that cancel."""
    priced = np.where(allowed, distortion + price * cost, np.inf).min(axis=1)
    lagrange = price * room
    rounding = 1e-13 * distortion.shape[0] * (float(np.abs(priced).sum()) + abs(lagrange))
    return float(priced.sum()) - lagrange - rounding


@register
@dataclass
class LPSolver(Solver):
    """LP relaxation solved by cvxpy, rounded (pages: amortized cost, then repair).

    Parameters
    ----------
    backend : str
        A cvxpy solver: ``"HIGHS"`` (default), ``"SCIPY"`` (HiGHS inside SciPy) or
        ``"CLARABEL"`` (interior point).
    """

    NAME: ClassVar[str] = "lp"
    EXACT: ClassVar[bool] = False
    REQUIRED_MODULES: ClassVar[tuple[str, ...]] = ("cvxpy",)
    PAGES: ClassVar[str] = "repair"

    backend: str = "HIGHS"

    def __post_init__(self):
        self.backend = self.backend.upper()
        if self.backend not in _TIME_LIMIT_OPTION:
            raise ValueError(f"backend must be one of {list(_TIME_LIMIT_OPTION)}, "
                             f"got {self.backend!r}")

    def _solve(self, problem: AllocationProblem, time_limit: float | None) -> Allocation:
        import cvxpy as cp
        import scipy.sparse as sp

        n, t = problem.distortion.shape
        cost = np.broadcast_to(problem.amortized_cost(), (n, t))
        free = problem.forced < 0
        fixed = np.flatnonzero(~free)
        fixed_cost = cost[fixed, problem.forced[fixed]].sum()
        fixed_distortion = problem.distortion[fixed, problem.forced[fixed]].sum()
        x_full = np.zeros((n, t))
        x_full[fixed, problem.forced[fixed]] = 1.0
        n_free = int(free.sum())
        if n_free:
            # x[k] = share of free item xi[k] at tier xt[k], for the tiers within its ceiling.
            xi, xt = np.nonzero(problem.allowed(free))
            x = cp.Variable(xi.size, nonneg=True)
            rows = sp.csr_matrix((np.ones(xi.size), (xi, np.arange(xi.size))),
                                 shape=(n_free, xi.size))
            items = np.flatnonzero(free)[xi]
            d, c = problem.distortion[items, xt], cost[items, xt]
            # The objective in units of a typical free item's distortion range: in the units of
            # the largest distortion (Solver.solve) most coefficients can sit below HiGHS's
            # tolerances (1e-7), and its "optimal" answer is then far from the optimum.
            unit = _unit(problem.distortion[free], problem.allowed(free))
            objective = cp.Minimize((d / unit) @ x)
            budget = c @ x <= problem.budget - fixed_cost
            constraints = [rows @ x == 1, budget]
            lp = cp.Problem(objective, constraints)
            lp.solve(solver=self.backend, **_TIME_LIMIT_OPTION[self.backend](time_limit))
            if lp.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
                raise RuntimeError(f"LP solver {self.backend} ended with status {lp.status}")
            x_full[items, xt] = np.clip(x.value, 0.0, 1.0)
            dual = budget.dual_value
            price = max(float(dual) * unit, 0.0) if dual is not None else 0.0
            # The bound is the Lagrangian dual at the solver's price, evaluated here: a bound for
            # any price, so an inaccurate solve cannot overstate it (the solver's value can).
            bound = _lagrangian_bound(problem.distortion[free], cost[free], problem.allowed(free),
                                      price, problem.budget - fixed_cost) + fixed_distortion
        else:
            bound, price = fixed_distortion, 0.0
        tiers = _round_within(problem, x_full, cost)
        if problem.page_size is not None:
            tiers = repair_pages(problem, tiers)
            bound = max(bound, paged_dual_bound(problem, price),
                        whole_page_bound(problem, price, evaluations=8))
        return finish(problem, tiers, bound, "feasible", price)
