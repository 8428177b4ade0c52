"""Scalar baselines: fp16, int8, KIVI-style groupwise int-b, TurboQuant-style rotated Lloyd–Max.

Each is a codec with the common interface and can serve as a tier. Their ``logits`` dequantize
and multiply, as a fused kernel does in registers.
"""

from __future__ import annotations

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
    check_vectors,
    to_fp16,
)
from sphkv.codec.lloyd_max import sphere_coordinate_quantizer, sphere_coordinate_uniform_quantizer
from sphkv.codec.packing import pack, packed_bytes, unpack
from sphkv.codec.rotation import RandomizedHadamard

__all__ = ["Fp16Codec", "Int8Codec", "KiviCodec", "TurboQuantCodec"]


@dataclass
class Fp16Codec(Codec):
    """Half precision, 2 bytes per coordinate (values beyond ±65504 are rejected)."""

    KERNEL = KernelKind.FP16

    @property
    def bytes_per_vector(self) -> float:
        return 2 * self.d

    def _encode(self, x: torch.Tensor) -> Codes:
        to_fp16("x", x.abs().amax(-1))
        return Codes(x.half().view(torch.uint8), {}, x.shape)

    def error_bound(self) -> float:
        # each coordinate is rounded with relative error <= 2^-11; 1e-4 covers subnormal ones
        return FP16_EPS + 1e-4

    def decode(self, codes: Codes) -> torch.Tensor:
        return codes.payload.view(torch.float16).float()


@dataclass
class Int8Codec(Codec):
    """Symmetric per-vector int8: ``x̂ = s c`` with ``c ∈ [-127, 127]`` and an fp16 scale
    ``s = max|x| / 127``; ``d + 2`` bytes per vector."""

    KERNEL = KernelKind.INT8

    def _encode(self, x: torch.Tensor) -> Codes:
        scale = to_fp16("x", x.abs().amax(-1) / 127)
        s = scale.float().unsqueeze(-1)
        codes = torch.round(x / torch.where(s > 0, s, 1)).clamp(-127, 127).to(torch.int8)
        return Codes(codes.view(torch.uint8), {"scale": scale}, x.shape)

    @property
    def bytes_per_vector(self) -> float:
        return self.d + 2

    def error_bound(self) -> float:
        """Each coordinate is off by at most ``ŝ/2 ≤ (1 + ε) max|x| / 254`` (a clipped extreme is
        off by less), and ``max|x| ≤ ‖x‖``, so ``‖e‖ ≤ sqrt(d) (1 + ε) ‖x‖ / 254``."""
        return math.sqrt(self.d) * (1 + FP16_EPS) / 254 + NUMERIC_SLACK

    def decode(self, codes: Codes) -> torch.Tensor:
        return codes.payload.view(torch.int8).float() * codes.side["scale"].float().unsqueeze(-1)


