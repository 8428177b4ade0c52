"""Greedy Lagrangian solver: convex hulls, upgrades in slope order.

Each item's (cost, distortion) points are reduced to their lower convex hull. Starting from every
item at its cheapest tier, the hull segments of all items are taken in order of efficiency
(distortion saved per byte, -ΔD/Δc) until the next one does not fit. Taking a fraction of that
next segment would be the exact optimum of the LP relaxation of the MCKP (Sinha & Zoltners 1979),
so that value is a proven lower bound, and the efficiency of the breaking segment is the Lagrange
multiplier λ, the price of a byte. The integer answer drops the fraction and then fills the
remaining bytes with later segments that still fit.

With pages the same is done on the amortized cost ``c + h/P`` (a relaxation of the paged cost,
so the bound stays valid), then partial pages are repaired (``sphkv.solvers.page_repair``).

O(N T² + N T log N T); numpy and torch (CPU or GPU) versions give the same allocation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import array_api_compat
import numpy as np

from sphkv.rdr.problem import Allocation, AllocationProblem
from sphkv.solvers.base import Solver, finish, register
from sphkv.solvers.page_repair import paged_dual_bound, repair_pages

__all__ = ["GreedySolver", "greedy_tiers"]

_N_BINS = 4096


def _bincount(xp, x, weights=None, minlength: int = 0):
    # bincount is not in the array API standard; both libraries have it.
    if array_api_compat.is_torch_namespace(xp):
        import torch

        return torch.bincount(x, weights=weights, minlength=minlength)
    return np.bincount(x, weights=weights, minlength=minlength)


def _gather(xp, table, index):
    """``table[i, index[i]]`` for a table [N, T], or ``table[index[i]]`` for a shared row [T]."""
    if table.ndim == 1:
        return xp.take(table, index)
    return xp.take_along_axis(table, index[:, None], axis=1)[:, 0]


def _hull(xp, distortion, cost):
    """Lower convex hull of each item's (cost, distortion) points, walked from its cheapest tier.

    ``cost`` is [N, T] or a shared row [T]. Returns ``base`` [N] (cheapest tier, least distortion
    among ties) and, per hull step s, rows of ``to`` [T-1, N] (tier reached, -1 past the hull's
    end), ``dc`` (> 0), ``dd`` (< 0) and ``eff`` = -dd/dc, non-increasing along the hull.
    """
    n, t = distortion.shape
    inf = float("inf")
    cost_nt = cost if cost.ndim == 2 else cost[None, :]
    cheapest = cost_nt == xp.min(cost_nt, axis=1, keepdims=True)
    cur = xp.argmin(xp.where(cheapest, distortion, inf), axis=1)
    base = cur
    c_cur, d_cur = _gather(xp, cost, cur), _gather(xp, distortion, cur)
    if cost.ndim == 1:
        # 1/Δc from tier j to each dearer tier (0 to cheaper ones), shared by all items.
        dc_table = cost[None, :] - cost[:, None]
        inv_dc_table = xp.where(dc_table > 0, 1.0 / xp.where(dc_table > 0, dc_table, 1.0), 0.0)
    steps = t - 1
    dev = array_api_compat.device(distortion)
    to = xp.full((steps, n), -1, dtype=xp.int64, device=dev)
    dcs, dds, effs = (xp.zeros((steps, n), dtype=xp.float64, device=dev) for _ in range(3))
    prev_eff = xp.full(n, inf, dtype=xp.float64, device=dev)
    for s in range(steps):
        if cost.ndim == 1:
            inv_dc = xp.take(inv_dc_table, cur, axis=0)
        else:
            dc = cost - c_cur[:, None]
            inv_dc = xp.where(dc > 0, 1.0 / xp.where(dc > 0, dc, 1.0), 0.0)
        # Next hull point: the steepest descent to a dearer tier (slope 0 to cheaper ones).
        slope = (distortion - d_cur[:, None]) * inv_dc
        nxt = xp.argmin(slope, axis=1)
        best = _gather(xp, slope, nxt)
        active = best < 0
        c_nxt, d_nxt = _gather(xp, cost, nxt), _gather(xp, distortion, nxt)
        to[s] = xp.where(active, nxt, -1)
        dcs[s] = c_nxt - c_cur
        dds[s] = d_nxt - d_cur
        # Hull slopes rise along the hull; clamp float noise so efficiency never increases.
        prev_eff = xp.minimum(-best, prev_eff)
        effs[s] = prev_eff
        cur = xp.where(active, nxt, cur)
        c_cur = xp.where(active, c_nxt, c_cur)
        d_cur = xp.where(active, d_nxt, d_cur)
        if not bool(xp.any(active)):
            steps = s + 1
            break
    return base, to[:steps], dcs[:steps], dds[:steps], effs[:steps]


def greedy_tiers(distortion, cost, room: float, bound_room: float | None = None, xp=None):
    """Allocate by hull segments in efficiency order within ``room`` bytes above the base.

    ``distortion`` [N, T], ``cost`` [N, T] or [T]. Returns ``(tiers, lp_bound, price)`` as
    numpy/float: the integer allocation (the prefix of segments that fits, then a fill with later
    segments that still fit), the LP optimum (the prefix plus the fraction of the breaking
    segment, within ``bound_room`` if given, else ``room``) and λ, the breaking efficiency.

    Only the bin of efficiencies that holds the break is sorted: segments are bucketed by
    log2(efficiency), whole buckets above the break are taken, so the result is that of one
    stable sort of all segments (ties by hull step, then item) at O(N T) cost.
    """
    xp = xp or array_api_compat.array_namespace(np.empty(0))
    distortion = xp.asarray(distortion, dtype=xp.float64)
    cost = xp.asarray(cost, dtype=xp.float64)
    dev = array_api_compat.device(distortion)
    n, t = distortion.shape
    base, to, dc, dd, eff = _hull(xp, distortion, cost)
    base_distortion = float(xp.sum(_gather(xp, distortion, base)))
    # Tier of each item after taking its first s hull segments: [T, N].
    hull_tiers = [base]
    for s in range(to.shape[0]):
        hull_tiers.append(xp.where(to[s] >= 0, to[s], hull_tiers[-1]))
    hull_tiers = xp.stack(hull_tiers, axis=0)
    # Valid segments, step-major: their flat index orders ties by (step, item).
    flat = xp.reshape(to, (-1,)) >= 0
    index = xp.nonzero(flat)[0]
    dc, dd, eff = (xp.reshape(a, (-1,))[flat] for a in (dc, dd, eff))
    if index.shape[0] == 0:
        return _np(hull_tiers[0]), base_distortion, 0.0
    # Buckets by log2 efficiency, highest efficiency first.
    lg = xp.log2(eff)
    lo, hi = float(xp.min(lg)), float(xp.max(lg))
    scale = (_N_BINS - 1) / (hi - lo) if hi > lo else 0.0
    bucket = xp.astype(xp.clip((hi - lg) * scale, 0, _N_BINS - 1), xp.int64)
    bucket_cum = xp.cumulative_sum(_bincount(xp, bucket, weights=dc, minlength=_N_BINS))

    def select(room: float):
        """Segments of the sorted prefix within ``room``, the breaking one and bytes left."""
        limit = xp.asarray([room * (1 + 1e-12) + 1e-9], dtype=xp.float64, device=dev)
        b = int(xp.searchsorted(bucket_cum, limit, side="right")[0])
        if b == _N_BINS:
            return (xp.ones(dc.shape[0], dtype=xp.bool, device=dev), None,
                    room - float(bucket_cum[-1]))
        before = float(bucket_cum[b - 1]) if b else 0.0
        members = xp.nonzero(bucket == b)[0]
        members = members[xp.argsort(-eff[members], stable=True)]
        cum = before + xp.cumulative_sum(dc[members])
        k = int(xp.searchsorted(cum, limit, side="right")[0])
        taken = bucket < b
        taken[members[:k]] = True
        return taken, int(members[k]), room - (float(cum[k - 1]) if k else before)

    # The LP optimum: the prefix within bound_room plus a fraction of the breaking segment.
    taken, brk, left = select(room if bound_room is None else bound_room)
    lp_bound = base_distortion + float(xp.sum(xp.where(taken, dd, 0.0)))
    if brk is not None:
        lp_bound += min(max(left / float(dc[brk]), 0.0), 1.0) * float(dd[brk])
    price = 0.0 if brk is None else float(eff[brk])
    if bound_room is not None:
        taken, brk, left = select(room)
    n_taken = _bincount(xp, index[taken] % n, minlength=n)
    if brk is not None:
        # Fill: later segments that still fit, in efficiency order.
        later = xp.nonzero(~taken & (dc <= left))[0]
        later = later[xp.argsort(-eff[later], stable=True)]
        _fill(xp, index[later] % n, index[later] // n, dc[later], left, n_taken,
              int(index[brk]) % n)
    tiers = xp.take_along_axis(hull_tiers, n_taken[None, :], axis=0)[0]
    return _np(tiers), lp_bound, price


def _np(x) -> np.ndarray:
    return x.cpu().numpy() if hasattr(x, "cpu") else np.asarray(x)


def _fill(xp, item, step, dc, left: float, n_taken, broken_item: int) -> None:
    """Scan candidate segments in order; take one if it continues its item's hull and fits.

    An item whose candidate is passed over (not its next segment, or too dear) is blocked
    from then on, as is the item of the breaking segment. Done as jumps from one taken
    segment to the next — at most left / (least segment cost) of them — rather than a loop over
    every candidate. Updates ``n_taken`` [N] in place.
    """
    if item.shape[0] == 0:
        return
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
            return
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
    backend : {"numpy", "torch"}
        Where hulls and the sort run; both give the same allocation.
    device : str
        Torch device for ``backend="torch"`` (``"cpu"``, ``"cuda"``).
    """

    NAME: ClassVar[str] = "greedy"
    EXACT: ClassVar[bool] = False
    REQUIRED_MODULES: ClassVar[tuple[str, ...]] = ("numpy",)
    PAGES: ClassVar[str] = "repair"

    backend: str = "numpy"
    device: str = "cpu"

    def __post_init__(self):
        if self.backend not in ("numpy", "torch"):
            raise ValueError(f"backend must be 'numpy' or 'torch', got {self.backend!r}")

    def _solve(self, problem: AllocationProblem, time_limit: float | None) -> Allocation:
        # Forced items have one point and no segments; the hull runs on the free ones.
        free = problem.forced < 0
        tiers = problem.forced.copy()
        amortized = problem.amortized_cost()
        fixed = np.flatnonzero(~free)
        per_item = np.broadcast_to(amortized, problem.distortion.shape)
        forced_cost = per_item[fixed, tiers[fixed]].sum()
        if amortized.ndim == 1:
            cost, base_cost = amortized, amortized.min() * free.sum()
        else:
            cost = amortized[free]
            base_cost = cost.min(axis=1).sum()
        distortion = problem.distortion[free]
        # The bound's room counts forced items at amortized cost, a relaxation; the allocation's
        # room counts their whole pages, whose free slots the page repair then fills for free.
        bound_room = problem.budget - forced_cost - base_cost
        room = bound_room
        if problem.page_size is not None:
            room = problem.budget - problem.page_cost(problem.forced_counts()) - base_cost
        if self.backend == "numpy":
            tiers[free], bound, price = greedy_tiers(distortion, cost, room, bound_room)
        else:
            import torch

            xp = array_api_compat.array_namespace(torch.empty(0))
            tiers[free], bound, price = greedy_tiers(
                torch.as_tensor(distortion, device=self.device),
                torch.as_tensor(cost, device=self.device), room, bound_room, xp=xp)
        bound += problem.distortion[fixed, tiers[fixed]].sum()
        if problem.page_size is not None:
            tiers = repair_pages(problem, tiers)
            bound = max(bound, paged_dual_bound(problem, price))
        return finish(problem, tiers, bound, "feasible", price)
