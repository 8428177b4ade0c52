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


@pytest.mark.parametrize("ordered", [True, False])
def test_budget_held_after_every_write_and_tiers_never_rise(tiers, ordered):
    fp16 = tiers.costs[-1] + 2
    budget = 0.35 * GROUPS * 200 * fp16
    alloc = OnlineAllocator(tiers, GROUPS, budget, page_size=P, decay=0.8, ordered=ordered)
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
    assert alloc.demotion_solves == 0


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


def test_a_sensitive_method_takes_head_weights_and_no_other_does():
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 12, D, generator=gen), torch.randn(2, 12, D, generator=gen)
    q = torch.randn(4, 4, D, generator=gen)
    sensitive, plain = METHODS["rdr-kv-fisher"], METHODS["rdr-kv"]
    with pytest.raises(ValueError, match="weighs heads by their sensitivity"):
        sensitive.distortion(k, v, q, sensitive.tier_set(D, P))
    with pytest.raises(ValueError, match="head_weights must be None"):
        plain.distortion(k, v, q, plain.tier_set(D, P), head_weights=torch.ones(4))
    assert sensitive.distortion(k, v, q, sensitive.tier_set(D, P),
                                head_weights=torch.ones(4)).shape == (2, 12, 10)


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
    assert alloc.demotion_solves == 1


def _paged_ladder(tiers):
    """drop, turbo2, turbo3, KIVI with per-channel keys (one page each), fp16."""
    from sphkv.codec import KiviCodec
    from sphkv.rdr import Tier, TierSet

    kivi = Tier("kc4", KiviCodec(d=D, bits=4, group_size=P, axis="channel"),
                KiviCodec(d=D, bits=4, group_size=D, axis="token"))
    return TierSet((tiers[0], tiers[1], tiers[2], kivi, tiers[len(tiers) - 1]))


def _state(alloc):
    """``{(group, position): (tier, key codes, value codes)}`` of everything kept, codes as
    byte strings; checks the store's layout and bookkeeping on the way: runs dense (and sorted
    where the store keeps them ordered), page ids each listed once, counts, positions, validity
    and accounted bytes exact."""
    store, out = alloc.store, {}
    groups = list(range(len(store.tables)))
    for t, pool in store.pools.items():
        runs = store.runs(t, groups, positions=True)  # raises on a partial page before the last
        for g in groups:
            pos = runs.positions[g, :runs.lengths[g]]
            if store.ordered[g]:
                assert (pos[1:] > pos[:-1]).all(), f"run ({g}, {t}) is not sorted"
            else:
                assert len(pos.unique()) == len(pos), f"run ({g}, {t}) repeats a position"
        assert (runs.lengths == store.counts[:, t]).all()
        ids = np.sort(np.concatenate([tb["page_id"][tb["tier"] == t] for tb in store.tables]))
        assert ids.tolist() == list(range(pool.pages))
        for g in groups:
            table = store.tables[g]
            assert (pool.owner[table["page_id"][table["tier"] == t]] == g).all()
        slots, valid, positions = store.gather(t, groups)
        on = slots[valid]
        assert int(pool.valid.sum()) == len(on) and pool.valid[on].all()
        if not len(on):
            continue
        assert torch.equal(pool.position[on], positions[valid])
        key, value = store.codes(t, on)
        rows = [torch.cat([c.payload.reshape(len(on), -1).view(torch.uint8)]
                          + [v.reshape(len(on), -1).contiguous().view(torch.uint8)
                             for v in c.side.values()], 1) for c in (key, value)]
        group = np.repeat(groups, valid.sum(1).numpy())
        for i, (g, p) in enumerate(zip(group.tolist(), positions[valid].tolist(), strict=True)):
            assert (g, p) not in out, "a token sits in two slots"
            out[g, p] = (t, bytes(rows[0][i].tolist()), bytes(rows[1][i].tolist()),
                         bool(pool.pinned[on[i]]))
    assert store.nbytes() == store.held_bytes()
    assert max(alloc.writes) <= alloc.budget
    return out


