"""The allocation problem of Rate-Distortion Retention (RDR).

Each item (a cached token of one attention head) takes exactly one tier (drop, a compressed codec,
fp16). Tier t of item i costs ``cost[i, t]`` bytes and adds ``distortion[i, t]``; the total cost
must stay within ``budget``. That is a multiple-choice knapsack problem (MCKP).

With ``page_size`` P, items of one page group (a layer and kv-head) and one tier are packed into
tier-homogeneous pages of P slots. A page of tier t in group g costs ``P * cost[g, t] +
page_overhead`` bytes whether full or not, so group g with n items at tier t pays
``ceil(n / P)`` pages. Tiers that cost nothing (``drop``) hold no pages.

Based on "Spherical KV: Angle-Domain Attention and Rate-Distortion Retention for Efficient
Long-Context Inference", arXiv 2605.18856.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["AllocationProblem", "Allocation", "InfeasibleBudgetError", "FILE_FORMAT_VERSION"]

FILE_FORMAT_VERSION = 1
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


def _float_array(name: str, value, ndim: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array, got {type(value).__name__}") from exc
    if arr.ndim not in ndim:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim))} dimensions, "
                         f"got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name} must be finite; found {arr[tuple(bad)]} at index {tuple(bad)}")
    if np.any(arr < 0):
        bad = np.argwhere(arr < 0)[0]
        raise ValueError(f"{name} must be >= 0; found {arr[tuple(bad)]} at index {tuple(bad)}")
    return arr


def _int_array(name: str, value, n: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one entry per item), got {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ValueError(f"{name} must hold integers")
    return arr.astype(np.int64)


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
    """

    distortion: np.ndarray
    cost: np.ndarray
    budget: float
    groups: np.ndarray | None = None
    page_size: int | None = None
    page_overhead: float = 0.0
    forced: np.ndarray | None = None
    tier_names: list[str] | None = None
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
        try:
            self.budget = float(self.budget)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"budget must be a number of bytes, got {self.budget!r}") from exc
        if not np.isfinite(self.budget) or self.budget < 0:
            raise ValueError(f"budget must be finite and >= 0, got {self.budget}")
        if self.groups is None:
            self.groups = np.zeros(n, dtype=np.int64)
        else:
            self.groups = _int_array("groups", self.groups, n)
            if n and self.groups.min() < 0:
                raise ValueError("groups must be >= 0")
        if self.forced is None:
            self.forced = np.full(n, -1, dtype=np.int64)
        else:
            self.forced = _int_array("forced", self.forced, n)
            bad = (self.forced < -1) | (self.forced >= t)
            if np.any(bad):
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(f"forced[{i}] = {self.forced[i]} is out of range: use -1 for a "
                                 f"free item or a tier in [0, {t - 1}]")
        if self.page_size is not None:
            if int(self.page_size) != self.page_size or self.page_size < 1:
                raise ValueError(f"page_size must be a positive integer, got {self.page_size!r}")
            self.page_size = int(self.page_size)
        self.page_overhead = float(self.page_overhead)
        if not np.isfinite(self.page_overhead) or self.page_overhead < 0:
            raise ValueError(f"page_overhead must be finite and >= 0, got {self.page_overhead}")
        if self.page_overhead > 0 and self.page_size is None:
            raise ValueError("page_overhead needs page_size: overhead is counted per page")
        if self.tier_names is not None:
            self.tier_names = [str(s) for s in self.tier_names]
            if len(self.tier_names) != t:
                raise ValueError(f"tier_names must name all {t} tiers, got {len(self.tier_names)}")
        # Dense group ids 0..G-1 and the cost row of each group.
        uniq, self._group_index = np.unique(self.groups, return_inverse=True)
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
        min_cost = self.min_cost()
        if self.budget < min_cost * (1 - 1e-12) - 1e-9:
            raise InfeasibleBudgetError(self.budget, min_cost)

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
        return np.where(self.cost > 0, self.cost + self.page_overhead / self.page_size, 0.0)

    # --- evaluation ----------------------------------------------------------------------
    def counts(self, tiers: np.ndarray) -> np.ndarray:
        """Items per (group, tier), [G, T]; items whose tier is -1 are not counted."""
        tiers = np.asarray(tiers)
        keep = tiers >= 0
        flat = self._group_index[keep] * self.n_tiers + tiers[keep]
        return np.bincount(flat, minlength=self.n_groups * self.n_tiers).reshape(
            self.n_groups, self.n_tiers
        )

    def forced_counts(self) -> np.ndarray:
        """Forced items per (group, tier), [G, T]."""
        return self.counts(np.where(self.forced >= 0, self.forced, -1))

    def page_cost(self, counts: np.ndarray) -> float:
        """Bytes of whole pages holding ``counts`` [G, T] items per (group, tier)."""
        return float((-(-np.asarray(counts) // self.page_size) * self.page_bytes).sum())

    def cost_of(self, tiers: np.ndarray) -> float:
        """Bytes an assignment really uses, whole pages and their overhead included."""
        tiers = self._check_tiers(tiers)
        if self.page_size is None:
            if self.cost.ndim == 1:
                return float(self.cost[tiers].sum())
            return float(self.cost[np.arange(self.n_items), tiers].sum())
        return self.page_cost(self.counts(tiers))

    def distortion_of(self, tiers: np.ndarray) -> float:
        tiers = self._check_tiers(tiers)
        return float(self.distortion[np.arange(self.n_items), tiers].sum())

    def is_feasible(self, tiers: np.ndarray, rtol: float = 1e-9) -> bool:
        tiers = self._check_tiers(tiers)
        free = self.forced < 0
        if np.any(tiers[~free] != self.forced[~free]):
            return False
        return self.cost_of(tiers) <= self.budget * (1 + rtol) + 1e-9

    def _check_tiers(self, tiers) -> np.ndarray:
        tiers = np.asarray(tiers)
        if tiers.shape != (self.n_items,):
            raise ValueError(f"tiers must have shape ({self.n_items},), got {tiers.shape}")
        if tiers.size and (tiers.min() < 0 or tiers.max() >= self.n_tiers):
            raise ValueError(f"tiers must lie in [0, {self.n_tiers - 1}]")
        return tiers.astype(np.int64)

    def full_cost(self, tier: int = -1) -> float:
        """Bytes when every item takes ``tier`` (the last, fp16, by default); forced kept."""
        t = np.full(self.n_items, tier % self.n_tiers)
        t[self.forced >= 0] = self.forced[self.forced >= 0]
        return self.cost_of(t)

    def min_cost_tiers(self) -> np.ndarray:
        """The cheapest feasible assignment (least distortion among equally cheap tiers)."""
        c = self.item_cost
        cheapest_item = np.lexsort((self.distortion, c), axis=1)[:, 0] if self.n_items else (
            np.zeros(0, dtype=np.int64))
        tiers = np.where(self.forced >= 0, self.forced, cheapest_item).astype(np.int64)
        if self.page_size is None:
            return tiers
        # With pages, free items first fill the slots that forced items leave free in their
        # partial pages (no extra bytes); the rest take pages of the cheapest tier.
        is_forced = self.forced >= 0
        forced_counts = self.forced_counts()
        pb = self.page_bytes
        for g in range(self.n_groups):
            if np.any(pb[g] == 0):
                continue  # a tier without pages (drop) absorbs every free item for nothing
            free_items = np.flatnonzero((self._group_index == g) & ~is_forced)
            slots = (-forced_counts[g]) % self.page_size
            if free_items.size == 0 or slots.sum() == 0:
                continue
            cheapest = int(np.argmin(pb[g]))
            # The items that suffer most in the cheapest tier take the free slots.
            by_harm = free_items[np.argsort(-self.distortion[free_items, cheapest], kind="stable")]
            slot_tiers = np.repeat(np.arange(self.n_tiers), slots)[: by_harm.size]
            tiers[by_harm[: slot_tiers.size]] = slot_tiers
        return tiers

    def min_cost(self) -> float:
        return self.cost_of(self.min_cost_tiers()) if self.n_items else 0.0

    def max_useful_cost(self) -> float:
        """Bytes of the least-distortion assignment; any budget above it changes nothing."""
        return self.cost_of(self.best_distortion_tiers())

    def best_distortion_tiers(self) -> np.ndarray:
        order = np.lexsort((self.item_cost, self.distortion), axis=1)[:, 0]
        return np.where(self.forced >= 0, self.forced, order).astype(np.int64)

    def with_budget(self, budget: float) -> AllocationProblem:
        return AllocationProblem(
            distortion=self.distortion, cost=self.cost, budget=budget, groups=self.groups,
            page_size=self.page_size, page_overhead=self.page_overhead, forced=self.forced,
            tier_names=self.tier_names,
        )

    # --- file layout ---------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the problem as a ``.npz`` file (see ``load`` for the layout)."""
        meta = {"format": "sphkv.AllocationProblem", "version": FILE_FORMAT_VERSION,
                "page_size": self.page_size, "page_overhead": self.page_overhead,
                "tier_names": self.tier_names}
        with open(path, "wb") as fh:
            np.savez_compressed(
                fh, distortion=self.distortion, cost=self.cost, budget=np.float64(self.budget),
                groups=self.groups, forced=self.forced, meta=np.array(json.dumps(meta)),
            )

    @classmethod
    def load(cls, path: str | Path, budget: float | None = None) -> AllocationProblem:
        """Read a problem saved by ``save``.

        Layout: a NumPy ``.npz`` archive with arrays ``distortion`` [N, T] float64, ``cost`` [T]
        or [N, T] float64, ``budget`` scalar float64 (bytes), ``groups`` [N] int64, ``forced``
        [N] int64 (-1 = free), and ``meta``, a JSON string with keys ``format``
        (``"sphkv.AllocationProblem"``), ``version``, ``page_size`` (int or null),
        ``page_overhead`` (bytes) and ``tier_names`` (list or null). ``budget`` overrides the
        stored budget.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"problem file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as exc:
            raise ValueError(f"{path} is not a readable .npz problem file: {exc}") from exc
        missing = {"distortion", "cost", "budget", "groups", "forced", "meta"} - arrays.keys()
        if missing:
            raise ValueError(f"{path} is missing arrays {sorted(missing)}; not a saved "
                             "sphkv.AllocationProblem")
        meta = json.loads(str(arrays["meta"]))
        if meta.get("format") != "sphkv.AllocationProblem":
            raise ValueError(f"{path} holds {meta.get('format')!r}, not a sphkv.AllocationProblem")
        if meta.get("version") != FILE_FORMAT_VERSION:
            raise ValueError(f"{path} has format version {meta.get('version')}; this sphkv reads "
                             f"version {FILE_FORMAT_VERSION}")
        return cls(
            distortion=arrays["distortion"], cost=arrays["cost"],
            budget=float(arrays["budget"]) if budget is None else budget,
            groups=arrays["groups"], forced=arrays["forced"], page_size=meta["page_size"],
            page_overhead=meta["page_overhead"], tier_names=meta["tier_names"],
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
