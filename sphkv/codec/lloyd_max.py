"""Lloyd–Max scalar quantizers matched to known densities, computed once and cached.

A Lloyd–Max quantizer with ``L = 2**bits`` levels minimises the mean-square error for a density
``p`` on ``[lo, hi]``; it is a fixed point of two conditions: each threshold is the midpoint of its
two neighbouring levels, and each level is the centroid ``∫ x p / ∫ p`` of its cell. Iterating the
two conditions from the equal-probability quantizer converges for log-concave densities.

Integrals use the cumulative distribution and first moment on a fine grid (scipy's cumulative
trapezoid), so each iteration only interpolates them at the cell edges.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.integrate import cumulative_trapezoid, trapezoid
from scipy.special import xlogy

__all__ = [
    "ScalarQuantizer",
    "lloyd_max",
    "gaussian_quantizer",
    "uniform_quantizer",
    "polar_angle_quantizer",
    "sphere_coordinate_quantizer",
    "sphere_coordinate_uniform_quantizer",
    "hyperspherical_angle_quantizer",
]

_GRID = 2**16 + 1


def _density_grid(logpdf: Callable, lo: float, hi: float, n: int = _GRID):
    x = np.linspace(lo, hi, n)
    with np.errstate(divide="ignore"):
        lp = logpdf(x)
    p = np.exp(lp - lp.max())
    return x, p / trapezoid(p, x)


@dataclass(frozen=True, eq=False)
class ScalarQuantizer:
    """A scalar quantizer on ``[lo, hi]``: sorted ``levels`` ``[L]``, ``thresholds`` ``[L-1]``.

    ``logpdf`` is the (unnormalised) log-density it was designed for, kept for expectations.
    """

    levels: np.ndarray
    thresholds: np.ndarray
    lo: float
    hi: float
    logpdf: Callable

    @property
    def max_error(self) -> float:
        """Largest ``|x - Q(x)|`` over the support: the worst end of the widest cell."""
        edges = np.concatenate([[self.lo], self.thresholds, [self.hi]])
        return float(np.max(np.maximum(self.levels - edges[:-1], edges[1:] - self.levels)))

    def expect(self, f: Callable[[np.ndarray], np.ndarray]) -> float:
        """``E[f(X - Q(X))]`` for ``X`` drawn from the design density."""
        x, p = _density_grid(self.logpdf, self.lo, self.hi)
        err = x - self.levels[np.searchsorted(self.thresholds, x)]
        return float(trapezoid(p * f(err), x))

    @property
    def mse(self) -> float:
        return self.expect(np.square)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (int64, same shape as ``x``) of the nearest level, i.e. the cell of each value:
        the number of thresholds below it."""
        thresholds = torch.as_tensor(self.thresholds, dtype=x.dtype)
        if x.device.type != "cpu" or len(thresholds) > 255:
            return torch.bucketize(x, thresholds.to(x.device))
        # on a CPU one comparison per threshold, counted in bytes, is several times faster than
        # bucketize's binary search (the same cells: thresholds rounded to x's dtype alike)
        codes = torch.zeros(x.shape, dtype=torch.uint8)
        for t in thresholds:
            codes += x > t
        return codes.long()

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.levels, dtype=torch.float32, device=codes.device)[codes]


def lloyd_max(logpdf: Callable, lo: float, hi: float, bits: int, *, max_iter: int = 1000,
              tol: float = 1e-10) -> ScalarQuantizer:
    """The Lloyd–Max quantizer with ``2**bits`` levels for the density ``exp(logpdf)`` on [lo, hi].

    Parameters
    ----------
    logpdf : callable
        Vectorised log-density up to a constant (``-inf`` allowed where the density is 0).
    lo, hi : float
        Support; for an unbounded density pass a range holding all but a negligible tail.
    bits : int
        ``0 <= bits <= 12``; 0 gives the single level at the mean.
    """
    x, p = _density_grid(logpdf, lo, hi)
    cdf = cumulative_trapezoid(p, x, initial=0.0)
    moment = cumulative_trapezoid(p * x, x, initial=0.0)
    n_levels = 2**bits
    # start from the centres (in probability) of equal-probability cells
    levels = np.interp((np.arange(n_levels) + 0.5) / n_levels, cdf / cdf[-1], x)
    for _ in range(max_iter):
        thresholds = (levels[1:] + levels[:-1]) / 2  # nearest-neighbour condition
        edges = np.concatenate([[lo], thresholds, [hi]])
        mass = np.diff(np.interp(edges, x, cdf))
        first = np.diff(np.interp(edges, x, moment))
        new = np.where(mass > 0, first / np.maximum(mass, 1e-300), levels)  # centroid condition
        done = np.max(np.abs(new - levels)) < tol
        levels = new
        if done:
            break
    return ScalarQuantizer(levels, (levels[1:] + levels[:-1]) / 2, float(lo), float(hi), logpdf)


