"""The codec interface: dataclass configs, ``encode`` -> :class:`Codes` -> ``decode``, ``logits``.

A codec turns vectors ``[..., d]`` into packed uint8 codes plus per-vector side information and
back. Key codecs also compute attention logits ``q · x̂`` straight from the codes.
"""

from __future__ import annotations

import enum
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

__all__ = ["Codec", "Codes", "FP16_EPS", "FP16_MAX", "KernelKind", "NUMERIC_SLACK",
           "check_vectors", "gather_lut", "to_fp16"]

FP16_MAX = 65504.0
#: unit roundoff of fp16: rounding a normal value v changes it by at most FP16_EPS |v|
FP16_EPS = 2.0**-11
#: slack for float32 arithmetic (trigonometry, sums) in stated bounds
NUMERIC_SLACK = 1e-5


@dataclass
class Codes:
    """What a codec stores for a batch of vectors.

    Attributes
    ----------
    payload : torch.Tensor
        uint8 ``[..., payload_bytes]``: the bit-packed codes of each vector.
    side : dict[str, torch.Tensor]
        Side information (radii, norms, scales, zero points), usually fp16, e.g. ``[...]`` or
        ``[..., groups]``.
    shape : torch.Size
        Shape ``[..., d]`` of the encoded tensor.
    """

    payload: torch.Tensor
    side: dict[str, torch.Tensor] = field(default_factory=dict)
    shape: torch.Size = torch.Size()

    @property
    def nbytes(self) -> int:
        """Bytes of everything ``encode`` produced: payload and side information."""
        tensors = [self.payload, *self.side.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def num_vectors(self) -> int:
        return math.prod(self.shape[:-1])

    def rows(self, index) -> Codes:
        """The vectors ``index`` of flat codes ``[S]`` (an integer index of any shape, a bool
        mask ``[S]`` or a slice), as codes ``[*selected, d]``."""
        payload = self.payload[index]
        return Codes(payload, {k: v[index] for k, v in self.side.items()},
                     torch.Size((*payload.shape[:-1], self.shape[-1])))

    def to(self, device: torch.device | str) -> Codes:
        """The same codes on ``device``."""
        return Codes(self.payload.to(device), {k: v.to(device) for k, v in self.side.items()},
                     self.shape)

    def reshape(self, *shape: int) -> Codes:
        """The same vectors with leading dimensions ``shape`` (the codec's ``d`` kept last)."""
        lead = len(self.shape) - 1
        return Codes(self.payload.reshape(*shape, *self.payload.shape[lead:]),
                     {k: v.reshape(*shape, *v.shape[lead:]) for k, v in self.side.items()},
                     torch.Size((*shape, self.shape[-1])))

    @classmethod
    def cat(cls, parts: list[Codes]) -> Codes:
        """Flat codes ``[n_1 + n_2 + …]`` of one codec, one part after another."""
        payload = torch.cat([c.payload for c in parts])
        return cls(payload, {k: torch.cat([c.side[k] for c in parts]) for k in parts[0].side},
                   torch.Size((payload.shape[0], parts[0].shape[-1])))


class KernelKind(enum.IntEnum):
    """How the Triton kernels (:mod:`sphkv.kernels`) read a codec's rows; the value is the
    kernels' compile-time constant."""

    FP16 = 0  # x̂ = x
    INT8 = 1  # x̂ = s·c, fp16 scale per vector
    TURBO = 2  # x̂ = Rᵀ (‖x‖/√d) lev[c], packed Lloyd–Max codes, fp16 norm
    ADA = 3  # x̂ = Rᵀ r u(θ), fp16 radius and per-level angle codes (keys)


def check_vectors(name: str, x, d: int) -> torch.Tensor:
    """Validate a float tensor ``[..., d]`` of finite values; return it as float32."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != d:
        raise ValueError(f"{name} must have last dimension d={d}, got shape {tuple(x.shape)}")
    # one pass without a mask: the extremes are finite exactly when every value is (aminmax
    # propagates NaN)
    if x.numel() and not torch.isfinite(torch.stack(torch.aminmax(x))).all():
        bad = torch.nonzero(~torch.isfinite(x))[0].tolist()
        raise ValueError(f"{name} must be finite; found {x[tuple(bad)].item()} at index {bad}")
    return x.float()


def to_fp16(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` as fp16 side information, refusing magnitudes that fp16 cannot hold."""
    if t.numel() and t.abs().max() > FP16_MAX:
        raise ValueError(f"{name} needs a stored value of {t.abs().max().item():.4g}, above the "
                         f"fp16 maximum {FP16_MAX}")
    return t.half()


def check_d(d, power_of_two: bool) -> None:
    """Validate the vector dimension ``d`` of a codec config."""
    if not isinstance(d, int) or isinstance(d, bool) or d < 2:
        raise ValueError(f"d must be an integer >= 2, got {d!r}")
    if power_of_two and d & (d - 1):
        raise ValueError(f"d must be a power of two for this codec, got d={d}")


def check_bits(name: str, bits, lo: int, hi: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not lo <= bits <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {bits!r}")


def gather_lut(lut: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Look up one table entry per (query, key, slot).

    Parameters
    ----------
    lut : torch.Tensor
        ``[..., m, P, C]``: for each query and slot p, a value per code c.
    codes : torch.Tensor
        integer ``[..., n, P]``; batch dimensions broadcast against those of ``lut``.

    Returns
    -------
    torch.Tensor
        ``[..., m, n, P]`` with ``out[..., i, j, p] = lut[..., i, p, codes[..., j, p]]``.
    """
    batch = torch.broadcast_shapes(lut.shape[:-3], codes.shape[:-2])
    m, p, c = lut.shape[-3:]
    n = codes.shape[-2]
    lut = lut.expand(*batch, m, p, c).unsqueeze(-3).expand(*batch, m, n, p, c)
    index = codes.long().expand(*batch, n, p).unsqueeze(-3).expand(*batch, m, n, p)
    return torch.gather(lut, -1, index.unsqueeze(-1)).squeeze(-1)


@dataclass
class Codec(ABC):
    """Base of all codecs. Subclasses are dataclasses whose fields are the config.

    ``IS_KEY_CODEC`` says whether ``logits`` is available (every codec can store values).
    ``POWER_OF_TWO`` says whether ``d`` must be a power of two.
    ``KERNEL`` says how the Triton kernels read its codes (None: no kernel does).
    """

    d: int

    IS_KEY_CODEC: ClassVar[bool] = True
    POWER_OF_TWO: ClassVar[bool] = False
    KERNEL: ClassVar[KernelKind | None] = None

    def __post_init__(self) -> None:
        check_d(self.d, self.POWER_OF_TWO)

    @property
    @abstractmethod
    def bytes_per_vector(self) -> float:
        """Exact bytes stored per vector, side information included."""

    @abstractmethod
    def error_bound(self) -> float:
        """Worst case of ``‖x - x̂‖ / ‖x‖`` over all inputs whose stored fp16 values are normal
        (norms above about 1e-2); ``math.inf`` when the codec has none. By Cauchy–Schwarz it also
        bounds the logit error ``|q·x - q·x̂| / (‖q‖ ‖x‖)``."""

    @property
    def bits_per_coordinate(self) -> float:
        return 8.0 * self.bytes_per_vector / self.d

    def encode(self, x: torch.Tensor) -> Codes:
        """Encode ``x`` ``[..., d]`` (finite floats) into :class:`Codes`."""
        return self._encode(check_vectors("x", x, self.d))

    @abstractmethod
    def _encode(self, x: torch.Tensor) -> Codes: ...

    @abstractmethod
    def decode(self, codes: Codes) -> torch.Tensor:
        """Reconstruct ``x̂`` ``[..., d]`` (float32) from ``codes``."""

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``x̂ = decode(encode(x))``, float32 ``[..., d]``."""
        return self.decode(self.encode(x))

    def logits(self, q: torch.Tensor, codes: Codes) -> torch.Tensor:
        """Attention logits ``q · x̂`` from the codes.

        Parameters
        ----------
        q : torch.Tensor
            Queries ``[..., m, d]``.
        codes : Codes
            Codes of keys ``[..., n, d]``; batch dimensions broadcast against those of ``q``.

        Returns
        -------
        torch.Tensor
            ``[..., m, n]`` float32, equal to ``q @ decode(codes).mT`` to rounding.
        """
        q = check_vectors("q", q, self.d)
        if q.dim() < 2 or len(codes.shape) < 2:
            raise ValueError(f"logits needs q [..., m, d] and keys [..., n, d], got "
                             f"q {tuple(q.shape)} and keys {tuple(codes.shape)}")
        return self._logits(q, codes)

    def _logits(self, q: torch.Tensor, codes: Codes) -> torch.Tensor:
        # Scalar codecs dequantize and multiply, as a kernel does in registers.
        return q @ self.decode(codes).mT
