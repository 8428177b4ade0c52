"""Bit packing round trips; the randomized Hadamard rotation is orthogonal."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sphkv.codec import RandomizedHadamard, fwht
from sphkv.codec.packing import _pack_bits, _unpack_bits, pack, packed_bytes, unpack


@given(layout=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 16)), min_size=1,
                       max_size=5),
       n=st.integers(1, 7), seed=st.integers(0, 2**16))
@settings(max_examples=50, deadline=None)
def test_pack_unpack_round_trip(layout, n, seed):
    gen = torch.Generator().manual_seed(seed)
    fields = [torch.randint(0, 2**b, (n, m), generator=gen) for m, b in layout]
    payload = pack(fields, [b for _, b in layout])
    assert payload.dtype == torch.uint8
    assert payload.shape == (n, packed_bytes(layout))
    for got, want in zip(unpack(payload, layout), fields, strict=True):
        assert torch.equal(got, want)


@given(layout=st.lists(st.tuples(st.integers(1, 12), st.sampled_from([0, 1, 2, 4, 8])),
                       min_size=1, max_size=4),
       n=st.integers(1, 5), seed=st.integers(0, 2**16))
@settings(max_examples=50, deadline=None)
def test_byte_aligned_layouts_pack_as_the_bit_stream(layout, n, seed):
    # whole bytes per field: packed by shifts within bytes, the same bytes as the bit stream
    layout = [(8 * m, b) for m, b in layout]
    gen = torch.Generator().manual_seed(seed)
    fields = [torch.randint(0, 2**b, (n, m), generator=gen) for m, b in layout]
    bits = [b for _, b in layout]
    payload = pack(fields, bits)
    assert torch.equal(payload, _pack_bits(fields, bits))
    for got, want in zip(unpack(payload, layout), _unpack_bits(payload, layout), strict=True):
        assert torch.equal(got, want)


def test_packing_is_dense():
    # 64 two-bit codes take 16 bytes
    assert pack([torch.full((1, 64), 3)], [2]).shape == (1, 16)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_rotation_preserves_dot_products(d):
    rot = RandomizedHadamard(d, seed=7)
    q, k = torch.randn(5, d, dtype=torch.float64), torch.randn(9, d, dtype=torch.float64)
    rot.signs = rot.signs.double()
    torch.testing.assert_close(rot.forward(q) @ rot.forward(k).T, q @ k.T)
    torch.testing.assert_close(rot.inverse(rot.forward(k)), k)


def test_fwht_matches_hadamard_matrix():
    from scipy.linalg import hadamard

    x = torch.randn(3, 32, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ torch.as_tensor(hadamard(32), dtype=torch.float64))


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.zeros(48))


def test_rotation_spreads_a_spike():
    rot = RandomizedHadamard(64, seed=0)
    y = rot.forward(torch.eye(64)[0])
    torch.testing.assert_close(y.abs(), torch.full((64,), 1 / math.sqrt(64)))
