"""Exact MCKP as a mixed-integer program, warm-started from greedy.

Without pages: x[i, t] ∈ {0, 1} = 1 if item i takes tier t; Σ_t x[i, t] = 1; Σ c x ≤ B. Tiers that
another tier of the same item dominates (no dearer, no worse) are left out: swapping to the
dominating tier never hurts, so the optimum is unchanged.

With pages: m[g, t] ∈ ℤ≥0 = pages of (group g, tier t); Σ_{i∈g} x[i, t] + forced[g, t] ≤ P m[g, t]
and Σ (P c + h) m ≤ B. Once the page counts are fixed, assigning items to tiers is a
transportation problem (totally unimodular), so x stays continuous in [0, 1] and only m is
integer (MIP backends); a fractional x is snapped to a vertex by a min-cost flow per group.

Backends: HiGHS (through highspy: warm start by ``setSolution``, incumbents at time limits),
SCIP and CP-SAT through OR-Tools (warm start by hints). OR-Tools' own HiGHS interface is not used:
it reports no incumbent at a time limit and crashes on hints.

Under a time limit the backend runs in a forked process that is killed at the deadline: HiGHS
checks its limit only between phases (its presolve and root LP on 200k paged items overran a
10 s limit by 3-13 s), so its own limit, set to what is left, is not enough. The answer is the
better of the backend's incumbent and the greedy warm start (the same allocation as
``solve(problem, "greedy")``), with status ``time_limit`` and the larger of the two bounds.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import scipy.sparse as sp

from sphkv.rdr.problem import Allocation, AllocationProblem
from sphkv.solvers.base import Solver, finish, register
from sphkv.solvers.greedy import GreedySolver
from sphkv.solvers.page_repair import reassign

__all__ = ["ILPSolver"]

BACKENDS = ("highs", "scip", "cpsat")


def _undominated(distortion: np.ndarray, cost: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """[N, T] mask of allowed tiers that no other allowed tier of the item dominates (ties keep
    the lower index)."""
    n, t = distortion.shape
    keep = allowed.copy()
    for a in range(t):
        for b in range(t):
            if a == b:
                continue
            no_worse = (allowed[:, b] & (cost[:, b] <= cost[:, a])
                        & (distortion[:, b] <= distortion[:, a]))
            strictly = (cost[:, b] < cost[:, a]) | (distortion[:, b] < distortion[:, a]) | (b < a)
            keep[:, a] &= ~(no_worse & strictly)
    return keep


@dataclass
class _Model:
    """min objective·v  s.t.  row_lb ≤ matrix v ≤ row_ub,  lb ≤ v ≤ ub,  v[integral] ∈ ℤ.

    Columns: x[xi[k], xt[k]] for k < n_x (free items only), then m[mg[k], mt[k]].
    """

    objective: np.ndarray
    lb: np.ndarray
    ub: np.ndarray
    matrix: sp.csr_matrix
    row_lb: np.ndarray
    row_ub: np.ndarray
    integral: np.ndarray  # bool per column
    hint: np.ndarray  # the greedy allocation as column values
    xi: np.ndarray
    xt: np.ndarray
    mg: np.ndarray
    mt: np.ndarray


def _build(problem: AllocationProblem, free: np.ndarray, objective: np.ndarray,
           hint_tiers: np.ndarray, all_integer: bool) -> _Model:
    n_free = free.size
    paged = problem.page_size is not None
    fixed = np.flatnonzero(problem.forced >= 0)
    item_cost = np.broadcast_to(problem.cost, problem.distortion.shape)
    allowed = problem.allowed(free)  # x[i, t] exists only for tiers within the ceiling
    if paged:
        x_mask = allowed
        page_bytes = problem.page_bytes
        mg, mt = np.nonzero(page_bytes > 0)
    else:
        x_mask = _undominated(problem.distortion[free], item_cost[free], allowed)
        mg = mt = np.zeros(0, dtype=np.int64)
    xi, xt = np.nonzero(x_mask)
    n_x, n_m = xi.size, mg.size
    n_col = n_x + n_m
    # One-hot row per free item.
    rows = [sp.csr_matrix((np.ones(n_x), (xi, np.arange(n_x))), shape=(n_free, n_col))]
    row_lb, row_ub = [np.ones(n_free)], [np.ones(n_free)]
    hint = np.zeros(n_col)
    hint[:n_x] = hint_tiers[free][xi] == xt
    if paged:
        forced_counts = problem.forced_counts()
        group_size = np.bincount(problem.group_index, minlength=problem.n_groups)
        # Budget over pages.
        rows.append(sp.csr_matrix((page_bytes[mg, mt], (np.zeros(n_m), n_x + np.arange(n_m))),
                                  shape=(1, n_col)))
        row_lb.append([-np.inf])
        row_ub.append([problem.budget])
        # Capacity: Σ_{i∈g} x[i, t] − P m[g, t] ≤ −forced[g, t].
        slot = np.full(page_bytes.shape, -1)
        slot[mg, mt] = np.arange(n_m)
        x_slot = slot[problem.group_index[free][xi], xt]
        paged_x = np.flatnonzero(x_slot >= 0)
        rows.append(sp.csr_matrix(
            (np.concatenate([np.ones(paged_x.size), np.full(n_m, -float(problem.page_size))]),
             (np.concatenate([x_slot[paged_x], np.arange(n_m)]),
              np.concatenate([paged_x, n_x + np.arange(n_m)]))), shape=(n_m, n_col)))
        row_lb.append(np.full(n_m, -np.inf))
        row_ub.append(-forced_counts[mg, mt].astype(float))
        ub_m = -(-group_size[mg] // problem.page_size)
        hint[n_x:] = -(-problem.counts(hint_tiers)[mg, mt] // problem.page_size)
    else:
        fixed_cost = item_cost[fixed, problem.forced[fixed]].sum()
        rows.append(sp.csr_matrix((item_cost[free][xi, xt], (np.zeros(n_x), np.arange(n_x))),
                                  shape=(1, n_col)))
        row_lb.append([-np.inf])
        row_ub.append([problem.budget - fixed_cost])
        ub_m = np.zeros(0)
    integral = np.ones(n_col, dtype=bool) if (all_integer or not paged) else np.r_[
        np.zeros(n_x, dtype=bool), np.ones(n_m, dtype=bool)]
    return _Model(objective=np.concatenate([objective[xi, xt], np.zeros(n_m)]),
                  lb=np.zeros(n_col), ub=np.concatenate([np.ones(n_x), ub_m]).astype(float),
                  matrix=sp.vstack(rows, format="csr"), row_lb=np.concatenate(row_lb),
                  row_ub=np.concatenate(row_ub).astype(float), integral=integral, hint=hint,
                  xi=xi, xt=xt, mg=mg, mt=mt)


def _run_highs(model: _Model, time_limit, mip_gap: float, warm_start: bool):
    """Returns (column values or None, dual bound, proven optimal)."""
    import highspy

    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("mip_rel_gap", float(mip_gap))
    h.setOptionValue("threads", 1)
    if time_limit is not None:
        h.setOptionValue("time_limit", float(time_limit))
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = model.matrix.shape[1], model.matrix.shape[0]
    lp.col_cost_, lp.col_lower_, lp.col_upper_ = model.objective, model.lb, model.ub
    lp.row_lower_, lp.row_upper_ = model.row_lb, model.row_ub  # HiGHS reads ±inf as free
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = model.matrix.indptr
    lp.a_matrix_.index_ = model.matrix.indices
    lp.a_matrix_.value_ = model.matrix.data
    lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                       for i in model.integral]
    h.passModel(lp)
    if warm_start:
        solution = highspy.HighsSolution()
        solution.col_value = model.hint
        h.setSolution(solution)
    h.run()
    status = h.getModelStatus()
    info = h.getInfo()
    feasible = info.primal_solution_status == highspy.SolutionStatus.kSolutionStatusFeasible
    values = np.array(h.getSolution().col_value) if feasible else None
    return values, float(info.mip_dual_bound), status == highspy.HighsModelStatus.kOptimal


def _run_ortools(model: _Model, backend: str, time_limit, mip_gap: float, workers: int,
                 warm_start: bool):
    from ortools.linear_solver.python import model_builder as mb

    m = mb.Model()
    m.helper.fill_model_from_sparse_data(model.lb, model.ub, model.objective, model.row_lb,
                                         model.row_ub, model.matrix)
    for j in np.flatnonzero(model.integral).tolist():
        m.helper.set_var_integrality(j, True)
    if warm_start:
        for j, v in enumerate(model.hint.tolist()):
            m.helper.add_hint(j, v)
    solver = mb.Solver("scip" if backend == "scip" else "cp_sat")
    if time_limit is not None:
        solver.set_time_limit_in_seconds(float(time_limit))
    solver.set_solver_specific_parameters(
        f"limits/gap = {mip_gap}" if backend == "scip"
        else f"relative_gap_limit:{mip_gap},num_workers:{workers}")
    status = solver.solve(m)
    values = None
    if status in (mb.SolveStatus.OPTIMAL, mb.SolveStatus.FEASIBLE):
        values = solver.values(m.get_variables()).to_numpy()
    try:
        bound = float(solver.best_objective_bound)
    except (TypeError, ValueError):
        bound = -math.inf
    return values, bound, status == mb.SolveStatus.OPTIMAL


def _reply(send, run, args) -> None:
    send.send(run(*args))
    send.close()


def _until(deadline: float | None, run, *args):
    """``run(*args)``, or None if it has not returned by ``deadline`` (perf_counter seconds): then
    it runs in a forked child, killed at the deadline. Without a deadline or fork it runs here."""
    if deadline is None or "fork" not in multiprocessing.get_all_start_methods():
        return run(*args)
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_reply, args=(send, run, args), daemon=True)
    child.start()
    send.close()
    try:
        if recv.poll(max(deadline - time.perf_counter(), 0.0)):
            return recv.recv()
        return None
    except EOFError:  # the child died without an answer
        return None
    finally:
        child.kill()
        child.join()


@register
@dataclass
class ILPSolver(Solver):
    """Exact solver: a MIP with page counts modelled exactly.

    Parameters
    ----------
    backend : {"highs", "scip", "cpsat"}
        HiGHS (highspy), SCIP (OR-Tools) or CP-SAT (OR-Tools; every variable integer and
        distortions floored to integers, with the bound made valid for the true objective).
    mip_gap : float
        Relative gap at which the backend may stop and call its answer optimal.
    workers : int
        Threads for CP-SAT.
    warm_start : bool
        Start from the greedy allocation. The greedy allocation is returned, with the better of
        the two bounds, when the backend finds nothing better.
    """

    NAME: ClassVar[str] = "ilp"
    EXACT: ClassVar[bool] = True
    REQUIRED_MODULES: ClassVar[tuple[str, ...]] = ("ortools", "highspy")
    PAGES: ClassVar[str] = "exact"

    backend: str = "highs"
    mip_gap: float = 1e-6
    workers: int = 1
    warm_start: bool = True

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if not 0 <= self.mip_gap < 1:
            raise ValueError(f"mip_gap must be in [0, 1), got {self.mip_gap}")

    def _solve(self, problem: AllocationProblem, time_limit: float | None) -> Allocation:
        # The deadline covers the warm start, the model, the backend (given what is left) and
        # the decoding. The warm start is greedy's own answer, polished as greedy polishes it, so
        # the ILP never returns worse than greedy; a limit shorter than greedy's time is overrun
        # by it.
        deadline = None if time_limit is None else time.perf_counter() + time_limit
        greedy = GreedySolver()._solve(problem, None)
        free = np.flatnonzero(problem.forced < 0)
        fixed = np.flatnonzero(problem.forced >= 0)
        if free.size == 0:
            return finish(problem, greedy.tiers, greedy.distortion, "optimal")
        if greedy.status == "optimal":
            return greedy
        if deadline is not None and deadline - time.perf_counter() < 0.05:
            return finish(problem, greedy.tiers, greedy.lower_bound, "time_limit")
        fixed_distortion = problem.distortion[fixed, problem.forced[fixed]].sum()
        d = problem.distortion[free]
        # Objective in units of the mean greedy distortion per item: well scaled for the solver.
        unit = max(greedy.distortion - fixed_distortion, 1e-300) / free.size
        cpsat = self.backend == "cpsat"
        if cpsat:
            # Σ floor(D/u)·u ≤ Σ D, so a bound on the floored objective bounds the true one.
            unit /= 1e4
            objective = np.floor(d / unit)
        else:
            objective = d / unit
        model = _build(problem, free, objective, greedy.tiers, all_integer=cpsat)
        if deadline is not None:
            # The backend is killed at the deadline; its own limit is set a tenth earlier, so
            # that where it stops in time its incumbent and bound come back.
            time_limit = 0.9 * (deadline - time.perf_counter())
            if time_limit < 0.05:
                return finish(problem, greedy.tiers, greedy.lower_bound, "time_limit")
        if self.backend == "highs":
            answer = _until(deadline, _run_highs, model, time_limit, self.mip_gap,
                            self.warm_start)
        else:
            answer = _until(deadline, _run_ortools, model, self.backend, time_limit, self.mip_gap,
                            self.workers, self.warm_start)
        values, dual, proven = answer if answer is not None else (None, -math.inf, False)
        bound = greedy.lower_bound
        if math.isfinite(dual):
            mip_bound = dual * unit + fixed_distortion
            bound = max(bound, mip_bound - 1e-9 * max(abs(mip_bound), 1.0))
        tiers = greedy.tiers
        if values is not None:
            candidate = self._decode(problem, free, model, values)
            if problem.is_feasible(candidate) and (
                    problem.distortion_of(candidate) < greedy.distortion):
                tiers = candidate
        result = finish(problem, tiers, bound, "optimal" if proven else "feasible")
        if result.status != "optimal" and time_limit is not None:
            result.status = "time_limit"
        return result

    @staticmethod
    def _decode(problem: AllocationProblem, free: np.ndarray, model: _Model,
                values: np.ndarray) -> np.ndarray:
        n_x = model.xi.size
        x = np.zeros((free.size, problem.n_tiers))
        x[model.xi, model.xt] = values[:n_x]
        tiers = problem.forced.copy()
        tiers[free] = np.argmax(x, axis=1)
        if problem.page_size is not None and np.any(np.abs(x - np.round(x)) > 1e-6):
            # A vertex of the transportation polytope of the chosen page counts is integral.
            pages = np.zeros(problem.page_bytes.shape, dtype=np.int64)
            pages[model.mg, model.mt] = np.round(values[n_x:])
            tiers = reassign(problem, tiers, pages=pages)
        return tiers
