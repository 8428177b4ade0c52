"""The allocation problem of Rate-Distortion Retention (RDR).

Each item (a cached token of one attention head) takes exactly one tier (drop, a compressed codec,
fp16). Tier t of item i costs ``cost[i, t]`` bytes and adds ``distortion[i, t]``; the total cost
must stay within ``budget``. That is a multiple-choice knapsack problem (MCKP).

With ``page_size`` P, items of one page group (a layer and kv-head) and one tier are packed into
tier-homogeneous pages of P slots. A page of tier t in group g costs ``P * cost[g, t] +
page_overhead`` bytes whether full or not, so group g with n items at tier t pays
``ceil(n / P)`` pages. Tiers that cost nothing (``drop``) hold no pages.

With ``ceiling``, item i may only take tiers ``0 … ceiling[i]`` (an online demotion step: a token's
tier may only go down). Every solver treats it as a constraint: disallowed tiers are not choices.

Based on "Spherical KV: Angle-Domain Attention and Rate-Distortion Retention for Efficient
Long-Context Inference", arXiv 2605.18856.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["AllocationProblem", "Allocation", "InfeasibleBudgetError", "FILE_FORMAT_VERSION",
           "budget_is_fraction", "budget_to_bytes"]

FILE_FORMAT_VERSION = 2  # 2 added ``ceiling``; version 1 files are still read
_TINY = 1e-30


class InfeasibleBudgetError(ValueError):
    """The budget is below the cheapest feasible assignment."""

    def __init__(self, budget: float, min_cost: float):
        self.budget = float(budget)
        self.min_cost = float(min_cost)
        super().__init__(
            f"budget {self.budget:.6g} bytes is below the cheapest feasible assignment: "
            f"at least {self.min_cost:.6g} bytes are needed (forced tiers and pages included)"
        )


def budget_is_fraction(budget: float) -> bool:
    """Whether a budget given as one number is a fraction: one at most 1 is a share of the fp16
    bytes, one above 1 is bytes (so a byte budget of 1 or less cannot be given this way)."""
    return budget <= 1


def budget_to_bytes(budget: float, full: float) -> float:
    """Bytes of a budget given as one number (:func:`budget_is_fraction`): in (0, 1] a fraction
    of ``full``, the bytes of everything at fp16; above 1 bytes.

    Raises
    ------
    ValueError
        A budget that is not positive.
    """
    if not budget > 0:
        raise ValueError(f"budget must be positive, got {budget}")
    return budget * full if budget_is_fraction(budget) else float(budget)


def _float_array(name: str, value, ndim: tuple[int, ...]) -> np.ndarray:
    """A read-only float64 copy of ``value``, checked finite and >= 0."""
    if np.iscomplexobj(value):
        raise ValueError(f"{name} must be real, got complex values")
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array, got {type(value).__name__}") from exc
    if arr.ndim not in ndim:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim))} dimensions, "
                         f"got shape {arr.shape}")
    # Two reductions and no temporaries when all is well (a NaN fails both comparisons).
    if arr.size and arr.min() >= 0 and arr.max() < np.inf:
        arr.flags.writeable = False
        return arr
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name} must be finite; found {arr[tuple(bad)]} at index {tuple(bad)}")
    if np.any(arr < 0):
        bad = np.argwhere(arr < 0)[0]
        raise ValueError(f"{name} must be >= 0; found {arr[tuple(bad)]} at index {tuple(bad)}")
    arr.flags.writeable = False
    return arr


def _int_array(name: str, value, n: int) -> np.ndarray:
    """A read-only int64 copy of ``value`` [n]; bool masks and fractions are refused."""
    arr = np.asarray(value)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one entry per item), got {arr.shape}")
    if arr.dtype == bool or np.iscomplexobj(arr):
        raise ValueError(f"{name} must hold integers (tier or group indices), got dtype "
                         f"{arr.dtype}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        try:
            as_float = arr.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}") from exc
        if not np.all(np.isfinite(as_float)) or np.any(as_float != np.round(as_float)):
            raise ValueError(f"{name} must hold integers")
    arr = np.array(arr, dtype=np.int64)
    arr.flags.writeable = False
    return arr


def _dense_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(ids, return_inverse=True)`` of ids >= 0: by a count of each id, not a sort,
    where the largest id is within a few times their number."""
    if not ids.size or int(ids.max()) > 4 * ids.size + (1 << 16):
        uniq, inverse = np.unique(ids, return_inverse=True)
        return uniq, inverse.reshape(-1)
    present = np.bincount(ids) > 0
    dense = np.cumsum(present) - 1
    return np.flatnonzero(present), dense[ids]


