"""Page repair: turn an item-level allocation into one that pays for whole pages within budget.

A group with n items at tier t pays ``ceil(n / P)`` pages of ``P c + h`` bytes, so an allocation
solved on the amortized cost ``c + h/P`` may exceed the budget by its partial pages, or leave free
slots unused. Two local moves, each priced exactly by the page counts they change:

- *trim* (while over budget): empty one partial page of (group g, tier t) — or a full one if none
  is partial — by demoting its least-harmed items to their best cheaper tier; taken in order of
  distortion added per byte saved.
- *fill* (while bytes are left): fill the free slots of a partial page of (g, t) — or open a new
  page — with the items of g that gain most from moving up into t; taken in order of distortion
  saved per byte spent, while they fit.

Every move changes one group only, so only that group's candidate moves are recomputed.
"""

from __future__ import annotations

import numpy as np

from sphkv.rdr.problem import AllocationProblem

__all__ = ["repair_pages"]


class _Group:
    """Items of one page group and their candidate moves."""

    def __init__(self, problem: AllocationProblem, items: np.ndarray, page_bytes: np.ndarray):
        self.items = items
        self.free = problem.forced[items] < 0
        self.d = problem.distortion[items]
        self.pb = page_bytes
        self.page_size = problem.page_size

    def pages(self, counts: np.ndarray) -> np.ndarray:
        return -(-counts // self.page_size)

    def move_cost(self, counts: np.ndarray, moved_from: np.ndarray, to_tiers: np.ndarray) -> float:
        """Exact change in page bytes when items at tiers ``moved_from`` go to ``to_tiers``."""
        t = len(counts)
        new = counts - np.bincount(moved_from, minlength=t) + np.bincount(to_tiers, minlength=t)
        return float(((self.pages(new) - self.pages(counts)) * self.pb).sum())

    def trim_moves(self, tiers: np.ndarray, counts: np.ndarray):
        """Per paged tier: (Δbytes < 0, Δdistortion, items, destinations) emptying one page."""
        moves = []
        rows = np.arange(len(self.items))
        cur_d = self.d[rows, tiers]
        for t in np.flatnonzero((self.pb > 0) & (counts > 0)):
            k = int(counts[t] % self.page_size) or self.page_size
            members = np.flatnonzero((tiers == t) & self.free)
            cheaper = self.pb < self.pb[t]
            if members.size < k or not cheaper.any():
                continue
            cand_d = np.where(cheaper[None, :], self.d[members], np.inf)
            dest = np.argmin(cand_d, axis=1)
            harm = cand_d[np.arange(members.size), dest] - cur_d[members]
            pick = np.argpartition(harm, k - 1)[:k] if k < members.size else np.arange(k)
            d_bytes = self.move_cost(counts, np.full(k, t), dest[pick])
            if d_bytes < 0:
                moves.append((d_bytes, float(harm[pick].sum()), members[pick], dest[pick]))
        return moves

    def fill_moves(self, tiers: np.ndarray, counts: np.ndarray):
        """Per paged tier: (Δbytes, Δdistortion < 0, items, destinations) filling one page."""
        moves = []
        rows = np.arange(len(self.items))
        cur_d = self.d[rows, tiers]
        cur_pb = self.pb[tiers]
        for t in np.flatnonzero(self.pb > 0):
            k = int(-counts[t] % self.page_size) or self.page_size
            gain = cur_d - self.d[:, t]
            members = np.flatnonzero(self.free & (cur_pb < self.pb[t]) & (gain > 0))
            if members.size == 0:
                continue
            if members.size > k:
                members = members[np.argpartition(-gain[members], k - 1)[:k]]
            dest = np.full(members.size, t)
            d_bytes = self.move_cost(counts, tiers[members], dest)
            moves.append((d_bytes, -float(gain[members].sum()), members, dest))
        return moves


def _best(moves, key):
    return min(moves, key=key) if moves else None


def repair_pages(problem: AllocationProblem, tiers: np.ndarray) -> np.ndarray:
    """Make ``tiers`` fit the budget in whole pages, then spend what is left on page fills.

    Falls back to the cheapest feasible assignment if trimming cannot reach the budget.
    """
    tiers = np.asarray(tiers, dtype=np.int64).copy()
    order = np.argsort(problem.group_index, kind="stable")
    bounds = np.searchsorted(problem.group_index[order], np.arange(problem.n_groups + 1))
    page_bytes = problem.page_bytes
    groups = [_Group(problem, order[bounds[g]:bounds[g + 1]], page_bytes[g])
              for g in range(problem.n_groups)]
    local = [tiers[grp.items] for grp in groups]
    counts = problem.counts(tiers)
    cost = problem.cost_of(tiers)

    def apply(g: int, move) -> float:
        d_bytes, _, members, dest = move
        counts[g] -= np.bincount(local[g][members], minlength=problem.n_tiers)
        counts[g] += np.bincount(dest, minlength=problem.n_tiers)
        local[g][members] = dest
        return d_bytes

    # Trim: least distortion added per byte saved.
    if cost > problem.budget:
        best = [_best(grp.trim_moves(local[g], counts[g]), key=lambda m: m[1] / -m[0])
                for g, grp in enumerate(groups)]
        while cost > problem.budget:
            scored = [(m[1] / -m[0], g) for g, m in enumerate(best) if m is not None]
            if not scored:
                return problem.min_cost_tiers()
            _, g = min(scored)
            cost += apply(g, best[g])
            best[g] = _best(groups[g].trim_moves(local[g], counts[g]), key=lambda m: m[1] / -m[0])

    # Fill: most distortion saved per byte, among moves that fit.
    def fill_key(m):
        return m[1] / m[0] if m[0] > 0 else -np.inf  # a fill that frees bytes comes first

    def best_fill(g: int):
        room = problem.budget - cost
        moves = [m for m in groups[g].fill_moves(local[g], counts[g]) if m[0] <= room]
        return _best(moves, key=fill_key)

    best = [best_fill(g) for g in range(len(groups))]
    while True:
        room = problem.budget - cost
        scored = [(fill_key(m), g) for g, m in enumerate(best) if m is not None and m[0] <= room]
        if not scored:
            break
        _, g = min(scored)
        cost += apply(g, best[g])
        best[g] = best_fill(g)
        # Moves elsewhere that no longer fit are dropped lazily; recompute them when stale.
        for h, m in enumerate(best):
            if m is not None and m[0] > problem.budget - cost:
                best[h] = best_fill(h)

    for grp, t in zip(groups, local):
        tiers[grp.items] = t
    return tiers
