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
  slot plus its share of a page-table entry); whether they fit is read from the store's item
  counts per (group, tier). If the store would exceed the budget, one greedy solve places the
  new items and the kept items cheapest to demote (least distortion added per byte saved, one
  computation over every pool on the store's device; 4 per new item, more only if they cannot
  free enough), each kept item's tier capped at the one it holds (``ceiling``: lost precision
  never comes back), the other kept items where they are — counted as the pages they fill, not
  as items, so the solve's size follows the admission, not the cache; λ becomes that solve's
  price. Otherwise λ decays, so that later items may take the room left.
- :meth:`~OnlineAllocator.evict`: tokens no later query can see (sliding and chunked layers) leave
  the store.
- :meth:`~OnlineAllocator.revise`: one greedy solve over every item given (all the tokens seen,
  with rows from newer queries), as the prefill's; items whose tier changes move, from the
  vectors given — what a cache holding an fp16 copy of its tokens elsewhere (host memory) can
  do as new queries arrive.

Room is made before anything is written: a plan is applied one write per pool (tokens appended
behind their runs, or the runs they leave or join rewritten), first the pools whose bytes fall,
then those whose bytes grow, so the store's bytes never exceed ``max(before, after) ≤ budget``.
:attr:`~OnlineAllocator.writes` records them after every pool write. Nothing here needs
transformers: tensors in, store contents out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sphkv.codec import Codec, Codes
from sphkv.rdr.distortion import PAGE_TABLE_ENTRY
from sphkv.rdr.pages import OFFSET_BYTES, PagedStore
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
        ``[n, d]``, or ``[G, m, d]`` read as its ``G·m`` rows in order (a view into buffers
        the caller leaves unchanged while the items are read: only the rows selected are
        copied).
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
        shapes = {"positions": len(self.positions), "keys": _row_count(self.keys),
                  "values": _row_count(self.values), "distortion": self.distortion.shape[0],
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
                      _take(self.keys, on), _take(self.values, on), self.distortion[index],
                      self.forced[index])

    @staticmethod
    def cat(parts: list[Tokens]) -> Tokens:
        return Tokens(np.concatenate([p.group for p in parts]),
                      torch.cat([p.positions for p in parts]),
                      torch.cat([_flat(p.keys) for p in parts]),
                      torch.cat([_flat(p.values) for p in parts]),
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
    ordered : bool or array of bool
        Per group (or for all): whether the store keeps its runs in position order
        (:class:`~sphkv.rdr.pages.PagedStore`); unordered runs make admissions cost in
        proportion to the tokens they move.
    offset_bytes : {2, 4}
        Width of each slot's position offset (the store's): 4 where positions may reach
        2^16.

    Attributes
    ----------
    price : float
        λ.
    writes : list of int
        The store's bytes after every pool write.
    demotion_solves : int
        Admissions that overflowed and solved for demotions.
    """

    def __init__(self, tiers: TierSet, groups: int, budget: float, page_size: int = 16,
                 decay: float = 0.8, device: torch.device | str = "cpu",
                 encode: Callable[[Codec, torch.Tensor], Codes] | None = None,
                 ordered=True, offset_bytes: int = OFFSET_BYTES):
        if not budget >= 0:
            raise ValueError(f"budget must be >= 0 bytes, got {budget}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.tiers, self.budget, self.decay = tiers, float(budget), decay
        self.demotion_solves = 0
        self.store = PagedStore(tiers, groups, page_size, device=device, ordered=ordered,
                                offset_bytes=offset_bytes)
        self.encode = encode or (lambda codec, x: codec.encode(x))
        self.price = 0.0
        self.writes: list[int] = []

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
    def prefill(self, tokens: Tokens | list[Tokens]) -> None:
        """Place the first items by one greedy solve within the budget; λ is its price.

        ``tokens`` may come in parts (a cache's layers, say), solved as one problem and
        written part by part: their vectors are never concatenated, so a long prompt's keys
        and values are not copied once more.

        Raises
        ------
        InfeasibleBudgetError
            The forced items alone need more than the budget.
        """
        if self.store.nbytes():
            raise ValueError("prefill() places the first items; the store already holds some")
        parts = [p for p in ([tokens] if isinstance(tokens, Tokens) else tokens) if len(p)]
        if not parts:
            return
        alloc = self._solve(self._problem(*(np.concatenate([getattr(p, name) for p in parts])
                                            for name in ("distortion", "forced", "group")),
                                          None))
        self.price = float(alloc.price or 0.0)
        ends = np.cumsum([len(p) for p in parts])
        self._arrive([_arrivals(p, alloc.tiers[end - len(p):end])
                      for p, end in zip(parts, ends, strict=True)])

    def admit(self, tokens: Tokens) -> None:
        """Add items at the price λ, demoting kept ones first when they would not fit."""
        if not len(tokens):
            return
        # argmin_t D[i, t] + λ c_t; ties go to the dearer tier
        priced = tokens.distortion + self.price * self.item_costs
        tiers = priced.shape[1] - 1 - np.argmin(priced[:, ::-1], axis=1)
        tiers = np.where(tokens.forced >= 0, tokens.forced, tiers)
        if self._page_bytes(self.store.counts + self._counts(tokens.group, tiers)) <= self.budget:
            self._arrive([_arrivals(tokens, tiers)])
            self.price *= self.decay
            return
        # one solve over the new items and the kept items cheapest to demote, capped at their
        # tier; the other kept items (and the pinned ones) stay where they are. Candidates grow
        # fourfold while they cannot free enough, up to every kept item.
        slope = self._demotion_slopes()
        movable = int(torch.isfinite(slope).sum())
        candidates = 4 * len(tokens)
        while True:
            candidates = min(candidates, movable)
            cand = self._candidates(slope, candidates)
            try:
                alloc = self._solve(self._demotion_problem(cand, tokens), polish=False)
                break
            except InfeasibleBudgetError:
                if candidates >= movable:
                    raise
                candidates *= 4
        self.demotion_solves += 1
        self.price = float(alloc.price or 0.0)
        n = len(cand.tier)
        self._demote(cand, alloc.tiers[:n], tokens, alloc.tiers[n:n + len(tokens)])

    def revise(self, tokens: Tokens | list[Tokens]) -> None:
        """Solve the whole allocation again over ``tokens`` — every item the store may hold,
        with fresh distortion rows — as :meth:`prefill` would, and move the store there: an
        item whose tier changes leaves its pool and is encoded at its new one from the vectors
        given (a dropped item comes back, a compressed one rises from its original, not from
        its codes); an item that stays keeps its codes and takes its new row; a kept item not
        among ``tokens`` leaves. λ becomes the solve's price. ``tokens`` may come in parts, as
        for :meth:`prefill`: only the vectors of the items that move are read.

        Raises
        ------
        InfeasibleBudgetError
            The forced items alone need more than the budget.
        """
        parts = [tokens] if isinstance(tokens, Tokens) else list(tokens)
        if not parts:
            raise ValueError("revise() needs at least one part of tokens (an empty one for none)")
        distortion, forced, group = (np.concatenate([getattr(p, name) for p in parts])
                                     for name in ("distortion", "forced", "group"))
        alloc = self._solve(self._problem(distortion, forced, group, None))
        self.price = float(alloc.price or 0.0)
        # each kept item matched to its token by (group, position)
        ident = torch.from_numpy(group) << 32 | torch.cat([p.positions for p in parts])
        order = torch.argsort(ident)
        ident = ident[order]
        now = np.zeros(len(group), dtype=np.int64)  # the tier each token holds; 0: none
        leaving = {}
        for t, pool in self.store.pools.items():
            slots = torch.nonzero(pool.valid).flatten()
            owner = torch.from_numpy(pool.owner)[slots.cpu() // self.page_size]
            kept = owner << 32 | pool.position[slots].cpu()
            if len(ident):
                at = torch.searchsorted(ident, kept).clamp(max=len(ident) - 1)
                hit, row = (ident[at] == kept).numpy(), order[at].numpy()
            else:
                hit, row = np.zeros(len(kept), bool), np.zeros(len(kept), np.int64)
            now[row[hit]] = t
            stays = hit.copy()
            stays[hit] = alloc.tiers[row[hit]] == t
            # an item that stays keeps its codes and takes its new row (later demotions read it)
            on = torch.from_numpy(stays).to(slots.device)
            pool.distortion[slots[on]] = torch.from_numpy(
                distortion[row[stays]]).float().to(pool.distortion.device)
            if not stays.all():
                leaving[t] = (slots[~on], owner[torch.from_numpy(~stays)].numpy())
        moved = np.flatnonzero(alloc.tiers != now)
        starts = np.cumsum([0] + [len(p) for p in parts])
        arriving = []
        for part, lo, hi in zip(parts, starts[:-1], starts[1:], strict=True):
            mine = moved[(moved >= lo) & (moved < hi)]
            if len(mine):
                arriving.append(_arrivals(part.select(mine - lo), alloc.tiers[mine]))
        self._arrive(arriving, leaving)

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
        first = np.asarray(first, dtype=np.int64)
        if not (first > 0).any():
            return 0
        first = torch.from_numpy(first).to(self.store.device)
        removed = 0
        for t, pool in self.store.pools.items():
            owner = torch.from_numpy(pool.owner).to(self.store.device)
            gone = pool.valid & (pool.position < first[owner].repeat_interleave(self.page_size))
            n = int(gone.sum())
            if n:
                self.store.remove(t, torch.nonzero(gone).flatten())
                self.writes.append(self.store.nbytes())
                removed += n
        return removed

    # --- demotion --------------------------------------------------------------------------
    def _demotion_slopes(self) -> torch.Tensor:
        """float32 ``[slots of every pool, pool after pool]``, on the store's device: the least
        distortion a kept item adds per byte it saves, ``min_{t' < t} (D[i, t'] − D[i, t]) /
        (c_t − c_t')`` at its tier t; +∞ at empty slots and pinned items."""
        cost = torch.from_numpy(self.item_costs).float().to(self.store.device)
        parts = []
        for t, pool in self.store.pools.items():
            cheaper, d = cost < cost[t], pool.distortion
            slope = (((d[:, cheaper] - d[:, t:t + 1]) / (cost[t] - cost[cheaper])).amin(1)
                     if cheaper.any() else torch.full_like(d[:, 0], torch.inf))
            parts.append(slope.masked_fill_(~pool.valid | pool.pinned, torch.inf))
        return torch.cat(parts)

    def _candidates(self, slope: torch.Tensor, k: int) -> _Candidates:
        """The ``k`` kept items of least slope (:meth:`_demotion_slopes`), read to the host."""
        index = torch.topk(slope, k, largest=False, sorted=False).indices if k else slope[:0]
        index = index.long().sort().values.cpu().numpy()
        start = 0
        tier, slot, group, positions, d = [], [], [], [], []
        for t, pool in self.store.pools.items():
            rows = pool.offset.numel()
            mine = index[(index >= start) & (index < start + rows)] - start
            start += rows
            on = torch.from_numpy(mine).to(self.store.device)
            tier.append(np.full(len(mine), t))
            slot.append(mine)
            group.append(pool.owner[mine // self.page_size])
            positions.append(pool.position[on].cpu())
            d.append(pool.distortion[on].double().cpu().numpy())
        return _Candidates(np.concatenate(tier), np.concatenate(slot), np.concatenate(group),
                           torch.cat(positions), np.concatenate(d))

    def _demotion_problem(self, cand: _Candidates, tokens: Tokens) -> AllocationProblem:
        """The new items and the candidates, with the rest of the store counted exactly: in a
        group the problem touches, the f items staying at tier t fill f // P pages that leave
        the budget, and the f % P of a partial page join the problem as items forced at t with
        no distortion, so the solver's rounding ceil((f % P + chosen) / P) adds exactly the
        pages the run grows by; the pages of other groups leave the budget whole."""
        p, counts = self.page_size, self.store.counts
        touched = np.zeros(len(counts), dtype=bool)
        touched[cand.group] = touched[tokens.group] = True
        stay = counts - self._counts(cand.group, cand.tier)
        pages = np.where(touched[:, None], stay // p, -(-counts // p))
        fixed = int((pages * self._page_costs()).sum())
        rest = np.where(touched[:, None], stay % p, 0)
        g, t = np.nonzero(rest)
        n = rest[g, t]
        dummies = int(n.sum())
        free = np.full(len(cand.tier), -1)
        d = np.concatenate([cand.distortion, tokens.distortion,
                            np.zeros((dummies, len(self.tiers)))])
        return self._problem(d, np.concatenate([free, tokens.forced, np.repeat(t, n)]),
                             np.concatenate([cand.group, tokens.group, np.repeat(g, n)]),
                             np.concatenate([cand.tier, np.full(len(tokens) + dummies, -1)]),
                             fixed)

    def _demote(self, cand: _Candidates, cand_to: np.ndarray, new: Tokens,
                new_to: np.ndarray) -> None:
        """Move the candidates to ``cand_to`` (0 drops) and write the new items at
        ``new_to``."""
        arriving, leaving = [_arrivals(new, new_to)], {}
        for t in np.unique(cand.tier[cand_to != cand.tier]):
            mine = (cand.tier == t) & (cand_to != t)
            slots = torch.from_numpy(cand.slot[mine]).to(self.store.device)
            key, value = self.store.codes(int(t), slots)
            tier = self.tiers[int(t)]
            # decoded now, before their pool is rewritten
            arriving.append((cand_to[mine], cand.group[mine],
                             cand.positions[torch.from_numpy(mine)], tier.key.decode(key),
                             tier.value.decode(value),
                             torch.from_numpy(cand.distortion[mine]).float(),
                             torch.zeros(int(mine.sum()), dtype=torch.bool)))
            leaving[int(t)] = (slots, cand.group[mine])
        self._arrive(arriving, leaving)

    # --- bookkeeping -----------------------------------------------------------------------
    def _counts(self, group: np.ndarray, tiers: np.ndarray) -> np.ndarray:
        """Items per (group, tier) ``[groups, T]``."""
        t = len(self.tiers)
        return np.bincount(np.asarray(group) * t + tiers, minlength=self.store.groups * t
                           ).reshape(self.store.groups, t)

    def _page_costs(self) -> np.ndarray:
        """Bytes of a page of each tier with its page-table entry ``[T]`` (0 for drop)."""
        return np.array([self.store.pools[t].page_bytes + PAGE_TABLE_ENTRY.itemsize
                         if t in self.store.pools else 0 for t in range(len(self.tiers))])

    def _page_bytes(self, counts: np.ndarray, axis: int | None = None):
        """Bytes of a store holding ``counts`` items per (group, tier), packed into pages (per
        tier ``[T]`` with ``axis=0``)."""
        return (-(-counts // self.page_size) * self._page_costs()).sum(axis=axis)

    def _solve(self, problem: AllocationProblem, polish: bool = True):
        """The greedy solve, on the store's device (torch) when that is a GPU; ``polish``: its
        local-move page repair (seconds at 10⁵ items, so admissions go without). Its tiers and
        price are what the allocator reads, so it computes no tight lower bound (``bound``)."""
        if self.store.device.type == "cuda":
            return solve(problem, "greedy", backend="torch", device=str(self.store.device),
                         polish=polish, bound=False)
        return solve(problem, "greedy", polish=polish, bound=False)

    def _problem(self, d, forced, group, ceiling, fixed: int = 0) -> AllocationProblem:
        """The problem over these items within the budget less ``fixed`` bytes held apart."""
        try:
            return AllocationProblem(
                distortion=d, cost=self.store.slot_costs, budget=self.budget - fixed,
                groups=group, page_size=self.page_size,
                page_overhead=PAGE_TABLE_ENTRY.itemsize, forced=forced, ceiling=ceiling,
                tier_names=self.tiers.names)
        except InfeasibleBudgetError as exc:
            raise InfeasibleBudgetError(self.budget, exc.min_cost + fixed) from None

    # --- writing ---------------------------------------------------------------------------
    def _arrive(self, parts: list[tuple], leaving: dict | None = None) -> None:
        """Write items at their tiers (``(tier, group, positions, keys, values, distortion,
        pinned)`` each, vectors not yet encoded; tier 0 drops) and take the items ``leaving``
        (tier → (slots, groups)) out, one write per pool: the pools whose bytes fall first,
        so the store's bytes never pass ``max(before, after)``."""
        leaving = leaving or {}
        to, group = (np.concatenate([part[i] for part in parts]) if parts
                     else np.zeros(0, np.int64) for i in (0, 1))
        counts = self.store.counts + self._counts(group, to)
        for t, (_, g) in leaving.items():
            counts -= self._counts(g, np.full(len(g), t))
        change = self._page_bytes(counts, axis=0) - self._page_bytes(self.store.counts, axis=0)
        touched = set(np.unique(to[to != 0]).tolist()) | set(leaving)
        for t in sorted(touched, key=lambda t: change[t]):
            tier, pool, dev = self.tiers[t], self.store.pools[t], self.store.device
            chunks = []
            for part in parts:
                sel = np.flatnonzero(part[0] == t)
                if not len(sel):
                    continue
                cpu, on = torch.from_numpy(sel), torch.from_numpy(sel).to(part[3].device)
                keys, values = part[3][on].to(dev), part[4][on].to(dev)
                chunks.append((part[1][sel], part[2][cpu],
                               keys.float() if pool.paged_keys else self.encode(tier.key, keys),
                               self.encode(tier.value, values), part[5][cpu].to(dev),
                               part[6][cpu]))
            new = None
            if chunks:
                g, pos, key, value, dist, pinned = zip(*chunks, strict=True)
                new = (np.concatenate(g), torch.cat(pos),
                       torch.cat(key) if pool.paged_keys else Codes.cat(key), Codes.cat(value),
                       torch.cat(dist), torch.cat(pinned))
            if t in leaving:
                self.store.update(t, leaving[t][0], new)
            else:
                self.store.add(t, *new)
            self.writes.append(self.store.nbytes())


@dataclass
class _Candidates:
    """Kept items that may be demoted: pool ``tier``, ``slot`` in it, ``group``, ``positions``
    and ``distortion`` rows (float64 ``[n, T]``), on the host."""

    tier: np.ndarray
    slot: np.ndarray
    group: np.ndarray
    positions: torch.Tensor
    distortion: np.ndarray


def _arrivals(tokens: Tokens, to: np.ndarray) -> tuple:
    """New items at tiers ``to``, as :meth:`OnlineAllocator._arrive` takes them."""
    return (np.asarray(to), tokens.group, tokens.positions, _flat(tokens.keys),
            _flat(tokens.values),
            torch.from_numpy(tokens.distortion).float(), torch.from_numpy(tokens.forced >= 0))


def _row_count(x: torch.Tensor) -> int:
    """Rows of a :class:`Tokens` vector field: ``[n, d]`` or ``[G, m, d]``."""
    return x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[1]


def _take(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of a :class:`Tokens` vector field, as ``[len(rows), d]``."""
    if x.dim() == 2:
        return x[rows]
    return x[rows // x.shape[1], rows % x.shape[1]]


def _flat(x: torch.Tensor) -> torch.Tensor:
    """A :class:`Tokens` vector field as ``[n, d]`` (a copy where ``x`` is a strided view)."""
    return x.reshape(-1, x.shape[-1])
