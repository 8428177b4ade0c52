"""A Lagrangian lower bound on the paged optimum that counts whole pages.

For a price λ >= 0, OPT >= min_x Σ_i D(i, x_i) + λ (paged bytes(x) - B), and the minimum splits
into one problem per group. Priced at the amortized cost ``c' = c + h/P``, item i's best tier
has value ``best_i = min_t D_it + λ c'_t`` and every other tier a regret ``r_it >= 0``; a group
whose tier of rank k (tiers in order of cost) holds n_k items pays ``λ c'_k e(n_k)`` beyond
amortized, ``e(n) = (-n) mod P`` its empty slots. So a group's minimum is
``Σ_i best_i + λ Σ_k c'_k f_k + W`` with f the forced counts and

    W = min_x Σ_i r(i, x_i) + λ Σ_k c'_k e(n_k(x)).

W is bounded from below by a chain over the boundaries between ranks k and k + 1. With Φ_k
the net number of items crossing boundary k upwards, ``n_k = n⁰_k + Φ_{k-1} - Φ_k`` (n⁰ the
counts at the best tiers, forced items included), and an item's regret is split over the
boundaries it crosses: a move from rank a up to b pays ``min_{b' > k} r_ib' / (b' - a)`` at each
boundary k it crosses (at most ``r_ib`` in all, for every b), likewise downwards. The cheapest
``|Φ_k|`` of a group's crossing costs at boundary k then bound the moves' regrets from below,
and as the empty slots depend on counts modulo P only, each Φ_k is needed modulo P (the class's
cheapest members are Φ = ρ up or P - ρ down). A move into the dearest rank from two ranks or
more below it (a long jump, e.g. into the empty fp16 slots of forced pages) is not split: such
an item's regret is counted whole, J_k the jumps from ranks <= k. The minimum over
(Φ_k mod P, J_k) is a dynamic program along the ranks on [P, J, G] arrays; a rank's empty
slots depend on its inflow m only through (ρ_k - n⁰_k - m) mod P, so the minimum over m is a
prefix and a suffix minimum (P steps, not P² pairs). Jumps beyond ``max_jumps`` are bounded by
the group's cheapest ``max_jumps + 1`` jump regrets.

Every relaxation step only drops constraints (which items cross where, counts >= 0), so the
value is a lower bound at every λ. Crossing costs above
what a flow at that boundary could save (the two ranks' greatest empty-slot cost) or above the
group's empty-slot cost at the best tiers are never worth taking: they are counted at that cap,
which leaves the minimum unchanged and the sorts short.

Computed on the host (numpy) from the problem's arrays, so every backend gets the same bound.
"""

from __future__ import annotations

import numpy as np

from sphkv.rdr.problem import AllocationProblem

__all__ = ["whole_page_bound"]


