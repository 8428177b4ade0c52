"""Page rounding of the greedy: whole pages within budget, every step one vectorised pass.

The greedy allocates on the amortized cost ``c' = c + h/P``; a group g with n items at a paged
tier t then pays ``ceil(n / P)`` pages, so each (g, t) with a partial page holds ``r = n mod P``
items and ``f = P - r`` paid, empty slots.

:func:`round_by_pages` (the default) offers every group the page counts next to the greedy's for
each tier and lets the greedy choose among those options across groups; see its docstring.

:func:`round_pages` (with ceilings, or more than 7 tiers) moves items instead. Every item sits
at a point of its convex hull, so its
moves are one step along the hull: *down* to the previous point, *up* to the next. At the greedy
price λ, a move's regret ``ΔD + λ Δc'`` is >= 0 (the greedy point minimises ``D + λ c'``).

1. **Round** (tiers in order of cost, dearest first, all groups at once): for each partial page
   of (g, t) either demote the r items of least regret (frees the page) or promote into its f
   slots the k items of least regret whose next hull point is t, k chosen where a further item's
   regret exceeds the λ·c'_t an empty slot wastes. Priced in whole pages, the two options cost
   ``Σ regret_down`` and ``Σ_{k} regret_up + λ (f - k) c'_t`` (both less ``λ f c'_t``). Moves
   only reach cheaper tiers, which later steps round.
2. **Trim** while over budget: per (g, t), demote the items of one page (its partial part, else
   a whole page) and credit only the bytes surely saved (the page, less ``ceil(m_u / P)`` pages
   at each destination u); pages taken in order of distortion added per byte, until the
   overrun is covered; repeated until within budget.
3. **Fill** with the bytes left: move items into empty slots (no page is added, so no byte is
   spent), then open pages in order of distortion saved per byte while they fit, then fill
   empty slots again.

Empty slots are filled from any tier, not only the next hull point (an item may jump from drop
to an fp16 slot that forced items leave): first those of the forced items' pages, with the gain
priced at λ, before rounding; an item put in a slot stays there.

Each pass sorts its candidates by (segment, regret) and selects per segment by rank, so the
work is a few sorts of N numbers, whatever the number of groups. Written once for numpy and
torch (``array_api_compat``); both give the same allocation.
"""

from __future__ import annotations

import array_api_compat

__all__ = ["round_by_pages", "round_pages", "slot_dual_bound"]

# Items per block of the blockwise passes on a CPU.
_CPU_BLOCK = 1 << 14


def _bincount(xp, x, weights=None, minlength: int = 0):
    if array_api_compat.is_torch_namespace(xp):
        import torch

        return torch.bincount(x, weights=weights, minlength=minlength)
    import numpy as np

    return np.bincount(x, weights=weights, minlength=minlength)


