"""The paged store: every kept token in exactly one slot, positions recoverable, exact bytes."""

import numpy as np
import pytest
import torch

from sphkv.rdr import default_tiers
from sphkv.rdr.distortion import PAGE_TABLE_ENTRY
from sphkv.rdr.pages import PagedStore

D, P = 16, 4


@pytest.fixture
def tiers():
    return default_tiers(D)


def _tokens(store, tier, runs, seed=0):
    """Fresh random tokens ``runs`` ({group: positions}) as :meth:`PagedStore.add` takes
    them: ``(group, positions, key, value, distortion, pinned)`` encoded by ``tier``'s codecs
    (keys quantized per page stay vectors, none pinned); and the keys and values ``[n, D]``."""
    gen = torch.Generator().manual_seed(seed)
    group = np.array([g for g, ps in runs.items() for _ in ps], dtype=np.int64)
    positions = torch.tensor([p for ps in runs.values() for p in ps], dtype=torch.long)
    n = len(positions)
    keys, values = torch.randn(n, D, generator=gen), torch.randn(n, D, generator=gen)
    t = store.tiers[tier]
    key = keys if store.pools[tier].paged_keys else t.key.encode(keys)
    return ((group, positions, key, t.value.encode(values),
             torch.rand(n, len(store.tiers), generator=gen), torch.zeros(n, dtype=torch.bool)),
            keys, values)


def _write(store, tier, runs, seed=0):
    """Make ``tier`` hold exactly the fresh tokens ``runs`` (one update: what it held out,
    these in); their keys and values."""
    args, keys, values = _tokens(store, tier, runs, seed)
    store.update(tier, gone=torch.nonzero(store.pools[tier].valid).flatten(), new=args)
    return keys, values


def _add(store, tier, runs, seed=0):
    """Add fresh tokens ``runs`` to what ``tier`` holds."""
    store.add(tier, *_tokens(store, tier, runs, seed)[0])


def _remove(store, tier, group, positions):
    """Take ``positions`` of ``group`` out of ``tier``."""
    pool, p = store.pools[tier], store.page_size
    owner = torch.from_numpy(pool.owner).repeat_interleave(p)
    mine = pool.valid & (owner == group) & torch.isin(pool.position, torch.tensor(positions))
    store.remove(tier, torch.nonzero(mine).flatten())


def _codes(store, tier):
    """{(group, position): its key and value codes, as one byte string} of every token kept at
    ``tier``."""
    g, pos, key, value, _ = store.contents(tier)
    if not len(pos):
        return {}
    rows = [c.payload.reshape(len(pos), -1) for c in (key, value)]
    rows += [v.reshape(len(pos), -1).contiguous().view(torch.uint8)
             for c in (key, value) for v in c.side.values()]
    data = torch.cat(rows, 1)
    return {(int(a), int(b)): bytes(r.tolist()) for a, b, r in zip(g, pos, data, strict=True)}


def _values(store, tier):
    """{(group, position): its value codes, as one byte string} of every token kept at ``tier``
    (a tier quantizing keys per page quantizes them again when it repacks a page)."""
    g, pos, _, value, _ = store.contents(tier)
    if not len(pos):
        return {}
    data = torch.cat([value.payload.reshape(len(pos), -1).view(torch.uint8)]
                     + [v.reshape(len(pos), -1).contiguous().view(torch.uint8)
                        for v in value.side.values()], 1)
    return {(int(a), int(b)): bytes(r.tolist()) for a, b, r in zip(g, pos, data, strict=True)}


