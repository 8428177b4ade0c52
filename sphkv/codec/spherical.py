"""Angle-domain key codecs: the recursive polar (ADA) codec and the hyperspherical variant.

Based on "Spherical KV: Angle-Domain Attention and Rate-Distortion Retention for Efficient
Long-Context Inference", arXiv 2605.18856.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from sphkv.codec.base import (
    FP16_EPS,
    NUMERIC_SLACK,
    Codec,
    Codes,
    KernelKind,
    check_bits,
    check_d,
    gather_lut,
    to_fp16,
)
from sphkv.codec.lloyd_max import (
    ScalarQuantizer,
    hyperspherical_angle_quantizer,
    polar_angle_quantizer,
    uniform_quantizer,
)
from sphkv.codec.packing import pack, packed_bytes, unpack
from sphkv.codec.rotation import RandomizedHadamard

__all__ = ["SphericalCodec", "HypersphericalCodec", "angular_error_bound", "level_chord_mse",
           "level_quantizer", "polar_transform", "radius_error_bound"]

_LUT_ELEMENTS = 2**22  # gathered LUT entries per chunk of keys in ``logits``


def polar_transform(x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Recursive polar transform of ``x`` ``[..., d]`` (d a power of two).

    Level 1 maps each pair ``(x_2i, x_2i+1)`` to ``(ρ, θ)`` with ``θ = atan2(x_2i+1, x_2i)`` in
    ``[0, 2π)``; level ℓ ≥ 2 maps two radii ``(ρ_2i, ρ_2i+1)`` of level ℓ-1 to their norm and
    ``θ = atan2(ρ_2i+1, ρ_2i)`` in ``[0, π/2]``.

    Returns
    -------
    angles : list of torch.Tensor
        ``angles[ℓ-1]`` is ``[..., d / 2**ℓ]``, ℓ = 1 … log2(d).
    radius : torch.Tensor
        ``[...]``, the norm of ``x``.
    """
    rho, angles = x, []
    while rho.shape[-1] > 1:
        a, b = rho[..., 0::2], rho[..., 1::2]
        theta = torch.atan2(b, a)
        angles.append(torch.remainder(theta, 2 * math.pi) if not angles else theta)
        rho = torch.hypot(a, b)
    return angles, rho.squeeze(-1)


def level_quantizer(level: int, bits: int) -> ScalarQuantizer:
    """Lloyd–Max codebook for the angles of ``level``: uniform on [0, 2π) at level 1, matched to
    the density ``∝ sin(2θ)^(2**(level-1) - 1)`` on [0, π/2] above."""
    if level == 1:
        return uniform_quantizer(bits, 0.0, 2 * math.pi)
    return polar_angle_quantizer(2 ** (level - 1), bits)


@functools.cache
def level_chord_mse(level: int, bits: int) -> float:
    """``E[4 sin²(Δ/2)]``, the mean squared chord ``‖u(θ) - u(θ̂)‖²`` of a unit vector turned
    by the angle error Δ of ``level`` at ``bits``, under that level's angle density."""
    return level_quantizer(level, bits).expect(lambda e: 4 * np.sin(e / 2) ** 2)


def angular_error_bound(max_errors: list[float]) -> float:
    """Worst ``‖u - û‖`` for a unit vector rebuilt from nested angles, innermost first, each off
    by at most ``max_errors[i]``.

    A node ``u = (cos θ a, sin θ b)`` with unit children a, b and ``û = (cos θ̂ â, sin θ̂ b̂)``
    splits as ``u - û = A + B``: ``A`` turns the node by Δ, ``‖A‖ = c = 2 sin(|Δ|/2)``;
    ``B = (cos θ̂ (a - â), sin θ̂ (b - b̂))`` has ``‖B‖ ≤ E``, the children's bound; and since
    ``a·(a - â) = ‖a - â‖²/2`` for unit vectors, ``|A·B| ≤ c E²/2``. Hence
    ``E' ² ≤ c² + (1 + c) E²``. A hyperspherical angle is such a node with one exact child.
    Two unit vectors are at most 2 apart.
    """
    bound_sq = 0.0
    for delta in max_errors:
        c = 2 * math.sin(min(delta, math.pi) / 2)
        bound_sq = c * c + (1 + c) * bound_sq
    return min(2.0, math.sqrt(bound_sq))


