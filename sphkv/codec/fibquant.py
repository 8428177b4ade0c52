"""FibQuant-style radial–angular vector quantizer.

After the randomized Hadamard rotation and division by the norm, the vector is cut into blocks of
k coordinates. Each block is stored as a radius code and a direction code: for a uniform point on
the unit sphere of R^d a block's squared radius is Beta(k/2, (d-k)/2) distributed, independent of
its direction, which is uniform on the sphere of R^k. Radii take the midpoints (in probability) of
equal-probability Beta cells; directions come from a quasi-uniform Kronecker sequence (the
generalised golden ratio, a Fibonacci lattice in any k) refined by spherical Lloyd iterations.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import brentq
from scipy.stats import beta, norm

from sphkv.codec.base import Codec, Codes, check_bits, gather_lut, to_fp16
from sphkv.codec.packing import pack, packed_bytes, unpack
from sphkv.codec.rotation import RandomizedHadamard

__all__ = ["FibQuantCodec", "direction_codebook", "radius_levels"]


@functools.cache
def direction_codebook(k: int, bits: int, seed: int = 0, iters: int = 30) -> np.ndarray:
    """``2**bits`` unit vectors ``[N, k]`` spread quasi-uniformly over the sphere of R^k."""
    n = 2**bits
    # Kronecker sequence frac(1/2 + i α) with α_j = g^-j, g the root of g^(k+1) = g + 1
    g = brentq(lambda t: t ** (k + 1) - t - 1, 1.0, 2.0)
    alpha = g ** -np.arange(1, k + 1)
    points = np.mod(0.5 + np.arange(1, n + 1)[:, None] * alpha, 1.0)
    book = norm.ppf(points)  # uniform cube -> Gaussian -> (normalised) uniform sphere
    book /= np.linalg.norm(book, axis=1, keepdims=True)
    # spherical Lloyd: assign uniform samples to the nearest codeword, move it to their mean
    sample = np.random.default_rng(seed).standard_normal((max(64 * n, 2**14), k))
    sample /= np.linalg.norm(sample, axis=1, keepdims=True)
    for _ in range(iters):
        owner = np.argmax(sample @ book.T, axis=1)
        sums = np.zeros_like(book)
        np.add.at(sums, owner, sample)
        lengths = np.linalg.norm(sums, axis=1, keepdims=True)
        book = np.where(lengths > 0, sums / np.maximum(lengths, 1e-300), book)
    return book


@functools.cache
def radius_levels(d: int, k: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Levels ``[L]`` and thresholds ``[L-1]`` for a block's radius, ρ² ~ Beta(k/2, (d-k)/2)."""
    n = 2**bits
    dist = beta(k / 2, (d - k) / 2)
    levels = np.sqrt(dist.ppf((np.arange(n) + 0.5) / n))
    thresholds = np.sqrt(dist.ppf(np.arange(1, n) / n))
    return levels, thresholds


@dataclass
class FibQuantCodec(Codec):
    """Radial–angular VQ over blocks of ``block`` coordinates after rotation.

    Parameters
    ----------
    d : int
        Vector dimension, a power of two.
    block : int
        k, coordinates per block (divides d, >= 2).
    direction_bits : int
        Bits per block direction code (1–12).
    radius_bits : int
        Bits per block radius code (0–8).
    seed : int
        Seed of the rotation's signs and of the codebook refinement samples.

    Bytes per vector: ``d/k (direction_bits + radius_bits) / 8`` plus 2 (fp16 norm).
    """

    block: int = 4
    direction_bits: int = 8
    radius_bits: int = 2
    seed: int = 0

    POWER_OF_TWO = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.block, int) or self.block < 2 or self.d % self.block:
            raise ValueError(f"block must be an integer >= 2 dividing d={self.d}, "
                             f"got {self.block!r}")
        check_bits("direction_bits", self.direction_bits, 1, 12)
        check_bits("radius_bits", self.radius_bits, 0, 8)
        self.rotation = RandomizedHadamard(self.d, self.seed)
        self.book = torch.as_tensor(direction_codebook(self.block, self.direction_bits,
                                                       self.seed), dtype=torch.float32)
        levels, thresholds = radius_levels(self.d, self.block, self.radius_bits)
        self.rho_levels = torch.as_tensor(levels, dtype=torch.float32)
        self.rho_thresholds = torch.as_tensor(thresholds, dtype=torch.float32)
        self.layout = [(self.d // self.block, self.radius_bits),
                       (self.d // self.block, self.direction_bits)]

    @property
    def bytes_per_vector(self) -> float:
        return packed_bytes(self.layout) + 2

    def error_bound(self) -> float:
        """No analytic worst case: the covering radius of the refined direction codebook has no
        closed form, and the outer radius cell is unbounded in relative terms."""
        return math.inf

    def _encode(self, x: torch.Tensor) -> Codes:
        y = self.rotation.forward(x)
        r = y.norm(dim=-1)
        blocks = (y / torch.where(r > 0, r, 1).unsqueeze(-1)).unflatten(-1, (-1, self.block))
        rho = blocks.norm(dim=-1)  # [..., d/k]
        rho_codes = torch.bucketize(rho, self.rho_thresholds.to(x.device))
        # nearest unit codeword = largest cosine
        dir_codes = torch.argmax(blocks @ self.book.to(x.device).T, dim=-1)
        return Codes(pack([rho_codes, dir_codes], [self.radius_bits, self.direction_bits]),
                     {"norm": to_fp16("x", r)}, x.shape)

    def _radii(self, codes: Codes) -> tuple[torch.Tensor, torch.Tensor]:
        rho_codes, dir_codes = unpack(codes.payload, self.layout)
        rho = self.rho_levels.to(rho_codes.device)[rho_codes]
        return rho * codes.side["norm"].float().unsqueeze(-1), dir_codes

    def decode_rotated(self, codes: Codes) -> torch.Tensor:
        """``R x̂`` ``[..., d]``: the reconstruction in the rotated domain."""
        rho, dir_codes = self._radii(codes)
        return (rho.unsqueeze(-1) * self.book.to(rho.device)[dir_codes]).flatten(-2)

    def decode(self, codes: Codes) -> torch.Tensor:
        return self.rotation.inverse(self.decode_rotated(codes))

    def _logits(self, q: torch.Tensor, codes: Codes) -> torch.Tensor:
        qb = self.rotation.forward(q).unflatten(-1, (-1, self.block))  # [..., m, d/k, k]
        lut = qb @ self.book.to(q.device).T  # per-query codebook inner products [..., m, d/k, N]
        rho, dir_codes = self._radii(codes)
        return (gather_lut(lut, dir_codes) * rho.unsqueeze(-3)).sum(-1)