def _check(store, expected):
    """Each group's kept positions per tier are ``expected``; bytes are exact."""
    for group, per_tier in expected.items():
        got = {t: p.tolist() for t, p in store.positions(group).items()}
        assert got == {t: sorted(p) for t, p in per_tier.items() if p}
    pages = {t: 0 for t in store.pools}
    for table in store.tables:
        assert np.all(table["valid"] >= 1) and np.all(table["valid"] <= P)
        for t in store.pools:
            pages[t] += int((table["tier"] == t).sum())
    for t, pool in store.pools.items():
        assert pool.pages == pages[t]
        # every page id of the pool is listed by exactly one page-table entry
        ids = sorted(i for table in store.tables for i in table["page_id"][table["tier"] == t])
        assert ids == list(range(pool.pages))
        # each token in exactly one slot, its position recovered from its page and offset
        group, pos, _, _, _ = store.contents(t)
        pairs = list(zip(group.tolist(), pos.tolist(), strict=True))
        assert len(set(pairs)) == len(pairs)
        assert sorted(pairs) == sorted((g, p) for g, per_tier in expected.items()
                                       for p in per_tier.get(t, []))
    accounted = sum(pages[t] * P * (int(store.tiers[t].bytes_per_token_head)
                                    + store.offset_bytes) for t in store.pools)
    accounted += sum(pages.values()) * PAGE_TABLE_ENTRY.itemsize
    assert store.nbytes() == accounted == store.held_bytes()


def test_positions_and_bytes(tiers):
    store = PagedStore(tiers, groups=3, page_size=P)
    fp16, turbo2 = tiers.index("fp16"), tiers.index("turbo2")
    keys, values = _write(store, fp16, {0: [0, 1, 2, 9, 12, 20, 21, 30]})
    _write(store, turbo2, {1: [3, 4, 5, 6, 7, 8, 10], 0: [5, 6]}, seed=1)
    _check(store, {0: {fp16: [0, 1, 2, 9, 12, 20, 21, 30], turbo2: [5, 6]},
                   1: {turbo2: [3, 4, 5, 6, 7, 8, 10]}, 2: {}})
    # fp16 pages hold the keys and values exactly (to fp16 rounding), in position order
    _, pos, kc, vc, _ = store.contents(fp16)
    assert pos.tolist() == [0, 1, 2, 9, 12, 20, 21, 30]
    assert torch.equal(tiers[fp16].key.decode(kc), keys.half().float())
    assert torch.equal(tiers[fp16].value.decode(vc), values.half().float())
    # taking tokens out frees their slots and leaves the others' codes as they were
    before = {t: _codes(store, t) for t in (fp16, turbo2)}
    _remove(store, fp16, 0, [9, 1])
    _remove(store, turbo2, 1, [3, 4, 5, 6, 7])
    _check(store, {0: {fp16: [0, 2, 12, 20, 21, 30], turbo2: [5, 6]}, 1: {turbo2: [8, 10]}})
    for t in (fp16, turbo2):
        for item, code in _codes(store, t).items():
            assert code == before[t][item]


def test_gather_pads_and_masks(tiers):
    store = PagedStore(tiers, groups=2, page_size=P)
    int8 = tiers.index("int8")
    keys, _ = _write(store, int8, {0: [0, 1, 2, 3, 4, 5], 1: [7]})
    slots, valid, positions = store.gather(int8, [0, 1])
    key, value = store.codes(int8, slots)
    assert key.shape == (2, 6, D) and valid.sum(1).tolist() == [6, 1]
    assert positions.tolist() == [[0, 1, 2, 3, 4, 5], [7, -1, -1, -1, -1, -1]]
    assert torch.allclose(tiers[int8].key.decode(key)[0], keys[:6], atol=0.05)
    assert torch.allclose(tiers[int8].key.decode(key)[1, 0], keys[6], atol=0.05)


#: runs kept in position order: all, none, or groups 0 and 2
ORDERED = {"ordered": True, "unordered": False,
           "mixed": np.array([True, False, True, False])}


