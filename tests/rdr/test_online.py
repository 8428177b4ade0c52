"""The online allocator without transformers: tensors in, store contents out.

Invariants: the store never holds more than the budget after any pool write; admission and
demotion never raise a kept token's tier; pinned (forced) tokens keep theirs; every kept token is
in exactly one slot; eviction removes exactly the tokens below the bound.
"""

import sys

import numpy as np
import pytest
import torch

from sphkv.rdr.distortion import PAGE_TABLE_ENTRY
from sphkv.rdr.methods import METHODS
from sphkv.rdr.online import OnlineAllocator, Tokens
from sphkv.rdr.problem import InfeasibleBudgetError
from sphkv.rdr.tiers import default_tiers

D, P, GROUPS = 16, 4, 3


@pytest.fixture(scope="module")
def tiers():
    return default_tiers(D)


def _tokens(tiers, group, positions, seed=0, forced=None):
    gen = torch.Generator().manual_seed(seed)
    n = len(group)
    rng = np.random.default_rng(seed)
    # distortion falls with the tier's bytes, differently per item; drop is dearest
    base = rng.uniform(0.1, 10.0, size=(n, 1))
    d = base / (1.0 + np.arange(len(tiers)))[None, :] ** 2
    d[:, -1] = 0.0
    return Tokens(np.asarray(group), torch.as_tensor(positions), torch.randn(n, D, generator=gen),
                  torch.randn(n, D, generator=gen), d, forced)


def _tiers_of(alloc):
    """``{(group, position): tier}`` of everything kept."""
    out = {}
    for t in alloc.store.pools:
        g, pos, *_ = alloc.store.contents(t)
        for gi, p in zip(g.tolist(), pos.tolist(), strict=True):
            assert (gi, p) not in out, "a token sits in two slots"
            out[gi, p] = t
    return out


def _chunk(tiers, start, n, seed, sinks=()):
    group = np.repeat(np.arange(GROUPS), n)
    pos = np.tile(np.arange(start, start + n), GROUPS)
    forced = np.where(np.isin(pos, sinks), len(tiers) - 1, -1)
    return _tokens(tiers, group, pos, seed, forced)


def test_runs_without_transformers():
    import subprocess

    code = ("import sys, sphkv.rdr.online; "
            "assert 'transformers' not in sys.modules, 'sphkv.rdr.online imports transformers'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_budget_held_after_every_write_and_tiers_never_rise(tiers):
    fp16 = tiers.costs[-1] + 2
    budget = 0.35 * GROUPS * 200 * fp16
    alloc = OnlineAllocator(tiers, GROUPS, budget, page_size=P, decay=0.8)
    alloc.prefill(_chunk(tiers, 0, 80, seed=0, sinks=(0, 1)))
    before = _tiers_of(alloc)
    demotions = 0
    for step in range(12):
        alloc.admit(_chunk(tiers, 80 + 10 * step, 10, seed=step + 1))
        after = _tiers_of(alloc)
        for key, t in after.items():
            if key in before:
                assert t <= before[key], f"token {key} rose from tier {before[key]} to {t}"
                demotions += t < before[key]
        # dropped tokens never come back
        assert set(after) - set(before) <= {(g, p) for g in range(GROUPS)
                                            for p in range(80 + 10 * step, 90 + 10 * step)}
        before = after
    assert alloc.writes and max(alloc.writes) <= budget
    assert alloc.store.nbytes() == alloc.store.held_bytes()
    assert demotions > 0, "the budget never bound: the test does not exercise demotion"
    # the sinks kept the dearest tier throughout
    for g in range(GROUPS):
        assert before[g, 0] == before[g, 1] == len(tiers) - 1


def test_admission_that_fits_uses_the_price_and_decays_it(tiers):
    alloc = OnlineAllocator(tiers, GROUPS, 1e9, page_size=P, decay=0.5)
    alloc.prefill(_chunk(tiers, 0, 16, seed=0))
    assert alloc.price == 0.0
    assert set(_tiers_of(alloc).values()) == {len(tiers) - 1}  # everything fits at fp16
    alloc.price = 1.0
    chunk = _chunk(tiers, 16, 8, seed=3)
    alloc.admit(chunk)
    expected = np.argmin(chunk.distortion + 1.0 * alloc.item_costs, axis=1)
    kept = _tiers_of(alloc)
    got = [kept.get((g, p), 0) for g, p in zip(chunk.group, chunk.positions.tolist(),
                                               strict=True)]
    assert got == expected.tolist()
    assert alloc.price == 0.5


def test_evict_removes_exactly_what_falls_below_the_bound(tiers):
    alloc = OnlineAllocator(tiers, GROUPS, 1e9, page_size=P)
    alloc.prefill(_chunk(tiers, 0, 20, seed=0))
    first = np.array([0, 7, 20])
    removed = alloc.evict(first)
    assert removed == 7 + 20
    kept = _tiers_of(alloc)
    assert {p for g, p in kept if g == 0} == set(range(20))
    assert {p for g, p in kept if g == 1} == set(range(7, 20))
    assert not any(g == 2 for g, _ in kept)
    assert alloc.writes[-1] <= alloc.writes[0]


def test_budget_below_the_forced_items_is_refused(tiers):
    alloc = OnlineAllocator(tiers, GROUPS, 100.0, page_size=P)
    with pytest.raises(InfeasibleBudgetError, match="at least"):
        alloc.prefill(_chunk(tiers, 0, 8, seed=0, sinks=(0, 1, 2, 3)))


def test_no_drop_method_keeps_every_token_when_it_can(tiers):
    method = METHODS["turboquant"]
    ladder = method.tier_set(D, P)
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 24, D, generator=gen), torch.randn(2, 24, D, generator=gen)
    q = torch.randn(4, 8, D, generator=gen)
    d = method.distortion(k, v, q, ladder)
    assert (d[..., 0] >= d[..., 1:].max() * 1e5).all()
    tokens = Tokens(np.repeat([0, 1], 24), torch.arange(24).repeat(2), k.reshape(-1, D),
                    v.reshape(-1, D), d.reshape(-1, len(ladder)))
    cheapest = ladder.costs[1] + 2
    alloc = OnlineAllocator(ladder, 2, 1.3 * 48 * cheapest + 100, page_size=P)
    alloc.prefill(tokens)
    assert len(_tiers_of(alloc)) == 48


