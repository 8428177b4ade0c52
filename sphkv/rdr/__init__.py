"""RDR: the allocation problem, tiers and the distortion model."""

from sphkv.rdr.problem import FILE_FORMAT_VERSION, Allocation, AllocationProblem, InfeasibleBudgetError
from sphkv.rdr.tiers import Tier, TierSet, ada_tiers, default_tiers

__all__ = ["Allocation", "AllocationProblem", "FILE_FORMAT_VERSION", "InfeasibleBudgetError"]
__all__ += ["Tier", "TierSet", "ada_tiers", "default_tiers"]