@pytest.mark.parametrize("ordered", ORDERED)
def test_random_operations_keep_invariants(tiers, ordered):
    gen = np.random.default_rng(0)
    store = PagedStore(tiers, groups=4, page_size=P, ordered=ORDERED[ordered])
    kept: dict[int, dict[int, list[int]]] = {g: {} for g in range(4)}
    next_pos = 0
    free = []  # positions taken out earlier: putting them back lands inside a run
    for step in range(120):
        group = int(gen.integers(4))
        tier = int(gen.integers(1, len(tiers)))
        before = _codes(store, tier)
        if gen.random() < 0.6 or not kept[group].get(tier):
            n = int(gen.integers(1, 7))
            if free and gen.random() < 0.3:
                pos, free = free[:n], free[n:]
            else:
                pos = list(range(next_pos, next_pos + n))
                next_pos += n
            _add(store, tier, {group: pos}, seed=step)
            kept[group].setdefault(tier, []).extend(pos)
        else:
            have = kept[group][tier]
            out = [int(p) for p in gen.choice(have, size=int(gen.integers(1, len(have) + 1)),
                                              replace=False)]
            _remove(store, tier, group, out)
            kept[group][tier] = [p for p in have if p not in out]
            free += [p for p in out if not any(p in ps for g in kept.values()
                                               for ps in g.values())]
        _check(store, kept)
        after = _codes(store, tier)
        for item, code in before.items():  # a repacked token keeps its codes
            if item in after:
                assert after[item] == code


def test_page_span_limit(tiers):
    store = PagedStore(tiers, groups=1, page_size=P)
    _write(store, 1, {0: [0, 1]})
    with pytest.raises(ValueError, match="span"):
        _write(store, 1, {0: [0, 70_000]})
    _check(store, {0: {1: [0, 1]}})  # the refused write changed nothing
    # a far token that starts its own page is fine
    _write(store, 1, {0: [0, 1, 2, 3, 70_000]})
    _check(store, {0: {1: [0, 1, 2, 3, 70_000]}})
    assert len(store.tables[0]) == 2


@pytest.mark.parametrize("ordered", ["ordered", "unordered"])
def test_wide_offsets_serve_pages_of_any_span(tiers, ordered):
    # a sparse tier of a long context: sinks at 0 … 3 and the odd token 100k or more later
    store = PagedStore(tiers, groups=2, page_size=P, ordered=ORDERED[ordered], offset_bytes=4)
    assert store.slot_costs[1] == tiers[1].bytes_per_token_head + 4
    kept = {0: {1: [0, 1, 2, 3, 70_000, 131_000]}, 1: {1: [5, 200_000]}}
    _write(store, 1, {g: per[1] for g, per in kept.items()})
    _check(store, kept)
    gen = np.random.default_rng(1)
    for step in range(30):  # tokens in and out anywhere in 0 … 2^20
        group = int(gen.integers(2))
        have = kept[group][1]
        if gen.random() < 0.6 or not have:
            pos = [int(p) for p in gen.choice(1 << 20, size=3, replace=False)
                   if p not in have]
            _add(store, 1, {group: pos}, seed=step)
            have.extend(pos)
        else:
            out = have[:int(gen.integers(1, len(have) + 1))]
            _remove(store, 1, group, out)
            kept[group][1] = have[len(out):]
        _check(store, kept)


def test_offsets_are_2_or_4_bytes(tiers):
    for bad in (3, True, None):
        with pytest.raises(ValueError, match="offset_bytes must be 2 or 4"):
            PagedStore(tiers, groups=1, offset_bytes=bad)


def test_contents_after_removals_and_emptying(tiers):
    store = PagedStore(tiers, groups=3, page_size=P)
    turbo2, fp16 = tiers.index("turbo2"), tiers.index("fp16")
    _write(store, turbo2, {0: [0, 1, 2, 3, 4], 2: [7, 9]})
    _write(store, fp16, {1: [3, 4]}, seed=2)
    version = store.version
    group, pos, *_ = store.contents(turbo2)
    assert sorted(zip(group.tolist(), pos.tolist(), strict=True)) == \
        [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (2, 7), (2, 9)]
    before = _codes(store, turbo2)
    _remove(store, turbo2, 0, [1, 3])
    assert store.version > version
    _check(store, {0: {turbo2: [0, 2, 4]}, 1: {fp16: [3, 4]}, 2: {turbo2: [7, 9]}})
    for item, code in _codes(store, turbo2).items():
        assert code == before[item]
    _write(store, turbo2, {})
    _check(store, {0: {}, 1: {fp16: [3, 4]}, 2: {}})