class _Groups:
    """The free items laid out group-major, each group padded to the largest: slot j of group g
    holds item ``item[g·M + j]`` (-1: padding), so a per-group selection is a partition along
    M. :meth:`rows` gives a block of groups' distortions in rank order (a padding slot has
    distortion 0 at rank 0 and no other tier, and is neither counted nor summed)."""

    def __init__(self, problem: AllocationProblem):
        p = problem.page_size
        free = problem.forced < 0
        group = problem.group_index[free]
        self.g_count, self.t = problem._group_cost.shape
        group_cost = problem._group_cost
        self.order = np.argsort(group_cost, axis=1, kind="stable")  # rank -> tier
        self.same_order = bool(np.all(self.order == self.order[:1]))
        amortized = np.where(group_cost > 0, group_cost + problem.page_overhead / p, 0.0)
        self.c_rank = np.take_along_axis(amortized, self.order, axis=1)
        self.f_rank = np.take_along_axis(problem.forced_counts(), self.order, axis=1)
        self.shared = bool(np.all(self.c_rank == self.c_rank[:1]))
        sizes = np.bincount(group, minlength=self.g_count)
        self.m = max(int(sizes.max(initial=0)), 1)
        by_group = np.argsort(group, kind="stable")
        slot = (group[by_group] * self.m
                + np.arange(by_group.size) - np.repeat(np.cumsum(sizes) - sizes, sizes))
        self.item = np.full(self.g_count * self.m, -1, dtype=np.int64)
        self.item[slot] = np.flatnonzero(free)[by_group]
        self.real = self.item >= 0
        self.distortion = problem.distortion
        self.ceiling = problem.ceiling_tier if problem.has_ceiling else None
        fixed = ~free
        self.constant = float(problem.distortion[fixed, problem.forced[fixed]].sum())
        self.n, self.p, self.budget = int(free.sum()), p, problem.budget

    def rows(self, lo: int, hi: int):
        """Distortions of the slots of groups ``lo:hi`` in rank order, [T, (hi - lo)·M] (inf
        above an item's ceiling)."""
        m = self.m
        real = self.real[lo * m:hi * m]
        item = np.where(real, self.item[lo * m:hi * m], 0)
        # One gather of whole rows [n, T] (48 contiguous bytes per item at T = 6), then its
        # columns in rank order.
        block = np.take(self.distortion, item, axis=0)
        if self.same_order:
            rows = np.ascontiguousarray(block[:, self.order[0]].T)
        else:
            rank_tier = np.repeat(self.order[lo:hi], m, axis=0).T  # [T, n]
            rows = np.take_along_axis(block.T, rank_tier, axis=0)
        if self.ceiling is not None:
            tiers = (np.broadcast_to(self.order[0][:, None], rows.shape) if self.same_order
                     else rank_tier)
            rows[self.ceiling[item][None, :] < tiers] = np.inf
        rows[:, ~real] = np.inf
        rows[0, ~real] = 0.0
        return rows


# Items per block of groups (whole groups; at least one). The program's many small operations per
# block favoured large blocks: at 1M items in 4,096 groups an evaluation took 0.62 s with blocks
# of 2^14 items, 0.50 s with 2^16; with its step in P rather than P² pairs, blocks of 2^15 to
# 2^18 items are within 10% of each other.
_BLOCK_ITEMS = 1 << 16
# The padded layout is used up to this many slots per item.
_MAX_PADDING = 4


def _padded_size(problem: AllocationProblem) -> int:
    """Slots of the group-major layout padded to the largest group, G·M."""
    sizes = np.bincount(problem.group_index, minlength=problem.n_groups)
    return problem.n_groups * int(sizes.max(initial=0))


def _smallest(table, k: int, cap):
    """Per row of ``table`` [..., M]: prefix sums of its ``k`` smallest finite values,
    [..., k + 1]; values at or above ``cap`` [...] count as the cap, inf where the row has
    fewer finite values."""
    m = table.shape[-1]
    # A whole sort (numpy's SIMD sort) costs less than a partition and a sort of its k.
    table = np.sort(table, axis=-1)[..., :k]
    if table.shape[-1] < k:
        table = np.concatenate([table, np.full(table.shape[:-1] + (k - m,), np.inf)], axis=-1)
    # The cap commutes with taking the k smallest; a missing value (inf) stays inf.
    table = np.where(table < np.inf, np.minimum(table, cap[..., None]), np.inf)
    return np.concatenate([np.zeros(table.shape[:-1] + (1,)), np.cumsum(table, axis=-1)],
                          axis=-1)


