"""Rate-distortion curves of allocations: the budgets they are drawn at."""

__all__ = ["BUDGET_FRACTIONS"]

#: budgets of the rate-distortion sweeps, as fractions of the all-fp16 cache
BUDGET_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)