def test_paged_keys_quantize_each_page_whole():
    """KIVI's per-channel keys: each page one group of statistics, striped over its slots."""
    from sphkv.codec import KiviCodec
    from sphkv.rdr import Tier, TierSet

    key = KiviCodec(d=D, bits=4, group_size=P, axis="channel")
    tiers = TierSet((Tier("drop"), Tier("kc4", key, KiviCodec(d=D, bits=4, group_size=D,
                                                                axis="token"))))
    with pytest.raises(ValueError, match="page_size"):
        PagedStore(tiers, groups=1, page_size=2 * P)
    store = PagedStore(tiers, groups=2, page_size=P)
    keys, _ = _write(store, 1, {0: [0, 1, 2, 3, 4, 5], 1: [3, 7]})
    _check(store, {0: {1: [0, 1, 2, 3, 4, 5]}, 1: {1: [3, 7]}})
    slots, valid, _ = store.gather(1, [0])
    k_codes, _ = store.codes(1, slots)
    assert valid.all()
    # a full page and a partial one, each quantized as one group of its own tokens
    expected = torch.cat([key.reconstruct(keys[:4]), key.reconstruct(keys[4:6])])
    assert torch.equal(key.decode(k_codes)[0], expected)
    _remove(store, 1, 0, [1])
    _check(store, {0: {1: [0, 2, 3, 4, 5]}, 1: {1: [3, 7]}})
    # the repacked first page [0, 2, 3, 4] is quantized again from its decoded keys
    k_codes, _ = store.codes(1, store.gather(1, [0])[0])
    assert torch.equal(key.decode(k_codes)[0, :4], key.reconstruct(expected[[0, 2, 3, 4]]))


def _kivi_tiers():
    from sphkv.codec import KiviCodec
    from sphkv.rdr import Tier, TierSet

    return TierSet((Tier("drop"), Tier("kc4", KiviCodec(d=D, bits=4, group_size=P,
                                                         axis="channel"),
                                       KiviCodec(d=D, bits=4, group_size=D, axis="token"))))


@pytest.mark.parametrize("ordered", ORDERED)
@pytest.mark.parametrize("ladder", ["default", "paged-keys"])
def test_add_and_remove_rewrite_only_their_runs(tiers, ladder, ordered):
    """Random appends behind runs, insertions inside them and removals (freeing pages that
    other runs reuse or that the pool's last pages fill): every invariant of ``_check``, the
    bookkeeping exact, codes kept (a tier quantizing keys per page: value codes), pinned flags
    kept, and pages of runs nothing touched left where they were."""
    tiers = tiers if ladder == "default" else _kivi_tiers()
    gen = np.random.default_rng(1)
    store = PagedStore(tiers, groups=4, page_size=P, ordered=ORDERED[ordered])
    kept: dict[int, dict[int, list[int]]] = {g: {} for g in range(4)}
    next_pos = {g: 0 for g in range(4)}
    free = {g: [] for g in range(4)}
    pinned = set()
    for step in range(150):
        tier = int(gen.integers(1, len(tiers)))
        codes = _values if store.pools[tier].paged_keys else _codes
        before, tables = codes(store, tier), [t.copy() for t in store.tables]
        groups = [int(g) for g in gen.choice(4, size=int(gen.integers(1, 4)), replace=False)]
        if gen.random() < 0.6 or not any(kept[g].get(tier) for g in groups):
            runs = {}
            for g in groups:
                n = int(gen.integers(1, 2 * P + 2))
                if free[g] and gen.random() < 0.4:  # lands inside the run
                    runs[g], free[g] = free[g][:n], free[g][n:]
                else:
                    runs[g] = list(range(next_pos[g], next_pos[g] + n))
                    next_pos[g] += n
            (group, pos, key, value, dist, _), _, _ = _tokens(store, tier, runs, seed=step)
            pin = torch.from_numpy(gen.random(len(group)) < 0.3)
            store.add(tier, group, pos, key, value, dist, pin)
            for g, q, b in zip(group.tolist(), pos.tolist(), pin.tolist(), strict=True):
                (pinned.add if b else pinned.discard)((g, q))
            for g, ps in runs.items():
                kept[g].setdefault(tier, []).extend(ps)
        else:
            slots, valid, positions = store.gather(tier, groups)
            take = valid & torch.from_numpy(gen.random(valid.shape) < 0.5)
            store.remove(tier, slots[take])
            for i, g in enumerate(groups):
                out = positions[i][take[i]].tolist()
                kept[g][tier] = [q for q in kept[g].get(tier, []) if q not in out]
                free[g] += out
        _check(store, kept)
        pool = store.pools[tier]
        assert (store.counts[:, tier] == [len(kept[g].get(tier, [])) for g in range(4)]).all()
        slots, valid, positions = store.gather(tier, list(range(4)))
        assert int(pool.valid.sum()) == int(valid.sum()) and pool.valid[slots[valid]].all()
        assert torch.equal(pool.position[slots[valid]], positions[valid])
        # the kernels' block tables, built on the device, are the runs
        read, built = store.runs(tier, list(range(4)), True), store.block_tables(tier, True)
        assert np.array_equal(built.pages.cpu().numpy(), read.pages)
        assert np.array_equal(built.lengths.cpu().numpy(), read.lengths)
        assert torch.equal(built.positions, read.positions)
        group = np.repeat(np.arange(4), valid.sum(1).numpy())
        assert [bool(b) for b in pool.pinned[slots[valid]]] == [
            (int(g), q) in pinned for g, q in zip(group, positions[valid].tolist(), strict=True)]
        assert store.nbytes() == store.held_bytes()
        after = codes(store, tier)
        for item, code in before.items():
            if item in after:
                assert after[item] == code
        for g in set(range(4)) - set(groups):
            if pool.pages:  # an untouched run keeps its pages unless compaction moved them
                mine = tables[g][tables[g]["tier"] == tier]
                now = store.tables[g][store.tables[g]["tier"] == tier]
                assert len(mine) == len(now)
                assert (mine["first_position"] == now["first_position"]).all()
                assert (mine["valid"] == now["valid"]).all()


