"""A budget given as one number: at most 1 a fraction of the fp16 bytes, above 1 bytes; the one
rule that ``problem_from_trace``, the quality tasks and the command line's fractions share."""

import math

import pytest

from sphkv.rdr import budget_is_fraction, budget_to_bytes


@pytest.mark.parametrize("budget, expected", [
    (0.125, 125.0), (1, 1000.0), (1.0, 1000.0), (1.5, 1.5), (3e6, 3e6), (2, 2.0),
])
def test_budget_to_bytes(budget, expected):
    assert budget_to_bytes(budget, 1000.0) == pytest.approx(expected)
    assert isinstance(budget_to_bytes(budget, 1000.0), float)
    assert budget_is_fraction(budget) == (budget <= 1)


@pytest.mark.parametrize("budget", [0, 0.0, -0.5, -3e6, math.nan])
def test_budget_to_bytes_rejects(budget):
    with pytest.raises(ValueError, match="budget must be positive"):
        budget_to_bytes(budget, 1000.0)


def test_command_line_bytes_stay_bytes():
    """A byte count with a unit is bytes even when it is 1 or less; a bare number is a fraction."""
    from sphkv.cli import parse_budget

    assert parse_budget("1B", full_cost=1000.0) == 1.0
    assert parse_budget("1", full_cost=1000.0) == 1000.0
