"""The Triton TurboQuant-tier decode against its torch reference (attention over the codecs'
``decode``): odd sizes, ragged lengths per (sequence, kv head), NaN-poisoned outputs."""

from __future__ import annotations

import pytest
import torch

from sphkv.kernels.quant_decode import quant_decode, quant_decode_naive
from sphkv.rdr.tiers import default_tiers
from tests.kernels.common import DEVICE, assert_close


def make_case(B, Hq, Hkv, D, L, P, tier_name, seed):
    """Fresh Gaussian keys and values encoded by the tier's codecs into a pool of pages that
    (sequence, kv head) page tables scatter through in random order."""
    tier = default_tiers(D)[default_tiers(D).index(tier_name)]
    gen = torch.Generator().manual_seed(seed)
    max_pages = (L + P - 1) // P
    num_pages = B * Hkv * max_pages + 2
    q = torch.randn(B, Hq, D, generator=gen).half()
    # keys with a per-channel offset, as real keys have; values plain Gaussian
    k = torch.randn(num_pages * P, D, generator=gen) + torch.randn(D, generator=gen)
    v = torch.randn(num_pages * P, D, generator=gen)
    key, value = tier.key.encode(k), tier.value.encode(v)
    block_table = torch.randperm(num_pages, generator=gen)[:B * Hkv * max_pages]
    lengths = torch.randint(1, L + 1, (B, Hkv), generator=gen)
    lengths[0, 0] = L
    tensors = (q, key.payload.view(num_pages, P, -1), key.side["norm"].view(num_pages, P),
               value.payload.view(num_pages, P, -1), value.side["norm"].view(num_pages, P),
               block_table.view(B, Hkv, max_pages).int(), lengths.int())
    return [t.to(DEVICE) for t in tensors], tier


# id: batch, query heads, kv heads, head dim, longest length, page size, tier
CASES = [
    ("B2-H9-G3-D64-L37-P16-turbo4", 2, 9, 3, 64, 37, 16, "turbo4"),
    ("B2-H9-G3-D64-L37-P16-turbo2", 2, 9, 3, 64, 37, 16, "turbo2"),
    ("B3-H4-G4-D128-L150-P16-turbo4", 3, 4, 1, 128, 150, 16, "turbo4"),
    ("B1-H6-G2-D128-L91-P7-turbo2", 1, 6, 3, 128, 91, 7, "turbo2"),
]


@pytest.mark.parametrize("block_n", [32, 64], ids=["N32", "N64"])
@pytest.mark.parametrize("B,Hq,Hkv,D,L,P,tier_name", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_matches_reference(nan_empty, B, Hq, Hkv, D, L, P, tier_name, block_n):
    args, tier = make_case(B, Hq, Hkv, D, L, P, tier_name, seed=L)
    ref = quant_decode_naive(*args, tier.key, tier.value)
    out = quant_decode(*args, tier.key, tier.value, block_n=block_n)
    # fp16 dot operands (R q, the codebook levels, p·‖v‖) put the error near 1e-3
    assert_close(f"B{B}-H{Hq}-Hkv{Hkv}-D{D}-L{L}-P{P}-{tier_name}", ref, out, 3e-3)


def test_splits_and_scale(nan_empty):
    args, tier = make_case(2, 4, 2, 64, 70, 16, "turbo4", seed=3)
    ref = quant_decode_naive(*args, tier.key, tier.value, scale=0.2)
    for splits in (1, 40):
        out = quant_decode(*args, tier.key, tier.value, scale=0.2, block_n=32, num_splits=splits)
        assert_close(f"splits={splits}, scale=0.2", ref, out, 3e-3)


def test_rejects_turbo3_and_small_blocks():
    args, tier = make_case(1, 2, 1, 64, 16, 16, "turbo4", seed=0)
    with pytest.raises(ValueError, match="2, 4 or 8 bits"):
        turbo3 = default_tiers(64)[default_tiers(64).index("turbo3")]
        quant_decode(*args, turbo3.key, turbo3.value)
    with pytest.raises(ValueError, match="block_n"):
        quant_decode(*args, tier.key, tier.value, block_n=16)
