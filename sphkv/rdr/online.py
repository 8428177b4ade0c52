"""The online allocator: prefill solve, admission at a price, demotion, eviction — within a
byte budget at every instant.

:class:`OnlineAllocator` owns a :class:`~sphkv.rdr.pages.PagedStore` and the price λ of a
byte (distortion per byte at the margin). Items are (token, group) pairs, a group being one
(sequence, layer, kv-head); each arrives with its distortion row ``D[i, :]`` over the ladder
(:meth:`sphkv.rdr.methods.Method.distortion`) and, optionally, a forced tier (attention sinks).

- :meth:`~OnlineAllocator.prefill`: one greedy solve over every item, pages and page-table
  entries counted (:class:`~sphkv.rdr.problem.AllocationProblem` with ``page_size``); its λ
  becomes the price.
- :meth:`~OnlineAllocator.admit`: each new item takes ``argmin_t D[i, t] + λ c_t`` (``c_t`` its
  slot plus its share of a page-table entry). If the store would then exceed the budget, one
  greedy solve places the new items and the kept items cheapest to demote (least distortion
  added per byte saved; 4 per new item, more only if they cannot free enough), each kept item's
  tier capped at the one it holds (``ceiling``: lost precision never comes back), the other
  kept items where they are; λ becomes that solve's price. Otherwise λ decays, so that later
  items may take the room left.
- :meth:`~OnlineAllocator.evict`: tokens no later query can see (sliding and chunked layers) leave
  the store.

Room is made before anything is written: a plan is applied by first rewriting every pool that
loses tokens, then every pool that gains some, so the store's bytes never exceed
``max(before, after) ≤ budget``. :attr:`~OnlineAllocator.writes` records them after every pool
write. Nothing here needs transformers: tensors in, store contents out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sphkv.codec import Codec, Codes
from sphkv.rdr.distortion import PAGE_TABLE_ENTRY
from sphkv.rdr.pages import PagedStore
from sphkv.rdr.problem import AllocationProblem, InfeasibleBudgetError
from sphkv.rdr.tiers import TierSet
from sphkv.solvers import solve

__all__ = ["OnlineAllocator", "Tokens"]


@dataclass
class Tokens:
    """Items for the allocator, one row per (token, group).

    Attributes
    ----------
    group : numpy.ndarray
        int64 ``[n]``.
    positions : torch.Tensor
        int64 ``[n]`` (on the CPU), distinct within a group.
    keys, values : torch.Tensor
        ``[n, d]``, where the store lives.
    distortion : numpy.ndarray
        float64 ``[n, T]``: ``D[i, t]``, finite and ≥ 0.
    forced : numpy.ndarray, optional
        int64 ``[n]``: -1 where free, else the tier the item must take.
    """

    group: np.ndarray
    positions: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    distortion: np.ndarray
    forced: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.group = np.asarray(self.group, dtype=np.int64).reshape(-1)
        self.positions = torch.as_tensor(self.positions).long().cpu().reshape(-1)
        self.distortion = np.asarray(self.distortion, dtype=np.float64)
        n = len(self.group)
        if self.forced is None:
            self.forced = np.full(n, -1, dtype=np.int64)
        self.forced = np.asarray(self.forced, dtype=np.int64).reshape(-1)
        shapes = {"positions": len(self.positions), "keys": self.keys.shape[0],
                  "values": self.values.shape[0], "distortion": self.distortion.shape[0],
                  "forced": len(self.forced)}
        bad = {k: v for k, v in shapes.items() if v != n}
        if bad:
            raise ValueError(f"every field of Tokens needs {n} rows (one per group entry); got "
                             f"{bad}")
        if self.distortion.ndim != 2:
            raise ValueError(f"distortion must be [n, T], got shape {self.distortion.shape}")

    def __len__(self) -> int:
        return len(self.group)

    def select(self, index: np.ndarray) -> Tokens:
        """The rows ``index`` (int or bool numpy array)."""
        index = np.flatnonzero(index) if np.asarray(index).dtype == bool else np.asarray(index)
        on = torch.from_numpy(index).to(self.keys.device)
        return Tokens(self.group[index], self.positions[torch.from_numpy(index)],
                      self.keys[on], self.values[on], self.distortion[index],
                      self.forced[index])

    @staticmethod
    def cat(parts: list[Tokens]) -> Tokens:
        return Tokens(np.concatenate([p.group for p in parts]),
                      torch.cat([p.positions for p in parts]),
                      torch.cat([p.keys for p in parts]), torch.cat([p.values for p in parts]),
                      np.concatenate([p.distortion for p in parts]),
                      np.concatenate([p.forced for p in parts]))


class OnlineAllocator:
    """Tiers for a growing KV cache within a byte budget (module docstring).

    Parameters
    ----------
    tiers : TierSet
        The ladder, drop first (:meth:`sphkv.rdr.methods.Method.tier_set`).
    groups : int
        Page tables, one per (sequence, layer, kv-head).
    budget : float
        Bytes the store may hold: pages (partial ones whole) and page-table entries.
    page_size : int
        Slots per page.
    decay : float
        λ is multiplied by it after an admission that fits, in (0, 1].
    device : torch.device or str
        Where the pools live.
    encode : callable, optional
        ``encode(codec, x [n, d]) -> Codes``: how new vectors are encoded (a device kernel);
        ``codec.encode`` by default.

    Attributes
    ----------
    price : float
        λ.
    writes : list of int
        The store's bytes after every pool write.
    """

    def __init__(self, tiers: TierSet, groups: int, budget: float, page_size: int = 16,
                 decay: float = 0.8, device: torch.device | str = "cpu",
                 encode: Callable[[Codec, torch.Tensor], Codes] | None = None):
        if not budget >= 0:
            raise ValueError(f"budget must be >= 0 bytes, got {budget}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.tiers, self.budget, self.decay = tiers, float(budget), decay
        self.store = PagedStore(tiers, groups, page_size, device=device)
        self.encode = encode or (lambda codec, x: codec.encode(x))
        self.price = 0.0
        self.writes: list[int] = []
        # (group, position) keys of the items that arrived forced: they keep their tier
        self._pinned = np.zeros(0, dtype=np.int64)

    @property
    def page_size(self) -> int:
        return self.store.page_size

    @property
    def item_costs(self) -> np.ndarray:
        """Amortized bytes per item at each tier ``[T]``: its slot and its share of a page-table
        entry (0 for drop)."""
        cost = self.store.slot_costs
        return np.where(cost > 0, cost + PAGE_TABLE_ENTRY.itemsize / self.page_size, 0.0)

    def nbytes(self) -> int:
        return self.store.nbytes()

    # --- the three steps -----------------------------------------------------------------
    def prefill(self, tokens: Tokens) -> None:
        """Place the first items by one greedy solve within the budget; λ is its price.

        Raises
        ------
        InfeasibleBudgetError
            The forced items alone need more than the budget.
        """
        if self.store.nbytes():
            raise ValueError("prefill() places the first items; the store already holds some")
        if not len(tokens):
            return
        alloc = self._solve(self._problem(tokens.distortion, tokens.forced, tokens.group, None))
        self.price = float(alloc.price or 0.0)
        self._pin(tokens)
        self._apply(self._kept(), np.zeros(0, dtype=np.int64), tokens, alloc.tiers)

    def admit(self, tokens: Tokens) -> None:
        """Add items at the price λ, demoting kept ones first when they would not fit."""
        if not len(tokens):
            return
        # argmin_t D[i, t] + λ c_t; ties go to the dearer tier
        priced = tokens.distortion + self.price * self.item_costs
        tiers = priced.shape[1] - 1 - np.argmin(priced[:, ::-1], axis=1)
        tiers = np.where(tokens.forced >= 0, tokens.forced, tiers)
        self._pin(tokens)
        kept = self._kept()
        counts = self._counts(kept.group, kept.tier) + self._counts(tokens.group, tiers)
        if self._page_bytes(counts) <= self.budget:
            self._apply(kept, kept.tier, tokens, tiers)
            self.price *= self.decay
            return
        # one solve over the new items and the kept items cheapest to demote, capped at their
        # tier; the other kept items (and the pinned ones) stay where they are. Candidates grow
        # fourfold while they cannot free enough, up to every kept item.
        group = np.concatenate([kept.group, tokens.group])
        d = np.concatenate([kept.distortion, tokens.distortion])
        ceiling = np.concatenate([kept.tier, np.full(len(tokens), -1)])
        slope = self._demotion_slope(kept)
        movable = int(np.isfinite(slope).sum())
        candidates = 4 * len(tokens)
        while True:
            candidates = min(candidates, movable)
            stay = np.ones(len(kept.group), dtype=bool)
            if candidates:
                stay[np.argpartition(slope, candidates - 1)[:candidates]] = False
            forced = np.concatenate([np.where(stay, kept.tier, -1), tokens.forced])
            try:
                alloc = self._solve(self._problem(d, forced, group, ceiling),
                                    polish=False)
                break
            except InfeasibleBudgetError:
                if candidates >= movable:
                    raise
                candidates *= 4
        self.price = float(alloc.price or 0.0)
        self._apply(kept, alloc.tiers[:len(kept.group)], tokens, alloc.tiers[len(kept.group):])

    def _demotion_slope(self, kept: _Kept) -> np.ndarray:
        """``[n]``: the least distortion a kept item adds per byte it saves,
        ``min_{t' < t} (D[i, t'] − D[i, t]) / (c_t − c_t')`` at its tier t; +∞ if pinned."""
        cost = self.item_costs
        d_now = np.take_along_axis(kept.distortion, kept.tier[:, None], axis=1)
        saved = cost[kept.tier][:, None] - cost[None, :]  # [n, T], > 0 where cheaper
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = np.where(saved > 0, (kept.distortion - d_now) / saved, np.inf).min(axis=1)
        slope[kept.pinned] = np.inf
        return slope

    def evict(self, first: np.ndarray) -> int:
        """Remove every kept token of group g at a position below ``first[g]``.

        Parameters
        ----------
        first : numpy.ndarray
            int ``[groups]``: the lowest position any later query of the group can see.

        Returns
        -------
        int
            Tokens removed.
        """
        kept = self._kept()
        gone = kept.positions.numpy() < np.asarray(first)[kept.group]
        if gone.any():
            self._apply(kept, np.where(gone, 0, kept.tier), None, None)
        return int(gone.sum())

    # --- bookkeeping -----------------------------------------------------------------------
    def _pin(self, tokens: Tokens) -> None:
        pinned = tokens.forced >= 0
        if pinned.any():
            keys = _key(tokens.group[pinned], tokens.positions.numpy()[pinned])
            self._pinned = np.union1d(self._pinned, keys)

    def _kept(self) -> _Kept:
        """Every kept item, pool by pool, with its tier and whether it is pinned."""
        parts = {t: self.store.contents(t) for t in self.store.pools}
        group = np.concatenate([c[0] for c in parts.values()])
        positions = torch.cat([c[1] for c in parts.values()])
        tier = np.concatenate([np.full(len(c[0]), t) for t, c in parts.items()])
        d = torch.cat([c[4] for c in parts.values()]).double().cpu().numpy()
        pinned = np.isin(_key(group, positions.numpy()), self._pinned)
        return _Kept(parts, group, positions, tier, d, pinned)

    def _counts(self, group: np.ndarray, tiers: np.ndarray) -> np.ndarray:
        """Items per (group, tier) ``[groups, T]``."""
        counts = np.zeros((len(self.store.tables), len(self.tiers)), dtype=np.int64)
        np.add.at(counts, (group, tiers), 1)
        return counts

    def _page_bytes(self, counts: np.ndarray) -> int:
        """Bytes of a store holding ``counts`` items per (group, tier), packed into pages."""
        pages = -(-counts // self.page_size)
        page = np.array([self.store.pools[t].page_bytes if t in self.store.pools else 0
                         for t in range(len(self.tiers))])
        pages[:, page == 0] = 0
        return int((pages * (page + PAGE_TABLE_ENTRY.itemsize)).sum())

    def _solve(self, problem: AllocationProblem, polish: bool = True):
        """The greedy solve, on the store's device (torch) when that is a GPU; ``polish``: its
        local-move page repair (seconds at 10⁵ items, so admissions go without)."""
        if self.store.device.type == "cuda":
            return solve(problem, "greedy", backend="torch", device=str(self.store.device),
                         polish=polish)
        return solve(problem, "greedy", polish=polish)

    def _problem(self, d, forced, group, ceiling) -> AllocationProblem:
        try:
            return AllocationProblem(
                distortion=d, cost=self.store.slot_costs, budget=self.budget, groups=group,
                page_size=self.page_size, page_overhead=PAGE_TABLE_ENTRY.itemsize,
                forced=forced, ceiling=ceiling, tier_names=self.tiers.names)
        except InfeasibleBudgetError as exc:
            raise InfeasibleBudgetError(self.budget, exc.min_cost) from None

    # --- writing a plan ----------------------------------------------------------------------
    def _apply(self, kept: _Kept, kept_to: np.ndarray, new: Tokens | None,
               new_to: np.ndarray | None) -> None:
        """Move kept items to ``kept_to`` (0 drops) and write new items at ``new_to``: pools
        that lose tokens are rewritten first, pools that gain some after."""
        start, leaving, moving = 0, {}, []
        for t, (g, p, key, value, dist) in kept.parts.items():
            to = kept_to[start:start + len(g)]
            start += len(g)
            out = np.flatnonzero(to != t)
            if not len(out):
                continue
            stay = np.flatnonzero(to == t)
            leaving[t] = self._part(t, g, p, key, value, dist, stay)
            move = out[to[out] != 0]
            if len(move):  # decoded now, before their pool is rewritten
                on = torch.from_numpy(move).to(dist.device)
                tier = self.tiers[t]
                moving.append((to[move], g[move], p[torch.from_numpy(move)],
                               tier.key.decode(key.rows(on)),
                               tier.value.decode(value.rows(on)), dist[on]))
        for t, part in leaving.items():
            self._write(t, [part])
        arriving: dict[int, list] = {}
        if new is not None:
            dist = torch.from_numpy(new.distortion).float()
            moving.append((np.asarray(new_to), new.group, new.positions, new.keys, new.values,
                           dist))
        for to, g, p, k, v, dist in moving:
            for t in np.unique(to[to != 0]):
                sel = np.flatnonzero(to == t)
                on = torch.from_numpy(sel).to(k.device)
                arriving.setdefault(int(t), []).append(self._encoded(
                    int(t), g[sel], p[torch.from_numpy(sel)], k[on], v[on],
                    dist[torch.from_numpy(sel).to(dist.device)]))
        for t, parts in arriving.items():
            current = leaving[t] if t in leaving else self._part(t, *kept.parts[t], None)
            self._write(t, [current, *parts])

    def _part(self, t, g, p, key, value, dist, index) -> tuple:
        """Rows ``index`` (all if None) of pool ``t``'s contents, as :meth:`_write` takes them:
        a tier whose keys are quantized per page gives its keys decoded."""
        if index is not None:
            on = torch.from_numpy(index).to(dist.device)
            g, p, key, value, dist = (g[index], p[torch.from_numpy(index)], key.rows(on),
                                      value.rows(on), dist[on])
        if self.store.pools[t].paged_keys:
            key = self.tiers[t].key.decode(key)
        return g, p, key, value, dist

    def _encoded(self, t: int, g, p, keys, values, dist) -> tuple:
        tier, pool = self.tiers[t], self.store.pools[t]
        key = keys.float() if pool.paged_keys else self.encode(tier.key, keys)
        return g, p, key, self.encode(tier.value, values), dist

    def _write(self, t: int, parts: list[tuple]) -> None:
        """Make pool ``t`` hold exactly ``parts`` (``(group, positions, key, value,
        distortion)`` each); record the store's bytes."""
        group, pos, key, value, dist = zip(*parts, strict=True)
        dev = self.store.device
        if self.store.pools[t].paged_keys:
            key = torch.cat([k.float().to(dev) for k in key])
        else:
            key = Codes.cat([k.to(dev) for k in key])
        self.store.replace(t, np.concatenate(group), torch.cat(pos),
                           key, Codes.cat([v.to(dev) for v in value]),
                           torch.cat([x.float().to(dev) for x in dist]))
        self.writes.append(self.store.nbytes())


@dataclass
class _Kept:
    """Every kept item: ``parts`` (pool → :meth:`PagedStore.contents`), and flat ``group``,
    ``positions``, ``tier``, ``distortion`` and ``pinned`` in the same order."""

    parts: dict
    group: np.ndarray
    positions: torch.Tensor
    tier: np.ndarray
    distortion: np.ndarray
    pinned: np.ndarray


def _key(group: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """One int64 per (group, position)."""
    return (np.asarray(group, dtype=np.int64) << 32) | np.asarray(positions, dtype=np.int64)