def _encoded(tiers, t_from, t_to, codes):
    """The codes an item at ``t_from`` takes at ``t_to``: its decoded vectors encoded again."""
    from sphkv.codec import Codes

    out = []
    for which, raw in (("key", codes[1]), ("value", codes[2])):
        src, dst = getattr(tiers[t_from], which), getattr(tiers[t_to], which)
        template = src.encode(torch.zeros(1, D))
        sizes = [template.payload[0].numel() * template.payload.element_size()]
        sizes += [v[0].numel() * v.element_size() for v in template.side.values()]
        data = torch.tensor(list(raw), dtype=torch.uint8)
        parts = torch.split(data, sizes)
        c = Codes(parts[0].view(template.payload.dtype).reshape(template.payload.shape),
                  {k: p.view(v.dtype).reshape(v.shape)
                   for (k, v), p in zip(template.side.items(), parts[1:], strict=True)},
                  template.shape)
        enc = dst.encode(src.decode(c))
        rows = [enc.payload.reshape(1, -1).view(torch.uint8)]
        rows += [v.reshape(1, -1).contiguous().view(torch.uint8) for v in enc.side.values()]
        out.append(bytes(torch.cat(rows, 1)[0].tolist()))
    return tuple(out)


@pytest.mark.parametrize("ordered", [True, False, "mixed"])
@pytest.mark.parametrize("ladder", ["default", "paged-keys"])
def test_admissions_and_evictions_keep_every_invariant(tiers, ladder, ordered):
    """Against the previous state after every step: each kept item in one slot of a dense,
    sorted run; bookkeeping exact; no write passes max(before, after); tiers never rise;
    pinned items never move; an item that stayed keeps its codes and a demoted one holds its
    decoded vectors encoded again; new items only at new positions; eviction removes exactly
    what falls below the bound."""
    ladder = tiers if ladder == "default" else _paged_ladder(tiers)
    fp16 = ladder.costs[-1] + 2
    budget = 0.3 * GROUPS * 150 * fp16
    if ordered == "mixed":
        ordered = np.arange(GROUPS) % 2 == 0
    alloc = OnlineAllocator(ladder, GROUPS, budget, page_size=P, decay=0.8, ordered=ordered)
    alloc.prefill(_chunk(ladder, 0, 60, seed=0, sinks=(0, 1)))
    before, overflowed, start = _state(alloc), 0, 60
    for step in range(14):
        if step % 5 == 4:
            first = np.array([step, 3 * step, 0])
            removed = alloc.evict(first)
            after = _state(alloc)
            assert removed == len(before) - len(after)
            assert after.keys() == {k for k in before if k[1] >= first[k[0]]}
            for key, item in after.items():  # a repacked page quantizes its keys again
                paged = alloc.store.pools[item[0]].paged_keys
                assert item[2:] == before[key][2:] and (paged or item == before[key])
            before = after
            continue
        n = 6 + step % 3
        price, held, done = alloc.price, alloc.nbytes(), len(alloc.writes)
        alloc.admit(_chunk(ladder, start, n, seed=step + 1, sinks=(start,)))
        overflowed += alloc.price != price * alloc.decay
        assert max(alloc.writes[done:]) <= max(held, alloc.nbytes())
        after = _state(alloc)
        for key, (t, *codes, pinned) in after.items():
            if key not in before:
                assert start <= key[1] < start + n, f"token {key} came back"
                assert pinned == (key[1] == start)
                continue
            t0, *codes0, pinned0 = before[key]
            assert t <= t0 and pinned == pinned0
            assert not pinned or t == t0, f"pinned token {key} moved"
            paged = alloc.store.pools[t].paged_keys
            if t == t0 and not paged:
                assert codes == codes0, f"token {key} changed its codes in place"
            elif t < t0 and not paged and not alloc.store.pools[t0].paged_keys:
                assert tuple(codes) == _encoded(ladder, t0, t, before[key])
        for key, (t0, *_, pinned0) in before.items():
            assert pinned0 <= (key in after and after[key][0] == t0)
        before, start = after, start + n
    assert overflowed >= 3, "too few admissions overflowed: demotion is not exercised"


