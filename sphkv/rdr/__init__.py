"""RDR: the allocation problem, tiers, the distortion model, attention layouts, methods and the
online allocator (:mod:`sphkv.rdr.online`, imported on its own: it drives the solvers)."""

from sphkv.rdr.distortion import (
    PAGE_TABLE_ENTRY,
    FidelityReport,
    byte_shares,
    distortion_matrix,
    fidelity,
    problem_from_trace,
)
from sphkv.rdr.layout import LAYER_KINDS, LayerAttention
from sphkv.rdr.methods import METHODS, Method, get_method
from sphkv.rdr.problem import (
    FILE_FORMAT_VERSION,
    Allocation,
    AllocationProblem,
    InfeasibleBudgetError,
    budget_is_fraction,
    budget_to_bytes,
)
from sphkv.rdr.synthetic import synthetic_problem
from sphkv.rdr.tiers import Tier, TierSet, ada_tiers, default_tiers, scalar_tiers
from sphkv.rdr.utility import ESTIMATORS, Estimator, get_estimator

__all__ = [
    "ESTIMATORS",
    "LAYER_KINDS",
    "METHODS",
    "LayerAttention",
    "Method",
    "get_method",
    "FILE_FORMAT_VERSION",
    "PAGE_TABLE_ENTRY",
    "Estimator",
    "FidelityReport",
    "Allocation",
    "AllocationProblem",
    "InfeasibleBudgetError",
    "Tier",
    "TierSet",
    "ada_tiers",
    "budget_is_fraction",
    "budget_to_bytes",
    "byte_shares",
    "default_tiers",
    "scalar_tiers",
    "distortion_matrix",
    "fidelity",
    "get_estimator",
    "problem_from_trace",
    "synthetic_problem",
]
