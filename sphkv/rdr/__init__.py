"""RDR: the allocation problem, tiers and the distortion model."""

from sphkv.rdr.problem import FILE_FORMAT_VERSION, Allocation, AllocationProblem, InfeasibleBudgetError

__all__ = ["Allocation", "AllocationProblem", "FILE_FORMAT_VERSION", "InfeasibleBudgetError"]