def _torch_where(condition, a, b):
    import torch

    return torch.where(condition, a, b)


def _is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass(eq=False)
class AllocationProblem:
    """One MCKP instance: pick a tier per item, minimise distortion, stay within the budget.

    Parameters
    ----------
    distortion : array [N, T]
        Expected distortion of item i at tier t; finite and >= 0.
    cost : array [T] or [N, T]
        Bytes per item at tier t. With pages, items of one group must share their cost row.
    budget : float
        Total bytes allowed, pages and their overhead included.
    groups : int array [N], optional
        Page group of each item (e.g. ``layer * kv_heads + kv_head``); all items form one group
        when omitted.
    page_size : int, optional
        Items per page. Without it cost is counted per item.
    page_overhead : float
        Bytes of metadata per page (page-table entry).
    forced : int array [N], optional
        -1 where the item is free, else the tier it must take (sinks, the recent window).
    tier_names : list of str, optional
        A name per tier, for reports.
    ceiling : int array [N], optional
        The highest tier index item i may take (tiers ``0 … ceiling[i]``); -1 = no ceiling.
        ``forced[i] <= ceiling[i]`` where both are set.

    Arrays are copied at construction and kept read-only, so later writes to the caller's
    arrays do not reach the problem. :meth:`to` moves the per-item arrays to a torch device
    (the greedy solver then runs there with nothing to transfer); :meth:`host` moves them back.
    """

    distortion: np.ndarray
    cost: np.ndarray
    budget: float
    groups: np.ndarray | None = None
    page_size: int | None = None
    page_overhead: float = 0.0
    forced: np.ndarray | None = None
    tier_names: list[str] | None = None
    ceiling: np.ndarray | None = None
    _group_cost: np.ndarray = field(init=False, repr=False)
    _group_index: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self.distortion = _float_array("distortion", self.distortion, (2,))
        n, t = self.distortion.shape
        if t < 1:
            raise ValueError("distortion must have at least one tier (column)")
        self.cost = _float_array("cost", self.cost, (1, 2))
        if self.cost.shape not in ((t,), (n, t)):
            raise ValueError(f"cost must have shape ({t},) or ({n}, {t}) to match distortion "
                             f"{self.distortion.shape}, got {self.cost.shape}")
        if isinstance(self.budget, (bool, np.bool_)):
            raise ValueError(f"budget must be a number of bytes, got {self.budget!r}")
        try:
            self.budget = float(self.budget)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"budget must be a number of bytes, got {self.budget!r}") from exc
        if not np.isfinite(self.budget) or self.budget < 0:
            raise ValueError(f"budget must be finite and >= 0, got {self.budget}")
        if self.groups is None:
            self.groups = np.zeros(n, dtype=np.int64)
            self.groups.flags.writeable = False
        else:
            self.groups = _int_array("groups", self.groups, n)
            if n and self.groups.min() < 0:
                raise ValueError("groups must be >= 0")
        if self.forced is None:
            self.forced = np.full(n, -1, dtype=np.int64)
            self.forced.flags.writeable = False
        else:
            self.forced = _int_array("forced", self.forced, n)
            bad = (self.forced < -1) | (self.forced >= t)
            if np.any(bad):
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(f"forced[{i}] = {self.forced[i]} is out of range: use -1 for a "
                                 f"free item or a tier in [0, {t - 1}]")
        if self.ceiling is None:
            self._ceiling = np.full(n, t - 1, dtype=np.int64)
            self._has_ceiling = False
        else:
            self.ceiling = _int_array("ceiling", self.ceiling, n)
            bad = (self.ceiling < -1) | (self.ceiling >= t)
            if np.any(bad):
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(f"ceiling[{i}] = {self.ceiling[i]} is out of range: use -1 for "
                                 f"no ceiling or a tier in [0, {t - 1}]")
            self._ceiling = np.where(self.ceiling < 0, t - 1, self.ceiling)
            self._has_ceiling = bool(np.any(self._ceiling < t - 1))
            above = self.forced > self._ceiling
            if np.any(above):
                i = int(np.flatnonzero(above)[0])
                raise ValueError(f"forced[{i}] = {self.forced[i]} is above ceiling[{i}] = "
                                 f"{self.ceiling[i]}: a forced tier must be allowed")
        self._ceiling.flags.writeable = False
        if self.page_size is not None:
            if not _is_integer(self.page_size) or self.page_size < 1:
                raise ValueError(f"page_size must be a positive integer, got {self.page_size!r}")
            self.page_size = int(self.page_size)
        if isinstance(self.page_overhead, (bool, np.bool_)):
            raise ValueError(f"page_overhead must be a number of bytes, got {self.page_overhead!r}")
        try:
            self.page_overhead = float(self.page_overhead)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"page_overhead must be a number of bytes, got "
                             f"{self.page_overhead!r}") from exc
        if not np.isfinite(self.page_overhead) or self.page_overhead < 0:
            raise ValueError(f"page_overhead must be finite and >= 0, got {self.page_overhead}")
        if self.page_overhead > 0 and self.page_size is None:
            raise ValueError("page_overhead needs page_size: overhead is counted per page")
        if self.tier_names is not None:
            if isinstance(self.tier_names, (str, bytes)) or not all(
                    isinstance(name, str) for name in self.tier_names):
                raise ValueError("tier_names must be a list of strings, one per tier, got "
                                 f"{self.tier_names!r}")
            self.tier_names = list(self.tier_names)
            if len(self.tier_names) != t:
                raise ValueError(f"tier_names must name all {t} tiers, got {len(self.tier_names)}")
        # Dense group ids 0..G-1 and the cost row of each group.
        uniq, self._group_index = _dense_ids(self.groups)
        self._group_index.flags.writeable = False
        if self.cost.ndim == 1:
            self._group_cost = np.broadcast_to(self.cost, (len(uniq), t)).copy()
        else:
            self._group_cost = np.zeros((len(uniq), t))
            self._group_cost[self._group_index] = self.cost
            if self.page_size is not None and not np.array_equal(
                self._group_cost[self._group_index], self.cost
            ):
                raise ValueError("cost rows must be equal within each group when page_size is "
                                 "set: a page holds items of one cost")
        self._group_cost.flags.writeable = False
        min_cost = self.min_cost()
        if self.budget < min_cost * (1 - 1e-12) - 1e-9:
            raise InfeasibleBudgetError(self.budget, min_cost)

    # --- where the arrays live ---------------------------------------------------------
    # [N] and [N, T] arrays; [G, T] and [T] ones (per group, per tier) always stay numpy.
    _ITEM_ARRAYS = ("distortion", "cost", "groups", "forced", "ceiling", "_ceiling",
                    "_group_index")

    @property
    def device(self):
        """The torch device of the per-item arrays, or None when they are numpy arrays."""
        return None if isinstance(self.distortion, np.ndarray) else self.distortion.device

    def to(self, device) -> AllocationProblem:
        """This problem with its per-item arrays (``distortion``, ``groups``, ``forced``,
        ``ceiling``, a per-item ``cost``) copied to torch tensors on ``device``; per-group and
        per-tier arrays stay numpy. Nothing is checked again: the problem was checked on the
        host. Evaluations (:meth:`counts`, :meth:`distortion_of`, :meth:`is_feasible`, …) then
        run on that device, and the greedy solver solves it there."""
        import torch

        device = torch.device(device)
        moved = copy.copy(self.host())
        for name in self._ITEM_ARRAYS:
            value = getattr(moved, name)
            if value is not None and (name != "cost" or value.ndim == 2):
                setattr(moved, name, torch.tensor(value, device=device))
        return moved

    def host(self) -> AllocationProblem:
        """This problem with numpy per-item arrays (itself when they are)."""
        if self.device is None:
            return self
        back = copy.copy(self)
        for name in self._ITEM_ARRAYS:
            value = getattr(back, name)
            if value is not None and not isinstance(value, np.ndarray):
                value = value.cpu().numpy()
                value.flags.writeable = False
                setattr(back, name, value)
        return back

    def asarray(self, a):
        """``a`` (numpy or torch) beside the per-item arrays: numpy, or on :attr:`device`."""
        if self.device is None:
            return a.cpu().numpy() if hasattr(a, "cpu") else np.asarray(a)
        import torch

        if isinstance(a, np.ndarray) and not a.flags.writeable:
            a = a.copy()  # a tensor may not share a read-only array
        return torch.as_tensor(a, device=self.device)

    def _arange(self, n: int):
        return self.asarray(np.arange(n, dtype=np.int64))

    # --- shape ---------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return self.distortion.shape[0]

    @property
    def n_tiers(self) -> int:
        return self.distortion.shape[1]

    @property
    def n_groups(self) -> int:
        return self._group_cost.shape[0]

    @property
    def has_ceiling(self) -> bool:
        """Whether some item may not take every tier."""
        return self._has_ceiling

    @property
    def ceiling_tier(self) -> np.ndarray:
        """The highest tier each item may take, [N] (``n_tiers - 1`` where unbounded)."""
        return self._ceiling

    def allowed(self, items=slice(None)) -> np.ndarray:
        """[n, T] bool: whether each of ``items`` may take tier t (``t <= ceiling``)."""
        return self._arange(self.n_tiers)[None, :] <= self._ceiling[items, None]

    @property
    def group_index(self) -> np.ndarray:
        """Dense group id in [0, n_groups) of each item."""
        return self._group_index

    @property
    def item_cost(self) -> np.ndarray:
        """Bytes per item and tier, [N, T]."""
        return self._group_cost[self._group_index] if self.cost.ndim == 1 else self.cost

    @property
    def page_bytes(self) -> np.ndarray:
        """Bytes of one page per (group, tier), [G, T]; 0 for tiers that hold no pages."""
        if self.page_size is None:
            raise ValueError("page_bytes needs page_size")
        pb = self.page_size * self._group_cost + self.page_overhead
        return np.where(self._group_cost > 0, pb, 0.0)

    def amortized_cost(self) -> np.ndarray:
        """Cost per item with page overhead spread over the page; [T] or [N, T] like ``cost``.

        ``ceil(n / P) * (P c + h) >= n (c + h / P)``, so an assignment's paged cost is never below
        its amortized cost: the amortized problem is a relaxation of the paged one.
        """
        if self.page_size is None:
            return self.cost
        where = np.where if isinstance(self.cost, np.ndarray) else _torch_where
        return where(self.cost > 0, self.cost + self.page_overhead / self.page_size, 0.0)

    # --- evaluation ----------------------------------------------------------------------
    def counts(self, tiers: np.ndarray) -> np.ndarray:
        """Items per (group, tier), [G, T] (numpy); items whose tier is -1 are not counted."""
        tiers = self.asarray(tiers)
        if tiers.shape[0] and int(tiers.min()) < 0:
            keep = tiers >= 0
            flat = self._group_index[keep] * self.n_tiers + tiers[keep]
        else:
            flat = self._group_index * self.n_tiers + tiers
        return self._bincount(flat)

    def forced_counts(self) -> np.ndarray:
        """Forced items per (group, tier), [G, T] (numpy)."""
        fixed = self.forced >= 0
        return self._bincount(self._group_index[fixed] * self.n_tiers + self.forced[fixed])

    def _bincount(self, flat) -> np.ndarray:
        """Occurrences of each flat (group, tier) index ``g T + t``, as numpy [G, T]."""
        size = self.n_groups * self.n_tiers
        counts = (np.bincount(flat, minlength=size) if isinstance(flat, np.ndarray)
                  else flat.bincount(minlength=size).cpu().numpy())
        return counts.reshape(self.n_groups, self.n_tiers)

    def page_cost(self, counts: np.ndarray) -> float:
        """Bytes of whole pages holding ``counts`` [G, T] items per (group, tier)."""
        return float((-(-np.asarray(counts) // self.page_size) * self.page_bytes).sum())

    def cost_of(self, tiers: np.ndarray) -> float:
        """Bytes an assignment really uses, whole pages and their overhead included."""
        tiers = self._check_tiers(tiers)
        if self.page_size is None:
            if self.cost.ndim == 1:
                return float(self.asarray(self.cost)[tiers].sum())
            return float(self.cost[self._arange(self.n_items), tiers].sum())
        return self.page_cost(self.counts(tiers))

    def distortion_of(self, tiers: np.ndarray) -> float:
        tiers = self._check_tiers(tiers)
        # a gather from the flat table: several times faster than take_along_axis at 10^7 items
        flat = self._arange(self.n_items) * self.n_tiers + tiers
        return float(self.distortion.reshape(-1)[flat].sum())

    def is_feasible(self, tiers: np.ndarray, rtol: float = 1e-9,
                    cost: float | None = None) -> bool:
        """Whether ``tiers`` keeps the forced tiers and the ceilings and fits the budget
        (``cost``: its :meth:`cost_of`, when already measured)."""
        tiers = self._check_tiers(tiers)
        fixed = self.forced >= 0
        if bool((tiers[fixed] != self.forced[fixed]).any()) or bool(
                (tiers > self._ceiling).any()):
            return False
        return (self.cost_of(tiers) if cost is None else cost) <= self.budget * (1 + rtol) + 1e-9

    def _check_tiers(self, tiers) -> np.ndarray:
        """``tiers`` as int64 beside the per-item arrays, checked in shape and range."""
        tiers = self.asarray(tiers)
        if tuple(tiers.shape) != (self.n_items,):
            raise ValueError(f"tiers must have shape ({self.n_items},), got "
                             f"{tuple(tiers.shape)}")
        if tiers.shape[0] and (int(tiers.min()) < 0 or int(tiers.max()) >= self.n_tiers):
            raise ValueError(f"tiers must lie in [0, {self.n_tiers - 1}]")
        return np.asarray(tiers, dtype=np.int64) if self.device is None else tiers.long()

    def full_cost(self, tier: int = -1) -> float:
        """Bytes when every item takes ``tier`` (the last, fp16, by default) or its ceiling if
        lower; forced kept."""
        if self.device is not None:
            return self.host().full_cost(tier)
        t = np.minimum(np.full(self.n_items, tier % self.n_tiers), self._ceiling)
        t[self.forced >= 0] = self.forced[self.forced >= 0]
        return self.cost_of(t)

    def min_cost_tiers(self) -> np.ndarray:
        """A cheapest feasible assignment, [N].

        Without pages: each free item's cheapest allowed tier (least distortion among ties).
        With pages, per group (see :meth:`_min_pages`): the fewest bytes of pages that hold every
        item within its ceiling; free items fill those slots in order of ceiling, then of
        distortion at tier 0, so items that lose most when dropped get the dearer slots.
        """
        if self.device is not None:
            return self.asarray(self.host().min_cost_tiers())
        n, t = self.distortion.shape
        free = self.forced < 0
        if self.page_size is None or n == 0:
            c = np.where(self.allowed(), self.item_cost, np.inf)
            cheapest = (np.lexsort((self.distortion, c), axis=1)[:, 0] if n
                        else np.zeros(0, dtype=np.int64))
            return np.where(free, cheapest, self.forced).astype(np.int64)
        capacity = self._min_pages()[1]
        # Free items of each group in order (group, ceiling, distortion at tier 0); the k-th of
        # its group takes the tier whose cumulative capacity first exceeds k. Hall's condition
        # (at most C_k items with ceiling <= k, C_k the slots of tiers <= k) puts it within its
        # ceiling.
        items = np.flatnonzero(free)
        g = self._group_index[items]
        items = items[np.lexsort((self.distortion[items, 0], self._ceiling[items], g))]
        g = self._group_index[items]
        rank = np.arange(items.size) - np.searchsorted(g, g)
        cum = np.cumsum(capacity, axis=1)  # [G, T]
        tier_of = (rank[:, None] >= cum[g]).sum(axis=1)
        tiers = self.forced.copy()
        tiers[items] = tier_of
        return tiers

    def _min_pages(self) -> tuple[float, np.ndarray]:
        """Least page bytes for every item within its ceiling, and the free slots it pays for.

        Per group: forced items fill s_t = (-f_t) mod P slots of their own pages for nothing;
        demand D_k = free items with ceiling <= k must fit the slots of tiers <= k. Taking k
        upwards, a shortfall is bought as pages of the cheapest tier <= k: every such page
        serves constraint k and all later ones alike, and earlier ones already hold, so the
        cheapest is optimal (a covering problem with nested constraints). Tiers whose pages
        cost nothing hold any number of items. Returns (bytes, slots [G, T]).
        """
        p, (ng, t) = self.page_size, self._group_cost.shape
        pb = self.page_bytes
        forced = self.forced_counts()
        free = self.forced < 0
        unlimited = np.iinfo(np.int64).max // (4 * t)
        slots = np.where(pb > 0, (-forced) % p, unlimited)
        demand = np.cumsum(np.bincount(
            self._group_index[free] * t + self._ceiling[free], minlength=ng * t).reshape(ng, t),
            axis=1)
        covered = np.zeros(ng, dtype=np.int64)
        rows = np.arange(ng)
        cheapest = np.zeros(ng, dtype=np.int64)
        bought = np.zeros((ng, t), dtype=np.int64)  # pages beyond the forced items' own
        for k in range(t):
            cheapest = np.where(pb[:, k] < pb[rows, cheapest], k, cheapest)
            covered = np.minimum(covered + slots[:, k], unlimited)
            pages = -(-np.maximum(demand[:, k] - covered, 0) // p)
            bought[rows, cheapest] += pages
            covered += pages * p
        return self.page_cost(forced) + float((bought * pb).sum()), slots + bought * p

    def min_cost(self) -> float:
        """Least bytes of any feasible assignment (exact, pages and ceilings included)."""
        if self.device is not None:
            return self.host().min_cost()
        if self.n_items == 0:
            return 0.0
        if self.page_size is None:
            return self.cost_of(self.min_cost_tiers())
        return self._min_pages()[0]

    def max_useful_cost(self) -> float:
        """Bytes of the least-distortion assignment; any budget above it changes nothing."""
        if self.device is not None:
            return self.host().max_useful_cost()
        return self.cost_of(self.best_distortion_tiers())

    def best_distortion_tiers(self) -> np.ndarray:
        if self.device is not None:
            return self.asarray(self.host().best_distortion_tiers())
        d = np.where(self.allowed(), self.distortion, np.inf)
        order = np.lexsort((self.item_cost, d), axis=1)[:, 0]
        return np.where(self.forced >= 0, self.forced, order).astype(np.int64)

    def with_budget(self, budget: float) -> AllocationProblem:
        if self.device is not None:
            return self.host().with_budget(budget).to(self.device)
        return AllocationProblem(
            distortion=self.distortion, cost=self.cost, budget=budget, groups=self.groups,
            page_size=self.page_size, page_overhead=self.page_overhead, forced=self.forced,
            tier_names=self.tier_names, ceiling=self.ceiling,
        )

    # --- file layout ---------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the problem as a ``.npz`` file (see ``load`` for the layout)."""
        if self.device is not None:
            return self.host().save(path)
        meta = {"format": "sphkv.AllocationProblem", "version": FILE_FORMAT_VERSION,
                "page_size": self.page_size, "page_overhead": self.page_overhead,
                "tier_names": self.tier_names}
        ceiling = self.ceiling if self.ceiling is not None else np.full(self.n_items, -1)
        with open(path, "wb") as fh:
            np.savez_compressed(
                fh, distortion=self.distortion, cost=self.cost, budget=np.float64(self.budget),
                groups=self.groups, forced=self.forced, ceiling=ceiling,
                meta=np.array(json.dumps(meta)),
            )

    @classmethod
    def load(cls, path: str | Path, budget: float | None = None) -> AllocationProblem:
        """Read a problem saved by ``save``.

        Layout: a NumPy ``.npz`` archive with arrays ``distortion`` [N, T] float64, ``cost`` [T]
        or [N, T] float64, ``budget`` scalar float64 (bytes), ``groups`` [N] int64, ``forced``
        [N] int64 (-1 = free), ``ceiling`` [N] int64 (-1 = none; from version 2), and ``meta``, a
        JSON string with keys ``format`` (``"sphkv.AllocationProblem"``), ``version``,
        ``page_size`` (int or null), ``page_overhead`` (bytes) and ``tier_names`` (list or
        null). ``budget`` overrides the stored budget. Versions 1 and 2 are read.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"problem file {path} does not exist")
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic != b"PK\x03\x04":  # every .npz is a zip archive
            raise ValueError(f"{path} is not a .npz archive (it does not start like a zip file); "
                             "expected a problem written by AllocationProblem.save")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as exc:
            raise ValueError(f"{path} is not a readable .npz problem file: {exc}") from exc
        missing = {"distortion", "cost", "budget", "groups", "forced", "meta"} - arrays.keys()
        if missing:
            raise ValueError(f"{path} is missing arrays {sorted(missing)}; not a saved "
                             "sphkv.AllocationProblem")
        try:
            meta = json.loads(str(arrays["meta"]))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: its metadata is not JSON ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != "sphkv.AllocationProblem":
            format_ = meta.get("format") if isinstance(meta, dict) else meta
            raise ValueError(f"{path} holds {format_!r}, not a sphkv.AllocationProblem")
        if meta.get("version") not in (1, FILE_FORMAT_VERSION):
            raise ValueError(f"{path} has format version {meta.get('version')}; this sphkv reads "
                             f"versions 1 and {FILE_FORMAT_VERSION}")
        absent = {"page_size", "page_overhead", "tier_names"} - meta.keys()
        if absent:
            raise ValueError(f"{path}: its metadata lacks the fields {sorted(absent)}")
        return cls(
            distortion=arrays["distortion"], cost=arrays["cost"],
            budget=float(arrays["budget"]) if budget is None else budget,
            groups=arrays["groups"], forced=arrays["forced"], page_size=meta["page_size"],
            page_overhead=meta["page_overhead"], tier_names=meta["tier_names"],
            ceiling=arrays.get("ceiling"),
        )


@dataclass
class Allocation:
    """A solver's answer: one tier per item and what it costs.

    ``lower_bound`` is a proven lower bound on the optimal distortion (LP or Lagrangian dual, or
    the MIP bound); ``gap = (distortion - lower_bound) / max(distortion, tiny)``.
    """

    tiers: np.ndarray
    cost: float
    distortion: float
    lower_bound: float
    status: str
    seconds: float
    method: str = ""
    budget: float = float("nan")
    price: float | None = None  # λ, distortion per byte at the margin

    @property
    def gap(self) -> float:
        return max(self.distortion - self.lower_bound, 0.0) / max(self.distortion, _TINY)

    def summary(self) -> dict:
        return {"method": self.method, "cost": self.cost, "budget": self.budget,
                "distortion": self.distortion, "lower_bound": self.lower_bound, "gap": self.gap,
                "status": self.status, "seconds": self.seconds, "price": self.price}
