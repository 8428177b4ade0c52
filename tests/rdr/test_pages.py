"""The paged store: every kept token in exactly one slot, positions recoverable, exact bytes."""

import numpy as np
import pytest
import torch

from sphkv.codec import Codes
from sphkv.rdr import default_tiers
from sphkv.rdr.distortion import PAGE_TABLE_ENTRY
from sphkv.rdr.pages import OFFSET_BYTES, PagedStore

D, P = 16, 4


@pytest.fixture
def tiers():
    return default_tiers(D)


def _put(store, group, tier, positions, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = len(positions)
    keys, values = torch.randn(n, D, generator=gen), torch.randn(n, D, generator=gen)
    store.put(group, tier, torch.tensor(positions), keys, values,
              torch.rand(n, len(store.tiers), generator=gen))
    return keys, values


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
    accounted = sum(pages[t] * P * (int(store.tiers[t].bytes_per_token_head) + OFFSET_BYTES)
                    for t in store.pools)
    accounted += sum(pages.values()) * PAGE_TABLE_ENTRY.itemsize
    assert store.nbytes() == accounted == store.held_bytes()


def test_put_take_positions_and_bytes(tiers):
    store = PagedStore(tiers, groups=3, page_size=P)
    fp16, turbo2 = tiers.index("fp16"), tiers.index("turbo2")
    keys, values = _put(store, 0, fp16, [0, 1, 2, 9, 12])
    _put(store, 1, turbo2, [3, 4, 5, 6, 7, 8, 10], seed=1)
    _put(store, 0, turbo2, [5, 6], seed=2)
    _put(store, 0, fp16, [20, 21, 30], seed=3)  # fills the partial page, then a new one
    _put(store, 2, tiers.index("drop"), [1, 2])  # drop keeps nothing
    _check(store, {0: {fp16: [0, 1, 2, 9, 12, 20, 21, 30], turbo2: [5, 6]},
                   1: {turbo2: [3, 4, 5, 6, 7, 8, 10]}, 2: {}})
    # fp16 pages hold the keys exactly (to fp16 rounding)
    pos, kc, _, _ = store.read(0, fp16)
    assert torch.equal(tiers[fp16].key.decode(kc)[:3], keys[:3].half().float())
    # taking tokens returns their reconstructions and frees their slots
    k_hat, v_hat, dist = store.take(0, fp16, torch.tensor([9, 1]))
    assert torch.equal(k_hat, keys[[3, 1]].half().float())
    assert torch.equal(v_hat, values[[3, 1]].half().float())
    assert dist.shape == (2, len(tiers))
    store.take(1, turbo2, torch.tensor([3, 4, 5, 6, 7]))
    _check(store, {0: {fp16: [0, 2, 12, 20, 21, 30], turbo2: [5, 6]}, 1: {turbo2: [8, 10]}})
    with pytest.raises(ValueError, match="not kept"):
        store.take(1, turbo2, torch.tensor([3]))


def test_gather_pads_and_masks(tiers):
    store = PagedStore(tiers, groups=2, page_size=P)
    int8 = tiers.index("int8")
    k0, _ = _put(store, 0, int8, [0, 1, 2, 3, 4, 5])
    _put(store, 1, int8, [7])
    key, value, valid, positions = store.gather(int8, [0, 1])
    assert key.shape == (2, 6, D) and valid.sum(1).tolist() == [6, 1]
    assert positions.tolist() == [[0, 1, 2, 3, 4, 5], [7, -1, -1, -1, -1, -1]]
    assert torch.allclose(tiers[int8].key.decode(key)[0], k0, atol=0.05)


def test_random_operations_keep_invariants(tiers):
    gen = np.random.default_rng(0)
    store = PagedStore(tiers, groups=4, page_size=P)
    kept: dict[int, dict[int, list[int]]] = {g: {} for g in range(4)}
    next_pos = 0
    free = []  # positions taken out earlier: putting them back re-packs a run
    for step in range(120):
        group = int(gen.integers(4))
        tier = int(gen.integers(1, len(tiers)))
        if gen.random() < 0.6 or not kept[group].get(tier):
            n = int(gen.integers(1, 7))
            if free and gen.random() < 0.3:
                pos, free = free[:n], free[n:]
            else:
                pos = list(range(next_pos, next_pos + n))
                next_pos += n
            _put(store, group, tier, pos, seed=step)
            kept[group].setdefault(tier, []).extend(pos)
        else:
            have = kept[group][tier]
            out = list(gen.choice(have, size=int(gen.integers(1, len(have) + 1)), replace=False))
            store.take(group, tier, torch.tensor(out))
            kept[group][tier] = [p for p in have if p not in out]
            free += [int(p) for p in out if not any(int(p) in ps for g in kept.values()
                                                     for ps in g.values())]
        _check(store, kept)


def test_page_span_limit(tiers):
    store = PagedStore(tiers, groups=1, page_size=P)
    with pytest.raises(ValueError, match="span"):
        _put(store, 0, 1, [0, 70_000])
    # appended one at a time, a far token starts a new page instead
    _put(store, 0, 1, [0])
    _put(store, 0, 1, [70_000])
    _check(store, {0: {1: [0, 70_000]}})
    assert len(store.tables[0]) == 2


def test_contents_and_replace_repack_every_group(tiers):
    store = PagedStore(tiers, groups=3, page_size=P)
    turbo2, fp16 = tiers.index("turbo2"), tiers.index("fp16")
    _put(store, 0, turbo2, [0, 1, 2, 3, 4])
    _put(store, 2, turbo2, [7, 9], seed=1)
    _put(store, 1, fp16, [3, 4], seed=2)
    version = store.version
    group, pos, key, value, dist = store.contents(turbo2)
    assert sorted(zip(group.tolist(), pos.tolist(), strict=True)) == \
        [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (2, 7), (2, 9)]
    before = dict(zip(zip(group.tolist(), pos.tolist(), strict=True),
                      tiers[turbo2].key.decode(key), strict=True))
    # drop group 0's tokens 1 and 3, move group 2's run to group 1, shuffled
    keep = torch.tensor([i for i, (g, p) in enumerate(zip(group, pos.tolist(), strict=True))
                         if (g, p) not in {(0, 1), (0, 3)}]).flip(0)
    new_group = np.where(group[keep.numpy()] == 2, 1, group[keep.numpy()])
    store.replace(turbo2, new_group, pos[keep], _codes(key, keep), _codes(value, keep),
                  dist[keep])
    assert store.version > version
    _check(store, {0: {turbo2: [0, 2, 4]}, 1: {turbo2: [7, 9], fp16: [3, 4]}, 2: {}})
    group, pos, key, _, _ = store.contents(turbo2)
    for g, p, k in zip(group.tolist(), pos.tolist(), tiers[turbo2].key.decode(key), strict=True):
        assert torch.equal(k, before[(0 if g == 0 else 2, p)])
    store.replace(turbo2, np.zeros(0, np.int64), torch.zeros(0, dtype=torch.long),
                  _codes(key, torch.zeros(0, dtype=torch.long)),
                  _codes(value, torch.zeros(0, dtype=torch.long)), dist[:0])
    _check(store, {0: {}, 1: {fp16: [3, 4]}, 2: {}})


def _codes(codes, index):
    return Codes(codes.payload[index], {k: v[index] for k, v in codes.side.items()},
                 torch.Size((len(index), codes.shape[-1])))


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
    keys, _ = _put(store, 0, 1, [0, 1, 2, 3, 4, 5])
    _put(store, 1, 1, [3, 7], seed=1)
    _check(store, {0: {1: [0, 1, 2, 3, 4, 5]}, 1: {1: [3, 7]}})
    pos, k_codes, _, _ = store.read(0, 1)
    # a full page and a partial one, each quantized as one group of its own tokens
    expected = torch.cat([key.reconstruct(keys[:4]), key.reconstruct(keys[4:])])
    assert torch.equal(key.decode(k_codes), expected)
    k_hat, _, _ = store.take(0, 1, torch.tensor([1]))
    assert torch.equal(k_hat[0], expected[1])
    _check(store, {0: {1: [0, 2, 3, 4, 5]}, 1: {1: [3, 7]}})
    # the repacked first page [0, 2, 3, 4] is quantized again from its decoded keys
    _, k_codes, _, _ = store.read(0, 1)
    assert torch.equal(key.decode(k_codes)[:4], key.reconstruct(expected[[0, 2, 3, 4]]))
    with pytest.raises(ValueError, match="per page"):
        store.put_encoded(0, 1, torch.tensor([9]), key.encode(keys[:4]),
                          tiers[1].value.encode(keys[:1]), torch.zeros(1, 2))