def _whole_cache_problem(alloc, cand, tokens):
    """The demotion solve over every kept item (the candidates free under their ceiling, the
    others forced where they are) and the new items: what the incremental problem stands for."""
    from sphkv.rdr.problem import AllocationProblem

    store = alloc.store
    chosen = set(zip(cand.group.tolist(), cand.positions.tolist(), strict=True))
    group, tier, d, free = [], [], [], []
    for t in store.pools:
        g, pos, _, _, dist = store.contents(t)
        group.append(g)
        tier.append(np.full(len(g), t))
        d.append(dist.double().numpy())
        free.append(np.array([(a, b) in chosen for a, b in zip(g.tolist(), pos.tolist(),
                                                                  strict=True)], dtype=bool))
    group, tier, d, free = (np.concatenate(x) for x in (group, tier, d, free))
    assert free.sum() == len(cand.group)
    problem = AllocationProblem(
        distortion=np.concatenate([d, tokens.distortion]), cost=store.slot_costs,
        budget=alloc.budget, groups=np.concatenate([group, tokens.group]),
        page_size=alloc.page_size, page_overhead=PAGE_TABLE_ENTRY.itemsize,
        forced=np.concatenate([np.where(free, -1, tier), tokens.forced]),
        ceiling=np.concatenate([tier, np.full(len(tokens), -1)]))
    return problem, d[~free, tier[~free]].sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_demotion_solve_matches_the_whole_cache_one(tiers, seed):
    """The demotion problem over the new items and the candidates, the rest of the store counted
    as fixed pages and forced partial-page items, is the whole-cache problem: the exact (ILP)
    optima differ by the distortion of the items that stay, to rounding; the greedy's
    allocations (each within its own rounding of the optimum) differ by less than 1%."""
    from sphkv.solvers import solve

    fp16 = tiers.costs[-1] + 2
    alloc = OnlineAllocator(tiers, GROUPS, 0.3 * GROUPS * 110 * fp16, page_size=P)
    alloc.prefill(_chunk(tiers, 0, 100, seed=seed, sinks=(0,)))
    tokens = _chunk(tiers, 100, 5, seed=seed + 10)
    slope = alloc._demotion_slopes()
    cand = alloc._candidates(slope, 4 * len(tokens))
    small = alloc._demotion_problem(cand, tokens)
    whole, stay = _whole_cache_problem(alloc, cand, tokens)
    assert small.n_items < whole.n_items / 2
    for method, tolerance in (("ilp", 1e-9), ("greedy", 1e-2)):
        options = {} if method == "ilp" else {"polish": False}
        a, b = solve(small, method, **options), solve(whole, method, **options)
        assert a.distortion + stay <= b.distortion * (1 + tolerance) + 1e-9
        if method == "ilp":
            assert a.distortion + stay == pytest.approx(b.distortion, rel=1e-9)
            assert a.status == b.status == "optimal"


@pytest.mark.parametrize("ordered", [True, False])
def test_positions_past_two_to_the_sixteen(tiers, ordered):
    """At 128k tokens the fp16 run holds the sinks and tokens 10^5 positions later: 16-bit
    offsets cannot place them in one page, 32-bit ones can, within the budget."""
    fp16 = tiers.costs[-1] + 2
    prefill = Tokens.cat([_chunk(tiers, 0, 40, seed=1, sinks=(0, 1)),
                          _chunk(tiers, 131_000, 40, seed=2)])
    narrow = OnlineAllocator(tiers, GROUPS, 0.4 * GROUPS * 100 * fp16, page_size=P,
                             ordered=ordered)
    with pytest.raises(ValueError, match="offset_bytes=4"):
        narrow.prefill(prefill)
    alloc = OnlineAllocator(tiers, GROUPS, 0.4 * GROUPS * 100 * fp16, page_size=P,
                            ordered=ordered, offset_bytes=4)
    alloc.prefill(prefill)
    for i in range(3):
        alloc.admit(_chunk(tiers, 140_000 + 4 * i, 4, seed=10 + i))
    kept = _tiers_of(alloc)
    assert all(kept[g, p] == len(tiers) - 1 for g in range(GROUPS) for p in (0, 1))
    assert any(p >= 131_000 for _, p in kept) and max(alloc.writes) <= alloc.budget
    assert alloc.nbytes() == alloc.store.held_bytes()


