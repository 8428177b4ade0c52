"""Key and value codecs: spherical (ADA) and baselines, behind one interface.

``encode(x) -> Codes``, ``decode(codes) -> x̂``, ``logits(q, codes) -> q · x̂`` (key codecs, those
with ``IS_KEY_CODEC``), ``bytes_per_vector`` (exact, side information included).
"""

from __future__ import annotations

from sphkv.codec.base import Codec, Codes, KernelKind
from sphkv.codec.fibquant import FibQuantCodec
from sphkv.codec.lloyd_max import ScalarQuantizer, lloyd_max
from sphkv.codec.polarquant import PolarQuantCodec
from sphkv.codec.rotation import RandomizedHadamard, fwht
from sphkv.codec.scalar import Fp16Codec, Int8Codec, KiviCodec, TurboQuantCodec
from sphkv.codec.spherical import HypersphericalCodec, SphericalCodec, polar_transform

__all__ = [
    "CODECS",
    "Codec",
    "Codes",
    "FibQuantCodec",
    "Fp16Codec",
    "HypersphericalCodec",
    "Int8Codec",
    "KernelKind",
    "KiviCodec",
    "PolarQuantCodec",
    "RandomizedHadamard",
    "ScalarQuantizer",
    "SphericalCodec",
    "TurboQuantCodec",
    "fwht",
    "get_codec",
    "lloyd_max",
    "polar_transform",
]

#: name -> codec class; ``get_codec(name, **params)`` builds one.
CODECS: dict[str, type[Codec]] = {
    "ada": SphericalCodec,
    "hyperspherical": HypersphericalCodec,
    "fp16": Fp16Codec,
    "int8": Int8Codec,
    "kivi": KiviCodec,
    "turbo": TurboQuantCodec,
    "polar": PolarQuantCodec,
    "fib": FibQuantCodec,
}


def get_codec(name: str, **params) -> Codec:
    """Build the codec registered as ``name`` with config ``params`` (e.g. ``d=64, bits=2``)."""
    try:
        cls = CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; available: {', '.join(CODECS)}") from None
    return cls(**params)