def test_tokens_validate_their_rows(tiers):
    with pytest.raises(ValueError, match="rows"):
        Tokens(np.zeros(3, np.int64), torch.arange(2), torch.zeros(3, D), torch.zeros(3, D),
               np.zeros((3, len(tiers))))
    with pytest.raises(ValueError, match="decay"):
        OnlineAllocator(tiers, 1, 1e6, decay=0.0)


def test_overflowing_admission_demotes_the_cheapest_items(tiers):
    # group 0's kept tokens lose almost nothing by demotion, group 1's a lot: the room for the
    # new tokens comes from group 0 only
    fp16 = tiers.costs[-1] + 2
    n = 64
    group = np.repeat([0, 1], n)
    pos = np.tile(np.arange(n), 2)
    d = np.zeros((2 * n, len(tiers)))
    d[:n] = 1e-6 * (len(tiers) - 1 - np.arange(len(tiers)))  # cheap to demote
    d[n:] = 1e3 * (len(tiers) - 1 - np.arange(len(tiers)))  # dear to demote
    gen = torch.Generator().manual_seed(0)
    prefill = Tokens(group, torch.as_tensor(pos), torch.randn(2 * n, D, generator=gen),
                     torch.randn(2 * n, D, generator=gen), d)
    page = PAGE_TABLE_ENTRY.itemsize + P * fp16
    alloc = OnlineAllocator(tiers, GROUPS, 2 * (n // P) * page, page_size=P)
    alloc.prefill(prefill)
    assert set(_tiers_of(alloc).values()) == {len(tiers) - 1}  # everything at fp16, just fits
    new = Tokens(np.full(8, 2), torch.arange(8), torch.randn(8, D, generator=gen),
                 torch.randn(8, D, generator=gen), 1e3 * d[n:n + 8])
    alloc.admit(new)
    kept = _tiers_of(alloc)
    assert all(kept[1, p] == len(tiers) - 1 for p in range(n)), "a dear token was demoted"
    assert any(kept.get((0, p), 0) < len(tiers) - 1 for p in range(n))
    assert all((2, p) in kept for p in range(8))
    assert max(alloc.writes) <= alloc.budget
