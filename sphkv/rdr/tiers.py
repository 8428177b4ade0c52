"""Precision tiers: what a kept (token, kv-head) item may be stored as, and what it costs.

A tier pairs a key codec (with ``logits``, so attention reads the codes) and a value codec; its
cost is the exact bytes per token-head, side information included. Tier 0 is ``drop`` (nothing
stored), the last tier ``fp16``. The default ladder is justified in ``docs/codecs.md``: each
compressed tier sits on the measured rate–distortion frontier of attention-output error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sphkv.codec import (
    Codec,
    Fp16Codec,
    Int8Codec,
    KiviCodec,
    SphericalCodec,
    TurboQuantCodec,
)

__all__ = ["KV_PAIRS", "Tier", "TierSet", "ada_tiers", "default_tiers", "fast_tiers", "kv_tiers",
           "scalar_tiers"]

#: (key bits, value bits) of :func:`kv_tiers`' compressed rungs, cheapest first; 8 is int8
KV_PAIRS = ((2, 1), (2, 2), (3, 2), (4, 2), (4, 3), (4, 4), (8, 4), (8, 8))


@dataclass(frozen=True)
class Tier:
    """One precision tier; ``key`` and ``value`` are both None for ``drop``."""

    name: str
    key: Codec | None = None
    value: Codec | None = None

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if (self.key is None) != (self.value is None):
            raise ValueError(f"tier {self.name!r}: key and value must both be codecs, or both "
                             f"None for a drop tier")
        if self.key is not None:
            if not self.key.IS_KEY_CODEC:
                raise ValueError(f"tier {self.name!r}: key codec {type(self.key).__name__} "
                                 f"cannot compute logits")
            if self.key.d != self.value.d:
                raise ValueError(f"tier {self.name!r}: key d={self.key.d} and value "
                                 f"d={self.value.d} differ")

    @property
    def is_drop(self) -> bool:
        return self.key is None

    @property
    def bytes_per_token_head(self) -> float:
        """Exact bytes of one token of one kv-head: key and value codes with side information."""
        if self.is_drop:
            return 0.0
        return self.key.bytes_per_vector + self.value.bytes_per_vector


@dataclass(frozen=True)
class TierSet:
    """An ordered ladder of tiers, cheapest first, all for one head dimension.

    ``costs`` (bytes per token-head, ``[T]``) is the ``cost`` of
    :class:`sphkv.rdr.AllocationProblem`; the tier index is the allocation's tier.
    """

    tiers: tuple[Tier, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "tiers", tuple(self.tiers))
        if not self.tiers:
            raise ValueError("tiers must hold at least one tier")
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tiers must have unique names, got {names}")
        dims = {t.key.d for t in self.tiers if not t.is_drop}
        if len(dims) > 1:
            raise ValueError(f"tiers must share one head dimension, got d in {sorted(dims)}")
        costs = self.costs
        if np.any(np.diff(costs) <= 0):
            raise ValueError(f"tiers must be ordered by strictly increasing bytes per "
                             f"token-head, got {dict(zip(names, costs.tolist(), strict=True))}")

    def __len__(self) -> int:
        return len(self.tiers)

    def __getitem__(self, i: int) -> Tier:
        return self.tiers[i]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tiers]

    @property
    def costs(self) -> np.ndarray:
        """Bytes per token-head of each tier, ``[T]``."""
        return np.array([t.bytes_per_token_head for t in self.tiers])

    @property
    def d(self) -> int | None:
        return next((t.key.d for t in self.tiers if not t.is_drop), None)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no tier named {name!r}; tiers: {', '.join(self.names)}") from None


def default_tiers(d: int = 64) -> TierSet:
    """drop → ~2 → ~3 → ~4 → 8 bits → fp16 for head dimension ``d`` (a power of two).

    Chosen from the measured frontier of attention-output error on SmolLM2 (``docs/codecs.md``):
    between 2 and 4 bits the TurboQuant-style codec for keys and values sits on it (ADA keys at
    equal bytes are 5–20% worse there); 8 bits is int8 for both.
    """
    def turbo(bits: int) -> Tier:
        return Tier(f"turbo{bits}", TurboQuantCodec(d=d, bits=bits),
                    TurboQuantCodec(d=d, bits=bits))

    return TierSet((Tier("drop"), turbo(2), turbo(3), turbo(4),
                    Tier("int8", Int8Codec(d=d), Int8Codec(d=d)),
                    Tier("fp16", Fp16Codec(d=d), Fp16Codec(d=d))))


def fast_tiers(d: int = 64) -> TierSet:
    """The ladder of :func:`default_tiers` with evenly spaced levels at 2 and 4 bits
    (``uniform2``, ``uniform4``: :class:`TurboQuantCodec` with ``levels="uniform"``).

    Same bytes per token-head; the decode kernel turns their codes into levels without a lookup
    (``sphkv.kernels.ada_decode``), at the price of more error per coordinate than Lloyd–Max
    levels (about 1% at 2 bits, 20% at 4; ``docs/codecs.md``). 3 bits keep Lloyd–Max levels
    (read by a register lookup at d ≥ 128; no decode without a lookup was built for 3 bits).
    At equal bytes the allocator would always prefer the Lloyd–Max rung, so the two are not
    offered side by side.
    """
    def uniform(bits: int) -> Tier:
        codec = TurboQuantCodec(d=d, bits=bits, levels="uniform")
        return Tier(f"uniform{bits}", codec, codec)

    lm = default_tiers(d)
    return TierSet((lm[0], uniform(2), lm[lm.index("turbo3")], uniform(4),
                    lm[lm.index("int8")], lm[lm.index("fp16")]))


def ada_tiers(d: int = 64) -> TierSet:
    """The ladder of :func:`default_tiers` with ADA keys at the same bytes per token-head.

    Keys use :meth:`SphericalCodec.for_rate` (per-level bits chosen for the rate, logits read
    from angle codes), values the TurboQuant-style codec; for RDR+ADA runs and comparisons.
    """
    def ada(bits: int) -> Tier:
        value = TurboQuantCodec(d=d, bits=bits)
        # the key gets the bytes a TurboQuant key of this depth would take
        return Tier(f"ada{bits}", SphericalCodec.for_rate(d, value.bits_per_coordinate), value)

    return TierSet((Tier("drop"), ada(2), ada(3), ada(4),
                    Tier("int8", Int8Codec(d=d), Int8Codec(d=d)),
                    Tier("fp16", Fp16Codec(d=d), Fp16Codec(d=d))))


def scalar_tiers(d: int = 64) -> TierSet:
    """drop → int2 → int4 → int8 → fp16 for head dimension ``d``: RDR with scalar tiers.

    int2 and int4 are KIVI-style groupwise asymmetric codes per token (an fp16 scale and zero
    per 32 channels, :class:`KiviCodec` with ``axis="token"``) for keys and values; int8 is
    :class:`Int8Codec` for both. Bytes per token-head at d = 64: 0, 48, 80, 132, 256.
    """
    def kivi(bits: int) -> Tier:
        g = math.gcd(d, 32)
        return Tier(f"int{bits}", KiviCodec(d=d, bits=bits, group_size=g, axis="token"),
                    KiviCodec(d=d, bits=bits, group_size=g, axis="token"))

    return TierSet((Tier("drop"), kivi(2), kivi(4),
                    Tier("int8", Int8Codec(d=d), Int8Codec(d=d)),
                    Tier("fp16", Fp16Codec(d=d), Fp16Codec(d=d))))


def kv_tiers(d: int = 64, pairs: tuple[tuple[int, int], ...] = KV_PAIRS,
             unbiased: bool = False) -> TierSet:
    """drop → (key codec, value codec) pairs → fp16: keys and values at their own bit depths.

    A rung ``k{a}v{b}`` stores keys at ``a`` bits and values at ``b`` (the TurboQuant-style
    codec at 1–4 bits, :class:`Int8Codec` at 8; ``k8v8`` is named ``int8``). A key error moves
    every logit of the token and is exponentiated by the softmax, a value error only adds to the
    output in proportion to the token's weight, so at d = 64 keys need more bits than values:
    whole-layer attention-output error on SmolLM2 (``docs/experiments.md``) is about the same
    for ``k3v1`` as for ``k2v2``, lower for ``k4v2`` than for ``k3v3`` and for ``k8v4`` than
    for ``k4v8``. The default pairs are those on that frontier; below ``k2v2`` (0.14 of fp16)
    ``k2v1`` (0.11) keeps a token where the symmetric ladder must drop it. Pairs share their
    codec objects, so the distortion rows compute each codec once
    (:func:`~sphkv.rdr.distortion.layer_distortion`). ``unbiased`` gives the TurboQuant-style
    codecs their unbiased norm (:class:`~sphkv.codec.TurboQuantCodec`).
    """
    codecs = {b: Int8Codec(d=d) if b == 8 else TurboQuantCodec(d=d, bits=b, unbiased=unbiased)
              for b in sorted({b for pair in pairs for b in pair})}
    rungs = [Tier("int8" if (a, b) == (8, 8) else f"k{a}v{b}", codecs[a], codecs[b])
             for a, b in pairs]
    return TierSet((Tier("drop"), *rungs, Tier("fp16", Fp16Codec(d=d), Fp16Codec(d=d))))
