"""One interface for all allocation solvers, and the registry that orders them."""

from __future__ import annotations

import copy
import importlib.util
import math
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from sphkv.rdr.problem import Allocation, AllocationProblem

__all__ = ["Solver", "SOLVERS", "register", "solve", "available_solvers"]


@dataclass
class Solver:
    """A solver of the allocation problem (MCKP with optional pages).

    Subclasses are dataclasses whose fields are the solver's options, and implement ``_solve``.
    Class attributes state what the solver can do, like cvxpy's solver capabilities.
    """

    NAME: ClassVar[str]
    EXACT: ClassVar[bool]  # proves optimality (given time)
    REQUIRED_MODULES: ClassVar[tuple[str, ...]] = ()
    PAGES: ClassVar[str]  # how page-granular cost is handled: "exact" | "repair"

    def solve(self, problem: AllocationProblem, time_limit: float | None = None) -> Allocation:
        """The allocation of ``problem``; its ``tiers`` lie where the problem's arrays do
        (numpy, or on the problem's torch device)."""
        if time_limit is not None and not time_limit > 0:
            raise ValueError(f"time_limit must be > 0 seconds or None, got {time_limit}")
        start = time.perf_counter()
        caller, problem = problem, self._placed(problem)
        if problem.n_items == 0:  # nothing to choose: the empty assignment is optimal
            alloc = finish(problem, np.zeros(0, dtype=np.int64), 0.0, "optimal")
        else:
            # Solved in units of a power of two near the largest distortion (an exact scaling),
            # so tolerances are relative; reported in the caller's units.
            scale = _unit(problem)
            alloc = self._solve(_scaled(problem, scale), time_limit)
            # exact: every entry and partial sum was divided by a power of two
            alloc.distortion *= scale
            alloc.lower_bound = min(alloc.lower_bound * scale, alloc.distortion)
            if alloc.price is not None:  # distortion per byte
                alloc.price *= scale
        alloc.tiers = caller.asarray(alloc.tiers)
        alloc.seconds = time.perf_counter() - start
        alloc.method = self.NAME
        alloc.budget = problem.budget
        # Every solver's answer is checked here, not trusted (its cost was measured on the
        # problem by ``finish``).
        if not caller.is_feasible(alloc.tiers, cost=alloc.cost):
            raise RuntimeError(f"solver {self.NAME} returned an infeasible allocation "
                               f"(cost {alloc.cost} > budget {problem.budget}); this is a bug")
        return alloc

    def _placed(self, problem: AllocationProblem) -> AllocationProblem:
        """The problem where this solver works (before the scaling, which runs there too): its
        host copy, unless the solver solves on a torch device (``AllocationProblem.to``)."""
        return problem.host()

    def _solve(self, problem: AllocationProblem, time_limit: float | None) -> Allocation:
        raise NotImplementedError

    @classmethod
    def is_available(cls) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in cls.REQUIRED_MODULES)

    @classmethod
    def describe(cls) -> dict:
        return {"name": cls.NAME, "exact": cls.EXACT,
                "required_modules": list(cls.REQUIRED_MODULES), "pages": cls.PAGES,
                "available": cls.is_available()}


def _unit(problem: AllocationProblem) -> float:
    """A power of two within a factor 2 of the largest distortion (1 if all are 0)."""
    top = float(problem.distortion.max())
    return 2.0 ** math.floor(math.log2(top)) if top > 0 else 1.0


def _scaled(problem: AllocationProblem, scale: float) -> AllocationProblem:
    """``problem`` with distortions divided by ``scale``; the other arrays are shared."""
    if scale == 1.0:
        return problem
    scaled = copy.copy(problem)
    scaled.distortion = problem.distortion * (1.0 / scale)
    if problem.device is None:
        scaled.distortion.flags.writeable = False
    return scaled


# Ordered by preference: the first is the default.
SOLVERS: dict[str, type[Solver]] = {}


def register(cls: type[Solver]) -> type[Solver]:
    SOLVERS[cls.NAME] = cls
    return cls


def available_solvers() -> list[str]:
    return [name for name, cls in SOLVERS.items() if cls.is_available()]


def solve(problem: AllocationProblem, method: str = "greedy", time_limit: float | None = None,
          **options) -> Allocation:
    """Solve ``problem`` with the named method.

    Parameters
    ----------
    problem : AllocationProblem
    method : {"greedy", "lp", "ilp"}
        ``greedy``: convex-hull/Lagrangian, near-optimal, fast (default). ``lp``: LP relaxation
        with cvxpy, rounded. ``ilp``: exact, OR-Tools.
    time_limit : float, optional
        Seconds; exact solvers then return their best feasible allocation with
        ``status="time_limit"``.
    **options
        Fields of the solver class, e.g. ``backend="torch"`` for greedy or ``backend="cbc"`` for
        ilp.
    """
    if method not in SOLVERS:
        raise ValueError(f"method must be one of {list(SOLVERS)}, got {method!r}")
    cls = SOLVERS[method]
    if not cls.is_available():
        raise ImportError(f"solver {method!r} needs the modules {list(cls.REQUIRED_MODULES)}")
    try:
        solver = cls(**options)
    except TypeError as exc:
        raise ValueError(f"bad options for method {method!r}: {exc}") from exc
    return solver.solve(problem, time_limit=time_limit)


def finish(problem: AllocationProblem, tiers: np.ndarray, lower_bound: float, status: str,
           price: float | None = None) -> Allocation:
    """Build an Allocation from tiers, with cost and distortion measured on the problem."""
    tiers = problem._check_tiers(tiers)
    distortion = problem.distortion_of(tiers)
    lower_bound = max(float(lower_bound), 0.0)  # distortion is never negative
    if lower_bound > distortion:
        # Above the distortion by float noise only; anything more is a bug, not a bound. Sums
        # over N items of size up to max|D| carry rounding up to about N·ε·max|D|.
        top = float(abs(problem.distortion).max()) if problem.n_items else 0.0
        noise = 1e-12 * problem.n_items * top
        if lower_bound - distortion > 1e-6 * max(abs(distortion), 1.0) + noise:
            raise RuntimeError(f"lower bound {lower_bound} exceeds the distortion {distortion} "
                               "of a feasible allocation; this is a bug")
        lower_bound = distortion
    # Relative: solvers see distortions in units of the largest one (see Solver.solve), where
    # 1e-15 is below the rounding of any entry.
    if distortion - lower_bound <= 1e-9 * distortion + 1e-15:
        status = "optimal"  # the bound proves it, whatever the solver claimed
    return Allocation(tiers=tiers, cost=problem.cost_of(tiers), distortion=distortion,
                      lower_bound=lower_bound, status=status, seconds=0.0, price=price)
