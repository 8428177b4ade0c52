"""The price λ (distortion per byte at the margin) comes back in the caller's units, as the
distortion and the bound do, whatever scale the solver works in."""

import numpy as np
import pytest

from sphkv.rdr.problem import AllocationProblem
from sphkv.solvers import solve


@pytest.mark.parametrize("page_size", [None, 4])
def test_price_scales_with_the_distortion(page_size):
    rng = np.random.default_rng(0)
    n, cost = 400, np.array([0.0, 40, 72, 136, 264])
    d = np.sort(rng.uniform(0, 1, (n, len(cost))), axis=1)[:, ::-1] * rng.uniform(1, 50, (n, 1))
    groups = rng.integers(0, 8, n)
    prices = []
    for factor in (1.0, 2.0**-20, 3e7):
        problem = AllocationProblem(distortion=d * factor, cost=cost, budget=0.3 * n * 264,
                                    groups=groups, page_size=page_size,
                                    page_overhead=12 if page_size else 0)
        alloc = solve(problem, "greedy")
        assert alloc.price is not None and alloc.price > 0
        prices.append(alloc.price / factor)
    np.testing.assert_allclose(prices, prices[0], rtol=1e-9)
    # the price is the greedy's margin: in the distortion's units, not in a power of two of them
    marginal = np.diff(d[:, ::-1], axis=1).max() / np.diff(cost).min()
    assert prices[0] <= marginal