def radius_error_bound(direction_bound: float) -> float:
    """``‖r u - r̂ û‖ / r ≤ |r - r̂| / r + (r̂ / r) ‖u - û‖`` with an fp16 radius ``r̂``."""
    return FP16_EPS + (1 + FP16_EPS) * direction_bound + NUMERIC_SLACK


@dataclass
class SphericalCodec(Codec):
    """ADA key codec: optional randomized Hadamard rotation, recursive polar transform, one
    Lloyd–Max angle codebook per level, one fp16 radius.

    Parameters
    ----------
    d : int
        Vector dimension, a power of two.
    bits : tuple of int
        Bits per angle at each level ℓ = 1 … log2(d) (level 1: 1–8, above: 0–8). Default
        ``(4, 2, 2, …)``.
    rotate : bool
        Apply the randomized Hadamard rotation first (to keys and queries alike); the codebooks
        assume rotated, i.e. isotropic, inputs.
    seed : int
        Seed of the rotation's random signs.

    Stores ``Σ_ℓ (d / 2**ℓ) bits[ℓ]`` bits of angle codes (padded to bytes) plus 2 bytes of radius.
    """

    bits: tuple[int, ...] | None = None
    rotate: bool = True
    seed: int = 0

    POWER_OF_TWO = True
    KERNEL = KernelKind.ADA

    def __post_init__(self) -> None:
        super().__post_init__()
        n_levels = int(math.log2(self.d))
        if self.bits is None:
            self.bits = (4,) + (2,) * (n_levels - 1)
        self.bits = tuple(self.bits)
        if len(self.bits) != n_levels:
            raise ValueError(f"bits must give one bit depth per level, log2(d)={n_levels} "
                             f"values, got {len(self.bits)}: {self.bits}")
        check_bits("bits[0] (level 1)", self.bits[0], 1, 8)
        for level, b in enumerate(self.bits[1:], start=2):
            check_bits(f"bits[{level - 1}] (level {level})", b, 0, 8)
        self.quantizers = [level_quantizer(lv, b) for lv, b in enumerate(self.bits, start=1)]
        self.layout = [(self.d >> lv, b) for lv, b in enumerate(self.bits, start=1)]
        self.rotation = RandomizedHadamard(self.d, self.seed) if self.rotate else None

    @classmethod
    def for_rate(cls, d: int, bits_per_coordinate: float, **kwargs) -> SphericalCodec:
        """The per-level bit depths that minimise the predicted mean-square error
        ``Σ_ℓ E[4 sin²(Δ_ℓ/2)]`` within ``bits_per_coordinate`` (radius included), by dynamic
        programming over levels."""
        check_d(d, power_of_two=True)
        budget = int(math.floor(bits_per_coordinate * d)) - 16  # 16 bits of fp16 radius
        if budget < d // 2:
            raise ValueError(f"bits_per_coordinate must allow at least 1 bit per level-1 angle "
                             f"plus the radius, i.e. >= {(d // 2 + 16) / d}, got "
                             f"{bits_per_coordinate}")
        # best[c] = (predicted mse, bits so far) using exactly c payload bits
        best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
        for level in range(1, int(math.log2(d)) + 1):
            n_angles, nxt = d >> level, {}
            for cost, (mse, bits) in best.items():
                for b in range(1 if level == 1 else 0, 9):
                    c = cost + n_angles * b
                    if c <= budget:
                        cand = (mse + level_chord_mse(level, b), (*bits, b))
                        if c not in nxt or cand[0] < nxt[c][0]:
                            nxt[c] = cand
            best = nxt
        # payload is padded to whole bytes, so keep the byte count within the budget too
        fits = [v for c, v in best.items() if 8 * math.ceil(c / 8) <= budget]
        return cls(d=d, bits=min(fits)[1], **kwargs)

    @property
    def bytes_per_vector(self) -> float:
        return packed_bytes(self.layout) + 2

    def error_bound(self) -> float:
        """Worst angle error of every level, level 1 innermost (see ``angular_error_bound``)."""
        return radius_error_bound(angular_error_bound([q.max_error for q in self.quantizers]))

    def _encode(self, x: torch.Tensor) -> Codes:
        y = self.rotation.forward(x) if self.rotate else x
        angles, radius = polar_transform(y)
        codes = [q.quantize(a) for q, a in zip(self.quantizers, angles, strict=True)]
        return Codes(pack(codes, list(self.bits)), {"radius": to_fp16("x", radius)},
                     x.shape)

    def _angles(self, codes: Codes) -> list[torch.Tensor]:
        raw = unpack(codes.payload, self.layout)
        return [q.dequantize(c) for q, c in zip(self.quantizers, raw, strict=True)]

    def decode(self, codes: Codes) -> torch.Tensor:
        angles = self._angles(codes)
        # top-down: each node splits its unit weight into (cos θ, sin θ) for its two children
        u = torch.ones(*codes.shape[:-1], 1, device=codes.payload.device)
        for theta in reversed(angles):
            u = torch.stack((u * torch.cos(theta), u * torch.sin(theta)), -1).flatten(-2)
        x = u * codes.side["radius"].float().unsqueeze(-1)
        return self.rotation.inverse(x) if self.rotate else x

    def _logits(self, q: torch.Tensor, codes: Codes) -> torch.Tensor:
        if self.rotate:
            q = self.rotation.forward(q)  # rotation is orthogonal: (Rq)·(Rk) = q·k
        theta1 = torch.as_tensor(self.quantizers[0].levels, dtype=torch.float32,
                                 device=q.device)
        # LUT[i, c] = q_2i cos θc + q_2i+1 sin θc: the level-1 pair i against code c
        lut = q[..., 0::2, None] * torch.cos(theta1) + q[..., 1::2, None] * torch.sin(theta1)
        n = codes.shape[-2]
        chunk = max(1, _LUT_ELEMENTS // (q.shape[-2] * self.d // 2))
        parts = []
        for j in range(0, n, chunk):
            part = Codes(codes.payload[..., j:j + chunk, :],
                         {"radius": codes.side["radius"][..., j:j + chunk]},
                         torch.Size((*codes.shape[:-2], min(chunk, n - j), self.d)))
            parts.append(self._logits_chunk(lut, part))
        return torch.cat(parts, -1)

    def _logits_chunk(self, lut: torch.Tensor, codes: Codes) -> torch.Tensor:
        raw = unpack(codes.payload, self.layout)
        v = gather_lut(lut, raw[0])  # [..., m, n, d/2]
        # bottom-up: a parent's dot product is cos θ · left child + sin θ · right child
        for quant, c in zip(self.quantizers[1:], raw[1:], strict=True):
            theta = quant.dequantize(c).unsqueeze(-3)  # [..., 1, n, d/2**ℓ]
            v = torch.cos(theta) * v[..., 0::2] + torch.sin(theta) * v[..., 1::2]
        return v.squeeze(-1) * codes.side["radius"].float().unsqueeze(-2)


@dataclass
class HypersphericalCodec(Codec):
    """Hyperspherical-coordinate key codec: one fp16 radius and d-1 nested angles.

    ``x = r (cos φ1, sin φ1 cos φ2, …, sin φ1 … sin φ_{d-2} cos φ_{d-1},
    sin φ1 … sin φ_{d-1})`` with ``φ_i ∈ [0, π]`` for i < d-1 (density ``∝ sin^(d-1-i)`` for
    isotropic inputs, one Lloyd–Max codebook each) and ``φ_{d-1} ∈ [0, 2π)`` (uniform).

    Parameters
    ----------
    d : int
        Vector dimension (a power of two when ``rotate``).
    bits : int
        Bits per angle, 1–8.
    rotate : bool
        Apply the randomized Hadamard rotation first.
    seed : int
        Seed of the rotation's random signs.
    """

    bits: int = 3
    rotate: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_d(self.d, power_of_two=self.rotate)
        check_bits("bits", self.bits, 1, 8)
        self.quantizers = [hyperspherical_angle_quantizer(self.d - 2 - i, self.bits)
                           for i in range(self.d - 2)]
        self.quantizers.append(uniform_quantizer(self.bits, 0.0, 2 * math.pi))
        self._levels = torch.as_tensor(np.stack([q.levels for q in self.quantizers]),
                                       dtype=torch.float32)  # [d-1, 2**bits]
        self._thresholds = torch.as_tensor(np.stack([q.thresholds for q in self.quantizers]),
                                           dtype=torch.float32)  # [d-1, 2**bits - 1]
        self.layout = [(self.d - 1, self.bits)]
        self.rotation = RandomizedHadamard(self.d, self.seed) if self.rotate else None

    @property
    def bytes_per_vector(self) -> float:
        return packed_bytes(self.layout) + 2

    def error_bound(self) -> float:
        """Nested angle errors, the last angle innermost (see ``angular_error_bound``)."""
        errors = [q.max_error for q in reversed(self.quantizers)]
        return radius_error_bound(angular_error_bound(errors))

    def _encode(self, x: torch.Tensor) -> Codes:
        y = self.rotation.forward(x) if self.rotate else x
        # tail[i] = ‖y_i:‖, so φ_i = atan2(‖y_i+1:‖, y_i)
        tail = torch.flip(torch.cumsum(torch.flip(y * y, [-1]), -1), [-1]).sqrt()
        phi = torch.atan2(tail[..., 1:-1], y[..., :-2])
        last = torch.remainder(torch.atan2(y[..., -1], y[..., -2]), 2 * math.pi)
        phi = torch.cat((phi, last.unsqueeze(-1)), -1)  # [..., d-1]
        flat = phi.reshape(-1, self.d - 1).T.contiguous()
        codes = torch.searchsorted(self._thresholds.to(x.device), flat).T.reshape(phi.shape)
        return Codes(pack([codes], [self.bits]), {"radius": to_fp16("x", tail[..., 0])},
                     x.shape)

    def _cos_sin(self, codes: Codes) -> tuple[torch.Tensor, torch.Tensor]:
        raw = unpack(codes.payload, self.layout)[0]
        levels = self._levels.to(raw.device)
        phi = levels[torch.arange(self.d - 1, device=raw.device), raw]
        return torch.cos(phi), torch.sin(phi)

    def decode(self, codes: Codes) -> torch.Tensor:
        c, s = self._cos_sin(codes)
        # prefix[i] = Π_{j<i} sin φ_j
        prefix = torch.cumprod(torch.cat((torch.ones_like(s[..., :1]), s), -1), -1)
        u = torch.cat((prefix[..., :-1] * c, prefix[..., -2:-1] * s[..., -1:]), -1)
        x = u * codes.side["radius"].float().unsqueeze(-1)
        return self.rotation.inverse(x) if self.rotate else x

    def _logits(self, q: torch.Tensor, codes: Codes) -> torch.Tensor:
        if self.rotate:
            q = self.rotation.forward(q)
        c, s = (t.unsqueeze(-3) for t in self._cos_sin(codes))  # [..., 1, n, d-1]
        q = q.unsqueeze(-2)  # [..., m, 1, d]
        # Horner form of q·u = q_1 cos φ1 + sin φ1 (q_2 cos φ2 + sin φ2 (…)), innermost first
        acc = q[..., -1] * s[..., -1] + q[..., -2] * c[..., -1]
        for i in range(self.d - 3, -1, -1):
            acc = q[..., i] * c[..., i] + s[..., i] * acc
        return acc * codes.side["radius"].float().unsqueeze(-2)
