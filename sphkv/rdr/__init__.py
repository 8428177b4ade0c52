"""RDR: the allocation problem, tiers and the distortion model."""

from sphkv.rdr.problem import (
    FILE_FORMAT_VERSION,
    Allocation,
    AllocationProblem,
    InfeasibleBudgetError,
)
from sphkv.rdr.synthetic import synthetic_problem
from sphkv.rdr.tiers import Tier, TierSet, ada_tiers, default_tiers

__all__ = [
    "FILE_FORMAT_VERSION",
    "Allocation",
    "AllocationProblem",
    "InfeasibleBudgetError",
    "Tier",
    "TierSet",
    "ada_tiers",
    "default_tiers",
    "synthetic_problem",
]
