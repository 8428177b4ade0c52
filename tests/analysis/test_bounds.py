"""Analytic bounds hold against adversarial keys; predictions match measurement."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sphkv.analysis import logit_bound, predicted_logit_rms, predicted_mse
from sphkv.analysis.distortion import logit_errors
from sphkv.codec import get_codec

# key codecs with a finite worst-case bound, at several bit depths
BOUNDED = [
    ("ada", dict(d=64, bits=(2, 1, 1, 1, 1, 1))),
    ("ada", dict(d=64, bits=(8, 8, 8, 8, 8, 8))),
    ("ada", dict(d=128, bits=(6, 5, 5, 5, 5, 5, 5))),
    ("ada", dict(d=64, bits=(5, 4, 4, 4, 4, 4), rotate=False)),
    ("hyperspherical", dict(d=64, bits=8)),
    ("fp16", dict(d=64)),
    ("int8", dict(d=64)),
    ("int8", dict(d=128)),
    ("kivi", dict(d=64, bits=4, axis="token")),
    ("kivi", dict(d=64, bits=8, axis="token", group_size=8)),
    ("turbo", dict(d=64, bits=3)),
    ("polar", dict(d=64)),
    ("polar", dict(d=64, radius_bits=8, angle_bits=8)),
    ("polar", dict(d=64, radius_bits=0, angle_bits=2)),
]
CODECS = {f"{n}-{i}": get_codec(n, **p) for i, (n, p) in enumerate(BOUNDED)}


@st.composite
def adversarial_keys(draw, d: int):
    """[16, d] keys of norm 1e-2 … 1e3 with structure that breaks isotropy: spikes, sparse
    vectors, outlier channels, constant vectors, near-duplicates of a rotation's preimage."""
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["gauss", "spike", "sparse", "outlier", "const", "signs"]))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, d, generator=gen)
    if kind == "spike":
        x = torch.eye(d)[torch.randint(0, d, (16,), generator=gen)] + 1e-3 * x
    elif kind == "sparse":
        x = x * (torch.rand(16, d, generator=gen) < 0.05)
        x[:, 0] += 1.0
    elif kind == "outlier":
        x[:, torch.randint(0, d, (3,), generator=gen)] *= 50
    elif kind == "const":
        x = torch.ones(16, d) + 1e-4 * x
    elif kind == "signs":
        x = torch.sign(x)
    scale = draw(st.floats(1e-2, 1e3))
    return x / x.norm(dim=-1, keepdim=True) * scale


@pytest.mark.parametrize("name", list(CODECS))
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_empirical_worst_case_never_exceeds_bound(name, data):
    codec = CODECS[name]
    keys = data.draw(adversarial_keys(codec.d))
    queries = torch.randn(8, codec.d)
    stats = logit_errors(codec, keys, queries)
    bound = logit_bound(codec)
    assert math.isfinite(bound)
    assert stats.max <= bound, f"{name}: measured {stats.max:.4g} > bound {bound:.4g}"
    assert stats.mean <= stats.max + 1e-6


@pytest.mark.parametrize("name", ["ada", "turbo", "hyperspherical"])
def test_rotated_codecs_have_no_useful_worst_case_at_low_bits(name):
    # an adversary's key x = Rᵀ e_1 is a spike after rotation; bounds >= 1 say so
    assert logit_bound(get_codec(name, d=64, bits=(3, 1, 0, 0, 0, 0) if name == "ada" else 2)
                       ) >= 1


@pytest.mark.parametrize(("name", "params"), [
    ("ada", dict(d=64, bits=(3, 2, 2, 2, 2, 2))),
    ("ada", dict(d=128, bits=(4, 2, 2, 1, 1, 1, 2))),
    ("hyperspherical", dict(d=64, bits=3)),
    ("turbo", dict(d=128, bits=2)),
    ("polar", dict(d=64, radius_bits=3, angle_bits=4)),
    ("fib", dict(d=64, block=4, direction_bits=6, radius_bits=2)),
    ("kivi", dict(d=64, bits=3, axis="token")),
    ("int8", dict(d=64)),
])
def test_predicted_rms_matches_random_keys(name, params):
    codec = get_codec(name, **params)
    gen = torch.Generator().manual_seed(0)
    stats = logit_errors(codec, torch.randn(2048, codec.d, generator=gen),
                         torch.randn(128, codec.d, generator=gen))
    assert stats.rms == pytest.approx(predicted_logit_rms(codec), rel=0.15)
    assert predicted_mse(codec) > 0