def _slot_of(store, tier, group):
    """{position: slot} of ``group``'s run at ``tier``."""
    slots, valid, positions = store.gather(tier, [group])
    return dict(zip(positions[valid].tolist(), slots[valid].tolist(), strict=True))


def test_unordered_runs_move_only_what_they_must(tiers):
    """Taking h tokens out of an unordered run moves at most h of the others (its last ones
    into the holes), and arrivals fill holes before going behind the run; the ordered run of
    the same store is rewritten in position order."""
    store = PagedStore(tiers, groups=2, page_size=P, ordered=np.array([False, True]))
    t = tiers.index("int8")
    _write(store, t, {0: list(range(0, 80, 2)), 1: list(range(0, 80, 2))})
    before = _slot_of(store, t, 0)
    gone = [10, 30, 50]
    _remove(store, t, 0, gone)
    _remove(store, t, 1, gone)
    after = _slot_of(store, t, 0)
    moved = [q for q in after if after[q] != before[q]]
    assert len(moved) <= len(gone) and all(q >= 74 for q in moved)  # the run's last tokens
    kept = sorted(set(range(0, 80, 2)) - set(gone))
    _check(store, {0: {t: kept}, 1: {t: kept}})
    ordered = _slot_of(store, t, 1)
    assert [q for q, _ in sorted(ordered.items(), key=lambda kv: kv[1])] == kept
    # arrivals, older than the run's last token, take the holes' slots first
    holes = {before[q] for q in gone} | {before[q] for q in moved}
    _add(store, t, {0: [1, 3]}, seed=5)
    arrived = _slot_of(store, t, 0)
    assert {arrived[1], arrived[3]} <= holes | set(after.values()) | {max(after.values()) + 1,
                                                                       max(after.values()) + 2}
    _check(store, {0: {t: sorted(kept + [1, 3])}, 1: {t: kept}})
    assert store.nbytes() == store.held_bytes()


def test_unordered_update_into_an_empty_pool(tiers):
    store = PagedStore(tiers, groups=2, page_size=P, ordered=False)
    t = tiers.index("turbo3")
    _write(store, t, {0: [5, 1, 3], 1: list(range(9))})
    _check(store, {0: {t: [1, 3, 5]}, 1: {t: list(range(9))}})


