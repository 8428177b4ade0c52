"""Analytic logit-distortion bounds and mean-square predictions per key codec.

For a key k, its reconstruction k̂ and any query q, the normalised logit error is
``ε(q, k) = |q·k - q·k̂| / (‖q‖ ‖k‖)``.

- Worst case: ``ε ≤ ‖k - k̂‖ / ‖k‖ ≤ codec.error_bound()`` (Cauchy–Schwarz; equality for q along
  k - k̂), so the bound on the reconstruction error is the bound on the logit error.
- Mean square: for isotropic keys and a query direction independent of the error,
  ``E[ε²] = E[‖k - k̂‖² / ‖k‖²] / d``; :func:`predicted_mse` gives ``E‖k - k̂‖² / ‖k‖²`` from the
  design densities of each codec (no data).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import integrate
from scipy.special import ndtr
from scipy.stats import beta, norm

from sphkv.codec import (
    Codec,
    FibQuantCodec,
    Fp16Codec,
    HypersphericalCodec,
    Int8Codec,
    KiviCodec,
    PolarQuantCodec,
    SphericalCodec,
    TurboQuantCodec,
)
from sphkv.codec.base import FP16_EPS
from sphkv.codec.fibquant import direction_codebook, radius_levels
from sphkv.codec.spherical import level_chord_mse

__all__ = ["logit_bound", "predicted_mse", "predicted_logit_rms"]

# relative fp16 rounding of a stored radius or norm: uniform within ±ε|v| on average over the
# mantissa, mean square ε²/3
_FP16_MS = FP16_EPS**2 / 3


def logit_bound(codec: Codec) -> float:
    """Worst case of ``|q·k - q·k̂| / (‖q‖ ‖k‖)`` (``math.inf`` when the codec has none)."""
    return codec.error_bound()


def predicted_logit_rms(codec: Codec) -> float:
    """Predicted root-mean-square normalised logit error for isotropic keys and queries."""
    return math.sqrt(predicted_mse(codec) / codec.d)


@functools.singledispatch
def predicted_mse(codec: Codec) -> float:
    """Predicted ``E‖k - k̂‖² / ‖k‖²`` for isotropic keys (a Gaussian vector)."""
    raise NotImplementedError(f"no prediction for {type(codec).__name__}")


@predicted_mse.register
def _(codec: SphericalCodec) -> float:
    # Node j of level ℓ turns its unit sub-vector by the angle error Δ: to first order it adds
    # 4 sin²(Δ/2) times the energy fraction of its subtree, of mean 2**ℓ / d. With d / 2**ℓ nodes
    # per level, every level weighs the same: Σ_ℓ E[4 sin²(Δ_ℓ/2)].
    angles = sum(level_chord_mse(lv, b) for lv, b in enumerate(codec.bits, start=1))
    return angles + _FP16_MS


@predicted_mse.register
def _(codec: HypersphericalCodec) -> float:
    # Angle i (1-based) turns a sub-vector holding on average (d - i + 1) / d of the energy.
    chords = [q.expect(lambda e: 4 * np.sin(e / 2) ** 2) for q in codec.quantizers]
    return sum((codec.d - i) / codec.d * c for i, c in enumerate(chords)) + _FP16_MS


@predicted_mse.register
def _(codec: TurboQuantCodec) -> float:
    # d coordinates of sqrt(d) u, each quantized with the codebook's own MSE, over ‖z‖² = d.
    return codec.quantizer.mse + _FP16_MS


@predicted_mse.register
def _(codec: Fp16Codec) -> float:
    return _FP16_MS


@functools.cache
def _max_abs_sq(n: int) -> float:
    """``E[max_j x_j²]`` for n iid N(0, 1): ``∫ 2t P(max|x| > t) dt``."""
    return integrate.quad(lambda t: 2 * t * (1 - (2 * ndtr(t) - 1) ** n), 0, 40)[0]


@functools.cache
def _range_sq(n: int) -> float:
    """``E[(max - min)²]`` of n iid N(0, 1), from ``P(R ≤ r) = n ∫ φ(x) (Φ(x+r) - Φ(x))^(n-1)``."""
    def cdf(r):
        inner = lambda x: norm.pdf(x) * (ndtr(x + r) - ndtr(x)) ** (n - 1)  # noqa: E731
        return n * integrate.quad(inner, -12, 12, limit=200)[0]

    return integrate.quad(lambda r: 2 * r * (1 - cdf(r)), 0, 16, limit=200)[0]


@predicted_mse.register
def _(codec: Int8Codec) -> float:
    # a uniform rounding error of step s = max|x| / 127 has variance s²/12 on each coordinate;
    # with unit-variance coordinates ‖x‖² ≈ d
    return _max_abs_sq(codec.d) / (12 * 127**2)


@predicted_mse.register
def _(codec: KiviCodec) -> float:
    # step s = range / (2**b - 1) of a group of G unit-variance values (tokens or channels alike
    # for isotropic keys); the two end values are exact, the others carry s²/12
    g, top = codec.group_size, 2**codec.bits - 1
    return _range_sq(g) / (12 * top**2) * (g - 2) / g


@functools.cache
def _rayleigh_range_sq(n: int, d: int) -> float:
    """``E[(max ρ - min ρ)²]`` of n iid pair radii, ``ρ² ~ (1/d) χ²₂`` (Rayleigh, scale 1/√d)."""
    s2 = 1 / d
    cdf = lambda x: 1 - np.exp(-x * x / (2 * s2))  # noqa: E731
    pdf = lambda x: x / s2 * np.exp(-x * x / (2 * s2))  # noqa: E731
    top = 12 * math.sqrt(s2)

    def p_le(r):
        return n * integrate.quad(lambda x: pdf(x) * (cdf(x + r) - cdf(x)) ** (n - 1), 0, top,
                                  limit=200)[0]

    return integrate.quad(lambda r: 2 * r * (1 - p_le(r)), 0, top, limit=200)[0]


@predicted_mse.register
def _(codec: PolarQuantCodec) -> float:
    # Isotropic unit-energy key: each of the d/2 pairs has E[ρ²] = 2/d. The angle error turns
    # a pair: Σ ρ² E[4 sin²(Δ/2)] = E[4 sin²(Δ/2)]. The radius error is uniform within a step
    # s = (max ρ - min ρ) / (2**b - 1): (d/2) E[s²] / 12 (no radius bits: ρ̂ = min ρ).
    pairs = codec.d // 2
    chord = codec.angle.expect(lambda e: 4 * np.sin(e / 2) ** 2)
    top = 2**codec.radius_bits - 1
    if top == 0:
        return chord + 1.0  # crude: radius error of the order of the radius itself
    return chord + pairs * _rayleigh_range_sq(pairs, codec.d) / (12 * top**2)


@predicted_mse.register
def _(codec: FibQuantCodec) -> float:
    # Per block: e = ρ w - ρ̂ ŵ with ρ² ~ Beta(k/2, (d-k)/2) independent of the uniform
    # direction w, so E‖e‖² = E[ρ²] + E[ρ̂²] - 2 E[ρ ρ̂] E[w·ŵ]. The radius moments are Beta
    # integrals; E[w·ŵ] is the codebook's mean cosine, estimated by Monte Carlo on uniform
    # directions (the codebook itself is numerical).
    k, blocks = codec.block, codec.d // codec.block
    levels, thresholds = radius_levels(codec.d, k, codec.radius_bits)
    dist = beta(k / 2, (codec.d - k) / 2)
    edges = np.concatenate([[0.0], thresholds**2, [1.0]])  # cells in ρ²
    mass = np.diff(dist.cdf(edges))
    # E[ρ · 1{cell}] = ∫ sqrt(t) p(t) dt over the cell
    rho_mean = np.array([integrate.quad(lambda t: math.sqrt(t) * dist.pdf(t), a, b)[0]
                         for a, b in zip(edges[:-1], edges[1:], strict=True)])
    e_rho2 = k / codec.d
    e_hat2 = float(np.sum(mass * levels**2))
    e_cross = float(np.sum(rho_mean * levels))
    book = direction_codebook(k, codec.direction_bits, codec.seed)
    w = np.random.default_rng(codec.seed + 1).standard_normal((2**14, k))
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    cos = float(np.mean(np.max(w @ book.T, axis=1)))
    return blocks * (e_rho2 + e_hat2 - 2 * e_cross * cos) + _FP16_MS