def _at_price(groups: _Groups, lam: float, max_jumps: int) -> float:
    """The bound at price ``lam``, over blocks of whole groups (each group's W is independent of
    the others'), so that temporaries scale with a block rather than with N."""
    step = max(1, _BLOCK_ITEMS // groups.m)
    best_sum = best_abs = w_sum = 0.0
    for lo in range(0, groups.g_count, step):
        b, b_abs, w = _block_at_price(groups, lo, min(lo + step, groups.g_count), lam,
                                      max_jumps)
        best_sum, best_abs, w_sum = best_sum + b, best_abs + b_abs, w_sum + w
    forced_bytes = float((groups.c_rank * groups.f_rank).sum())
    total = best_sum + w_sum
    lagrange = lam * (forced_bytes - groups.budget)
    # Σ best carries λ·bytes terms that λ(F - B) mostly cancels: give up their rounding.
    rounding = 1e-13 * max(groups.n, 1) * (abs(groups.constant) + best_abs + abs(total)
                                           + abs(lagrange))
    return groups.constant + total + lagrange - rounding


def _block_at_price(groups: _Groups, lo: int, hi: int, lam: float, max_jumps: int):
    """Σ best_i, Σ |best_i| and Σ W of the groups ``lo:hi`` at price ``lam``."""
    g_count, t, p, m = hi - lo, groups.t, groups.p, groups.m
    c_rank = groups.c_rank[lo:hi]
    rows = groups.rows(lo, hi)
    real = groups.real[lo * m:hi * m]
    # value[k] = D at rank k + λ c'_k, per padded slot.
    if groups.shared:
        value = rows + lam * c_rank[0][:, None]
    else:
        value = rows + lam * np.repeat(c_rank.T, m, axis=1)
    # Rank of the best tier (the first least value, as argmin, in passes along whole rows).
    a = np.zeros(value.shape[1], dtype=np.int8 if t < 128 else np.int64)
    best = value[0].copy()
    for k in range(1, t):
        a[value[k] < best] = k
        np.minimum(best, value[k], out=best)
    regret = np.subtract(value, best, out=value)
    top = t - 1
    # Crossing costs, up: min over destinations b > k of regret_b / (b - a), for a <= k; into
    # the top only from the rank just below it (from further down it is a jump, counted whole).
    # Divisions only where they count (``where=``), into rows filled with inf.
    ranks = a.astype(np.float64)
    part = np.empty(a.size)
    up = np.full((max(t - 1, 0), a.size), np.inf)
    lowest = np.full(a.shape, np.inf)
    for b in range(top, 0, -1):
        into = a < b if b < top else a == top - 1
        part.fill(np.inf)
        np.divide(regret[b], b - ranks, out=part, where=into)
        np.minimum(lowest, part, out=lowest)
        np.copyto(up[b - 1], lowest, where=a <= b - 1)
    down = np.full((max(t - 1, 0), a.size), np.inf)
    lowest.fill(np.inf)
    for b in range(top):
        above = a > b
        part.fill(np.inf)
        np.divide(regret[b], ranks - b, out=part, where=above)
        np.minimum(lowest, part, out=lowest)
        np.copyto(down[b], lowest, where=above)
    flat = (np.arange(g_count).repeat(m) * t + a)[real]
    counts = np.bincount(flat, minlength=g_count * t).reshape(g_count, t) + groups.f_rank[lo:hi]
    slot_price = lam * c_rank  # [G, T]: one empty slot
    empty0 = (slot_price * ((-counts) % p)).sum(axis=1)  # W at the best tiers
    rho = np.arange(p)
    # Per boundary k (ranks k | k + 1), the cheapest net flow of each residue ρ: ρ up or
    # P - ρ down. A flow costing more than the two ranks' empty slots could save never pays.
    cap = np.minimum(empty0[:, None], (slot_price[:, :-1] + slot_price[:, 1:]) * (p - 1)).T
    ups = _smallest(up.reshape(-1, g_count, m), p - 1, cap)  # [T - 1, G, P]
    downs = _smallest(down.reshape(-1, g_count, m), p - 1, cap)
    cross = np.zeros((g_count, max(t - 1, 0), p))
    cross[:, :, 1:] = np.minimum(ups[..., 1:], downs[..., :0:-1]).transpose(1, 0, 2)
    # Jumps into the top from ranks <= top - 2, their regrets whole.
    jump = np.where(a <= top - 2, regret[top], np.inf)
    jumps = np.full((g_count, t, max_jumps + 1), np.inf)
    jumps[:, :, 0] = 0.0
    sources = np.arange(max(top - 1, 0))
    cap = np.minimum(empty0[:, None], (slot_price[:, sources] + slot_price[:, top:]) * (p - 1)).T
    from_rank = np.where(a == sources[:, None], jump, np.inf).reshape(-1, g_count, m)
    jumps[:, sources] = _smallest(from_rank, max_jumps, cap).transpose(1, 0, 2)
    cap = np.minimum(empty0, slot_price.max(axis=1) * 2 * (p - 1))
    beyond = _smallest(jump.reshape(g_count, m), max_jumps + 1, cap)[:, -1]

    # dp[ρ, J, g]: least cost of the ranks below the current one, ρ = Φ mod P, J jumps so far
    # (groups last, so that every step runs along whole rows of groups).
    n_j = max_jumps + 1
    dp = np.full((p, n_j, g_count), np.inf)
    dp[0, 0] = 0.0
    for k in range(t - 1):
        # j jumps out of rank k: m = ρ - j mod P is its net inflow from below.
        inflow = np.full_like(dp, np.inf)
        twice = np.concatenate([dp, dp])  # twice[ρ + j] = dp[(ρ + j) mod P]
        for j in range(n_j):
            if j and not np.isfinite(jumps[:, k, j]).any():
                break  # (the j-th cheapest jumps of a rank are finite only if the (j-1)-th are)
            moved = twice[j % p:j % p + p, :n_j - j] + jumps[:, k, j]
            np.minimum(inflow[:, j:], moved, out=inflow[:, j:])
        # n_k = n⁰_k + m - ρ_k leaves e = (v - m) mod P empty slots, v = (ρ_k - n⁰_k) mod P:
        # min_m inflow[m] + s e = s v + min(min_{m <= v} h[m], s P + min_{m > v} h[m]) with
        # h[m] = inflow[m] - s m, a prefix and a suffix minimum rather than all P² pairs.
        s = slot_price[:, k]
        h = inflow - s * rho[:, None, None]
        upto, above = h.copy(), np.full_like(h, np.inf)
        for q in range(1, p):  # upto[v] = min_{m <= v} h[m]
            np.minimum(upto[q], upto[q - 1], out=upto[q])
        for q in range(p - 1, 0, -1):  # above[v] = min_{m > v} h[m]
            np.minimum(above[q], h[q], out=above[q - 1])
        at_v = s * rho[:, None, None] + np.minimum(upto, s * p + above)
        v = (rho[:, None] - counts[:, k]) % p  # [ρ_k, G]
        dp = np.take_along_axis(at_v, v[:, None, :], axis=0) + cross[:, k].T[:, None, :]
    count = counts[:, top] + rho[:, None, None] + np.arange(n_j)[:, None]
    w = np.minimum(np.min(dp + slot_price[:, top] * ((-count) % p), axis=(0, 1)), beyond)
    best = best[real]
    return float(best.sum()), float(np.abs(best).sum()), float(w.sum())


def whole_page_bound(problem: AllocationProblem, price: float, evaluations: int = 1,
                     max_jumps: int = 8) -> float:
    """Lower bound on the paged optimum counting whole pages (see the module docstring): the
    largest of its values at ``price`` and, with ``evaluations`` > 1, at the points of a golden
    section search on [0.8, 1.25] × ``price`` (every value is a bound, whatever the function's
    shape). ``-inf`` without pages or a positive price, or where padding every group to the
    largest would take more than 4 slots per item."""
    if problem.page_size is None or not price > 0 or problem.n_items == 0:
        return -np.inf
    if _padded_size(problem) > _MAX_PADDING * problem.n_items + (1 << 12):
        return -np.inf  # groups too unequal for the padded layout
    groups = _Groups(problem)
    best = _at_price(groups, price, max_jumps)
    if evaluations < 3:
        return best
    lo, hi = 0.8 * price, 1.25 * price
    golden = (np.sqrt(5.0) - 1) / 2
    x1, x2 = hi - golden * (hi - lo), lo + golden * (hi - lo)
    f1, f2 = _at_price(groups, x1, max_jumps), _at_price(groups, x2, max_jumps)
    best = max(best, f1, f2)
    for _ in range(evaluations - 3):
        if f1 >= f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - golden * (hi - lo)
            f1 = _at_price(groups, x1, max_jumps)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + golden * (hi - lo)
            f2 = _at_price(groups, x2, max_jumps)
        best = max(best, f1, f2)
    return best