@pytest.mark.parametrize("ordered", ORDERED)
def test_removing_repeated_or_empty_slots_removes_each_item_once(tiers, ordered):
    store = PagedStore(tiers, groups=4, page_size=P, ordered=ORDERED[ordered])
    t = tiers.index("int8")
    _write(store, t, {0: list(range(10)), 3: list(range(7))})
    slots, valid, positions = store.gather(t, [0])
    empty = torch.nonzero(~store.pools[t].valid).flatten()  # the partial pages' free slots
    assert len(empty)
    store.remove(t, torch.cat([slots[0, :3], slots[0, :3], empty]))
    _check(store, {0: {t: list(range(3, 10))}, 3: {t: list(range(7))}})


def test_splice_matches_a_block_by_block_copy(tiers):
    """The vectorised splice against the straightforward one: kept stretches and new blocks
    copied in turn (empty blocks, blocks at the ends and insertions at one place included)."""
    gen = np.random.default_rng(3)
    store = PagedStore(tiers, groups=1, page_size=P)
    for _ in range(200):
        old = np.zeros(int(gen.integers(0, 30)), PAGE_TABLE_ENTRY)
        old["page_id"] = np.arange(len(old))
        cuts = np.sort(gen.integers(0, len(old) + 1, 2 * int(gen.integers(0, 6))))
        blocks = cuts.reshape(-1, 2)
        sizes = gen.integers(0, 4, len(blocks))
        new = np.zeros(int(sizes.sum()), PAGE_TABLE_ENTRY)
        new["page_id"] = 1000 + np.arange(len(new))
        expected, src, at = [], 0, 0
        for (lo, hi), n in zip(blocks, sizes, strict=True):
            expected += [old[src:lo], new[at:at + n]]
            src, at = hi, at + n
        expected = np.concatenate([*expected, old[src:]])
        store.entries[1] = old
        store._splice(1, blocks, new, sizes)
        assert np.array_equal(store.entries[1], expected)


@pytest.mark.parametrize("ordered", ["ordered", "mixed"])
def test_rewrite_from_the_first_changed_page_matches_a_full_rewrite(tiers, ordered):
    """An ordered run rewritten from its first changed page leaves the store exactly as a
    rewrite of the whole run does (entries, counts, every slot's codes and bookkeeping, owners):
    appends, insertions inside runs and removals, through one update each."""
    gen = np.random.default_rng(4)
    stores = [PagedStore(tiers, groups=4, page_size=P, ordered=ORDERED[ordered])
              for _ in range(2)]
    stores[1]._unchanged = lambda tier, touched, *_: np.zeros(len(touched), np.int64)
    free = list(range(0, 400, 3))  # positions for insertions inside runs
    next_pos = 400
    for step in range(150):
        tier = int(gen.integers(1, len(tiers)))
        runs = {}
        for g in gen.choice(4, size=int(gen.integers(1, 4)), replace=False):
            n = int(gen.integers(1, 2 * P + 2))
            if free and gen.random() < 0.3:
                runs[int(g)], free = free[:n], free[n:]
            else:
                runs[int(g)] = list(range(next_pos, next_pos + n))
                next_pos += n
        valid = torch.nonzero(stores[0].pools[tier].valid).flatten()
        gone = valid[torch.from_numpy(gen.random(len(valid)) < 0.1)]
        for store in stores:
            store.update(tier, gone=gone, new=_tokens(store, tier, runs, seed=step)[0])
        a, b = stores
        assert np.array_equal(a.counts, b.counts)
        for t, pool in a.pools.items():
            other = b.pools[t]
            assert np.array_equal(a.entries[t], b.entries[t])
            assert np.array_equal(pool.owner, other.owner)
            for name in ("offset", "distortion", "position", "valid", "pinned"):
                assert torch.equal(getattr(pool, name), getattr(other, name))
            for c, d in ((pool.key, other.key), (pool.value, other.value)):
                assert torch.equal(c.payload, d.payload)
                assert all(torch.equal(v, d.side[k]) for k, v in c.side.items())