class _State:
    """Hull positions of the free items and the item counts per (group, tier).

    ``columns`` [T, N]: the distortions rank-major (:func:`rank_major`), shared by the states
    of one rounding."""

    def __init__(self, xp, distortion, columns, hull_tiers, pos, group, amortized, page_bytes,
                 forced_counts, page_size: int, price: float):
        self.xp, self.cols, self.group = xp, columns, group
        self.pos = xp.astype(pos, xp.int64)
        self.dev = array_api_compat.device(distortion)
        self.c, self.pb, self.p, self.price = amortized, page_bytes, page_size, price
        self.n_groups, self.n_tiers = page_bytes.shape
        self.forced_counts = forced_counts
        self.last = hull_tiers.shape[0] - 1
        # Gathers by flat index (a fraction of the time of take_along_axis): D[i, t] at
        # i T + t, the hull's tier at step s of item i at s N + i.
        self.d_flat = xp.reshape(distortion, (-1,))
        self.hull_flat = xp.reshape(hull_tiers, (-1,))
        self.c_flat = xp.reshape(amortized, (-1,))
        self.items = xp.arange(pos.shape[0], dtype=xp.int64, device=self.dev)
        # Items moved into empty slots off their hull stay there: pinned at pin_tier.
        self.pin_tier = xp.full(pos.shape[0], -1, dtype=xp.int64, device=self.dev)
        self.now = self._at(self.pos)  # current tier of every item
        self.d_now = self.distortion_at(self.items, self.now)  # and its distortion there
        # The tiers one hull step down and up (:meth:`neighbour`), kept as items move.
        self.down, self.up = self.neighbour(-1), self.neighbour(+1)
        self.counts = self._count()

    def _count(self):
        xp, t = self.xp, self.n_tiers
        flat = _bincount(xp, self.group * t + self.tier(), minlength=self.n_groups * t)
        return xp.reshape(flat, (self.n_groups, t)) + self.forced_counts

    def _at(self, pos):
        """Tier of every item at hull steps ``pos`` [N] (pinned items at their pin)."""
        on_hull = self.xp.take(self.hull_flat, pos * self.pos.shape[0] + self.items)
        return self.xp.where(self.pin_tier >= 0, self.pin_tier, on_hull)

    def tier(self, items=None):
        """Current tier of ``items`` (all when None)."""
        return self.now if items is None else self.now[items]

    def neighbour(self, step: int, items=None):
        """Tier one hull step down (-1) or up (+1) of ``items`` (all when None), -1 where there
        is none."""
        xp = self.xp
        if items is None:
            items, pos, now, pin = self.items, self.pos, self.now, self.pin_tier
        else:
            pos, now, pin = self.pos[items], self.now[items], self.pin_tier[items]
        nxt = xp.maximum(pos - 1, 0) if step < 0 else xp.minimum(pos + 1, self.last)
        there = xp.take(self.hull_flat, nxt * self.pos.shape[0] + items)
        return xp.where((nxt != pos) & (there != now) & (pin < 0), there, -1)

    def distortion_at(self, items, tiers):
        """``D[i, tiers]`` of ``items``."""
        return self.xp.take(self.d_flat, items * self.n_tiers + tiers)

    def regret(self, items, to, unpriced: bool = False):
        """``D[i, to] - D[i, now] + λ (c'[to] - c'[now])`` of ``items`` (no price if
        ``unpriced``); ``to`` >= 0."""
        xp, t = self.xp, self.n_tiers
        dd = self.distortion_at(items, to) - self.d_now[items]
        if unpriced:
            return dd
        g = self.group[items] * t
        return dd + self.price * (xp.take(self.c_flat, g + to)
                                  - xp.take(self.c_flat, g + self.now[items]))

    def page_cost(self) -> float:
        xp = self.xp
        return float(xp.sum(((self.counts + self.p - 1) // self.p) * self.pb))

    def move(self, items, step: int, pin: int | None = None) -> None:
        """Move ``items`` ``step`` hull steps, or pin them at tier ``pin``."""
        xp, t = self.xp, self.n_tiers
        if items.shape[0] == 0:
            return
        size = self.n_groups * t
        before = self.group[items] * t + self.now[items]
        if pin is None:
            self.pos[items] += step
            self.now[items] = xp.take(self.hull_flat, self.pos[items] * self.pos.shape[0] + items)
            self.d_now[items] = self.distortion_at(items, self.now[items])
        else:
            self.pin_tier[items] = pin
            self.now[items] = pin
            self.d_now[items] = xp.take(self.cols[pin], items)
        self.down[items], self.up[items] = self.neighbour(-1, items), self.neighbour(+1, items)
        after = self.group[items] * t + self.now[items]
        change = _bincount(xp, after, minlength=size) - _bincount(xp, before, minlength=size)
        self.counts = self.counts + xp.reshape(change, (self.n_groups, t))


def _combined_key(xp, segment, key, n_segments: int):
    """One int64 per candidate that sorts as (segment, key): the segment in the high bits, the
    float's order-preserving bit pattern, cut to the bits left (47 for up to 2^16 segments, so
    keys within about 2^-35 of each other tie and keep their order)."""
    if array_api_compat.is_torch_namespace(xp):
        bits = key.contiguous().view(xp.int64)
    else:
        bits = key.view("int64")
    # IEEE doubles order like their bits when >= 0, reversed when < 0.
    bits = xp.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)
    shift = max(int(n_segments).bit_length(), 1) + 1
    # key part in [0, 2^(64 - shift)), segment above it: below 2^63 in all.
    return (segment << (64 - shift)) + ((bits >> shift) + (1 << (63 - shift)))


def rank_major(xp, a):
    """``a`` [N, T] as a contiguous [T, N] array: its rows are then read at unit stride (numpy:
    copied by blocks of rows, which keeps both sides of each block's copy in cache)."""
    if array_api_compat.is_torch_namespace(xp):
        return a.T.contiguous()
    import numpy as np

    out = np.empty(a.shape[::-1], dtype=a.dtype)
    for s in range(0, a.shape[0], _CPU_BLOCK):
        out[:, s:s + _CPU_BLOCK] = a[s:s + _CPU_BLOCK].T
    return out


def _stable_argsort(xp, key):
    """The stable order of int64 ``key`` (ties by index). numpy: its unstable (SIMD) sort, a
    fifth of the time, gives the same order when no two keys tie, which is checked (else the
    stable sort)."""
    if array_api_compat.is_torch_namespace(xp):
        return xp.argsort(key, stable=True)
    import numpy as np

    order = np.argsort(key)
    ordered = key[order]
    if np.any(ordered[1:] == ordered[:-1]):
        return np.argsort(key, kind="stable")
    return order


def _ranked(xp, items, segment, key, n_segments: int):
    """Sort ``items`` by (segment, key); return them, their segments, rank within the segment,
    each segment's candidate count and a function summing a per-candidate value per segment."""
    order = _stable_argsort(xp, _combined_key(xp, segment, key, n_segments))
    items, segment = items[order], segment[order]
    bounds = xp.searchsorted(segment, xp.arange(n_segments + 1,
                                                device=array_api_compat.device(segment)))
    rank = xp.arange(items.shape[0], device=array_api_compat.device(items)) - xp.take(
        bounds, segment)
    count = bounds[1:] - bounds[:-1]

    def segment_sum(values):
        # Prefix sums in sorted order, differenced at segment bounds: the same sums, in the
        # same order, on every backend.
        zero = xp.zeros(1, dtype=values.dtype, device=array_api_compat.device(values))
        cum = xp.concat([zero, xp.cumulative_sum(values)])
        return xp.take(cum, bounds[1:]) - xp.take(cum, bounds[:-1])

    return items, segment, rank, count, segment_sum, order


def _round(state: _State, tier_rank) -> None:
    """Step 1: each partial page rounded down or filled, dearest tier of each group first."""
    xp, s = state.xp, state
    g_all = xp.arange(s.n_groups, device=s.dev)
    order = xp.argsort(-tier_rank, axis=1, stable=True)  # [G, T]: tiers dearest first
    for j in range(s.n_tiers):
        tg = order[:, j]
        n = s.counts[g_all, tg]
        r = n % s.p
        f = (s.p - r) % s.p
        active = (r > 0) & (s.pb[g_all, tg] > 0)
        if not bool(xp.any(active)):  # no partial page: nothing moves
            continue
        c_t = s.c[g_all, tg]
        # The target tier of each item's group, -1 where the group has nothing to round.
        target = xp.take(xp.where(active, tg, -1), s.group)
        # Down: items at the target tier with a hull point below.
        cand = xp.nonzero((s.tier() == target) & (s.down >= 0))[0]
        reg_d = s.regret(cand, s.down[cand])
        d_items, _, d_rank, d_count, d_sum, d_order = _ranked(xp, cand, s.group[cand], reg_d,
                                                              s.n_groups)
        d_sel = d_rank < xp.take(r, s.group[d_items])
        reg_d = reg_d[d_order]
        v_down = xp.where(d_count >= r, d_sum(xp.where(d_sel, reg_d, 0.0)), float("inf"))
        # Up: items whose next hull point is the target tier.
        cand = xp.nonzero((s.up == target) & (target >= 0))[0]
        reg_u = s.regret(cand, s.up[cand])
        u_items, _, u_rank, _, u_sum, u_order = _ranked(xp, cand, s.group[cand], reg_u,
                                                        s.n_groups)
        reg_u = reg_u[u_order]
        u_group = s.group[u_items]
        # An item is worth a slot while its regret is below what the empty slot wastes.
        u_sel = (u_rank < xp.take(f, u_group)) & (reg_u < s.price * xp.take(c_t, u_group))
        k = _bincount(xp, u_group[u_sel], minlength=s.n_groups)
        v_fill = u_sum(xp.where(u_sel, reg_u, 0.0)) + s.price * c_t * (f - k)
        go_down = active & (v_down < v_fill)
        s.move(d_items[d_sel & xp.take(go_down, s.group[d_items])], -1)
        s.move(u_items[u_sel & ~xp.take(go_down, u_group)], +1)


def _fill_slots(state: _State, allowed, priced: bool) -> None:
    """Move items into the empty slots of pages already paid for, from any tier (no page is
    added, so no byte is spent), dearest tier first, the items that gain most first; they stay
    there (pinned). ``priced``: the gain counts the bytes freed at the item's tier at λ.
    ``allowed``: bool [T, N] (rank-major) or None."""
    xp, s = state.xp, state
    t = s.n_tiers
    order = xp.argsort(-xp.max(s.c, axis=0), stable=True)
    for tier in [int(v) for v in order]:
        empty = xp.where(s.pb[:, tier] > 0, (-s.counts[:, tier]) % s.p, 0)
        if not bool(xp.any(empty > 0)):
            continue
        # Items that may move there, then those that gain (gains of those alone).
        ok = (xp.take(empty, s.group) > 0) & (s.tier() != tier)
        if allowed is not None:
            ok = ok & allowed[tier]
        cand = xp.nonzero(ok)[0]
        gain = xp.take(s.cols[tier], cand) - s.d_now[cand]
        if priced:
            gain = gain - s.price * xp.take(s.c_flat, s.group[cand] * t + s.tier(cand))
        cand, gain = cand[gain < 0], gain[gain < 0]
        if cand.shape[0] == 0:
            continue
        items, seg, rank, _, _, _ = _ranked(xp, cand, s.group[cand], gain, s.n_groups)
        s.move(items[rank < xp.take(empty, seg)], 0, pin=tier)


def _open_pages(state: _State, room: float) -> None:
    """Open one page per (group, tier) with the items that gain most, in order of distortion
    saved per page byte, while the pages' bytes fit ``room`` (leaving other pages can only
    save bytes)."""
    xp, s = state.xp, state
    t = s.n_tiers
    up = s.up
    cand = xp.nonzero(up >= 0)[0]
    if cand.shape[0] == 0:
        return
    seg = s.group[cand] * t + up[cand]
    gain = s.regret(cand, up[cand], unpriced=True)
    items, seg, rank, _, seg_sum, order = _ranked(xp, cand, seg, gain, s.n_groups * t)
    sel = rank < s.p
    saved = -seg_sum(xp.where(sel, gain[order], 0.0))
    bytes_ = xp.reshape(s.pb, (-1,))
    useful = xp.nonzero((saved > 0) & (bytes_ > 0))[0]
    if useful.shape[0] == 0:
        return
    by_ratio = useful[xp.argsort(-(saved[useful] / bytes_[useful]), stable=True)]
    fits = xp.cumulative_sum(bytes_[by_ratio]) <= room
    chosen = xp.zeros(s.n_groups * t, dtype=xp.bool, device=s.dev)
    chosen[by_ratio[fits]] = True
    s.move(items[sel & xp.take(chosen, seg)], +1)


def _trim(state: _State, over: float) -> bool:
    """Demote pages, least distortion per surely-saved byte first, to free ``over`` bytes.
    Returns False when no page can be demoted."""
    xp, s = state.xp, state
    t, size = s.n_tiers, s.n_groups * state.n_tiers
    down = s.down
    now = s.tier()
    cand = xp.nonzero(down >= 0)[0]
    if cand.shape[0] == 0:
        return False
    seg = s.group[cand] * t + now[cand]
    loss = s.regret(cand, down[cand], unpriced=True)
    items, seg, rank, count, seg_sum, order = _ranked(xp, cand, seg, loss, size)
    loss, dest = loss[order], down[items]
    counts = xp.reshape(s.counts, (-1,))
    part = counts % s.p
    take = xp.where(part > 0, part, s.p)  # the partial page's items, else a whole page's
    sel = rank < xp.take(take, seg)
    # Bytes surely saved: the page, less ceil(m_u / P) pages at each destination tier u.
    arrive = xp.reshape(_bincount(xp, seg[sel] * t + dest[sel], minlength=size * t), (size, t))
    pb_rows = xp.reshape(xp.take(s.pb, xp.arange(size, device=s.dev) // t, axis=0), (size, t))
    added = xp.sum(((arrive + s.p - 1) // s.p) * pb_rows, axis=1)
    saved = xp.reshape(s.pb, (-1,)) - added
    loss_page = seg_sum(xp.where(sel, loss, 0.0))
    ok = xp.nonzero((count >= take) & (saved > 0) & (counts > 0))[0]
    if ok.shape[0] == 0:
        return False
    by_ratio = ok[xp.argsort(loss_page[ok] / saved[ok], stable=True)]
    cum = xp.cumulative_sum(saved[by_ratio])
    n_take = int(xp.searchsorted(cum, xp.asarray([over], dtype=cum.dtype, device=s.dev))[0]) + 1
    chosen = xp.zeros(size, dtype=xp.bool, device=s.dev)
    chosen[by_ratio[:n_take]] = True
    s.move(items[sel & xp.take(chosen, seg)], -1)
    return True


def round_pages(xp, distortion, hull_tiers, positions, room: float, group, amortized,
                page_bytes, forced_counts, page_size: int, price: float, budget_left: float,
                allowed=None, tries: int = 1, max_trims: int = 64):
    """Round a greedy allocation to whole pages within budget.

    The greedy's room is first narrowed (secant steps on the rounded cost, ``tries`` of them)
    so that rounding alone lands within budget; trims cover what is left over.

    Parameters
    ----------
    xp : array namespace (numpy or torch, through ``array_api_compat``)
    distortion : array [N, T]
        Distortions of the free items.
    hull_tiers : int array [S + 1, N]
        Tier of each item after s hull steps (``HullSegments.hull_tiers``).
    positions : callable
        ``positions(room)`` -> int array [N], the greedy's hull step of each item within
        ``room`` bytes (``HullSegments.positions``).
    room : float
        The greedy's first room.
    group : int array [N]
        Dense group id of each item.
    amortized, page_bytes : arrays [G, T]
        Amortized cost per item ``c + h/P`` and bytes of one page (0 for tiers without pages).
    forced_counts : int array [G, T]
        Forced items per (group, tier): they fill slots and never move.
    page_size : int
    price : float
        λ, the greedy's price of a byte.
    budget_left : float
        Bytes for all pages, forced items' pages included.
    allowed : bool array [N, T], optional
        Tiers within each item's ceiling.

    Returns
    -------
    tiers : int array [N]
        Whole pages of these cost at most ``budget_left`` (None if trimming could not reach it).
    """
    # Columns read per tier by every state.
    columns = rank_major(xp, distortion)
    if allowed is not None:
        allowed = rank_major(xp, allowed)

    def rounded(r: float) -> _State:
        s = _State(xp, distortion, columns, hull_tiers, positions(r), group, amortized,
                   page_bytes, forced_counts, page_size, price)
        _fill_slots(s, allowed, priced=True)  # the forced items' pages first
        _round(s, amortized)
        return s

    best, over_room = None, None
    s = rounded(room)
    for _ in range(tries):
        cost = s.page_cost()
        if cost <= budget_left:
            best = s
            if over_room is None or budget_left - cost <= 1e-3 * budget_left:
                break
            room = (room + over_room) / 2
        else:
            over_room = room
            room = room - (cost - budget_left) if best is None else room
            if best is not None:
                room = (room + over_room) / 2
        s = rounded(room)
    if best is None or s.page_cost() <= budget_left:
        best = s
    for _ in range(max_trims):
        cost = best.page_cost()
        if cost <= budget_left:
            break
        if not _trim(best, cost - budget_left):
            return None
    else:
        if best.page_cost() > budget_left:
            return None
    _fill_slots(best, allowed, priced=False)
    _open_pages(best, budget_left - best.page_cost())
    _fill_slots(best, allowed, priced=False)
    return best.tier()


def round_by_pages(xp, distortion, lp_tiers, group, tier_order, page_bytes, forced_counts,
                   page_size: int, budget: float, hull_solver, amortized, price: float,
                   directed: bool = False):
    """Whole pages for every group: per group, one of the page counts next to the greedy's,
    chosen across groups by the greedy itself.

    Free items of each group are ordered by their greedy tier (dearest first). Within a tier an
    option moves items at the two ends of its block: the first ones up a rank (when the rank
    above gains capacity), the last ones down (when this rank loses it). So each item is put at
    the end it would rather leave by, by its regret at the price λ of one rank up,
    ``D_up - D + λ (c'_up - c')``, against one down, ``D_down - D - λ (c' - c'_down)``: those
    that would rather move up first, by gain up (largest first), the others after them, by loss
    down (smallest last). A choice of capacity per tier then assigns that order top down,
    dearest tier first, and its distortion is a difference of prefix sums. Per tier of rank
    r >= 1 the options are the page counts m and m + 1 around the greedy's count n
    (m = floor((n + f) / P), f forced items, at least their own pages), so a group has
    2^(T-1) options of known bytes and distortion; which option each group takes is a
    multiple-choice knapsack over groups, solved by
    ``hull_solver(distortion [G, C], bytes [G, C], room)`` (the greedy on those options).

    With ``directed`` each option is valued by the items best to move: those an option moves up
    out of a tier's block as the ones that gain most by one rank up, those it moves down as the
    ones that lose least by one rank down (one order of the blocks by each; the two sets are
    taken as disjoint, so a small block moved both ways may be valued too low). One more sort
    and prefix-sum pass; in groups of 244 items this took the chosen options' allocation, items
    reassigned by min-cost flow, from 0.163% to 0.096% above the bound. The chosen option's
    blocks moved down only are filled in the order by loss down, the others by gain up.

    Parameters
    ----------
    lp_tiers : int array [N]
        The greedy's tier of every free item.
    tier_order : int array [G, T]
        Tiers of each group by cost, cheapest first (rank r -> tier).
    page_bytes, forced_counts : arrays [G, T]
    amortized : array [G, T]
        ``c' = c + h/P`` per (group, tier).
    price : float
        λ, the greedy's price of a byte (for the order without ``directed``).

    Returns int8 array [N] of tiers, or None if even the cheapest options exceed ``budget``.
    """
    dev = array_api_compat.device(distortion)
    n, t = distortion.shape
    if n == 0:  # forced items only: their pages fit by the problem's own check
        return xp.zeros(0, dtype=xp.int64, device=dev)
    g_count = page_bytes.shape[0]
    p = page_size
    rank_of = xp.reshape(xp.argsort(tier_order, axis=1, stable=True), (-1,))  # tier -> rank
    flat_order = xp.reshape(tier_order, (-1,))
    flat_cost = xp.reshape(amortized, (-1,))
    # Sort keys and greedy counts per (group, rank), block by block: with ``directed`` one order
    # by gain up and one by loss down, else one mixed order (up first, then down).
    keys = [xp.empty(n, dtype=xp.int64, device=dev) for _ in range(2 if directed else 1)]
    n_lp = xp.zeros(g_count * t, dtype=xp.int64, device=dev)
    for s, e in _blocks(xp, distortion):
        g = group[s:e] * t
        now = xp.astype(lp_tiers[s:e], xp.int64)
        lp_rank = xp.take(rank_of, g + now)
        up = xp.take(flat_order, g + xp.minimum(lp_rank + 1, t - 1))
        down = xp.take(flat_order, g + xp.maximum(lp_rank - 1, 0))
        d = distortion[s:e]
        d_now = _gather(xp, d, now)
        gain_up = d_now - _gather(xp, d, up)
        loss_down = _gather(xp, d, down) - d_now
        block = g + (t - 1 - lp_rank)
        if directed:
            keys[0][s:e] = _combined_key(xp, block, -gain_up, g_count * t)
            keys[1][s:e] = _combined_key(xp, block, -loss_down, g_count * t)
        else:
            c_now = xp.take(flat_cost, g + now)
            # Regrets at λ of one rank up and one down (inf where there is none).
            regret_up = xp.where(lp_rank < t - 1, price * (xp.take(flat_cost, g + up) - c_now)
                                 - gain_up, float("inf"))
            regret_down = xp.where(lp_rank > 0, loss_down
                                   - price * (c_now - xp.take(flat_cost, g + down)),
                                   float("inf"))
            down_part = xp.astype(regret_up >= regret_down, xp.int64)
            keys[0][s:e] = _combined_key(xp, block * 2 + down_part,
                                         xp.where(down_part == 1, -loss_down, -gain_up),
                                         2 * g_count * t)
        n_lp += _bincount(xp, g + lp_rank, minlength=g_count * t)
    orders = [xp.argsort(key, stable=True) for key in keys]
    del keys
    n_lp = xp.reshape(n_lp, (g_count, t))
    n_free = xp.sum(n_lp, axis=1)
    start = xp.concat([xp.zeros(1, dtype=n_free.dtype, device=dev),
                       xp.cumulative_sum(n_free)])  # group offsets in that order
    # Per (group, rank): forced counts, page bytes, options.
    f = xp.take_along_axis(forced_counts, tier_order, axis=1)
    pb = xp.take_along_axis(page_bytes, tier_order, axis=1)
    paged = pb > 0
    m_lo = xp.maximum((n_lp + f) // p, (f + p - 1) // p)
    n_opt = 2 ** (t - 1)
    bits = (xp.arange(n_opt, device=dev)[:, None] >> xp.arange(t - 1, device=dev)[None, :]) & 1
    bits = xp.concat([xp.zeros((n_opt, 1), dtype=bits.dtype, device=dev), bits], axis=1)
    # Capacity [G, C, T] for free items (rank 0 takes the rest).
    cap = xp.where(paged[:, None, :], (m_lo[:, None, :] + bits[None, :, :]) * p - f[:, None, :],
                   n_lp[:, None, :])
    cap = xp.where(xp.arange(t, device=dev) == 0, 0, cap)
    # Items from the top down: B[r] = items at ranks >= r (B[0] = all free items).
    from_top = xp.flip(xp.cumulative_sum(xp.flip(cap, axis=2), axis=2), axis=2)
    bound = xp.minimum(from_top, n_free[:, None, None])
    bound = xp.where(xp.arange(t, device=dev) == 0, n_free[:, None, None], bound)
    upper = xp.concat([bound[:, :, 1:], xp.zeros_like(bound[:, :, :1])], axis=2)
    count = bound - upper
    pages = xp.where(paged[:, None, :], (count + f[:, None, :] + p - 1) // p, 0)
    option_bytes = xp.sum(xp.astype(pages, pb.dtype) * pb[:, None, :], axis=2)
    # Distortion: ranks r take positions [B[r+1], B[r]) of their group, at tier tier_order[r]:
    # a difference of prefix sums of the sorted distortions at that tier. B[i] (B[T] = 0)
    # depends only on the options' bits of ranks >= i, so each of its values is asked once:
    # at every every[i]-th option (those whose lower bits are 0).
    edges = xp.concat([bound, xp.zeros_like(bound[:, :, :1])], axis=2)  # B[i], [G, C, T + 1]
    every = [n_opt if i in (0, t) else 1 << (i - 1) for i in range(t + 1)]
    asked = [(r, r + j) for r in range(t) for j in (0, 1)]  # (rank, boundary)
    b_asked = [edges[:, ::every[i], i] for _, i in asked]  # [G, C / every[i]]
    rows = xp.concat([xp.reshape(start[:-1, None] + b - 1, (-1,)) for b in b_asked])
    cols = xp.concat([xp.reshape(xp.broadcast_to(tier_order[:, r:r + 1], b.shape), (-1,))
                      for b, (r, _) in zip(b_asked, asked)])
    if directed:
        # The greedy's block of rank k holds positions [a_k, a_k + n_k) of its group (in both
        # orders); an option moves its first B[k+1] - a_k items up and its last
        # a_k + n_k - B[k] down. Those moved up are valued as the ones that gain most by it,
        # those moved down as the ones that lose least (as if the two never shared an item):
        # the prefix sum at boundary B[j] inside block k is taken in the order by gain up
        # where j > k (the positions before it move up), else in the order by loss down.
        a_k = xp.flip(xp.cumulative_sum(xp.flip(n_lp, axis=1), axis=1), axis=1) - n_lp
        e_k = a_k + n_lp
        # Position y = B - 1 lies in block k = the number of ranks with a_k > y (a_k falls
        # with the rank; an empty block shares its start with the next rank down), so
        # boundary i is past it, i > k, iff a_{i-1} <= y (never for i = 0: a_{-1} = n_free).
        a_before = xp.concat([n_free[:, None], a_k], axis=1)
        by_up = xp.concat([xp.reshape(a_before[:, i:i + 1] <= b - 1, (-1,))
                           for b, (_, i) in zip(b_asked, asked)])
        sums = xp.zeros(rows.shape[0], dtype=distortion.dtype, device=dev)
        for order, pick in ((orders[0], xp.nonzero(by_up)[0]),
                            (orders[1], xp.nonzero(~by_up)[0])):
            sums[pick] = _prefix_sums(xp, distortion, order, xp.take(rows, pick),
                                      xp.take(cols, pick))
    else:
        sums = _prefix_sums(xp, distortion, orders[0], rows, cols)
    # Each option's sums: at boundary i, the value asked for option c // every[i].
    option = xp.arange(n_opt, device=dev)
    at_option, start_of = [], 0
    for b, (_, i) in zip(b_asked, asked):
        asked_here = xp.reshape(sums[start_of:start_of + b.shape[0] * b.shape[1]], b.shape)
        at_option.append(xp.take(asked_here, option // every[i], axis=1))
        start_of += b.shape[0] * b.shape[1]
    option_d = xp.sum(xp.stack([at_option[2 * r] - at_option[2 * r + 1] for r in range(t)],
                               axis=2), axis=2)
    cheapest = float(xp.sum(xp.min(option_bytes, axis=1)))
    if cheapest > budget:
        return None
    choice = xp.astype(hull_solver(option_d, option_bytes, budget - cheapest), xp.int64)

    def chosen_of(a):
        return xp.take_along_axis(a, xp.broadcast_to(choice[:, None, None], (g_count, 1, t)),
                                  axis=1)[:, 0, :]

    order = orders[0]
    if directed:
        # A block its group's option moves down only takes the order by loss down; the others
        # the order by gain up.
        down = xp.astype((chosen_of(upper) <= a_k) & (chosen_of(bound) < e_k), xp.int8)
        down = xp.repeat(xp.reshape(xp.flip(down, axis=1), (-1,)),
                         xp.reshape(xp.flip(n_lp, axis=1), (-1,)))
        order = xp.where(down == 1, orders[1], order)
    # In sorted order each group holds its chosen counts, dearest rank first.
    # (int8: the random writes of a permutation then stay in cache.)
    tiers = xp.empty(n, dtype=xp.int8, device=dev)
    tiers[order] = xp.repeat(xp.reshape(xp.astype(xp.flip(tier_order, axis=1), xp.int8), (-1,)),
                             xp.reshape(xp.flip(chosen_of(count), axis=1), (-1,)))
    return tiers


def _prefix_sums(xp, distortion, order, rows, cols):
    """``Σ_{j <= rows[q]} distortion[order[j], cols[q]]`` for every query q (0 where
    ``rows[q] < 0``): the cumulative sum of each column in ``order``, one block of rows at a time
    (the previous block's last sums lead the next, so each is one sequential sum). With torch
    each block is scanned as ``[T, rows]``, along its last axis: a GPU scans a tall
    ``[rows, T]`` array along its rows with one thread block per column, orders of magnitude
    slower. numpy scans the gathered ``[rows, T]`` block in place, with no transposing copy
    (the same sums)."""
    dev = array_api_compat.device(distortion)
    n, t = distortion.shape
    step = _block(xp, distortion)
    # Queries by block (-1: rows < 0, left at 0); within a block in any order. They come
    # nearly in block order (group by group), which keeps that sort cheap.
    block_of = rows // step
    by_row = xp.argsort(block_of, stable=True)
    r, c = rows[by_row], cols[by_row]
    ends = [int(v) for v in xp.searchsorted(block_of[by_row], xp.arange(
        (n + step - 1) // step + 1, dtype=block_of.dtype, device=dev))]
    out = xp.zeros(rows.shape[0], dtype=distortion.dtype, device=dev)
    if not array_api_compat.is_torch_namespace(xp):
        import numpy as np

        block = np.zeros((step + 1, t), dtype=distortion.dtype)  # row 0: the sums before it
        for b, s in enumerate(range(0, n, step)):
            lo, hi, size = ends[b], ends[b + 1], min(step, n - s)
            np.take(distortion, order[s:s + size], axis=0, out=block[1:size + 1])
            np.cumsum(block[:size + 1], axis=0, out=block[:size + 1])
            if hi > lo:
                out[by_row[lo:hi]] = block.reshape(-1)[(r[lo:hi] - s + 1) * t + c[lo:hi]]
            block[0] = block[size]
        return out
    carry = xp.zeros((t, 1), dtype=distortion.dtype, device=dev)
    for b, s in enumerate(range(0, n, step)):
        lo, hi = ends[b], ends[b + 1]
        block = xp.cumulative_sum(xp.concat([carry, rank_major(
            xp, xp.take(distortion, order[s:s + step], axis=0))], axis=1), axis=1)
        if hi > lo:
            width = block.shape[1]
            out[by_row[lo:hi]] = xp.reshape(block, (-1,))[c[lo:hi] * width + r[lo:hi] - s + 1]
        carry = block[:, -1:]
    return out


def _gather(xp, table, index):
    """``table[i, index[i]]`` of a table [n, T] (int64 ``index``), gathered from the flat table:
    a fraction of the time of ``take_along_axis``."""
    n, t = table.shape
    rows = xp.arange(n, dtype=xp.int64, device=array_api_compat.device(table)) * t
    return xp.take(xp.reshape(table, (-1,)), rows + index)


def _blocks(xp, x):
    """``(start, end)`` of the blocks of rows of ``x`` (see :func:`_block`); one if empty."""
    n, step = x.shape[0], _block(xp, x)
    return [(s, min(s + step, n)) for s in range(0, max(n, 1), step)]


def _block(xp, x) -> int:
    """Rows per block of a blockwise pass over ``x``: on a CPU a block stays in cache and its
    temporaries are reused, not faulted in fresh; on a GPU one block is best."""
    if array_api_compat.is_torch_namespace(xp) and x.device.type != "cpu":
        return max(x.shape[0], 1)
    return _CPU_BLOCK


def slot_dual_bound(xp, distortion, allowed, amortized, group, slots, constant: float,
                    forced_bytes: float, budget: float, price: float, price_max: float,
                    evaluations: int = 16, return_price: bool = False, guess=None):
    """A Lagrangian lower bound on the paged optimum that credits forced pages' empty slots.

    Paged cost >= R(x) = F + Σ_{g,t} c'_gt · max(0, n_gt - s_gt), with F the bytes of the forced
    items' whole pages and s_gt the empty slots they leave. For λ >= 0,
    OPT >= min_x Σ D + λ (R(x) - B). There each free item either pays its best priced tier,
    best_i = min_t D_it + λ c'_t, or takes an empty slot of tier t at D_it; with at most s_gt
    items per slot and an item allowed into every slot tier at once (a relaxation), the minimum
    is at least L(λ) = Σ_i best_i - Σ_{g,t} (sum of the s_gt largest max(0, best_i - D_it) in g)
    + λ (F - B). L is concave and piecewise linear in λ, with slope
    Σ_i c'(best tier of i) · (1 - number of slots i is credited) + F - B; it is maximised over
    λ in [0, ``price_max``] (beyond the steepest hull slope no upgrade pays) by regula falsi on
    the slope from ``price``, with at most ``evaluations`` evaluations; ``guess(λ, slope)``, if
    given, proposes the next λ from the last one (None: no proposal), taken where it lies
    within the bracket. Each is T passes over
    the items, block by block, and per tier with empty slots a sort of the items whose gain is
    at least a floor below each group's s-th largest (the s-th largest gain of the items
    credited at the previous λ; at the first, of every k-th item). Every evaluated L is a
    bound; the largest is returned (with its λ if ``return_price``).

    Parameters
    ----------
    distortion : array [N, T]
        Free items' distortions.
    allowed : bool array [N, T] or None
        Tiers within each item's ceiling.
    amortized : array [G, T]
        ``c + h/P`` per (group, tier).
    group : int array [N]
    slots : int array [G, T]
        Empty slots of forced items' pages.
    constant : float
        Distortion of the forced items.
    """
    import numpy as np

    g_count, t = amortized.shape
    n = distortion.shape[0]
    dev = array_api_compat.device(distortion)
    step = _block(xp, distortion)
    # Costs as floats when all groups share one row.
    shared = bool(xp.all(amortized == amortized[:1, :]))
    if shared:
        row = amortized[0, :]
        c_row = [float(v) for v in np.asarray(row.cpu() if hasattr(row, "cpu") else row)]
    tiers = [tier for tier in range(t) if bool(xp.any(slots[:, tier] > 0))]
    torch_lib = None
    if array_api_compat.is_torch_namespace(xp):
        import torch as torch_lib

        if shared:
            c_tensor = xp.asarray(c_row, dtype=distortion.dtype, device=dev)
    slot_rows = {tier: slots[:, tier] for tier in tiers}
    # Per slot tier, items whose gains bound each group's s-th largest from below: those
    # credited at the last λ, at first every k-th item (k to sample about 16 s per group).
    k = max(1, n // (16 * g_count * max(int(xp.max(slots)), 1)))
    credited = {tier: xp.arange(0, n, k, device=dev) for tier in tiers}

    def priced(items, lam: float):
        """best_i = min_t D_it + λ c'_t (the first such tier), its bytes and the gains
        ``best_i - D_i,tier`` of each slot tier, for the items of a slice or an index array."""
        if torch_lib is not None:
            # torch: one reduction over the rows [n, T] (a loop over tiers of rank-major rows
            # costs a transposing copy and 3 T operations, each with torch's per-call overhead;
            # numpy is faster with the loop). Both take the first least tier.
            block = distortion[items]
            cost = c_tensor if shared else xp.take(amortized, group[items], axis=0)
            value = block + lam * cost
            ok = None if allowed is None else allowed[items]
            if ok is not None:
                value = xp.where(ok, value, float("inf"))
            best, arg = torch_lib.min(value, dim=1)
            paid = (xp.take(cost, arg) if shared
                    else xp.take_along_axis(cost, arg[:, None], axis=1)[:, 0])
            gains = {}
            for tier in tiers:
                gain = best - block[:, tier]
                gains[tier] = gain if ok is None else xp.where(ok[:, tier], gain, 0.0)
            return best, paid, gains
        # numpy: the columns of the rows [n, T], read at stride T (a transposing copy costs
        # more), each tier's pass in place.
        rows = distortion[items]
        cost = None if shared else xp.take(amortized, group[items], axis=0)
        ok = None if allowed is None else allowed[items]
        value = np.empty(rows.shape[0], dtype=rows.dtype)
        better = np.empty(rows.shape[0], dtype=bool)
        best = paid = None
        for j in range(t):
            c_j = c_row[j] if shared else cost[:, j]
            np.add(rows[:, j], lam * c_j, out=value)
            if ok is not None:
                np.copyto(value, np.inf, where=~ok[:, j])
            if best is None:
                best, value = value, np.empty_like(value)
                paid = np.zeros(rows.shape[0], dtype=rows.dtype) + c_j
            else:
                np.less(value, best, out=better)
                np.minimum(best, value, out=best)
                np.copyto(paid, c_j, where=better)
        gains = {}
        for tier in tiers:
            gain = best - rows[:, tier]
            gains[tier] = gain if ok is None else xp.where(ok[:, tier], gain, 0.0)
        return best, paid, gains

    def dual(lam: float) -> tuple[float, float]:
        # The s largest gains of a group are at least the s-th largest of any of its items:
        # only items above that floor are sorted.
        shift = max(int(g_count).bit_length(), 1) + 1
        floors = {}
        for tier in tiers:
            last = credited[tier]
            gain = priced(last, lam)[2][tier]
            _, seg, rank, count, _, order = _ranked(xp, last, group[last], -gain, g_count)
            s_t = slot_rows[tier]
            floor = xp.zeros(g_count, dtype=gain.dtype, device=dev)
            at = rank == xp.take(s_t, seg) - 1
            floor[seg[at]] = gain[order][at]
            # Less a margin: sort keys drop the float's last ``shift`` bits, so the item at
            # rank s - 1 may be up to 2^(shift - 52) above the s-th largest (relative). A group
            # without slots keeps no item: its floor is inf.
            floors[tier] = xp.where(s_t == 0, float("inf"), xp.where(
                count < s_t, 0.0, floor - xp.abs(floor) * 2.0 ** (shift - 50)))
        total = magnitude = paid_bytes = 0.0
        found = {tier: ([], [], []) for tier in tiers}
        for s in range(0, n, step):
            part = slice(s, min(s + step, n))
            best, paid, gains = priced(part, lam)
            total += float(xp.sum(best))
            magnitude += float(xp.sum(xp.abs(best)))
            paid_bytes += float(xp.sum(paid))
            g = group[part]
            for tier in tiers:
                gain = gains[tier]
                keep = (gain > 0) & (gain >= xp.take(floors[tier], g))
                at = xp.nonzero(keep)[0]
                found[tier][0].append(at + s)
                found[tier][1].append(gain[at])
                found[tier][2].append(paid[at])
        credit, credited_bytes = 0.0, 0.0
        for tier in tiers:
            if not found[tier][0]:  # no free items
                continue
            cand, gain, paid = (xp.concat(parts) for parts in found[tier])
            if cand.shape[0] == 0:
                continue
            items, seg, rank, _, seg_sum, order = _ranked(xp, cand, group[cand], -gain, g_count)
            chosen = rank < xp.take(slot_rows[tier], seg)
            credited[tier] = items[chosen]
            credit += float(xp.sum(seg_sum(xp.where(chosen, gain[order], 0.0))))
            credited_bytes += float(xp.sum(xp.where(chosen, paid[order], 0.0)))
        lagrange = lam * (forced_bytes - budget)
        # Σ best carries λ·bytes terms that λ(F - B) mostly cancels: give up their rounding
        # (about N·ε of their magnitudes) rather than overstate the optimum.
        rounding = 1e-13 * n * (abs(constant) + magnitude + credit + abs(lagrange))
        value = constant + total - credit + lagrange - rounding
        return value, paid_bytes - credited_bytes + forced_bytes - budget

    lam = max(price, 0.0)  # a bound for λ >= 0 only (a solver's dual may be -0)
    value, slope = dual(lam)
    best_value, best_lam = value, lam

    def result():
        return (best_value, best_lam) if return_price else best_value

    if price_max <= 0 or evaluations <= 1 or slope == 0:
        return result()
    # Bracket the maximum: [lo, hi] with slope(lo) > 0 > slope(hi), doubling or halving λ.
    lo, hi = (lam, None) if slope > 0 else (None, lam)
    s_lo, s_hi = (slope, None) if slope > 0 else (None, slope)
    f_lo, f_hi = (value, None) if slope > 0 else (None, value)
    g_lo, g_hi = s_lo, s_hi  # the true slopes (s_lo, s_hi are scaled by Illinois steps)
    side = 0  # Illinois: halve the slope kept twice on one side
    for _ in range(evaluations - 1):
        if lo is not None and hi is not None:
            # The tangents at lo and hi meet above the maximum: stop when that is close.
            top = (f_hi - f_lo + g_lo * lo - g_hi * hi) / (g_lo - g_hi)
            if f_lo + g_lo * (top - lo) - best_value <= 1e-6 * abs(best_value):
                break
        # The caller's guess from the last point where it has one inside the bracket, else
        # doubling or halving λ until there is a bracket, then regula falsi.
        guessed = guess(lam, slope) if guess is not None else None
        inside = guessed is not None and (lo or 0.0) < guessed < (price_max if hi is None
                                                                  else hi)
        if inside:
            lam = guessed
        elif hi is None:
            lam = min(2 * lo if lo > 0 else price_max * 1e-6, price_max)
        elif lo is None:
            lam = hi / 2 if hi > price_max * 1e-9 else 0.0
        else:
            lam = lo + (hi - lo) * s_lo / (s_lo - s_hi)
        value, slope = dual(lam)
        if value > best_value:
            best_value, best_lam = value, lam
        if slope > 0:
            if lo is not None and hi is not None and side == 1:
                s_hi /= 2
            lo, s_lo, g_lo, f_lo, side = lam, slope, slope, value, 1
            if lam >= price_max:
                break
        elif slope < 0:
            if lo is not None and hi is not None and side == -1:
                s_lo /= 2
            hi, s_hi, g_hi, f_hi, side = lam, slope, slope, value, -1
            if lam <= 0:
                break
        else:
            break
    return result()