@dataclass
class KiviCodec(Codec):
    """KIVI-style groupwise asymmetric int-b: ``x̂ = z + s c``, ``c ∈ [0, 2**b - 1]``, with fp16
    scale ``s`` and zero point ``z`` per group.

    Based on "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", arXiv 2402.02750.

    Parameters
    ----------
    d : int
        Vector dimension.
    bits : int
        1–8 bits per coordinate.
    group_size : int
        Group length G.
    axis : {"channel", "token"}
        ``"channel"`` (KIVI's keys): one (s, z) per channel per G consecutive tokens along
        dimension -2, which must be a multiple of G. ``"token"`` (KIVI's values): one (s, z) per
        G consecutive channels of each vector; d must be a multiple of G.

    Bytes per vector: ``b d / 8`` of codes plus ``4 d / G`` of fp16 scales and zero points.
    """

    bits: int = 2
    group_size: int = 32
    axis: str = "channel"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bits("bits", self.bits, 1, 8)
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")
        if self.axis not in ("channel", "token"):
            raise ValueError(f"axis must be 'channel' or 'token', got {self.axis!r}")
        if self.axis == "token" and self.d % self.group_size:
            raise ValueError(f"group_size={self.group_size} must divide d={self.d} for "
                             f"axis='token'")

    @property
    def bytes_per_vector(self) -> float:
        return packed_bytes([(self.d, self.bits)]) + 4 * self.d / self.group_size

    def error_bound(self) -> float:
        """Per token (``axis="token"``): a group g with range ``R ≤ sqrt(2) ‖x_g‖`` has step
        ``ŝ ≤ (1 + ε)(R + ε‖x_g‖) / (2**b - 1)``; a coordinate is off by at most ``ŝ/2`` (clipping
        at the fp16-rounded ends costs at most ``2 ε ‖x_g‖``), so ``‖e‖ ≤ sqrt(G) c ‖x‖``.
        Per channel the scale comes from other tokens: no bound relative to ``‖x‖``."""
        if self.axis == "channel":
            return math.inf
        eps = FP16_EPS
        c = max((1 + eps) * (math.sqrt(2) + eps) / (2 * (2**self.bits - 1)), 2 * eps)
        return math.sqrt(self.group_size) * c + NUMERIC_SLACK

    def _groups(self, x: torch.Tensor) -> torch.Tensor:
        """View ``x`` as ``[..., groups, G, ...]`` with the group members on dimension -2."""
        g = self.group_size
        if self.axis == "token":
            return x.unflatten(-1, (-1, g))  # [..., n, d/G, G]
        if x.dim() < 2 or x.shape[-2] % g:
            raise ValueError(f"x must be [..., n, d] with n a multiple of group_size={g} for "
                             f"axis='channel', got shape {tuple(x.shape)}")
        return x.unflatten(-2, (-1, g)).transpose(-1, -2)  # [..., n/G, d, G]

    def _ungroup(self, y: torch.Tensor) -> torch.Tensor:
        if self.axis == "token":
            return y.flatten(-2)
        return y.transpose(-1, -2).flatten(-3, -2)

    def _encode(self, x: torch.Tensor) -> Codes:
        top = 2**self.bits - 1
        g = self._groups(x)
        lo, hi = g.amin(-1), g.amax(-1)
        zero = to_fp16("x", lo)
        scale = to_fp16("x", (hi - zero.float()) / top)
        s = scale.float().unsqueeze(-1)
        codes = torch.round((g - zero.float().unsqueeze(-1)) / torch.where(s > 0, s, 1))
        codes = self._ungroup(codes.clamp(0, top))
        return Codes(pack([codes], [self.bits]), {"scale": scale, "zero": zero}, x.shape)

    def decode(self, codes: Codes) -> torch.Tensor:
        """``x̂``; with ``axis="channel"`` the side may also hold each vector's own (s, z)
        ``[..., n, d]`` (its group's, as a paged store reads them back)."""
        c = unpack(codes.payload, [(self.d, self.bits)])[0].float()
        s, z = (codes.side[k].float() for k in ("scale", "zero"))
        if self.axis == "channel" and s.shape[-2] == c.shape[-2]:
            return c * s + z
        return self._ungroup(self._groups(c) * s.unsqueeze(-1) + z.unsqueeze(-1))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))``; with ``axis="channel"``, dimension -2 of any length: its last
        group is completed by repeating the last vector (as a paged store completes a
        partial page), which leaves the group's minima and maxima as they are."""
        if self.axis == "token" or x.shape[-2] % self.group_size == 0:
            return super().reconstruct(x)
        n = x.shape[-2]
        pad = x[..., -1:, :].expand(*x.shape[:-2], -n % self.group_size, x.shape[-1])
        return super().reconstruct(torch.cat([x, pad], dim=-2))[..., :n, :]


