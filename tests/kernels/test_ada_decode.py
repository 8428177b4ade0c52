"""The Triton mixed-tier decode against its torch reference (attention over the codecs'
``decode`` and the window): every tier of the default and ADA ladders alone and mixed, odd
sizes, ragged runs per (sequence, kv head), empty runs, left padding and several query
positions in the window, NaN-poisoned outputs."""

from __future__ import annotations

import pytest
import torch

from sphkv.kernels.ada_decode import (
    AdaDecodePlan,
    TierPages,
    Window,
    ada_decode,
    ada_decode_naive,
)
from sphkv.rdr.tiers import ada_tiers, default_tiers, fast_tiers
from tests.kernels.common import DEVICE, assert_close


def make_pages(tier, B, Hkv, D, L, P, gen, device=DEVICE):
    """Fresh Gaussian keys (with a per-channel offset) and values of ragged runs, encoded by the
    tier's codecs into a pool whose pages the (sequence, kv head) tables scatter in random
    order; some runs may be empty."""
    max_pages = (L + P - 1) // P
    num_pages = B * Hkv * max_pages + 1
    k = torch.randn(num_pages * P, D, generator=gen) + torch.randn(D, generator=gen)
    v = torch.randn(num_pages * P, D, generator=gen)
    key, value = tier.key.encode(k), tier.value.encode(v)
    table = torch.randperm(num_pages, generator=gen)[:B * Hkv * max_pages].view(B, Hkv, -1)
    lengths = torch.randint(0, L + 1, (B, Hkv), generator=gen)
    lengths[0, 0] = L

    return TierPages(tier.key, tier.value, key.to(device), value.to(device),
                     table.int().to(device), lengths.int().to(device), P)