def test_prefill_in_parts_equals_the_prefill_of_their_concatenation(tiers):
    parts = [_chunk(tiers, 0, 30, seed=3, sinks=(0, 1)), _chunk(tiers, 30, 25, seed=4),
             _chunk(tiers, 55, 0, seed=5), _chunk(tiers, 55, 20, seed=6)]
    budget = 0.3 * GROUPS * 75 * (tiers.costs[-1] + 2)
    whole, split = (OnlineAllocator(tiers, GROUPS, budget, page_size=P) for _ in range(2))
    whole.prefill(Tokens.cat(parts))
    split.prefill(parts)
    assert split.price == whole.price and split.nbytes() == whole.nbytes()
    assert _tiers_of(split) == _tiers_of(whole)
    for t in whole.store.pools:  # the same codes for every kept token
        a, b = whole.store.contents(t), split.store.contents(t)
        order_a, order_b = (np.lexsort((x[1].numpy(), x[0])) for x in (a, b))
        assert torch.equal(a[2].payload[order_a], b[2].payload[order_b])


def _with_rows(tokens, seed):
    """``tokens`` with other distortion rows (other queries read them)."""
    rng = np.random.default_rng(seed)
    d = tokens.distortion * rng.uniform(0.05, 20.0, size=(len(tokens), 1))
    return Tokens(tokens.group, tokens.positions, tokens.keys, tokens.values, d, tokens.forced)


@pytest.mark.parametrize("ordered", [True, False])
@pytest.mark.parametrize("ladder", ["default", "paged-keys"])
def test_revise_moves_the_store_to_a_fresh_prefill_of_the_new_rows(tiers, ladder, ordered):
    """After admissions, a revision over every token seen with new rows leaves the store as a
    fresh prefill of those rows would be: the same tiers, price and bytes; a token that moved
    (a dropped one came back, a compressed one rose) has the codes of its vectors, one that
    stayed its old codes; no write passes max(before, after); every kept item holds its new
    row."""
    ladder = tiers if ladder == "default" else _paged_ladder(tiers)
    budget = 0.3 * GROUPS * 100 * (ladder.costs[-1] + 2)
    alloc = OnlineAllocator(ladder, GROUPS, budget, page_size=P, ordered=ordered)
    seen = [_chunk(ladder, 0, 60, seed=0, sinks=(0, 1))]
    alloc.prefill(seen[0])
    for step in range(4):
        seen.append(_chunk(ladder, 60 + 10 * step, 10, seed=step + 1))
        alloc.admit(seen[-1])
    before, held, done = _state(alloc), alloc.nbytes(), len(alloc.writes)
    tokens = _with_rows(Tokens.cat(seen), seed=7)
    alloc.revise(tokens)
    fresh = OnlineAllocator(ladder, GROUPS, budget, page_size=P, ordered=ordered)
    fresh.prefill(tokens)
    after = _state(alloc)
    assert alloc.price == fresh.price and alloc.nbytes() == fresh.nbytes() <= budget
    assert max(alloc.writes[done:]) <= max(held, alloc.nbytes())
    expected = _state(fresh)
    assert after.keys() == expected.keys()
    for key, item in after.items():
        assert item[0] == expected[key][0]
        if alloc.store.pools[item[0]].paged_keys:
            continue
        # an item that stayed kept its codes (a demoted one's are its decoded vectors
        # encoded again), one that moved was encoded from its vectors
        stayed = key in before and before[key][0] == item[0]
        assert item[1:3] == (before[key] if stayed else expected[key])[1:3]
    recalled = after.keys() - before.keys()
    promoted = [k for k in after.keys() & before.keys() if after[k][0] > before[k][0]]
    assert recalled and promoted, "the new rows moved no token up: the test shows nothing"
    rows = {(g, p): r for g, p, r in zip(tokens.group.tolist(), tokens.positions.tolist(),
                                          tokens.distortion, strict=True)}
    for t in alloc.store.pools:
        g, pos, _, _, dist = alloc.store.contents(t)
        for gi, p, r in zip(g.tolist(), pos.tolist(), dist, strict=True):
            np.testing.assert_allclose(r.numpy(), rows[gi, p], rtol=1e-6)


