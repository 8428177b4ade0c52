"""Exact MCKP with OR-Tools (HiGHS or SCIP MIP, or CP-SAT), warm-started from greedy.

Without pages: x[i, t] ∈ {0, 1} = 1 if item i takes tier t; Σ_t x[i, t] = 1; Σ c x ≤ B. Tiers that
another tier of the same item dominates (no dearer, no worse) are left out: swapping to the
dominating tier never hurts, so the optimum is unchanged.

With pages: m[g, t] ∈ ℤ≥0 = pages of (group g, tier t); Σ_{i∈g} x[i, t] + forced[g, t] ≤ P m[g, t]
and Σ (P c + h) m ≤ B. Once the page counts are fixed, assigning items to tiers is a
transportation problem (totally unimodular), so x may stay continuous in [0, 1] and only m is
integer (MIP backends); a fractional x is snapped to a vertex by a transportation LP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import scipy.sparse as sp

from sphkv.rdr.problem import Allocation, AllocationProblem
from sphkv.solvers.base import Solver, finish, register
from sphkv.solvers.greedy import GreedySolver

__all__ = ["ILPSolver"]

_BACKENDS = {"highs": "highs", "scip": "scip", "cpsat": "cp_sat"}


def _undominated(distortion: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """[N, T] mask of tiers no other tier of the item dominates (ties keep the lower index)."""
    n, t = distortion.shape
    keep = np.ones((n, t), dtype=bool)
    for a in range(t):
        for b in range(t):
            if a == b:
                continue
            no_worse = (cost[:, b] <= cost[:, a]) & (distortion[:, b] <= distortion[:, a])
            strictly = (cost[:, b] < cost[:, a]) | (distortion[:, b] < distortion[:, a]) | (b < a)
            keep[:, a] &= ~(no_worse & strictly)
    return keep


def _transport(problem: AllocationProblem, x: np.ndarray, free: np.ndarray,
               capacity: np.ndarray) -> np.ndarray:
    """A vertex (integral) assignment of free items within per-(group, tier) slot capacities."""
    from scipy.optimize import linprog

    n_free, t = x.shape
    g = problem.group_index[free]
    rows = sp.kron(sp.eye(n_free), np.ones((1, t)), format="csr")
    cap_rows = sp.csr_matrix((np.ones(n_free * t), (np.repeat(g, t) * t + np.tile(np.arange(t),
                              n_free), np.arange(n_free * t))), shape=(capacity.size, n_free * t))
    res = linprog(problem.distortion[free].ravel(), A_ub=cap_rows, b_ub=capacity.ravel(),
                  A_eq=rows, b_eq=np.ones(n_free), bounds=(0, 1), method="highs-ds")
    if res.status != 0:
        raise RuntimeError(f"transportation LP failed: {res.message}")
    return res.x.reshape(n_free, t)


@register
@dataclass
class ILPSolver(Solver):
    """Exact solver on OR-Tools; pages modelled exactly with integer page counts.

    Parameters
    ----------
    backend : {"highs", "scip", "cpsat"}
        MIP backend (HiGHS, SCIP) or CP-SAT (all variables integer, distortions scaled to
        integers; the reported bound is made valid for the unscaled objective).
    mip_gap : float
        Relative gap at which the backend may stop and call the answer optimal.
    workers : int
        Threads for CP-SAT.
    warm_start : bool
        Hint the greedy allocation to SCIP and CP-SAT (HiGHS through OR-Tools crashes on hints).
        Every backend returns the greedy allocation, with the better of the two bounds, when
        it finds nothing better.
    """

    NAME: ClassVar[str] = "ilp"
    EXACT: ClassVar[bool] = True
    REQUIRED_MODULES: ClassVar[tuple[str, ...]] = ("ortools",)
    PAGES: ClassVar[str] = "exact"

    backend: str = "highs"
    mip_gap: float = 1e-6
    workers: int = 1
    warm_start: bool = True

    def __post_init__(self):
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {list(_BACKENDS)}, got {self.backend!r}")
        if not 0 <= self.mip_gap < 1:
            raise ValueError(f"mip_gap must be in [0, 1), got {self.mip_gap}")

    def _solve(self, problem: AllocationProblem, time_limit: float | None) -> Allocation:
        from ortools.linear_solver.python import model_builder as mb

        greedy = GreedySolver().solve(problem)
        free = np.flatnonzero(problem.forced < 0)
        fixed = np.flatnonzero(problem.forced >= 0)
        n_free, t = free.size, problem.n_tiers
        if n_free == 0:
            return finish(problem, greedy.tiers, greedy.distortion, "optimal")
        d = problem.distortion[free]
        paged = problem.page_size is not None
        cpsat = self.backend == "cpsat"
        # Objective in units of the mean greedy distortion per item: well scaled for the solver.
        unit = max(greedy.distortion, 1e-300) / max(n_free, 1)
        if cpsat:
            # CP-SAT needs integers: floor keeps Σ floor(D s)/s ≤ Σ D, so its bound stays valid.
            unit = unit / 1e4
            obj = np.floor(d / unit)
        else:
            obj = d / unit

        # x[i, t] for free items (only undominated tiers when costs are per item).
        if paged:
            x_mask = np.ones((n_free, t), dtype=bool)
        else:
            x_mask = _undominated(d, np.broadcast_to(problem.cost if problem.cost.ndim == 1
                                                     else problem.cost[free], (n_free, t)))
        xi, xt = np.nonzero(x_mask)
        n_x = xi.size
        # m[g, t] = pages of group g at tier t, for tiers that hold pages.
        if paged:
            page_bytes = problem.page_bytes
            mg, mt = np.nonzero(page_bytes > 0)
            forced_counts = np.zeros(page_bytes.shape, dtype=np.int64)
            np.add.at(forced_counts, (problem.group_index[fixed], problem.forced[fixed]), 1)
            group_size = np.bincount(problem.group_index, minlength=problem.n_groups)
            max_pages = -(-group_size[mg] // problem.page_size)
        else:
            mg = mt = np.zeros(0, dtype=np.int64)
        n_m = mg.size

        lb = np.zeros(n_x + n_m)
        ub = np.concatenate([np.ones(n_x), max_pages.astype(float) if paged else []])
        objective = np.concatenate([obj[xi, xt], np.zeros(n_m)])
        # Rows: one-hot per item, then the budget, then per (group, tier) page capacity.
        one_hot = sp.csr_matrix((np.ones(n_x), (xi, np.arange(n_x))), shape=(n_free, n_x + n_m))
        item_cost = np.broadcast_to(problem.cost, problem.distortion.shape)
        fixed_cost = item_cost[fixed, problem.forced[fixed]].sum()
        if paged:
            budget_row = sp.csr_matrix((page_bytes[mg, mt], (np.zeros(n_m), n_x + np.arange(n_m))),
                                       shape=(1, n_x + n_m))
            budget_rhs = problem.budget
            slot = {(g, tt): k for k, (g, tt) in enumerate(zip(mg.tolist(), mt.tolist()))}
            gi = problem.group_index[free][xi]
            has_pages = page_bytes[gi, xt] > 0
            cap_of_x = np.array([slot[(g, tt)] for g, tt in zip(gi[has_pages].tolist(),
                                                              xt[has_pages].tolist())],
                                dtype=np.int64)
            cap = sp.csr_matrix(
                (np.concatenate([np.ones(cap_of_x.size), -problem.page_size * np.ones(n_m)]),
                 (np.concatenate([cap_of_x, np.arange(n_m)]),
                  np.concatenate([np.flatnonzero(has_pages), n_x + np.arange(n_m)]))),
                shape=(n_m, n_x + n_m))
            cap_rhs = -forced_counts[mg, mt].astype(float)
        else:
            costs = item_cost[free][xi, xt]
            budget_row = sp.csr_matrix((costs, (np.zeros(n_x), np.arange(n_x))),
                                       shape=(1, n_x + n_m))
            budget_rhs = problem.budget - fixed_cost
            cap = sp.csr_matrix((0, n_x + n_m))
            cap_rhs = np.zeros(0)
        matrix = sp.vstack([one_hot, budget_row, cap], format="csr")
        row_lb = np.concatenate([np.ones(n_free), [-np.inf], np.full(cap_rhs.size, -np.inf)])
        row_ub = np.concatenate([np.ones(n_free), [budget_rhs], cap_rhs])

        model = mb.Model()
        model.helper.fill_model_from_sparse_data(lb, ub, objective, row_lb, row_ub, matrix)
        integral = np.arange(n_x + n_m) if (cpsat or not paged) else n_x + np.arange(n_m)
        for j in integral.tolist():
            model.helper.set_var_integrality(j, True)
        solver = mb.Solver(_BACKENDS[self.backend])
        if time_limit is not None:
            solver.set_time_limit_in_seconds(float(time_limit))
        if self.warm_start and self.backend != "highs":
            # HiGHS through OR-Tools crashes on hints (and its objective_bound cutoff wrongly
            # prunes); it is warm-started only in that greedy is returned when not beaten.
            hint_x = (greedy.tiers[free][xi] == xt).astype(float)
            hint = np.concatenate([hint_x, (-(-problem.counts(greedy.tiers)[mg, mt]
                                             // problem.page_size)) if paged else []])
            for j, v in enumerate(hint.tolist()):
                model.helper.add_hint(j, v)
        solver.set_solver_specific_parameters(self._parameters())
        status = solver.solve(model)

        best = greedy
        bound = greedy.lower_bound
        if status in (mb.SolveStatus.OPTIMAL, mb.SolveStatus.FEASIBLE):
            values = np.array([solver.value(model.var_from_index(j)) for j in range(n_x)])
            x = np.zeros((n_free, t))
            x[xi, xt] = values
            if paged and np.any(np.abs(x - np.round(x)) > 1e-6):
                pages = np.zeros(page_bytes.shape)
                pages[mg, mt] = np.round([solver.value(model.var_from_index(n_x + k))
                                          for k in range(n_m)])
                capacity = pages * problem.page_size - np.where(page_bytes > 0, forced_counts, 0)
                capacity = np.where(page_bytes > 0, capacity, n_free)
                x = _transport(problem, x, free, capacity)
            tiers = problem.forced.copy()
            tiers[free] = np.argmax(x, axis=1)
            if problem.is_feasible(tiers) and problem.distortion_of(tiers) < best.distortion:
                best = finish(problem, tiers, bound, "feasible")
            solver_bound = solver.best_objective_bound
            if math.isfinite(solver_bound):
                mip_bound = solver_bound * unit + problem.distortion[fixed,
                                                                     problem.forced[fixed]].sum()
                bound = max(bound, mip_bound - 1e-9 * max(abs(mip_bound), 1.0))
        proven = status == mb.SolveStatus.OPTIMAL
        result = finish(problem, best.tiers, bound, "optimal" if proven else "feasible")
        if not proven and time_limit is not None:
            result.status = "time_limit"
        return result

    def _parameters(self) -> str:
        if self.backend == "highs":
            return f"mip_rel_gap={self.mip_gap}\noutput_flag=false"
        if self.backend == "scip":
            return f"limits/gap = {self.mip_gap}"
        return f"relative_gap_limit:{self.mip_gap},num_workers:{self.workers}"
