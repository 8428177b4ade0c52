"""Greedy Lagrangian solver: convex hulls, upgrades in slope order.

Each item's (cost, distortion) points are reduced to their lower convex hull. Starting from every
item at its cheapest tier, the hull segments of all items are taken in order of efficiency
(distortion saved per byte, -ΔD/Δc) until the next one does not fit. Taking a fraction of that
next segment would be the exact optimum of the LP relaxation of the MCKP (Sinha & Zoltners 1979),
so that value is a proven lower bound, and the efficiency of the breaking segment is the Lagrange
multiplier λ, the price of a byte. The integer answer drops the fraction and then fills the
remaining bytes with later segments that still fit. Finding the break is a weighted selection
(buckets of efficiencies, one of them sorted), not a sort of all segments.

With pages the same is done on the amortized cost ``c + h/P`` (a relaxation of the paged cost,
so the bound stays valid), then each page group takes one of the page counts next to the
greedy's (``sphkv.solvers.page_round.round_by_pages``): one sort of the items, whatever the
number of page groups. The bound is the larger of the amortized LP bound, the slot dual
(``page_round.slot_dual_bound``) and, where those leave more than 0.1%, the whole-page bound
(``page_bound.whole_page_bound``).

O(N T²) passes over N numbers plus one sort of N (two in small groups); numpy and torch (CPU or
GPU) versions give the same allocation. On a CPU the per-item passes run block by block of items
(``page_round._block``): a block's [T, n] rows stay in cache and its temporaries are reused,
where passes over whole arrays were bound by memory and by faulting in fresh pages.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import array_api_compat
import numpy as np

from sphkv.rdr.problem import Allocation, AllocationProblem
from sphkv.solvers.base import Solver, finish, register
from sphkv.solvers.page_bound import whole_page_bound
from sphkv.solvers.page_repair import exchange_tiers, repair_pages
from sphkv.solvers.page_round import (
    _blocks,
    rank_major,
    round_by_pages,
    round_pages,
    slot_dual_bound,
)

__all__ = ["GreedySolver", "HullSegments", "greedy_tiers"]

# Pages: up to this size the rounded allocation is also polished by ``repair_pages``.
_POLISH_ITEMS, _POLISH_GROUPS = 200_000, 512
# Fill candidates scanned this many at a time (most efficient first).
_FILL_CHUNK = 4096
# Page rounding by options (2^(T-1) per group) up to this many tiers, else by moves.
_MAX_OPTION_TIERS = 7
# With pages, the whole-page bound is computed when the slot dual leaves a larger relative gap.
_WHOLE_PAGE_GAP = 1e-3
# Page rounding values each option by the items best to move (``directed``, one more sort)
# where groups hold up to this many pages of items on average (groups of 244 items: 15 pages;
# with 128, the regret order alone is within 0.09% of the bound).
_DIRECTED_PAGES = 32


def _bincount(xp, x, weights=None, minlength: int = 0):
    # bincount is not in the array API standard; both libraries have it.
    if array_api_compat.is_torch_namespace(xp):
        import torch

        return torch.bincount(x, weights=weights, minlength=minlength)
    return np.bincount(x, weights=weights, minlength=minlength)


def _gather(xp, table, index):
    """``table[i, index[i]]`` for a table [N, T] (int64 ``index``; gathered from the flat table,
    a fraction of the time of ``take_along_axis``), or ``table[index[i]]`` for a shared row
    [T]."""
    if table.ndim == 1:
        return xp.take(table, index)
    n, t = table.shape
    rows = xp.arange(n, dtype=xp.int64, device=array_api_compat.device(table)) * t
    return xp.take(xp.reshape(table, (-1,)), rows + index)


def _hull(xp, distortion, cost, allowed=None, out=None):
    """Lower convex hull of each item's (cost, distortion) points, one vectorised pass per pair
    of tiers.

    Tiers are taken in order of cost (rank k; per item when ``cost`` is [N, T]). Point k is
    optimal at price λ, ``D_k + λ c_k <= D_j + λ c_j`` for every allowed j, iff
    ``lo_k <= λ <= hi_k`` with ``hi_k = min_{c_j < c_k} (D_j - D_k) / (c_k - c_j)`` and
    ``lo_k = max_{c_j > c_k} (D_k - D_j) / (c_j - c_k)``; of points of equal cost only the least
    distortion (then the lower tier) can be. The hull's vertices are the points optimal at some
    λ > 0, the first (cheapest) is the base, and the segment into vertex k has efficiency
    -ΔD/Δc = ``hi_k``, which never rises along the hull (``hi_k <= lo_prev <= hi_prev``, also in
    floating point).

    Returns rank-major arrays [T, N]: ``tier`` (tier index of rank k; [T, 1] for a shared cost
    row), ``vertex`` (bool), ``dc`` (cost of the segment into vertex k, 0 off the hull and at the
    base), ``eff`` (its efficiency, 0 where no segment), and ``base`` [N] (tier of the base).
    ``out``: arrays ``(dc, eff)`` [T, N] to write those into.
    """
    n, t = distortion.shape
    dev = array_api_compat.device(distortion)
    inf = float("inf")
    if cost.ndim == 1:
        row = _np(cost)  # one transfer: the costs become Python floats
        order = np.argsort(row, kind="stable")
        c = [float(row[j]) for j in order]
        # Rank k's rows are rows of the rank-major copies (views, no gather of columns).
        rows = rank_major(xp, distortion)
        d = [rows[j] for j in order]
        ok = None
        if allowed is not None:
            allowed_rows = rank_major(xp, allowed)
            ok = [allowed_rows[j] for j in order]
        tier = xp.reshape(xp.asarray(order, dtype=xp.int64, device=dev), (t, 1))
    else:
        rank = xp.argsort(cost, axis=1, stable=True)
        tier = rank_major(xp, rank)
        c = list(rank_major(xp, xp.take_along_axis(cost, rank, axis=1)))
        d = list(rank_major(xp, xp.take_along_axis(distortion, rank, axis=1)))
        ok = (None if allowed is None else
              list(rank_major(xp, xp.take_along_axis(allowed, rank, axis=1))))
    # Updated in place (``out=``): at 10⁷ items a fresh array per operation costs more than
    # the arithmetic.
    lib = _lib(xp)
    hi = xp.full((t, n), inf, dtype=xp.float64, device=dev)
    lo = xp.full((t, n), -inf, dtype=xp.float64, device=dev)
    e = xp.empty(n, dtype=xp.float64, device=dev)
    alive = [xp.ones(n, dtype=xp.bool, device=dev) if ok is None else ok[k] for k in range(t)]
    # A rank that no item may take bounds nothing (its slopes are masked out) and is no
    # vertex: its pairs are skipped (those above the items' ceilings, in blocks of low ones).
    used = [ok is None or bool(xp.any(ok[k])) for k in range(t)]
    for k in range(t):
        for j in range(k) if used[k] else ():  # c_j <= c_k
            if not used[j]:
                continue
            gap = c[k] - c[j]
            if isinstance(gap, float):
                if gap == 0.0:  # equal cost: the worse point (the later on a tie) is never optimal
                    worse = d[j] <= d[k]
                    alive[k] = alive[k] & ~(worse if ok is None else worse & ok[j])
                    alive[j] = alive[j] & (worse if ok is None else worse | ~ok[k])
                    continue
                lib.subtract(d[j], d[k], out=e)
                e /= gap
                e_hi = e_lo = e
            else:
                same = gap == 0.0
                worse = d[j] <= d[k]
                alive[k] = alive[k] & ~(same & worse & (True if ok is None else ok[j]))
                alive[j] = alive[j] & ~(same & ~worse & (True if ok is None else ok[k]))
                slope = (d[j] - d[k]) / xp.where(same, 1.0, gap)
                e_hi, e_lo = xp.where(same, inf, slope), xp.where(same, -inf, slope)
            if ok is not None:  # a tier outside the ceiling bounds no other
                e_hi, e_lo = xp.where(ok[j], e_hi, inf), xp.where(ok[k], e_lo, -inf)
            lib.minimum(hi[k], e_hi, out=hi[k])
            lib.maximum(lo[j], e_lo, out=lo[j])
    vertex = xp.empty((t, n), dtype=xp.bool, device=dev)
    for k in range(t):
        vertex[k] = alive[k] & (hi[k] > 0) & (lo[k] <= hi[k])
    # Segments: each vertex after the first, from the vertex before it. Their costs and
    # efficiencies overwrite lo and hi row by row (rows k are done with once vertex[k] is).
    dc, eff = (lo, hi) if out is None else out
    started = xp.zeros(n, dtype=xp.bool, device=dev)
    last_c = xp.zeros(n, dtype=xp.float64, device=dev)
    base = xp.zeros(n, dtype=xp.int64, device=dev)
    for k in range(t):
        seg = vertex[k] & started
        dc[k] = xp.where(seg, c[k] - last_c, 0.0)
        eff[k] = xp.where(seg, hi[k], 0.0)
        base = xp.where(vertex[k] & ~started, tier[k], base)
        last_c = xp.where(vertex[k], c[k], last_c)
        started = started | vertex[k]
    return tier, vertex, dc, eff, base


def _lib(xp):
    """The library behind ``xp`` (numpy or torch), for its ``out=`` arguments."""
    if array_api_compat.is_torch_namespace(xp):
        import torch

        return torch
    return np


def _float_of(bits: int) -> float:
    """The float64 whose bit pattern is ``bits``."""
    return float(np.int64(bits).view(np.float64))


def _bits(xp, x):
    """The int64 bit pattern of float64 ``x``: for x >= 0 it orders like x."""
    if array_api_compat.is_torch_namespace(xp):
        return x.contiguous().view(xp.int64)
    return x.view(np.int64)


class HullSegments:
    """Every item's hull segments, ready to allocate any room.

    Parameters
    ----------
    distortion : array [N, T]
    cost : array [N, T] or [T]
    xp : array namespace, optional
        ``array_api_compat`` namespace of the arrays (numpy when omitted; torch for CPU/GPU).
    allowed : bool array [N, T], optional
        Tiers each item may take (its ceiling); all when omitted.

    Taking segments in order of efficiency is a weighted selection, not a sort: segments are
    bucketed by the top 20 bits of their efficiency's float pattern (exponent and 8 bits of
    mantissa, which order like the efficiency), whole buckets above the one that holds the break
    are taken and only that bucket is sorted. The result is that of one stable sort of all
    segments by efficiency (ties by rank, then item), at a few O(N T) passes.
    """

    _SHIFT = 44  # of 52 mantissa bits, 8 stay: 256 buckets per octave

    def __init__(self, distortion, cost, xp=None, allowed=None):
        xp = self.xp = xp or array_api_compat.array_namespace(np.empty(0))
        distortion = xp.asarray(distortion, dtype=xp.float64)
        cost = xp.asarray(cost, dtype=xp.float64)
        dev = self.dev = array_api_compat.device(distortion)
        n, t = distortion.shape
        self.n = n
        if allowed is not None:
            allowed = xp.asarray(allowed, device=dev)
        self.d, self.allowed = distortion, allowed
        # Block by block of items (see _block); the bytes per bucket accumulate in ``weight``
        # (bucket keys, the top bits of a float >= 0, are below 2^(63 - _SHIFT)).
        shared = cost.ndim == 1
        self.tier = None if shared else xp.empty((t, n), dtype=xp.int64, device=dev)
        # A segment's cost is a difference of two tier costs: float32 where every such
        # difference is exact in it (bytes are small integers), to halve that array.
        exact = False
        if shared:
            row = _np(cost)
            diff = row[:, None] - row[None, :]
            exact = bool(np.all(diff.astype(np.float32) == diff))
        self.dc = xp.empty((t, n), dtype=xp.float32 if exact else xp.float64, device=dev)
        self.eff = xp.empty((t, n), dtype=xp.float64, device=dev)
        self.seg = xp.empty((t, n), dtype=xp.bool, device=dev)
        self.base = xp.empty(n, dtype=xp.int8 if t < 128 else xp.int64, device=dev)
        weight = xp.zeros(1 << (63 - self._SHIFT), dtype=xp.float64, device=dev)
        top, self.max_efficiency = 0, 0.0
        for s, e in _blocks(xp, distortion):
            dc, eff = self.dc[:, s:e], self.eff[:, s:e]
            tier, _, _, _, base = _hull(xp, distortion[s:e], cost if shared else cost[s:e],
                                        None if allowed is None else allowed[s:e],
                                        out=(dc, eff))
            if shared:
                self.tier = tier
            else:
                self.tier[:, s:e] = tier
            self.base[s:e] = base
            seg = self.seg[:, s:e]
            seg[...] = dc > 0
            if not bool(xp.any(seg)):
                continue
            key = xp.bitwise_right_shift(_bits(xp, eff), self._SHIFT)
            high = int(xp.max(key))
            low = int(xp.min(xp.where(seg, key, high)))
            weight[low:high + 1] += _bincount(xp, xp.reshape(xp.maximum(key, low) - low, (-1,)),
                                              weights=xp.reshape(xp.astype(dc, xp.float64),
                                                                 (-1,)),
                                              minlength=high - low + 1)
            top = max(top, high)
            self.max_efficiency = max(self.max_efficiency, float(xp.max(eff)))
        # Bucket b holds the efficiencies of key top - b: bucket 0 the highest.
        self.top = top
        self.bucket_cum = xp.cumulative_sum(xp.flip(weight[:top + 1], axis=0))

    def _bucket_range(self, b: int) -> tuple[float, float]:
        """Efficiencies [low, high) of bucket ``b``."""
        key = self.top - b
        return _float_of(key << self._SHIFT), _float_of((key + 1) << self._SHIFT)

    def price(self, room: float) -> float:
        """λ within ``room`` bytes above the base: the efficiency of the breaking segment (0
        when everything fits), as :meth:`lp_bound` gives it, without the bound."""
        _, brk, _ = self._select(room, counts=False)
        return 0.0 if brk is None else float(self.xp.reshape(self.eff, (-1,))[brk])

    @functools.cached_property
    def hull_tiers(self):
        """Tier of each item after s hull steps, [T, N] (the last vertex past the hull's end)."""
        xp, t = self.xp, self.seg.shape[0]
        # In int8 up to 127 tiers (an eighth of the bytes per pass), int64 when returned.
        small = xp.int8 if t < 128 else xp.int64
        tier = xp.astype(self.tier, small)
        steps = xp.zeros(self.n, dtype=small, device=self.dev)
        rows = [xp.astype(self.base, small)] * t
        for k in range(t):
            steps = steps + xp.astype(self.seg[k], small)
            rows = [rows[0]] + [xp.where(self.seg[k] & (steps <= s), tier[k], rows[s])
                                for s in range(1, t)]
        return xp.astype(xp.stack(rows), xp.int64)

    def _select(self, room: float, counts: bool = True):
        """Segments taken per item [N] by the sorted prefix within ``room`` (a prefix of each
        hull; int8 up to 127 tiers; None without ``counts``), the flat index
        ``rank * N + item`` of the breaking one (None when all fit) and the bytes left."""
        xp, n = self.xp, self.n
        steps = xp.int8 if self.seg.shape[0] < 128 else xp.int64
        limit = xp.asarray([room * (1 + 1e-12) + 1e-9], dtype=xp.float64, device=self.dev)
        b = int(xp.searchsorted(self.bucket_cum, limit, side="right")[0])
        if b == self.bucket_cum.shape[0] or self.max_efficiency == 0:  # all fit, or no segment
            return (xp.sum(self.seg, axis=0, dtype=steps) if counts else None, None,
                    room - float(self.bucket_cum[-1]))
        before = float(self.bucket_cum[b - 1]) if b else 0.0
        low, high = self._bucket_range(b)
        n_taken = xp.zeros(n, dtype=steps, device=self.dev) if counts else None
        members = []
        for s, e in _blocks(xp, self.d):
            eff = self.eff[:, s:e]
            for k in range(eff.shape[0] if counts else 0):
                n_taken[s:e] += xp.astype(eff[k] >= high, steps)  # eff 0: no segment
            # (eff >= low > 0 only on segments; a flat nonzero costs less than a 2-d one)
            inside = (eff >= low) & (eff < high)
            if low <= 0:
                inside = inside & self.seg[:, s:e]
            flat = xp.nonzero(xp.reshape(inside, (-1,)))[0]
            members.append((flat // (e - s)) * n + flat % (e - s) + s)
        members = xp.sort(xp.concat(members))
        eff, dc = xp.reshape(self.eff, (-1,)), xp.reshape(self.dc, (-1,))
        members = members[xp.argsort(-eff[members], stable=True)]
        cum = before + xp.cumulative_sum(xp.astype(dc[members], xp.float64))
        k = int(xp.searchsorted(cum, limit, side="right")[0])
        if counts:
            items, taken = xp.unique_counts(members[:k] % n)
            n_taken[items] += xp.astype(taken, steps)
        return n_taken, int(members[k]), room - (float(cum[k - 1]) if k else before)

    def lp_bound(self, room: float) -> tuple[float, float]:
        """The LP optimum within ``room`` bytes above the base (the sorted prefix plus a fraction
        of the breaking segment), and λ, the breaking efficiency (0 when everything fits)."""
        xp = self.xp
        n_taken, brk, left = self._select(room)
        tiers = self.tiers(n_taken)
        bound = sum(float(xp.sum(_gather(xp, self.d[s:e], xp.astype(tiers[s:e], xp.int64))))
                    for s, e in _blocks(xp, self.d))
        if brk is None:
            return bound, 0.0
        k, i = divmod(brk, self.n)
        to = int(self.tier[k, i if self.tier.shape[1] > 1 else 0])
        dd = float(self.d[i, to] - self.d[i, int(tiers[i])])
        return bound + min(max(left / float(self.dc[k, i]), 0.0), 1.0) * dd, float(self.eff[k, i])

    def allocate(self, room: float) -> np.ndarray:
        """Tiers [N]: the sorted prefix within ``room``, then later segments that still fit."""
        return _np(self.tiers(self.positions(room))).astype(np.int64)

    def tiers(self, positions):
        """Tier of each item at its hull step ``positions`` [N] (at most its number of
        segments; arrays of ``xp``; int8 up to 127 tiers: fewer bytes to fault in and to
        write). Step p >= 1 ends at the rank of the item's p-th segment, the number of ranks
        with fewer than p segments up to them."""
        xp, t = self.xp, self.seg.shape[0]
        shared = self.tier.shape[1] == 1
        tier_row = xp.reshape(self.tier, (-1,)) if shared else None
        out = xp.asarray(self.base, copy=True)
        for s, e in _blocks(xp, self.d):
            p = xp.astype(positions[s:e], xp.int64)
            steps = xp.zeros(e - s, dtype=xp.int64, device=self.dev)
            rank = xp.zeros(e - s, dtype=xp.int64, device=self.dev)
            for k in range(t - 1):  # (every step p ends at a rank <= t - 1)
                steps += xp.astype(self.seg[k, s:e], xp.int64)
                rank += xp.astype(steps < p, xp.int64)
            tier = (xp.take(tier_row, rank) if shared else
                    xp.take_along_axis(self.tier[:, s:e], rank[None, :], axis=0)[0])
            out[s:e] = xp.where(p > 0, xp.astype(tier, out.dtype), out[s:e])
        return out

    def positions(self, room: float):
        """Hull steps [N] taken by :meth:`allocate` within ``room`` (arrays of ``xp``)."""
        xp, n = self.xp, self.n
        n_taken, brk, left = self._select(room)
        if brk is not None:
            # Candidates: of each item (but the breaking one), the untaken segments up to the
            # first that does not fit. A segment behind one that does not fit can only block
            # its own item in the scan, which then takes nothing anyway.
            later = []
            for s, e in _blocks(xp, self.d):
                reach = xp.ones(e - s, dtype=xp.bool, device=self.dev)
                if s <= brk % n < e:
                    reach[brk % n - s] = False
                steps = xp.zeros(e - s, dtype=xp.int64, device=self.dev)
                for k in range(self.seg.shape[0]):
                    steps += xp.astype(self.seg[k, s:e], xp.int64)
                    open_ = self.seg[k, s:e] & (steps > n_taken[s:e])
                    reach = reach & (~open_ | (self.dc[k, s:e] <= left))
                    later.append(xp.nonzero(open_ & reach)[0] + (k * n + s))
            later = xp.sort(xp.concat(later))
            eff, dc = xp.reshape(self.eff, (-1,)), xp.reshape(self.dc, (-1,))
            # Scanned in chunks of the most efficient candidates: after a chunk only those that
            # still fit matter (one that does not would only block its own item).
            while later.shape[0]:
                head = later
                later = later[:0]
                if head.shape[0] > _FILL_CHUNK:
                    kth = _kth_largest(xp, eff[head], _FILL_CHUNK)
                    head, later = head[eff[head] >= kth], head[eff[head] < kth]
                head = head[xp.argsort(-eff[head], stable=True)]
                rank, item = head // n, head % n
                # Hull step of each candidate: the item's segments at lower ranks.
                below = xp.arange(self.seg.shape[0], device=self.dev)[:, None] < rank[None, :]
                step = xp.sum(xp.astype(self.seg[:, item] & below, xp.int64), axis=0)
                left = _fill(xp, item, step, dc[head], left, n_taken, brk % n)
                later = later[dc[later] <= left]
        return n_taken


def greedy_tiers(distortion, cost, room: float, xp=None):
    """Greedy allocation within ``room`` bytes above the base: ``(tiers, lp_bound, price)``.

    ``distortion`` [N, T], ``cost`` [N, T] or [T], as numpy or (with ``xp``) torch arrays;
    ``tiers`` [N] is numpy. See :class:`HullSegments`.
    """
    hull = HullSegments(distortion, cost, xp)
    return (hull.allocate(room), *hull.lp_bound(room))


def _beside(xp, dev, a):
    """A small numpy array (per tier or per group) copied to ``xp`` on ``dev`` (a copy: the
    problem's arrays are read-only, which a CPU tensor may not share)."""
    return xp.asarray(np.array(a), device=dev)


def _np(x) -> np.ndarray:
    return x.cpu().numpy() if hasattr(x, "cpu") else np.asarray(x)


def _kth_largest(xp, x, k: int):
    """The k-th largest value of ``x`` (a 0-d array), by partial selection."""
    if array_api_compat.is_torch_namespace(xp):
        import torch

        return torch.kthvalue(x, x.shape[0] - k + 1).values
    return np.partition(x, x.shape[0] - k)[x.shape[0] - k]


def _fill(xp, item, step, dc, left: float, n_taken, broken_item: int) -> float:
    """Scan candidate segments in order; take one if it continues its item's hull and fits.

    An item whose candidate is passed over (not its next segment, or too dear) is blocked
    from then on, as is the item of the breaking segment. Done as jumps from one taken
    segment to the next — at most left / (least segment cost) of them — rather than a loop over
    every candidate. Updates ``n_taken`` [N] in place; returns the bytes left.
    """
    if item.shape[0] == 0:
        return left
    dev = array_api_compat.device(item)
    blocked = xp.zeros(n_taken.shape[0], dtype=xp.bool, device=dev)
    blocked[broken_item] = True
    position = xp.arange(item.shape[0], device=dev)
    # previous[k]: position of the candidate before k of the same item (-1 if none).
    by_item = xp.argsort(item, stable=True)
    same = xp.concat([xp.zeros(1, dtype=xp.bool, device=dev),
                      item[by_item][1:] == item[by_item][:-1]])
    previous = xp.full(item.shape[0], -1, dtype=xp.int64, device=dev)
    previous[by_item[1:][same[1:]]] = by_item[:-1][same[1:]]
    start = 0
    while True:
        # The first candidate of its item from here on, its hull's next segment, and it fits.
        eligible = ((position >= start) & (previous < start) & (step == n_taken[item])
                    & (dc <= left) & ~blocked[item])
        if not bool(xp.any(eligible)):
            return left
        p = int(xp.argmax(xp.astype(eligible, xp.int8)))
        blocked[item[start:p]] = True  # passed over on the way
        left -= float(dc[p])
        n_taken[item[p]] += 1
        start = p + 1


@register
@dataclass
class GreedySolver(Solver):
    """Greedy Lagrangian (convex-hull) solver.

    Parameters
    ----------
    backend : {"numpy", "torch"}, optional
        Where hulls and the sort run; both give the same allocation. By default torch for a
        problem whose arrays are on a torch device (:meth:`AllocationProblem.to`), else numpy.
    device : str, optional
        Torch device for ``backend="torch"``; by default the problem's device, else the CPU.
        A problem elsewhere is copied there for the solve.
    repair : bool
        With pages: round the greedy allocation to whole pages (:func:`round_by_pages`; with
        ceilings or more than 7 tiers :func:`round_pages`: partial pages rounded at the greedy
        price, trims and fills to the budget) or, if False, only shrink the greedy's room until
        its whole pages fit (:func:`_fit_pages`). The bound is then the unpaged Lagrangian bound
        only.
    polish : bool
        With pages and ``repair``: also polish problems of up to 200k items and 512 groups with
        :func:`repair_pages` (local moves and min-cost-flow reassignment; seconds at 10⁵ items),
        and maximise the slot dual bound over λ with up to 24 evaluations up to 50k items (6
        else); the whole-page bound, where it runs, with 8 evaluations up to 50k items (1
        else).
    bound : bool
        With pages and ``repair``: compute the slot dual bound and, where the allocation is more
        than 0.1% above it, the whole-page bound and the exchanges between tiers it calls for.
        Without: neither runs (a caller that reads only the tiers and the price, like the
        online allocator, saves their time: the whole-page bound runs on the host), and
        ``lower_bound`` is the unpaged Lagrangian bound.
    """

    NAME: ClassVar[str] = "greedy"
    EXACT: ClassVar[bool] = False
    REQUIRED_MODULES: ClassVar[tuple[str, ...]] = ("numpy",)
    PAGES: ClassVar[str] = "repair"

    backend: str | None = None
    device: str | None = None
    repair: bool = True
    polish: bool = True
    bound: bool = True

    def __post_init__(self):
        if self.backend not in (None, "numpy", "torch"):
            raise ValueError(f"backend must be 'numpy' or 'torch', got {self.backend!r}")

    def _placed(self, problem: AllocationProblem) -> AllocationProblem:
        """The problem where this solve runs: on the host for numpy, else on a torch device."""
        backend = self.backend or ("numpy" if problem.device is None else "torch")
        if backend == "numpy":
            return problem.host()
        import torch

        device = torch.device(self.device or problem.device or "cpu")
        if device.type == "cuda" and device.index is None:  # "cuda": the current GPU
            device = torch.device("cuda", torch.cuda.current_device())
        return problem if problem.device == device else problem.to(device)

    def _solve(self, problem: AllocationProblem, time_limit: float | None) -> Allocation:
        xp = array_api_compat.array_namespace(problem.distortion)
        dev = array_api_compat.device(problem.distortion)
        # Forced items have one point and no segments; the hull runs on the free ones.
        free = problem.forced < 0
        tiers = xp.asarray(problem.forced, copy=True)
        fixed = xp.nonzero(~free)[0]
        at = problem.forced[fixed]
        amortized = problem.amortized_cost()  # [T] numpy, or [N, T] beside the problem's
        if amortized.ndim == 1:
            amortized = _beside(xp, dev, amortized)
            forced_cost = float(xp.sum(amortized[at]))
        else:
            forced_cost = float(xp.sum(amortized[fixed, at]))
        allowed = problem.allowed(free) if problem.has_ceiling else None
        if allowed is not None and amortized.ndim == 1:
            # The allowed tiers are those up to the ceiling: the cheapest is a prefix minimum.
            cost = amortized
            cheapest = _beside(xp, dev, np.minimum.accumulate(_np(amortized)))
            base_cost = float(xp.sum(xp.take(cheapest, problem.ceiling_tier[free])))
        elif allowed is not None:
            cost = amortized[free]
            base_cost = float(xp.sum(xp.min(xp.where(allowed, cost, xp.inf), axis=1)))
        elif amortized.ndim == 1:
            cost, base_cost = amortized, float(xp.min(amortized)) * int(xp.sum(free))
        else:
            cost = amortized[free]
            base_cost = float(xp.sum(xp.min(cost, axis=1)))
        # (a gather of the free rows: half the time of a boolean mask over rows)
        distortion = xp.take(problem.distortion, xp.nonzero(free)[0], axis=0)
        # The bound's room counts forced items at amortized cost, a relaxation; the allocation's
        # room counts their whole pages, whose free slots the page repair then fills for free.
        bound_room = problem.budget - forced_cost - base_cost
        room = bound_room
        if problem.page_size is not None:
            room = problem.budget - problem.page_cost(problem.forced_counts()) - base_cost
        hull = HullSegments(distortion, cost, xp, allowed)
        bound, price = hull.lp_bound(bound_room)
        constant = float(xp.sum(problem.distortion[fixed, at]))
        bound += constant
        if problem.page_size is not None and self.repair:
            # Rounded from the allocation whose forced pages are counted whole (their empty
            # slots are filled for free afterwards), at that allocation's own price.
            tiers, paged_bound = self._round(problem, hull, hull.d, hull.allowed, free, room,
                                             price, constant, bound_room)
            return finish(problem, tiers, max(bound, paged_bound), "feasible", price)
        tiers[free] = xp.astype(hull.tiers(hull.positions(room)), xp.int64)
        if problem.page_size is not None:
            tiers = problem.asarray(_fit_pages(problem.host(), hull, _np(tiers), room))
        return finish(problem, tiers, bound, "feasible", price)

    def _round(self, problem: AllocationProblem, hull: HullSegments, distortion, allowed,
               free: np.ndarray, room: float, price: float, constant: float,
               bound_room: float):
        """Whole pages from the greedy at ``room`` (:func:`round_pages`), and the slot-crediting
        dual bound from the greedy price (the break of ``bound_room``), both on the hull's
        device; where the allocation is more than 0.1% above it, also the whole-page bound (on
        the host). ``distortion`` [N_free, T] and ``allowed`` are arrays of the hull's
        namespace."""
        xp = hull.xp

        def on(a):
            return _beside(xp, hull.dev, a)

        group_cost = problem._group_cost
        amortized = on(np.where(group_cost > 0,
                                group_cost + problem.page_overhead / problem.page_size, 0.0))
        forced_counts = problem.forced_counts()
        slots = np.where(problem.page_bytes > 0, (-forced_counts) % problem.page_size, 0)
        group = problem.group_index[free]
        pos = None
        if allowed is None and problem.n_tiers <= _MAX_OPTION_TIERS:
            at = hull.positions(room)
            pos = round_by_pages(
                xp, distortion, hull.tiers(at), group,
                on(np.argsort(group_cost, axis=1, kind="stable")), on(problem.page_bytes),
                on(forced_counts), problem.page_size, problem.budget,
                lambda d, c, r: (lambda h: h.tiers(h.positions(r)))(HullSegments(d, c, xp)),
                amortized, price,
                directed=problem.n_items <= _DIRECTED_PAGES * problem.page_size * problem.n_groups)
        if pos is None:
            pos = round_pages(xp, distortion, hull.hull_tiers, hull.positions, room, group,
                              amortized, on(problem.page_bytes), on(forced_counts),
                              problem.page_size, hull.price(room), problem.budget,
                              allowed)
        if pos is None:
            tiers = problem.min_cost_tiers()
        else:
            tiers = xp.asarray(problem.forced, copy=True)
            tiers[free] = xp.astype(pos, xp.int64)
        if self.polish and problem.n_items <= _POLISH_ITEMS and (
                problem.n_groups <= _POLISH_GROUPS):
            # Small enough for the local-move repair and min-cost-flow reassignment to be cheap;
            # the better of the two allocations is kept (both on the host).
            polished = repair_pages(problem.host(), _np(tiers))
            if problem.distortion_of(polished) < problem.distortion_of(tiers):
                tiers = problem.asarray(polished)
        if not self.bound:
            return tiers, -np.inf
        # The dual is maximised over λ where that is cheap, else taken near the greedy price.
        evaluations = 24 if self.polish and problem.n_items <= 50_000 else 6
        bound, bound_price = slot_dual_bound(
            xp, distortion, allowed, amortized, group, on(slots), constant,
            problem.page_cost(forced_counts), problem.budget, price, hull.max_efficiency,
            evaluations=evaluations, return_price=True,
            guess=_price_guess(hull, bound_room, price))
        distortion_now = problem.distortion_of(tiers)
        if distortion_now - bound > _WHOLE_PAGE_GAP * distortion_now:
            # Far from the bound: small groups, whose partial pages the slot dual leaves out
            # and the rounding pays most for. The whole-page bound counts them (searched around
            # the slot dual's best price on small problems, taken there alone on large ones),
            # and exchanges along cycles of tiers fill the pages with the items best in them.
            small = self.polish and problem.n_items <= 50_000
            host = problem.host()
            bound = max(bound, whole_page_bound(host, bound_price,
                                                evaluations=8 if small else 1))
            tiers = problem.asarray(exchange_tiers(host, _np(tiers)))
        return tiers, bound


def _price_guess(hull: HullSegments, room: float, price: float):
    """The next λ for the slot dual's search (:func:`slot_dual_bound`'s ``guess``). The dual's
    slope at λ is the bytes of the items' best tiers there — the greedy's within the room
    whose break is at λ — less the bytes credited to slots and the budget; so where it is σ,
    the greedy's price for σ bytes less (a sixteenth more than σ, so that the guess tends to
    land past the maximum and bracket it), the credits taken as they are. Known at the breaks
    of rooms asked before (at first ``price``, that of ``room``), else None."""
    rooms = {price: room}

    def guess(lam: float, slope: float) -> float | None:
        if lam not in rooms:
            return None
        target = rooms[lam] - 1.0625 * slope
        at = hull.price(target)
        rooms[at] = target
        return at

    return guess


def _fit_pages(problem: AllocationProblem, hull: HullSegments, tiers: np.ndarray,
               room: float, steps: int = 16) -> np.ndarray:
    """The greedy allocation at the largest room (bisected over ``steps``) whose whole pages fit
    the budget; ``tiers`` holds the forced items and the allocation at ``room``.

    Items are priced at their slot plus an amortized page-table entry, so an allocation within
    ``room`` overshoots the budget only by its partial pages; shrinking the room removes that.
    """
    if problem.cost_of(tiers) <= problem.budget:
        return tiers
    free = problem.forced < 0

    def at(r: float) -> np.ndarray:
        out = tiers.copy()
        out[free] = hull.allocate(r)
        return out

    best = at(0.0)
    if problem.cost_of(best) > problem.budget:
        return problem.min_cost_tiers()
    lo, hi = 0.0, room
    for _ in range(steps):
        mid = (lo + hi) / 2
        candidate = at(mid)
        if problem.cost_of(candidate) <= problem.budget:
            lo, best = mid, candidate
        else:
            hi = mid
    return _fill_free_slots(problem, best)


def _fill_free_slots(problem: AllocationProblem, tiers: np.ndarray) -> np.ndarray:
    """Move free items up into the empty slots of their group's partial pages, largest
    distortion saved first, dearest tier first. No page is added, so the cost cannot grow."""
    tiers = tiers.copy()
    free = problem.forced < 0
    group, p = problem.group_index, problem.page_size
    d = problem.distortion
    dearest = problem.page_bytes.max(axis=0)
    for t in np.argsort(-dearest)[:np.count_nonzero(dearest)]:  # tiers that hold pages
        counts = problem.counts(tiers)[:, t]
        slots = np.where(counts > 0, -counts % p, 0)  # empty slots of the last page
        rows = np.flatnonzero(free & (tiers != t) & (problem.ceiling_tier >= t))
        gain = d[rows, tiers[rows]] - d[rows, t]
        keep = (gain > 0) & (slots[group[rows]] > 0)
        rows, gain = rows[keep], gain[keep]
        if not rows.size:
            continue
        rows = rows[np.lexsort((-gain, group[rows]))]  # by group, best gain first
        g = group[rows]
        rank = np.arange(rows.size) - np.searchsorted(g, g)  # rank within its group
        tiers[rows[rank < slots[g]]] = t
    return tiers