def _strided(tokens, rows):
    """``tokens`` whose vectors are ``[len / rows, rows, d]`` views into buffers twice as
    long per group of rows (as the cache's host copy gives them), garbage in the gaps."""
    def view(x):
        buf = torch.full((len(x) // rows, 2 * rows, x.shape[-1]), float("nan"), dtype=x.dtype)
        buf[:, :rows] = x.reshape(-1, rows, x.shape[-1])
        return buf[:, :rows]
    out = Tokens(tokens.group, tokens.positions, view(tokens.keys), view(tokens.values),
                 tokens.distortion, tokens.forced)
    assert not out.keys.is_contiguous()
    return out


def test_tokens_read_a_strided_view_as_its_rows(tiers):
    """Vectors given as ``[G, m, d]`` views are read as their G·m rows, in order, by every
    allocator step: a revision from such views equals one from their flat copies."""
    parts = [_chunk(tiers, 0, 30, seed=3, sinks=(0,)), _chunk(tiers, 30, 25, seed=5)]
    budget = 0.3 * GROUPS * 55 * (tiers.costs[-1] + 2)
    flat, views = (OnlineAllocator(tiers, GROUPS, budget, page_size=P) for _ in range(2))
    for alloc in (flat, views):
        alloc.prefill(parts)
    new = [_with_rows(p, seed=9 + i) for i, p in enumerate(parts)]
    strided = [_strided(p, n) for p, n in zip(new, (30, 25), strict=True)]
    index = np.array([5, 0, 31, GROUPS * 30 - 1])
    picked = strided[0].select(index)
    assert torch.equal(picked.keys, new[0].keys[index]) and picked.keys.shape == (4, D)
    assert torch.equal(Tokens.cat(strided).values, Tokens.cat(new).values)
    flat.revise(new)
    views.revise(strided)
    assert views.price == flat.price and _state(views) == _state(flat)
    with pytest.raises(ValueError, match="rows"):
        Tokens(new[0].group[:-1], new[0].positions[:-1], strided[0].keys, strided[0].values,
               new[0].distortion[:-1])


def test_revise_takes_out_what_the_tokens_leave_out(tiers):
    budget = GROUPS * 40 * (tiers.costs[-1] + 2)
    alloc = OnlineAllocator(tiers, GROUPS, budget, page_size=P)
    alloc.prefill(_chunk(tiers, 0, 30, seed=0))
    rest = _chunk(tiers, 0, 30, seed=0).select(np.arange(GROUPS * 30) % 30 >= 10)
    alloc.revise(rest)
    assert set(_tiers_of(alloc)) == {(g, p) for g in range(GROUPS) for p in range(10, 30)}
    alloc.revise(_chunk(tiers, 0, 0, seed=0))
    assert alloc.nbytes() == 0 and not _tiers_of(alloc)


def test_revise_in_parts_equals_the_revise_of_their_concatenation(tiers):
    parts = [_chunk(tiers, 0, 30, seed=3, sinks=(0,)), _chunk(tiers, 30, 0, seed=4),
             _chunk(tiers, 30, 25, seed=5)]
    budget = 0.3 * GROUPS * 55 * (tiers.costs[-1] + 2)
    whole, split = (OnlineAllocator(tiers, GROUPS, budget, page_size=P) for _ in range(2))
    for alloc in (whole, split):
        alloc.prefill(parts)
    new = [_with_rows(p, seed=9 + i) for i, p in enumerate(parts)]
    whole.revise(Tokens.cat(new))
    split.revise(new)
    assert split.price == whole.price and _state(split) == _state(whole)
    with pytest.raises(ValueError, match="at least one part"):
        split.revise([])