@functools.cache
def gaussian_quantizer(bits: int) -> ScalarQuantizer:
    """Lloyd–Max for N(0, 1) (support truncated at ±12, a tail below 1e-32)."""
    return lloyd_max(lambda x: -x * x / 2, -12.0, 12.0, bits)


@functools.cache
def uniform_quantizer(bits: int, lo: float = 0.0, hi: float = 1.0) -> ScalarQuantizer:
    """Lloyd–Max for the uniform density: cells of equal width, levels at their centres."""
    return lloyd_max(np.zeros_like, lo, hi, bits)


@functools.cache
def polar_angle_quantizer(n: int, bits: int) -> ScalarQuantizer:
    """Angle ``θ = atan2(‖b‖, ‖a‖)`` of two independent isotropic blocks of ``n`` coordinates.

    With ``‖a‖, ‖b‖`` chi-distributed with ``n`` degrees of freedom, ``θ`` on ``[0, π/2]`` has
    density ``∝ cos^(n-1) θ sin^(n-1) θ ∝ sin(2θ)^(n-1)``: level ℓ ≥ 2 of the recursive polar
    transform has ``n = 2**(ℓ-1)``.
    """
    return lloyd_max(lambda t: xlogy(n - 1, np.sin(2 * t)), 0.0, math.pi / 2, bits)


@functools.cache
def sphere_coordinate_quantizer(d: int, bits: int) -> ScalarQuantizer:
    """One coordinate of a uniform point on the unit sphere of R^d, scaled by ``sqrt(d)``.

    ``u_j`` has density ``∝ (1 - u²)^((d-3)/2)`` on ``[-1, 1]``, so ``z = sqrt(d) u_j`` has density
    ``∝ (1 - z²/d)^((d-3)/2)`` on ``[-sqrt(d), sqrt(d)]`` (close to N(0, 1) for large d).
    """
    s = math.sqrt(d)
    return lloyd_max(lambda z: xlogy((d - 3) / 2, 1 - np.minimum(z * z / d, 1.0)), -s, s, bits)


def uniform_step(logpdf: Callable, lo: float, hi: float, bits: int) -> ScalarQuantizer:
    """The ``2**bits`` evenly spaced levels ``Δ (c − (2^bits − 1)/2)`` (c = 0 … 2^bits − 1) with
    the step ``Δ`` of least mean squared error for the symmetric density ``exp(logpdf)`` on
    ``[lo, hi] = [−h, h]``; thresholds at the midpoints. Uniform levels are what a kernel can
    decode without a lookup (the code is the level, up to an affine map)."""
    from scipy.optimize import minimize_scalar

    centred = np.arange(2**bits) - (2**bits - 1) / 2

    def quantizer(step: float) -> ScalarQuantizer:
        levels = step * centred
        return ScalarQuantizer(levels, (levels[1:] + levels[:-1]) / 2, float(lo), float(hi),
                               logpdf)

    # the optimum lies below the step that puts the outer levels at the support's ends
    widest = (hi - lo) / (2**bits - 1)
    best = minimize_scalar(lambda step: quantizer(step).mse, bounds=(widest * 1e-3, widest),
                           method="bounded", options={"xatol": 1e-7})
    return quantizer(float(best.x))


@functools.cache
def sphere_coordinate_uniform_quantizer(d: int, bits: int) -> ScalarQuantizer:
    """:func:`uniform_step` for the density of :func:`sphere_coordinate_quantizer`."""
    s = math.sqrt(d)
    return uniform_step(lambda z: xlogy((d - 3) / 2, 1 - np.minimum(z * z / d, 1.0)), -s, s,
                        bits)


@functools.cache
def hyperspherical_angle_quantizer(k: int, bits: int) -> ScalarQuantizer:
    """Angle ``φ_i`` on ``[0, π]`` of hyperspherical coordinates, density ``∝ sin^k φ``.

    For a uniform point on the sphere of R^d, ``φ_i`` (i = 1 … d-2) has ``k = d - 1 - i``.
    """
    return lloyd_max(lambda t: xlogy(k, np.sin(t)), 0.0, math.pi, bits)
