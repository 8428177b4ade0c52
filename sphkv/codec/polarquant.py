"""PolarQuant-style key codec: each RoPE pair in polar form, no rotation.

RoPE turns each pair ``(x_i, x_i+d/2)`` (Hugging Face's rotate-half layout) by a position angle, so
a pair's radius does not depend on position and its angle is spread around the circle. The codec
stores per pair a ``radius_bits`` code of ρ (asymmetric min–max over the vector's d/2 radii, fp16
minimum and step) and an ``angle_bits`` uniform code of θ on [0, 2π).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sphkv.codec.base import FP16_EPS, NUMERIC_SLACK, Codec, Codes, check_bits, gather_lut, to_fp16
from sphkv.codec.lloyd_max import uniform_quantizer
from sphkv.codec.packing import pack, packed_bytes, unpack

__all__ = ["PolarQuantCodec"]


@dataclass
class PolarQuantCodec(Codec):
    """Pairwise polar codec on RoPE pairs.

    Parameters
    ----------
    d : int
        Vector dimension, even.
    radius_bits, angle_bits : int
        Bits per pair for ρ (0–8) and θ (1–8); default 4 + 4.
    pairing : {"half", "adjacent"}
        ``"half"`` pairs ``(x_i, x_i+d/2)`` (rotate-half RoPE, Llama in Hugging Face),
        ``"adjacent"`` pairs ``(x_2i, x_2i+1)`` (interleaved RoPE).

    Bytes per vector: ``d/2 (radius_bits + angle_bits) / 8`` plus 4 (fp16 minimum and step of ρ).
    """

    radius_bits: int = 4
    angle_bits: int = 4
    pairing: str = "half"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d % 2:
            raise ValueError(f"d must be even for pairwise polar coding, got d={self.d}")
        check_bits("radius_bits", self.radius_bits, 0, 8)
        check_bits("angle_bits", self.angle_bits, 1, 8)
        if self.pairing not in ("half", "adjacent"):
            raise ValueError(f"pairing must be 'half' or 'adjacent', got {self.pairing!r}")
        self.angle = uniform_quantizer(self.angle_bits, 0.0, 2 * math.pi)
        self.layout = [(self.d // 2, self.radius_bits), (self.d // 2, self.angle_bits)]

    @property
    def bytes_per_vector(self) -> float:
        return packed_bytes(self.layout) + 4

    def error_bound(self) -> float:
        """Pair i is off by ``|ρ - ρ̂| + ρ̂ 2 sin(δθ/2)``. The radii's range is at most ``‖x‖``, so
        ``|ρ - ρ̂| ≤ η ‖x‖`` with ``η = (1 + ε)² / (2 (2**b - 1))`` (1 with no radius bits); summing
        over the d/2 pairs, ``‖e‖ ≤ sqrt(d/2) η (1 + c) ‖x‖ + c ‖x‖`` with ``c = 2 sin(δθ/2)``."""
        top = 2**self.radius_bits - 1
        eta = (1 + FP16_EPS) ** 2 / (2 * top) if top else 1.0
        eta = max(eta, 2 * FP16_EPS)
        c = 2 * math.sin(self.angle.max_error / 2)
        return math.sqrt(self.d / 2) * eta * (1 + c) + c + NUMERIC_SLACK

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pairing == "half":
            return x[..., : self.d // 2], x[..., self.d // 2:]
        return x[..., 0::2], x[..., 1::2]

    def _encode(self, x: torch.Tensor) -> Codes:
        a, b = self._split(x)
        rho, theta = torch.hypot(a, b), torch.remainder(torch.atan2(b, a), 2 * math.pi)
        top = 2**self.radius_bits - 1
        lo = to_fp16("x", rho.amin(-1))
        step = to_fp16("x", (rho.amax(-1) - lo.float()) / max(top, 1))
        s = step.float().unsqueeze(-1)
        rho_codes = torch.round((rho - lo.float().unsqueeze(-1)) / torch.where(s > 0, s, 1))
        payload = pack([rho_codes.clamp(0, top), self.angle.quantize(theta)],
                       [self.radius_bits, self.angle_bits])
        return Codes(payload, {"rho_min": lo, "rho_step": step}, x.shape)

    def _polar(self, codes: Codes) -> tuple[torch.Tensor, torch.Tensor]:
        rho_codes, theta_codes = unpack(codes.payload, self.layout)
        lo, step = (codes.side[k].float().unsqueeze(-1) for k in ("rho_min", "rho_step"))
        return lo + step * rho_codes, theta_codes

    def decode(self, codes: Codes) -> torch.Tensor:
        rho, theta_codes = self._polar(codes)
        theta = self.angle.dequantize(theta_codes)
        a, b = rho * torch.cos(theta), rho * torch.sin(theta)
        if self.pairing == "half":
            return torch.cat((a, b), -1)
        return torch.stack((a, b), -1).flatten(-2)

    def _logits(self, q: torch.Tensor, codes: Codes) -> torch.Tensor:
        rho, theta_codes = self._polar(codes)
        theta = torch.as_tensor(self.angle.levels, dtype=torch.float32, device=q.device)
        qa, qb = self._split(q)
        # LUT[i, c] = q_a,i cos θc + q_b,i sin θc for pair i and angle code c
        lut = qa.unsqueeze(-1) * torch.cos(theta) + qb.unsqueeze(-1) * torch.sin(theta)
        return (gather_lut(lut, theta_codes) * rho.unsqueeze(-3)).sum(-1)