@dataclass
class TurboQuantCodec(Codec):
    """TurboQuant-style: randomized Hadamard rotation, fp16 norm, and per coordinate a Lloyd–Max
    codebook for one coordinate of a uniform point on the sphere (close to N(0, 1/d)).

    Based on "TurboQuant: Online Vector Quantization with Near-optimal Distortion Rate",
    arXiv 2504.19874 (its MSE variant, without the QJL residual).

    Parameters
    ----------
    d : int
        Vector dimension, a power of two.
    bits : int
        1–8 bits per coordinate; ``b d / 8 + 2`` bytes per vector. The codes are bit-packed
        in coordinate order, except at 3 bits: a plane of their low two bits (coordinate
        4i + f in bits 2f, 2f + 1 of byte i), then a plane of their high bits (coordinate j
        in bit j mod 8 of byte d/4 + j/8), which a decode kernel reads like 2-bit codes.
    seed : int
        Seed of the rotation's random signs.
    levels : {"lloyd-max", "uniform"}
        The codebook: Lloyd–Max for the coordinate's density (least error), or evenly spaced
        levels with the step of least error (more error, at 4 bits about a fifth more; a
        decode kernel turns the codes into levels without a lookup).
    unbiased : bool
        Store ``n = ‖y‖ · d / ⟨ẑ, z⟩`` instead of ``‖y‖`` (same bytes; decoders read it as the
        norm), so that ``⟨x̂, x⟩ = ‖x‖²``: the reconstruction's component along x is x. The
        Lloyd–Max codebook's ``x̂`` is the conditional mean, shrunk towards 0 by the share of
        the energy its error takes (``⟨ẑ, z⟩ ≈ ‖ẑ‖² ≈ d (1 − ε)``, ε about 0.12 at 2 bits and
        0.36 at 1 bit); in attention that shrinkage is common to all tokens (every logit scaled
        down by 1 − ε, every value too) where the rest of the error is independent between
        tokens and averages out in ``Σ p v``.
    """

    bits: int = 2
    seed: int = 0
    levels: str = "lloyd-max"
    unbiased: bool = False

    POWER_OF_TWO = True
    KERNEL = KernelKind.TURBO
    LEVELS = ("lloyd-max", "uniform")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bits("bits", self.bits, 1, 8)
        if self.levels not in self.LEVELS:
            raise ValueError(f"levels must be one of {', '.join(self.LEVELS)}, got "
                             f"{self.levels!r}")
        self.quantizer = (sphere_coordinate_quantizer(self.d, self.bits)
                          if self.levels == "lloyd-max" else
                          sphere_coordinate_uniform_quantizer(self.d, self.bits))
        self.rotation = RandomizedHadamard(self.d, self.seed)

    @property
    def bytes_per_vector(self) -> float:
        return packed_bytes([(self.d, self.bits)]) + 2

    def error_bound(self) -> float:
        """``z = sqrt(d) R x / ‖x‖`` has ``‖z‖² = d``. A coordinate inside the outer levels is
        off by at most δ (the widest inner half-cell), one beyond them by less than ``|z_j|``, so
        ``‖z - ẑ‖² ≤ d δ² + d``: no useful worst case (an adversary picks ``x = Rᵀ e_1``)."""
        q = self.quantizer
        edges = np.concatenate([q.levels[:1], q.thresholds, q.levels[-1:]])
        delta = np.max(np.maximum(q.levels - edges[:-1], edges[1:] - q.levels))
        bound = math.sqrt(delta**2 + 1)
        if self.unbiased:
            # ẑ = s ẑ' with |s − 1| ≤ max(√d / l_min − 1, 1): every ẑ'_j has z_j's sign and
            # |ẑ'_j| ≥ l_min, so ⟨ẑ', z⟩ ≥ l_min ‖z‖₁ ≥ l_min √d; and ‖ẑ'‖ ≤ l_max √d
            low, high = np.abs(q.levels).min(), np.abs(q.levels).max()
            bound += max(math.sqrt(self.d) / low - 1, 1) * high
        return FP16_EPS + (1 + FP16_EPS) * bound + NUMERIC_SLACK

    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The level index of every rotated coordinate ``[..., d]`` and the fp16 norm
        ``[...]``."""
        y = self.rotation.forward(x)
        norm = y.norm(dim=-1, keepdim=True)
        # z = sqrt(d) y / ‖y‖ has coordinates of unit variance
        z = y / torch.where(norm > 0, norm, 1) * math.sqrt(self.d)
        c = self.quantizer.quantize(z)
        if self.unbiased:
            dot = (self.quantizer.dequantize(c) * z).sum(-1, keepdim=True)
            norm = norm * torch.where(dot > 0, self.d / dot.clamp_min(1e-30), 1.0)
        return c, to_fp16("x", norm.squeeze(-1))

    def _dequantize(self, c: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """``R x̂`` from level indices and the fp16 norm."""
        return self.quantizer.dequantize(c) * (norm.float().unsqueeze(-1) / math.sqrt(self.d))

    def _encode(self, x: torch.Tensor) -> Codes:
        c, norm = self._quantize(x)
        payload = pack([c & 3, c >> 2], [2, 1]) if self.bits == 3 else pack([c], [self.bits])
        return Codes(payload, {"norm": norm}, x.shape)

    def decode_rotated(self, codes: Codes) -> torch.Tensor:
        """``R x̂`` ``[..., d]``: the reconstruction in the rotated domain."""
        if self.bits == 3:
            low, high = unpack(codes.payload, [(self.d, 2), (self.d, 1)])
            c = low | high << 2
        else:
            c = unpack(codes.payload, [(self.d, self.bits)])[0]
        return self._dequantize(c, codes.side["norm"])

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))`` without packing the codes (the distortion rows reconstruct
        every prompt token at every tier)."""
        return self.rotation.inverse(self._dequantize(*self._quantize(
            check_vectors("x", x, self.d))))

    def decode(self, codes: Codes) -> torch.Tensor:
        return self.rotation.inverse(self.decode_rotated(codes))

    def _logits(self, q: torch.Tensor, codes: Codes) -> torch.Tensor:
        # rotate the query once instead of rotating every key back
        return self.rotation.forward(q) @ self.decode_rotated(codes).mT
