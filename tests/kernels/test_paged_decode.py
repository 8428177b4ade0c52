"""The Triton paged decode against its torch reference: odd sizes, ragged lengths, NaN-poisoned
outputs (``torch.empty`` is filled with NaN while the kernel runs, so an unwritten element
fails)."""

from __future__ import annotations

import pytest
import torch

from sphkv.kernels.paged_decode import paged_decode, paged_decode_naive
from tests.kernels.common import DEVICE, assert_close


def make_case(B, Hq, Hkv, D, L, P, seed):
    """Fresh random q and a paged cache with pages scattered through the pools (and spare
    pages no sequence owns). Lengths vary per sequence, ending at ``L`` for the longest."""
    gen = torch.Generator().manual_seed(seed)
    max_pages = (L + P - 1) // P
    num_pages = B * max_pages + 3
    q = torch.randn(B, Hq, D, generator=gen).half()
    k = torch.randn(num_pages, P, Hkv, D, generator=gen).half()
    v = torch.randn(num_pages, P, Hkv, D, generator=gen).half()
    block_table = torch.randperm(num_pages, generator=gen)[:B * max_pages].view(B, max_pages)
    lengths = torch.randint(1, L + 1, (B,), generator=gen)
    lengths[0] = L
    return [t.to(DEVICE) for t in (q, k, v, block_table.int(), lengths.int())]


# id: batch, query heads, kv heads (G = Hq/Hkv), head dim, longest length, page size
CASES = [
    ("B2-H9-G3-D64-L37-P16", 2, 9, 3, 64, 37, 16),
    ("B3-H4-G4-D128-L200-P16", 3, 4, 1, 128, 200, 16),
    ("B1-H2-G1-D16-L5-P8", 1, 2, 2, 16, 5, 8),
    ("B2-H6-G6-D32-L131-P32", 2, 6, 1, 32, 131, 32),
    ("B3-H8-G2-D64-L333-P5", 3, 8, 4, 64, 333, 5),
]


@pytest.mark.parametrize("B,Hq,Hkv,D,L,P", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_reference(nan_empty, B, Hq, Hkv, D, L, P):
    q, k, v, bt, lengths = make_case(B, Hq, Hkv, D, L, P, seed=L)
    ref = paged_decode_naive(q, k, v, bt, lengths)
    out = paged_decode(q, k, v, bt, lengths, block_n=16)
    assert_close(f"B{B}-H{Hq}-Hkv{Hkv}-D{D}-L{L}-P{P}", ref, out, 2e-3)


@pytest.mark.parametrize("num_splits", [1, 3, 50], ids=["S1", "S3", "S50-more-than-blocks"])
def test_splits_agree(nan_empty, num_splits):
    # more splits than blocks leaves empty splits, which the merge must weigh 0
    q, k, v, bt, lengths = make_case(2, 6, 2, 32, 77, 16, seed=num_splits)
    ref = paged_decode_naive(q, k, v, bt, lengths)
    out = paged_decode(q, k, v, bt, lengths, block_n=16, num_splits=num_splits)
    assert_close(f"splits={num_splits}", ref, out, 2e-3)


def test_scale_and_length_one(nan_empty):
    q, k, v, bt, lengths = make_case(3, 4, 2, 64, 19, 16, seed=7)
    lengths[1] = 1
    ref = paged_decode_naive(q, k, v, bt, lengths, scale=0.3)
    out = paged_decode(q, k, v, bt, lengths, scale=0.3, block_n=32)
    assert_close("scale=0.3, a length-1 sequence", ref, out, 2e-3)


def test_rejects_bad_shapes():
    q, k, v, bt, lengths = make_case(1, 6, 4, 32, 16, 16, seed=0)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        paged_decode(q, k, v, bt, lengths)
    q, k, v, bt, lengths = make_case(1, 4, 2, 32, 16, 16, seed=0)
    with pytest.raises(ValueError, match="block_n"):
        paged_decode(q, k, v, bt, lengths, block_n=24)
