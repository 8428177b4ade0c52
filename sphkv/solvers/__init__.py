"""Allocation solvers: greedy Lagrangian, LP relaxation (cvxpy), exact ILP (OR-Tools).

``SOLVERS`` maps name to solver class, ordered by preference; each class states ``EXACT``,
``REQUIRED_MODULES`` and ``PAGES`` (how page-granular cost is handled).
"""

from sphkv.solvers.base import SOLVERS, Solver, available_solvers, solve

# Import order is registration order, which is the order of preference.
from sphkv.solvers.greedy import GreedySolver  # isort: skip
from sphkv.solvers.lp import LPSolver  # isort: skip
from sphkv.solvers.ilp import ILPSolver  # isort: skip

__all__ = [
    "GreedySolver",
    "ILPSolver",
    "LPSolver",
    "SOLVERS",
    "Solver",
    "available_solvers",
    "solve",
]
