"""Measured logit and attention-output distortion of codecs, and the sweeps behind the plots."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from sphkv.analysis.bounds import logit_bound, predicted_logit_rms
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

__all__ = ["KEY_FAMILIES", "PAIR_FAMILIES", "LogitStats", "attention_error", "describe",
           "key_codecs", "label", "logit_errors", "pair_codecs"]

_CHUNK = 4096  # keys per encode call, to bound memory of the vector quantizers


def _round_trip(codec: Codec, x: torch.Tensor) -> torch.Tensor:
    """``decode(encode(x))`` for ``x`` ``[N, d]`` in chunks (a multiple of KIVI's groups)."""
    return torch.cat([codec.decode(codec.encode(x[i:i + _CHUNK]))
                      for i in range(0, x.shape[0], _CHUNK)])


@dataclass
class LogitStats:
    """Normalised logit error ``|q·k - q·k̂| / (‖q‖ ‖k‖)`` of one codec on one set of keys.

    ``max`` is the worst case over queries (``‖k - k̂‖ / ‖k‖``), maximised over keys; ``mean``
    and ``rms`` are over (query, key) pairs of the given queries.
    """

    max: float
    mean: float
    rms: float


def logit_errors(codec: Codec, keys: torch.Tensor, queries: torch.Tensor) -> LogitStats:
    """Measure ``codec`` on keys ``[..., N, d]`` against queries ``[..., M, d]``.

    Batch dimensions (e.g. layer and kv-head) broadcast; for KIVI per channel, N counts
    consecutive tokens (a multiple of its group size).
    """
    d = keys.shape[-1]
    k_hat = _round_trip(codec, keys.reshape(-1, d)).view_as(keys)
    err = keys - k_hat
    knorm = keys.norm(dim=-1)
    worst = (err.norm(dim=-1) / knorm).max().item()
    q_unit = queries / queries.norm(dim=-1, keepdim=True)
    eps = (q_unit @ err.mT).abs() / knorm.unsqueeze(-2)  # [..., M, N]
    return LogitStats(worst, eps.mean().item(), eps.square().mean().sqrt().item())


def attention_error(key_codec: Codec, value_codec: Codec, keys: torch.Tensor,
                    values: torch.Tensor, queries: torch.Tensor) -> float:
    """Mean relative error ``‖o - ô‖ / ‖o‖`` of causal attention outputs.

    Parameters
    ----------
    keys, values : torch.Tensor
        ``[H_kv, n, d]`` of one layer.
    queries : torch.Tensor
        ``[H_q, m, d]``: the last m positions' queries (m ≤ n), H_q a multiple of H_kv.
    """
    h_kv, n, d = keys.shape
    h_q, m, _ = queries.shape
    k_hat = _round_trip(key_codec, keys.reshape(-1, d)).view_as(keys)
    v_hat = _round_trip(value_codec, values.reshape(-1, d)).view_as(values)
    q = queries.reshape(h_kv, h_q // h_kv * m, d)
    # query at position n - m + i sees keys 0 … n - m + i
    pos = torch.arange(n - m, n).repeat(h_q // h_kv)
    mask = torch.arange(n)[None, :] > pos[:, None]

    def attend(k, v):
        s = (q @ k.mT) / math.sqrt(d)
        return torch.softmax(s.masked_fill(mask, -math.inf), -1) @ v

    o, o_hat = attend(keys, values), attend(k_hat, v_hat)
    return ((o - o_hat).norm(dim=-1) / o.norm(dim=-1)).mean().item()


# Key codec families and their bit depths, as (label, config) pairs for a dimension d.
KEY_FAMILIES = {
    "ADA (polar, rotated)": lambda d: [SphericalCodec.for_rate(d, r)
                                        for r in (2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0)],
    "hyperspherical": lambda d: [HypersphericalCodec(d=d, bits=b) for b in (2, 3, 4, 5, 6)],
    "TurboQuant": lambda d: [TurboQuantCodec(d=d, bits=b) for b in (1, 2, 3, 4, 5, 6)],
    "TurboQuant, uniform levels": lambda d: [TurboQuantCodec(d=d, bits=b, levels="uniform")
                                             for b in (2, 3, 4)],
    "PolarQuant (RoPE pairs)": lambda d: [PolarQuantCodec(d=d, radius_bits=r, angle_bits=a)
                                          for r, a in ((1, 2), (2, 3), (3, 4), (4, 4), (4, 5),
                                                       (5, 6))],
    "FibQuant (k=4)": lambda d: [FibQuantCodec(d=d, block=4, direction_bits=t, radius_bits=r)
                                 for t, r in ((5, 1), (6, 2), (8, 2), (10, 2))],
    "KIVI (per channel)": lambda d: [KiviCodec(d=d, bits=b) for b in (1, 2, 3, 4, 6)],
    "int8": lambda d: [Int8Codec(d=d)],
    "fp16": lambda d: [Fp16Codec(d=d)],
}


def key_codecs(d: int) -> list[tuple[str, Codec]]:
    """Every (family, codec) of :data:`KEY_FAMILIES` for dimension ``d``."""
    return [(family, codec) for family, make in KEY_FAMILIES.items() for codec in make(d)]


# Tier candidates: (key codec, value codec) pairs at matched bit depths.
PAIR_FAMILIES = {
    "ADA K + TurboQuant V": lambda d: [(SphericalCodec.for_rate(d, b + 0.25),
                                        TurboQuantCodec(d=d, bits=b)) for b in (1, 2, 3, 4, 5)],
    "ADA K + ADA V": lambda d: [(SphericalCodec.for_rate(d, r), SphericalCodec.for_rate(d, r))
                                for r in (2.0, 3.0, 4.0, 5.0)],
    "TurboQuant K + V": lambda d: [(TurboQuantCodec(d=d, bits=b), TurboQuantCodec(d=d, bits=b))
                                   for b in (1, 2, 3, 4, 5)],
    "KIVI (K channel, V token)": lambda d: [(KiviCodec(d=d, bits=b),
                                             KiviCodec(d=d, bits=b, axis="token"))
                                            for b in (2, 3, 4, 6)],
    "PolarQuant K + KIVI V": lambda d: [(PolarQuantCodec(d=d, radius_bits=r, angle_bits=a),
                                         KiviCodec(d=d, bits=b, axis="token"))
                                        for r, a, b in ((2, 3, 2), (3, 4, 3), (4, 4, 4))],
    "FibQuant K + V": lambda d: [(FibQuantCodec(d=d, direction_bits=t, radius_bits=r),) * 2
                                 for t, r in ((6, 2), (8, 2), (10, 2))],
    "int8 K + V": lambda d: [(Int8Codec(d=d), Int8Codec(d=d))],
}


def pair_codecs(d: int) -> list[tuple[str, Codec, Codec]]:
    """Every (family, key codec, value codec) of :data:`PAIR_FAMILIES` for dimension ``d``."""
    return [(family, k, v) for family, make in PAIR_FAMILIES.items() for k, v in make(d)]


def label(codec: Codec) -> str:
    """A short config label, e.g. ``SphericalCodec(bits=(3, 1, 0, 0, 0, 0), rotate=True)``."""
    params = ", ".join(f"{f.name}={getattr(codec, f.name)}" for f in fields(codec)
                       if f.name not in ("d", "seed"))
    return f"{type(codec).__name__}({params})"


def describe(codec: Codec) -> dict:
    """Config, rate and analytic numbers of a key codec, as a table row."""
    return {"codec": label(codec), "bits_per_coord": codec.bits_per_coordinate,
            "bytes": codec.bytes_per_vector, "bound": logit_bound(codec),
            "predicted_rms": predicted_logit_rms(codec)}