def make_window(B, Hkv, D, W, gen, device=DEVICE):
    keys = (torch.randn(B, Hkv, W, D, generator=gen) + torch.randn(D, generator=gen)).half()
    values = torch.randn(B, Hkv, W, D, generator=gen).half()
    first = torch.randint(-3, W // 2 + 1, (B,), generator=gen)
    first[0] = 0
    return Window(keys.to(device), values.to(device), first.to(device))


def run(B, Hq, Hkv, D, L, P, names, W, M, seed, ladder=default_tiers, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    tiers = ladder(D)
    pages = [make_pages(tiers[tiers.index(n)], B, Hkv, D, L, P, gen) for n in names]
    window = make_window(B, Hkv, D, W, gen) if W else None
    q = torch.randn(B, Hq, M, D, generator=gen).half().to(DEVICE)
    ref = ada_decode_naive(q, pages, window, scale=kwargs.get("scale"))
    out = ada_decode(q, pages, window, **kwargs)
    return ref, out


# id: batch, query heads, kv heads, head dim, longest run, page size, tiers, window, positions
CASES = [
    ("B2-H9-G3-D64-L37-P16-turbo3-W5", 2, 9, 3, 64, 37, 16, ("turbo3",), 5, 1),
    ("B2-H4-G2-D64-L40-P7-int8-W0", 2, 4, 2, 64, 40, 7, ("int8",), 0, 1),
    ("B1-H6-G3-D128-L45-P16-fp16-W9", 1, 6, 2, 128, 45, 16, ("fp16",), 9, 1),
    ("B3-H8-G4-D64-L70-P5-mixed-W17", 3, 8, 2, 64, 70, 5,
     ("turbo2", "turbo3", "turbo4", "int8", "fp16"), 17, 1),
    ("B2-H4-G4-D128-L33-P8-mixed-W6-M3", 2, 4, 1, 128, 33, 8, ("turbo4", "int8"), 6, 3),
    ("B2-H8-G4-D128-L77-P16-turbo234-W5", 2, 8, 2, 128, 77, 16, ("turbo3", "turbo2", "turbo4"),
     5, 1),
]


@pytest.mark.parametrize("B,Hq,Hkv,D,L,P,names,W,M", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_matches_reference(nan_empty, B, Hq, Hkv, D, L, P, names, W, M):
    ref, out = run(B, Hq, Hkv, D, L, P, names, W, M, seed=L + W)
    # fp16 dot operands (R q, the decoded tiles, p·scale) put the error near 1e-3
    assert_close(f"B{B}-H{Hq}-Hkv{Hkv}-D{D}-L{L}-P{P}-{'+'.join(names)}-W{W}-M{M}", ref, out,
                 3e-3)


@pytest.mark.parametrize("D", [16, 32, 64, 128, 256], ids=["D16", "D32", "D64", "D128", "D256"])
def test_ada_keys(nan_empty, D):
    """ADA keys (radius + per-level angle codes, rotated) beside TurboQuant values, mixed with
    int8 pages and the window: per coordinate below D = 64, in half (D = 64) and quarter
    field tiles above."""
    ref, out = run(2, 6, 2, D, 29, 16, ("ada2", "ada4", "int8"), 4, 1, seed=D,
                   ladder=ada_tiers)
    assert_close(f"ada2+ada4+int8-D{D}", ref, out, 3e-3)


@pytest.mark.parametrize("D", [64, 128], ids=["D64", "D128"])
def test_fast_ladder(nan_empty, D):
    """Evenly spaced 2- and 4-bit levels (on a GPU decoded without a lookup, their step applied
    per row) mixed with Lloyd–Max 3 bits, int8 and the window."""
    ref, out = run(2, 8, 2, D, 41, 8, ("uniform2", "turbo3", "uniform4", "int8"), 5, 1,
                   seed=D + 1, ladder=fast_tiers)
    assert_close(f"uniform2+turbo3+uniform4+int8-D{D}", ref, out, 3e-3)


@pytest.mark.parametrize("D", [16, 64], ids=["D16", "D64"])
def test_turbo_every_bit_depth(nan_empty, D):
    """TurboQuant pages of every packing group: 1 and 8 bits (whole bytes), 5, 6 and 7 bits
    (8, 4 and 8 codes in 5, 3 and 7 bytes), mixed in one call."""
    from sphkv.codec import TurboQuantCodec
    from sphkv.rdr.tiers import Tier, TierSet

    def ladder(d):
        return TierSet([Tier("drop")] + [Tier(f"t{b}", TurboQuantCodec(d=d, bits=b),
                                              TurboQuantCodec(d=d, bits=b))
                                         for b in (1, 5, 6, 7, 8)])

    ref, out = run(2, 4, 2, D, 21, 5, ("t1", "t5", "t6", "t7", "t8"), 3, 1, seed=D,
                   ladder=ladder)
    assert_close(f"turbo 1/5/6/7/8 bits, D{D}", ref, out, 3e-3)


def test_window_only_splits_and_scale(nan_empty):
    ref, out = run(2, 4, 2, 64, 1, 16, (), 70, 2, seed=5, scale=0.2, block_n=32, num_splits=3)
    assert_close("window only, 3 splits, scale=0.2", ref, out, 3e-3)


def test_refusals():
    gen = torch.Generator().manual_seed(0)
    tiers = default_tiers(64)
    pages = [make_pages(tiers[tiers.index("turbo2")], 1, 1, 64, 16, 16, gen)]
    q = torch.randn(1, 3, 1, 64).half().to(DEVICE)
    with pytest.raises(ValueError, match="block_n"):
        ada_decode(q, pages, None, block_n=16)
    with pytest.raises(ValueError, match="num_warps"):
        ada_decode(q, pages, None, block_n=32, num_warps=8)
    with pytest.raises(ValueError, match="at most"):
        ada_decode(torch.randn(1, 2, 65, 64).to(DEVICE), pages, None)
    with pytest.raises(ValueError, match="first must be"):
        pages[0].first = torch.zeros(1, 2, 2, dtype=torch.int32, device=DEVICE)
        ada_decode(q, pages, None)
    with pytest.raises(ValueError, match="nothing to attend"):
        ada_decode(q, [], None)
    # window rows 20 elements apart: not on 16-byte boundaries
    keys = torch.randn(1, 1, 4, 84).half().to(DEVICE)[..., :64]
    window = Window(keys, keys, torch.zeros(1, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="16-byte boundaries"):
        ada_decode(q, [], window)


# id: batch, query heads, kv heads, head dim, longest run, page size, window, positions, block
BOUND_CASES = [
    ("B2-H9-G3-D64-L75-P8-W21-M1-N32", 2, 9, 3, 64, 75, 8, 21, 1, 32),
    ("B3-H4-G2-D64-L70-P5-W13-M3-N32", 3, 4, 2, 64, 70, 5, 13, 3, 32),
    ("B1-H6-G3-D128-L99-P16-W0-M2-N64", 1, 6, 3, 128, 99, 16, 0, 2, 64),
]


@pytest.mark.parametrize("B,Hq,Hkv,D,L,P,W,M,block_n", [c[1:] for c in BOUND_CASES],
                         ids=[c[0] for c in BOUND_CASES])
def test_visibility_bounds(nan_empty, B, Hq, Hkv, D, L, P, W, M, block_n):
    """Sliding-window lower bounds: per-row ``first`` on the runs of two tiers (``[B, Hkv, M]``
    and ``[B, Hkv]``) and on the window (``[B, M]``), hiding whole blocks and splits, and
    everything for some rows (those return 0)."""
    gen = torch.Generator().manual_seed(L + W + M)
    tiers = default_tiers(D)
    pages = [make_pages(tiers[tiers.index(n)], B, Hkv, D, L, P, gen)
             for n in ("turbo3", "int8")]
    pages[0].first = torch.randint(-2, L + 3, (B, Hkv, M), generator=gen).int().to(DEVICE)
    pages[0].first[0, 0, 0] = L - 3  # only the last tokens, past several hidden blocks
    pages[1].first = torch.randint(0, L // 2, (B, Hkv), generator=gen).int().to(DEVICE)
    pages[1].first[-1, -1] = L + 1  # hides the whole run
    window = None
    if W:
        window = make_window(B, Hkv, D, W, gen)
        window.first = torch.randint(-1, W + 1, (B, M), generator=gen).to(DEVICE)
        window.first[-1] = W  # the last sequence's rows see nothing in the window …
        pages[0].first[-1] = L  # … nor in either tier: its output is 0
        pages[1].first[-1] = L
    elif B == 1:
        pages[0].first[0, -1, -1] = L  # the last row of the last kv head sees nothing
        pages[1].first[0, -1] = L
    q = torch.randn(B, Hq, M, D, generator=gen).half().to(DEVICE)
    ref = ada_decode_naive(q, pages, window)
    out = ada_decode(q, pages, window, block_n=block_n, num_splits=3)
    if W:
        assert out[-1].abs().max() == 0 and ref[-1].abs().max() == 0
    else:
        assert out[0, -1, -1].abs().max() == 0 and ref[0, -1, -1].abs().max() == 0
    assert_close(f"bounds B{B}-H{Hq}-Hkv{Hkv}-D{D}-L{L}-P{P}-W{W}-M{M}", ref, out, 3e-3)


def test_window_bound_per_batch_equals_per_row(nan_empty):
    """A ``[B]`` window bound means the same bound for every query position."""
    gen = torch.Generator().manual_seed(7)
    window = make_window(2, 2, 64, 40, gen)
    q = torch.randn(2, 4, 3, 64, generator=gen).half().to(DEVICE)
    rows = Window(window.keys, window.values, window.first[:, None].expand(2, 3).contiguous())
    assert_close("[B] vs [B, M] window bound", ada_decode(q, [], window),
                 ada_decode(q, [], rows), 1e-6)


def test_plan_reused(nan_empty):
    """A plan made once serves later calls with a new q and runs that grew in place."""
    gen = torch.Generator().manual_seed(11)
    tiers = default_tiers(64)
    pages = [make_pages(tiers[tiers.index(n)], 2, 2, 64, 40, 8, gen) for n in ("turbo4", "fp16")]
    window = make_window(2, 2, 64, 7, gen)
    plan = AdaDecodePlan(pages, window, 6, 1, 64, device=torch.device(DEVICE), block_n=32)
    for step in range(2):
        q = torch.randn(2, 6, 1, 64, generator=gen).half().to(DEVICE)
        assert_close(f"plan, step {step}", ada_decode_naive(q, pages, window),
                     ada_decode(q, pages, window, plan=plan), 3e-3)
        pages[0].lengths.clamp_(max=39).add_(1)  # every run one token longer, at most 40
    with pytest.raises(ValueError, match="plan was made"):
        plan.run(torch.randn(2, 6, 2, 64).half().to(DEVICE))


def test_plan_follows_new_bounds_and_window_length(nan_empty):
    """One plan over a window buffer of fixed capacity serves decode steps whose window grows
    and whose sliding bounds move: set_bounds writes them in place."""
    gen = torch.Generator().manual_seed(12)
    tiers = default_tiers(64)
    pages = [make_pages(tiers[tiers.index(n)], 2, 2, 64, 45, 8, gen) for n in ("turbo3", "int8")]
    pages[0].first = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    buffer = make_window(2, 2, 64, 24, gen)
    window = Window(buffer.keys, buffer.values, buffer.first, length=5)
    plan = AdaDecodePlan(pages, window, 6, 1, 64, device=torch.device(DEVICE), block_n=32)
    for step, length in enumerate((5, 6, 13, 24)):
        window.length, window.first = length, torch.tensor([0, step], device=DEVICE)
        pages[0].first = torch.tensor([[step, 3 * step], [0, 40]], dtype=torch.int32,
                                      device=DEVICE)
        plan.set_bounds([pages[0].first, None], window.first, length)
        q = torch.randn(2, 6, 1, 64, generator=gen).half().to(DEVICE)
        assert_close(f"plan over a window of {length} of 24", ada_decode_naive(q, pages, window),
                     plan.run(q), 3e-3)
    with pytest.raises(ValueError, match="capacity"):
        plan.set_bounds(window_length=25)
    with pytest.raises(ValueError, match="without bounds"):
        plan.set_bounds([None, torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)])
