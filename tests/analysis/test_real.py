"""Codecs on real SmolLM2 keys, values and queries (one model load per session)."""

from __future__ import annotations

import math

import pytest
import torch

from sphkv.analysis import logit_bound
from sphkv.analysis.distortion import attention_error, key_codecs, logit_errors
from sphkv.codec import SphericalCodec, TurboQuantCodec

pytestmark = pytest.mark.slow


def test_trace_shapes(smollm2_trace):
    t = smollm2_trace
    assert t.keys.shape == (30, 3, 256, 64) and t.values.shape == t.keys.shape
    assert t.queries.shape == (30, 9, 256, 64) and t.group == 3
    assert torch.isfinite(t.keys).all() and torch.isfinite(t.queries).all()


def test_real_keys_within_bounds_and_logits_from_codes(smollm2_trace):
    keys = smollm2_trace.keys[::5]  # [6, 3, 256, 64]
    queries = smollm2_trace.queries[::5, :, -16:].reshape(6, 3, 48, 64)
    for _, codec in key_codecs(64):
        stats = logit_errors(codec, keys, queries)
        bound = logit_bound(codec)
        assert not math.isfinite(bound) or stats.max <= bound, repr(codec)
    codec = SphericalCodec.for_rate(64, 3.0)
    codes = codec.encode(keys)
    torch.testing.assert_close(codec.logits(queries, codes),
                               queries @ codec.decode(codes).mT, rtol=1e-4, atol=1e-3)


def test_attention_error_falls_with_bits(smollm2_trace):
    t = smollm2_trace
    errs = [attention_error(SphericalCodec.for_rate(64, b + 0.25), TurboQuantCodec(d=64, bits=b),
                            t.keys[10], t.values[10], t.queries[10, :, -32:])
            for b in (2, 3, 4)]
    assert errs[0] > errs[1] > errs[2] > 0
