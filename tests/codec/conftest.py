"""Codec cases shared by the codec tests: every registered codec, several configs and sizes."""

from __future__ import annotations

import pytest

from sphkv.codec import CODECS, get_codec

# (id, registry name, params); ids read like "ada-D64-b4.2.2"
CASES = [
    ("ada-D64-default", "ada", dict(d=64)),
    ("ada-D128-b3.1.1.0", "ada", dict(d=128, bits=(3, 1, 1, 0, 0, 0, 0))),
    ("ada-D256-b5", "ada", dict(d=256, bits=(5,) * 8)),
    ("ada-D64-norot", "ada", dict(d=64, bits=(4, 3, 2, 2, 2, 2), rotate=False)),
    ("hyper-D64-b4", "hyperspherical", dict(d=64, bits=4)),
    ("hyper-D128-b2", "hyperspherical", dict(d=128, bits=2)),
    ("fp16-D64", "fp16", dict(d=64)),
    ("fp16-D256", "fp16", dict(d=256)),
    ("int8-D128", "int8", dict(d=128)),
    ("kivi-D64-b2-channel", "kivi", dict(d=64, bits=2)),
    ("kivi-D128-b4-token", "kivi", dict(d=128, bits=4, axis="token")),
    ("kivi-D64-b3-token-G16", "kivi", dict(d=64, bits=3, axis="token", group_size=16)),
    ("turbo-D64-b2", "turbo", dict(d=64, bits=2)),
    ("turbo-D128-b4", "turbo", dict(d=128, bits=4)),
    ("turbo-D64-b4-uniform", "turbo", dict(d=64, bits=4, levels="uniform")),
    ("turbo-D64-b1-unbiased", "turbo", dict(d=64, bits=1, unbiased=True)),
    ("turbo-D128-b2-unbiased", "turbo", dict(d=128, bits=2, unbiased=True)),
    ("polar-D64-r4a4", "polar", dict(d=64)),
    ("polar-D128-r2a3-adjacent", "polar", dict(d=128, radius_bits=2, angle_bits=3,
                                               pairing="adjacent")),
    ("fib-D64-k4", "fib", dict(d=64)),
    ("fib-D128-k2", "fib", dict(d=128, block=2, direction_bits=5, radius_bits=1)),
]


def test_every_registered_codec_has_a_case():
    assert {name for _, name, _ in CASES} == set(CODECS)


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def codec(request):
    _, name, params = request.param
    return get_codec(name, **params)
