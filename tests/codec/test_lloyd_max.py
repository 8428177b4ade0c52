"""The Lloyd–Max routine against known optimal quantizers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sphkv.codec.lloyd_max import (
    gaussian_quantizer,
    lloyd_max,
    polar_angle_quantizer,
    sphere_coordinate_quantizer,
    sphere_coordinate_uniform_quantizer,
    uniform_quantizer,
    uniform_step,
)

# Max (1960), "Quantizing for minimum distortion": positive levels and MSE of N(0, 1)
GAUSSIAN = {
    1: ([0.7979], 0.3634),
    2: ([0.4528, 1.5104], 0.1175),
    3: ([0.2451, 0.7560, 1.3440, 2.1520], 0.03454),
}


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_gaussian_matches_max_table(bits):
    q = gaussian_quantizer(bits)
    levels, mse = GAUSSIAN[bits]
    np.testing.assert_allclose(q.levels[2 ** (bits - 1):], levels, atol=1.5e-4)
    np.testing.assert_allclose(q.levels, -q.levels[::-1], atol=1e-9)
    assert q.mse == pytest.approx(mse, rel=2e-3)


@given(bits=st.integers(0, 6), lo=st.floats(-10, 10), width=st.floats(0.1, 10))
@settings(max_examples=25, deadline=None)
def test_uniform_source_gives_uniform_quantizer(bits, lo, width):
    q = lloyd_max(np.zeros_like, lo, lo + width, bits)
    n = 2**bits
    np.testing.assert_allclose(q.levels, lo + (np.arange(n) + 0.5) * width / n,
                               atol=1e-6 * width)
    assert q.max_error == pytest.approx(width / (2 * n), rel=1e-5)
    assert q.mse == pytest.approx((width / n) ** 2 / 12, rel=1e-3)


def test_uniform_quantizer_cached():
    assert uniform_quantizer(3, 0.0, 1.0) is uniform_quantizer(3, 0.0, 1.0)


def test_level2_angle_density_matches_monte_carlo():
    # θ = atan2(|b|, |a|) for Gaussian pairs a, b: density ∝ sin(2θ)
    rng = np.random.default_rng(0)
    a, b = (np.linalg.norm(rng.standard_normal((200_000, 2)), axis=1) for _ in range(2))
    theta = np.arctan2(b, a)
    q = polar_angle_quantizer(2, 2)
    err = theta - q.levels[np.searchsorted(q.thresholds, theta)]
    assert np.mean(err**2) == pytest.approx(q.mse, rel=0.02)


def test_angle_quantizers_concentrate_with_level():
    widths = [np.ptp(polar_angle_quantizer(2**k, 3).levels) for k in range(1, 7)]
    assert all(w1 > w2 for w1, w2 in zip(widths, widths[1:], strict=False))
    assert all(abs(np.mean(polar_angle_quantizer(2**k, 3).levels) - math.pi / 4) < 1e-6
               for k in range(1, 7))


def test_sphere_coordinate_close_to_gaussian_for_large_d():
    np.testing.assert_allclose(sphere_coordinate_quantizer(256, 2).levels,
                               gaussian_quantizer(2).levels, atol=0.01)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_uniform_step_is_the_best_step(bits):
    """Evenly spaced, symmetric, midpoint thresholds; a step 2% either side does worse; Lloyd–Max
    (free levels) does better, equal at 1 bit (two levels are always evenly spaced)."""
    q = sphere_coordinate_uniform_quantizer(128, bits)
    np.testing.assert_allclose(np.diff(q.levels), q.levels[1] - q.levels[0], rtol=1e-12)
    np.testing.assert_allclose(q.levels, -q.levels[::-1], atol=1e-12)
    np.testing.assert_allclose(q.thresholds, (q.levels[1:] + q.levels[:-1]) / 2)
    step = q.levels[1] - q.levels[0]
    for factor in (0.98, 1.02):
        other = (np.arange(2**bits) - (2**bits - 1) / 2) * step * factor
        worse = type(q)(other, (other[1:] + other[:-1]) / 2, q.lo, q.hi, q.logpdf)
        assert worse.mse > q.mse
    lm = sphere_coordinate_quantizer(128, bits).mse
    assert lm <= q.mse * (1 + 1e-6)
    assert q.mse == pytest.approx(lm, rel=1e-4) if bits == 1 else q.mse > lm * 1.005


def test_uniform_step_matches_max_table_for_the_gaussian():
    """Max (1960), the best uniform quantizer of N(0, 1): steps 0.9957 (2 bits), 0.5860 (3)."""
    for bits, step in ((2, 0.9957), (3, 0.5860)):
        q = uniform_step(lambda x: -x * x / 2, -12.0, 12.0, bits)
        assert q.levels[1] - q.levels[0] == pytest.approx(step, abs=2e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_quantize_counts_the_thresholds_below_like_bucketize(bits, dtype):
    q = sphere_coordinate_quantizer(64, bits)
    thresholds = torch.as_tensor(q.thresholds, dtype=dtype)
    # values on every threshold, just beside them, far outside, and random
    x = torch.cat([thresholds, thresholds.nextafter(torch.tensor(-math.inf, dtype=dtype)),
                   thresholds.nextafter(torch.tensor(math.inf, dtype=dtype)),
                   torch.tensor([-1e9, 1e9, 0.0], dtype=dtype),
                   torch.randn(1000, generator=torch.Generator().manual_seed(bits)).to(dtype)])
    codes = q.quantize(x.view(-1, 1))
    assert codes.dtype == torch.int64 and codes.shape == (len(x), 1)
    assert torch.equal(codes.view(-1), torch.bucketize(x, thresholds))
