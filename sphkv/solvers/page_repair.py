"""Page repair: turn an item-level allocation into one that pays for whole pages within budget.

A group with n items at tier t pays ``ceil(n / P)`` pages of ``P c + h`` bytes, so an allocation
solved on the amortized cost ``c + h/P`` may exceed the budget by its partial pages, or leave free
slots unused. Local moves, each priced exactly by the page counts it changes:

- *trim* (while over budget): empty one partial page of (group g, tier t) — or a full one if none
  is partial — by demoting its least-harmed items to a cheaper tier u; taken in order of
  distortion added per byte saved.
- *fill* (while bytes are left): fill the free slots of a partial page of (g, t) — or open a new
  page — with the items of one cheaper tier a of g that gain most from moving up into t; taken in
  order of distortion saved per byte spent, while they fit. Moves are generated per source
  tier, so a cheap upgrade (2-bit to 3-bit pays only the difference of two pages) competes with
  an expensive one (drop to 3-bit pays a whole page).
- *exchange*: a fill that does not fit, paid for by trims in other groups that cost less
  distortion than the fill saves (a page-granular knapsack is not solved by ratio order alone).

Every move changes one group only, so only that group's candidate moves are recomputed. After the
moves, ``reassign`` puts the items of each group into the slots its pages pay for at least
distortion (a min-cost flow), which may empty pages for another round; ``paged_dual_bound`` is
the matching lower bound. ``exchange_tiers`` is the vectorised form of the reassignment for
many groups: exchanges of items along negative cycles of a group's tiers, all groups at once
(with cycles of every length, run to the end, it reaches the reassignment's optimum).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np

from sphkv.rdr.problem import AllocationProblem
from sphkv.solvers.page_round import rank_major

__all__ = ["exchange_tiers", "paged_dual_bound", "reassign", "repair_pages"]

# Slots per block of groups in a round of exchanges: a block's arrays stay in cache (at 1M
# items in 4,096 groups, 2^16 took the exchanges from 0.20 s to 0.13 s against one pass over
# all groups; 2^14 to 2^17 were within 15% of each other).
_EXCHANGE_SLOTS = 1 << 16


class _Group:
    """Items of one page group and their candidate moves."""

    def __init__(self, problem: AllocationProblem, items: np.ndarray, page_bytes: np.ndarray):
        self.items = items
        self.free = problem.forced[items] < 0
        self.d = problem.distortion[items]
        self.allowed = problem.allowed(items)
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
        """Per pair of paged tier t and cheaper tier u: demote the items of one page of t
        (the partial one, else a full one) that lose least by moving to u."""
        moves = []
        rows = np.arange(len(self.items))
        cur_d = self.d[rows, tiers]
        for t in np.flatnonzero((self.pb > 0) & (counts > 0)):
            k = int(counts[t] % self.page_size) or self.page_size
            members = np.flatnonzero((tiers == t) & self.free)
            if members.size < k:
                continue
            for u in np.flatnonzero(self.pb < self.pb[t]):
                harm = np.where(self.allowed[members, u], self.d[members, u] - cur_d[members],
                                np.inf)
                pick = np.argpartition(harm, k - 1)[:k] if k < members.size else np.arange(k)
                dest = np.full(k, u)
                d_bytes = self.move_cost(counts, np.full(k, t), dest)
                if d_bytes < 0 and np.isfinite(harm[pick]).all():
                    moves.append((d_bytes, float(harm[pick].sum()), members[pick], dest))
        return moves

    def fill_moves(self, tiers: np.ndarray, counts: np.ndarray):
        """Per pair of paged tier t and cheaper tier a: move up into t the items of a that gain
        most, as many as t has free slots (else a new page's worth)."""
        moves = []
        rows = np.arange(len(self.items))
        cur_d = self.d[rows, tiers]
        for t in np.flatnonzero(self.pb > 0):
            k = int(-counts[t] % self.page_size) or self.page_size
            gain = cur_d - self.d[:, t]
            for a in np.flatnonzero(self.pb < self.pb[t]):
                members = np.flatnonzero(self.free & (tiers == a) & (gain > 0)
                                         & self.allowed[:, t])
                if members.size == 0:
                    continue
                if members.size > k:
                    members = members[np.argpartition(-gain[members], k - 1)[:k]]
                dest = np.full(members.size, t)
                d_bytes = self.move_cost(counts, tiers[members], dest)
                moves.append((d_bytes, -float(gain[members].sum()), members, dest))
        return moves


class _Move(NamedTuple):
    d_bytes: float
    d_distortion: float
    members: np.ndarray  # positions within the group
    dest: np.ndarray  # their new tiers


def _trim_key(m: _Move) -> float:
    return m.d_distortion / -m.d_bytes  # distortion added per byte saved


def _fill_key(m: _Move) -> float:
    # Distortion saved per byte (negative: smaller is better); a fill that frees bytes first.
    return m.d_distortion / m.d_bytes if m.d_bytes > 0 else -np.inf


class _PageState:
    """An allocation being repaired, with each group's candidate moves cached."""

    def __init__(self, problem: AllocationProblem, tiers: np.ndarray):
        self.problem = problem
        order = np.argsort(problem.group_index, kind="stable")
        bounds = np.searchsorted(problem.group_index[order], np.arange(problem.n_groups + 1))
        self.groups = [_Group(problem, order[bounds[g]:bounds[g + 1]], problem.page_bytes[g])
                       for g in range(problem.n_groups)]
        self.local = [tiers[grp.items] for grp in self.groups]
        self.counts = problem.counts(tiers)
        self.cost = problem.cost_of(tiers)
        self._trims: list = [None] * len(self.groups)
        self._fills: list = [None] * len(self.groups)
        self.touched: set[int] = set()

    @property
    def room(self) -> float:
        return self.problem.budget - self.cost

    def trims(self, g: int) -> list[_Move]:
        if self._trims[g] is None:
            self._trims[g] = [_Move(*m) for m in
                              self.groups[g].trim_moves(self.local[g], self.counts[g])]
        return self._trims[g]

    def fills(self, g: int) -> list[_Move]:
        if self._fills[g] is None:
            self._fills[g] = [_Move(*m) for m in
                              self.groups[g].fill_moves(self.local[g], self.counts[g])]
        return self._fills[g]

    def apply(self, g: int, move: _Move) -> None:
        t = self.problem.n_tiers
        self.counts[g] -= np.bincount(self.local[g][move.members], minlength=t)
        self.counts[g] += np.bincount(move.dest, minlength=t)
        self.local[g][move.members] = move.dest
        self.cost += move.d_bytes
        self._trims[g] = self._fills[g] = None
        self.touched.add(g)

    def trim_to_budget(self) -> bool:
        """Empty pages, least distortion added per byte saved first, until within budget."""
        while self.cost > self.problem.budget:
            scored = [(_trim_key(m), g, m) for g in range(len(self.groups))
                      for m in self.trims(g)]
            if not scored:
                return False
            _, g, m = min(scored, key=lambda s: s[:2])
            self.apply(g, m)
        return True

    def fill(self) -> None:
        """Fill pages, most distortion saved per byte first, while they fit."""
        while True:
            room = self.room
            scored = [(_fill_key(m), g, m) for g in range(len(self.groups))
                      for m in self.fills(g) if m.d_bytes <= room]
            if not scored:
                return
            _, g, m = min(scored, key=lambda s: s[:2])
            self.apply(g, m)

    def exchange(self, tries: int = 16) -> bool:
        """One page fill that does not fit, paid for by page trims in other groups.

        Tries the best-ratio fills first; applies the first whose trims cost less distortion
        than the fill saves. Returns whether anything changed.
        """
        room = self.room
        adds = sorted(((_fill_key(m), g, m) for g in range(len(self.groups))
                       for m in self.fills(g) if m.d_bytes > room), key=lambda s: s[:2])
        trims = sorted(((_trim_key(m), g, m) for g in range(len(self.groups))
                        for m in self.trims(g)), key=lambda s: s[:2])
        for _, g_add, add in adds[:tries]:
            need, loss, chosen, used = add.d_bytes - room, 0.0, [], set()
            for _, g, m in trims:
                if g == g_add or g in used:
                    continue  # one move per group: moves of one group interact
                chosen.append((g, m))
                used.add(g)
                loss += m.d_distortion
                need += m.d_bytes
                if need <= 0 or loss >= -add.d_distortion:
                    break
            if need <= 0 and loss < -add.d_distortion * (1 - 1e-12):
                for g, m in chosen:
                    self.apply(g, m)
                self.apply(g_add, add)
                return True
        return False

    def tiers(self) -> np.ndarray:
        tiers = np.empty(self.problem.n_items, dtype=np.int64)
        for grp, local in zip(self.groups, self.local):
            tiers[grp.items] = local
        return tiers


def reassign(problem: AllocationProblem, tiers: np.ndarray, groups=None,
             pages: np.ndarray | None = None) -> np.ndarray:
    """The least-distortion assignment of items to the page slots that ``tiers`` pays for.

    With page counts fixed (those of ``tiers``, or ``pages`` [G, T]), each (group, tier) offers
    ``pages * P - forced`` slots (tiers without pages offer any number), and assigning a group's
    free items to its slots is a min-cost flow: item → slot of a tier → sink, one small flow per
    group (all groups, or those in ``groups``). Distortions are scaled to integers for OR-Tools'
    solver (rounding 2⁻³⁶ of the largest).
    """
    from ortools.graph.python import min_cost_flow

    t = problem.n_tiers
    if pages is None:
        pages = -(-problem.counts(tiers) // problem.page_size)
    out = tiers.copy()
    free = problem.forced < 0
    capacity = np.where(problem.page_bytes > 0,
                        pages * problem.page_size - problem.forced_counts(), free.size)
    top = float(problem.distortion.max(initial=0.0))
    scale = 2.0**36 / top if top > 0 else 1.0  # all distortions 0: any assignment is best
    order = np.argsort(problem.group_index, kind="stable")
    bounds = np.searchsorted(problem.group_index[order], np.arange(problem.n_groups + 1))
    for g in range(problem.n_groups) if groups is None else groups:
        items = order[bounds[g]:bounds[g + 1]]
        items = items[free[items]]
        n = items.size
        if n == 0:
            continue
        flow = min_cost_flow.SimpleMinCostFlow()
        # Nodes: items 0..n-1, tier slots n..n+T-1, sink n+T; an arc per allowed tier.
        ok = problem.allowed(items).ravel()
        flow.add_arcs_with_capacity_and_unit_cost(
            np.repeat(np.arange(n), t)[ok], np.tile(n + np.arange(t), n)[ok],
            np.ones(int(ok.sum()), dtype=np.int64),
            np.rint(problem.distortion[items] * scale).astype(np.int64).ravel()[ok])
        flow.add_arcs_with_capacity_and_unit_cost(
            n + np.arange(t), np.full(t, n + t), np.minimum(capacity[g], n).astype(np.int64),
            np.zeros(t, dtype=np.int64))
        supplies = np.zeros(n + t + 1, dtype=np.int64)
        supplies[:n], supplies[-1] = 1, -n
        flow.set_nodes_supplies(np.arange(n + t + 1), supplies)
        if flow.solve() == flow.OPTIMAL:
            x = np.zeros(n * t, dtype=np.int64)
            x[ok] = flow.flows(np.arange(int(ok.sum())))
            out[items] = np.argmax(x.reshape(n, t), axis=1)
    return out


def repair_pages(problem: AllocationProblem, tiers: np.ndarray, rounds: int = 3) -> np.ndarray:
    """Make ``tiers`` fit the budget in whole pages, then improve it.

    Rounds of: fills and exchanges, then a reassignment of items to the paid-for slots
    (which may empty pages and free bytes for the next round). Falls back to the cheapest
    feasible assignment if trimming cannot reach the budget.
    """
    state = _PageState(problem, np.asarray(tiers, dtype=np.int64).copy())
    if not state.trim_to_budget():
        return problem.min_cost_tiers()
    best = state.tiers()
    for round_ in range(rounds):
        state.fill()
        for _ in range(4 * problem.n_groups * problem.n_tiers):
            if not state.exchange():
                break
            state.fill()
        # Reassign every group first, then only those the round's moves touched.
        tiers = reassign(problem, state.tiers(), None if round_ == 0 else sorted(state.touched))
        if problem.distortion_of(tiers) >= problem.distortion_of(best) * (1 - 1e-12):
            break
        best = tiers
        state = _PageState(problem, tiers)
    return best


def paged_dual_bound(problem: AllocationProblem, price: float, evaluations: int = 16) -> float:
    """The slot-crediting Lagrangian lower bound on the paged optimum
    (:func:`sphkv.solvers.page_round.slot_dual_bound`), maximised over λ from ``price`` with at
    most ``evaluations`` evaluations."""
    import array_api_compat

    from sphkv.solvers.page_round import slot_dual_bound

    free = problem.forced < 0
    fixed = np.flatnonzero(~free)
    group_cost = problem._group_cost
    amortized = np.where(group_cost > 0,
                         group_cost + problem.page_overhead / problem.page_size, 0.0)
    forced_counts = problem.forced_counts()
    slots = np.where(problem.page_bytes > 0, (-forced_counts) % problem.page_size, 0)
    return slot_dual_bound(
        array_api_compat.array_namespace(amortized), problem.distortion[free],
        problem.allowed(free) if problem.has_ceiling else None, amortized,
        problem.group_index[free], slots,
        float(problem.distortion[fixed, problem.forced[fixed]].sum()),
        problem.page_cost(forced_counts), problem.budget, price, 4.0 * price, evaluations)


def exchange_tiers(problem: AllocationProblem, tiers: np.ndarray, rounds: int = 16,
                   longest: int = 3) -> np.ndarray:
    """Move items between the tiers of each group along cycles that lower the distortion; no
    page count grows, so neither do the bytes.

    Per group, a graph of its tiers and a slack node S: arc u -> v costs the least
    ``D_v - D_u`` over the free items at u that may take v, v -> S costs 0 where v has an empty
    slot in its pages (or has no pages), S -> u costs 0. Moving the item of every tier-to-tier
    arc of a cycle keeps every count, except that a cycle through S moves one item out of u and
    one into v's empty slot; the items are distinct (one per tier). Each round applies, in every
    group that has one, the most negative cycle of 2 to ``longest`` arcs, until none is left or
    after ``rounds``. A negative cycle of the min-cost flow that assigns a group's items to the
    slots its pages pay for (:func:`reassign`) visits each tier once, so with ``longest`` the
    number of tiers + 1 and no negative cycle left the assignment is that flow's optimum. All
    groups at once on a group-major layout padded to the largest group, [G, M] (``tiers``
    unchanged where that would take more than 4 slots per item), a round by blocks of groups
    (each gathering its own distortions, in cache).
    """
    tiers = np.array(tiers, dtype=np.int64)
    g_count, t = problem.n_groups, problem.n_tiers
    group = problem.group_index
    sizes = np.bincount(group, minlength=g_count)
    m = max(int(sizes.max(initial=0)), 1)
    if g_count * m > 4 * problem.n_items + (1 << 12) or problem.page_size is None:
        return tiers
    by_group = np.argsort(group, kind="stable")
    slot = (group[by_group] * m + np.arange(by_group.size)
            - np.repeat(np.cumsum(sizes) - sizes, sizes))
    index = np.full(g_count * m, -1, dtype=np.int64)
    index[slot] = by_group
    index = index.reshape(g_count, m)
    item = np.maximum(index, 0)
    movable = (index >= 0) & (problem.forced[item] < 0)
    ceiling = np.where(movable, problem.ceiling_tier[item], -1) if problem.has_ceiling else None
    now = np.where(movable, tiers[item], -1).astype(np.int16)  # (sorted by radix sort)
    counts = problem.counts(tiers)
    # Empty slots of each (group, tier); unpaged tiers take any number.
    spare = np.where(problem.page_bytes > 0, (-counts) % problem.page_size, 1 << 40)
    # A cycle counts as negative below -1e-12 of its group's distortion.
    tolerance = 1e-12 * np.where(index >= 0, np.abs(np.take(problem.distortion,
                                                            item * t + tiers[item])),
                                 0.0).sum(axis=1)
    src, dst = _cycles(t + 1, min(longest, t + 1))
    rows = np.arange(g_count)
    step = max(1, _EXCHANGE_SLOTS // m)  # rows per block
    for _ in range(rounds):
        if not rows.size:
            break
        better = np.concatenate([
            _exchange_round(problem.distortion, now, item, ceiling, spare, tolerance, src, dst,
                            rows[s:s + step]) for s in range(0, rows.size, step)])
        rows = rows[better]
    tiers[index[movable]] = now[movable]
    return tiers


def _exchange_round(distortion, now, item, ceiling, spare, tolerance, src, dst, rows):
    """One round of :func:`exchange_tiers` on the groups ``rows``: each applies its most
    negative cycle (``now`` [G, M] and ``spare`` updated in place). Returns whether each
    had one."""
    t, m = distortion.shape[1], now.shape[1]
    r = np.arange(rows.size)
    # Each row's slots by tier (padding and forced items, -1, first): the items of tier u
    # of a row are one segment, and an arc's cost a minimum over it.
    by_tier = np.argsort(now[rows], axis=1, kind="stable")
    sorted_slot = by_tier + (rows * m)[:, None]  # in the [G, M] layout
    at = np.take(now, sorted_slot)
    # The block's distortions in that order, rank-major [T, R·M]: one gather of whole rows.
    d = rank_major(np, np.take(distortion, np.take(item, sorted_slot).reshape(-1), axis=0))
    width = d.shape[1]
    cur = np.take(d, np.maximum(at, 0).astype(np.int64) * width
                  + np.arange(width).reshape(at.shape))
    limit = None if ceiling is None else np.take(ceiling, sorted_slot)
    segment = (r[:, None] * (t + 1) + at + 1).ravel()
    starts = np.searchsorted(segment, np.arange(rows.size * (t + 1) + 1))
    empty = (starts[1:] == starts[:-1]).reshape(rows.size, t + 1)[:, 1:]
    arc = np.zeros((rows.size, t + 1, t + 1))  # node t: S
    padded = np.full(width + 1, np.inf)  # an end for the empty last segments
    delta = padded[:-1].reshape(at.shape)
    for v in range(t):
        np.subtract(d[v].reshape(at.shape), cur, out=delta)
        if limit is not None:
            delta[limit < v] = np.inf
        low = np.minimum.reduceat(padded, starts[:-1]).reshape(rows.size, t + 1)[:, 1:]
        arc[:, :t, v] = np.where(empty, np.inf, low)
        arc[:, v, v] = 0.0
    arc[:, :t, t] = np.where(spare[rows] > 0, 0.0, np.inf)
    cost = arc[:, src, dst].sum(axis=2)  # [R, cycles]
    best = np.argmin(cost, axis=1)
    better = cost[r, best] < -tolerance[rows]
    r, best = r[better], best[better]
    for j in range(src.shape[1]):
        u, v = src[best, j], dst[best, j]
        step = (u != v) & (u < t) & (v < t)
        k, u, v = r[step], u[step], v[step]
        # The arc's item: the first of least D_v - D_u in segment (k, u), gathered alone.
        first = starts[k * (t + 1) + u + 1]
        length = starts[k * (t + 1) + u + 2] - first
        offset = np.cumsum(length) - length
        at_pos = np.arange(int(length.sum())) + np.repeat(first - offset, length)
        to = np.repeat(v, length)
        gain = np.take(d, to * width + at_pos) - cur.reshape(-1)[at_pos]
        if limit is not None:
            gain[limit.reshape(-1)[at_pos] < to] = np.inf
        least = gain == np.repeat(np.minimum.reduceat(gain, offset), length)
        hit = np.flatnonzero(least)
        hit = hit[np.searchsorted(hit, offset)]  # the first in each segment
        g = rows[k]
        now[g, by_tier.reshape(-1)[at_pos[hit]]] = v
        spare[g, u] += 1
        spare[g, v] -= 1
    return better


def _cycles(n: int, longest: int) -> tuple[np.ndarray, np.ndarray]:
    """Every directed simple cycle of 2 to ``longest`` of ``n`` nodes, once (from its least
    node), as arcs ``src -> dst`` [K, longest], padded with self-arcs of its first node."""
    src, dst = [], []
    for k in range(2, longest + 1):
        for nodes in itertools.combinations(range(n), k):
            for rest in itertools.permutations(nodes[1:]):
                cycle = (nodes[0],) + rest
                pad = [nodes[0]] * (longest - k)
                src.append(list(cycle) + pad)
                dst.append(list(cycle[1:]) + [nodes[0]] + pad)
    return np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64)
