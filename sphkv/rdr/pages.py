"""Tier-homogeneous pages: the paged store of a compressed KV cache.

A page holds P slots of one group (a sequence, layer and kv-head) and one tier. Each tier has a
pool of pages with fixed page bytes; slot s of page p is row ``p·P + s`` of the pool's tensors:
the key codes, the value codes (payload and side information, as the tier's codecs produce
them) and a position offset (16 bits, or 32 where positions reach 2^16). A page table per
group lists its pages as
:data:`~sphkv.rdr.distortion.PAGE_TABLE_ENTRY` rows (page id, first position, valid count,
tier). Within a (group, tier) the kept tokens are packed densely, so only the last page of a
run is partial, and token j of a page sits at position ``first_position + offset[slot]`` (the
page's least position plus the offset): every kept (token, head) is in exactly one slot,
with its position recoverable. A group's runs are sorted by position where a reader needs it
(``ordered``: a sliding layer's kernel path bounds them by position); elsewhere they are in
no order, so that taking tokens out moves only as many of the run's last tokens into the
holes, not the whole run. The entries are held per tier, one array for all groups in (group,
run) order: a group's run at a tier is the block ``starts[g] … starts[g + 1]`` of it, the
starts being the cumulative pages ``ceil(count / P)`` of the groups before, so that readers
of a tier (the decode kernels, for every group at once) and writers (one splice per tier
write) work on one array instead of one per group.

The store is written a tier at a time: :meth:`PagedStore.add` appends tokens behind their runs
(into each run's last partial page, then new pages at the pool's end), :meth:`PagedStore.remove`
takes tokens out and :meth:`PagedStore.update` does both, writing only the runs it touches.
Pools hold exactly their pages and the accounted bytes — ``pages · P · (codes + side +
offset)`` per tier plus one entry per page — equal the bytes of the tensors the store really
holds (:meth:`PagedStore.held_bytes`); :attr:`PagedStore.counts` keeps the items per (group,
tier), so the bytes of a store with more or fewer items are known without reading it.

Beside each slot the store keeps the item's distortion row ``D[i, :]`` (float32), its position,
whether the slot holds an item and whether that item is pinned (it must keep its tier): the
allocator's bookkeeping for later demotions, read on the device; it is not cache content and is
not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sphkv.codec import Codes, KiviCodec
from sphkv.rdr.distortion import PAGE_TABLE_ENTRY
from sphkv.rdr.tiers import Tier, TierSet

__all__ = ["OFFSET_BYTES", "PagedStore", "Runs", "TierPool", "slot_bytes"]

#: bytes of the per-slot position offset from the page's first position, by default: 16 bits
#: serve pages that span fewer than 2^16 positions; a store whose positions may reach 2^16 needs
#: 32-bit offsets, since a page of a sparse tier can span the whole context
OFFSET_BYTES = 2
# per width: the offset dtype, the shift subtracted before storing (torch has no uint16: offsets
# 0 … 2^16-1 are stored as int16 minus 2^15), and the span a page must stay below
_OFFSET_FORMATS = {2: (torch.int16, 2**15, 2**16), 4: (torch.int32, 0, 2**31)}


def slot_bytes(tier: Tier, offset_bytes: int = OFFSET_BYTES) -> int:
    """Bytes of one slot of ``tier``: key and value codes with side information, and the offset
    (``offset_bytes``: 2 or 4); 0 for ``drop``."""
    return 0 if tier.is_drop else int(tier.bytes_per_token_head) + offset_bytes


def _paged_keys(tier: Tier) -> bool:
    """Whether the tier's keys are quantized per channel over groups of tokens (KIVI's keys):
    the store makes each page one group."""
    return isinstance(tier.key, KiviCodec) and tier.key.axis == "channel"


def _stripe(codes: Codes, p: int) -> Codes:
    """Codes of whole pages (``[pages, P]`` vectors, statistics ``[pages, 1, d]``) in slot
    layout: ``[pages · P]`` rows, slot j of a page holding channels ``j d/P … (j+1) d/P − 1``
    of its page's statistics, so that a page's bytes are its slots' bytes."""
    rows = codes.payload.shape[0] * p
    return Codes(codes.payload.reshape(rows, -1),
                 {k: v.reshape(rows, -1) for k, v in codes.side.items()},
                 torch.Size((rows, codes.shape[-1])))


def _empty(template: Codes, rows: int) -> Codes:
    """Zeroed flat codes of ``rows`` vectors, shaped like ``template`` (codes of one vector)."""
    return Codes(template.payload.new_zeros(rows, *template.payload.shape[1:]),
                 {k: v.new_zeros(rows, *v.shape[1:]) for k, v in template.side.items()},
                 torch.Size((rows, template.shape[-1])))


def _ranges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The indices ``lo[i] … hi[i] − 1`` of every range, end to end."""
    n = hi - lo
    return np.repeat(lo - (np.cumsum(n) - n), n) + np.arange(n.sum())


def _present(values: np.ndarray, n: int) -> np.ndarray:
    """The distinct ``values`` (ints in ``0 … n − 1``), ascending: a count, not a sort."""
    return np.flatnonzero(np.bincount(values, minlength=n))


def _inverse(order: np.ndarray) -> np.ndarray:
    """The inverse of the permutation ``order``."""
    out = np.empty_like(order)
    out[order] = np.arange(len(order))
    return out


def _select(new: tuple | None, mask: np.ndarray) -> tuple | None:
    """The rows ``mask`` of :meth:`PagedStore.add`'s arguments (None if none)."""
    if new is None or not mask.any():
        return None
    group, positions, key, value, distortion, pinned = new
    index = torch.from_numpy(np.flatnonzero(mask))
    on = index.to(value.payload.device)
    return (np.asarray(group)[mask], positions[index.to(positions.device)],
            key[on] if isinstance(key, torch.Tensor) else key.rows(on), value.rows(on),
            distortion[index.to(distortion.device)], pinned[index.to(pinned.device)])


def _entries(page_id: np.ndarray, first: np.ndarray, valid: np.ndarray,
             tier: int) -> np.ndarray:
    """Page-table entries of pages of one tier."""
    out = np.zeros(len(page_id), PAGE_TABLE_ENTRY)
    out["page_id"], out["first_position"], out["valid"], out["tier"] = page_id, first, valid, tier
    return out


class TierPool:
    """The pages of one non-drop tier: ``pages · P`` slots of key codes, value codes and offsets.

    Attributes
    ----------
    index : int
        The tier's index in the ladder.
    key, value : Codes
        Flat codes of ``[pages · P]`` vectors.
    offset : torch.Tensor
        int16 or int32 ``[pages · P]``: position of the slot's token minus its page's first
        position, minus ``shift`` (2^15 for int16).
    distortion : torch.Tensor
        float32 ``[pages · P, T]``: the distortion row of the slot's item (bookkeeping).
    position : torch.Tensor
        int64 ``[pages · P]``: the slot's token position (bookkeeping).
    valid, pinned : torch.Tensor
        bool ``[pages · P]``: the slot holds an item; that item keeps its tier (bookkeeping).
    owner : numpy.ndarray
        int64 ``[pages]``: the group of each page.
    """

    def __init__(self, tier: Tier, index: int, page_size: int, n_tiers: int,
                 device: torch.device, offset_bytes: int = OFFSET_BYTES):
        self.tier, self.index, self.page_size = tier, index, page_size
        self.offset_bytes = offset_bytes
        dtype, self.shift, self.max_span = _OFFSET_FORMATS[offset_bytes]
        self.paged_keys = _paged_keys(tier)
        key = tier.key
        if self.paged_keys and (key.group_size != page_size or key.d % page_size):
            raise ValueError(f"tier {tier.name} quantizes its keys per channel over groups of "
                             f"{key.group_size} tokens, one page each: it needs page_size = "
                             f"{key.group_size} dividing d = {key.d}, got page_size {page_size}")
        # codes of one zero vector: the shapes and dtypes of new slots (paged keys: a slot's
        # codes and its stripe of the page's statistics)
        one = torch.zeros(1, dtype=torch.long)
        key_template = (_stripe(key.encode(torch.zeros(1, page_size, key.d)), page_size).rows(one)
                        if self.paged_keys else key.encode(torch.zeros(1, key.d)))
        self.templates = tuple(c.to(device) for c in
                               (key_template, tier.value.encode(torch.zeros(1, key.d))))
        self.key, self.value = (_empty(t, 0) for t in self.templates)
        self.offset = torch.zeros(0, dtype=dtype, device=device)
        self.distortion = torch.zeros(0, n_tiers, device=device)
        self.position = torch.zeros(0, dtype=torch.long, device=device)
        self.valid = torch.zeros(0, dtype=torch.bool, device=device)
        self.pinned = torch.zeros(0, dtype=torch.bool, device=device)
        self.owner = np.zeros(0, dtype=np.int64)

    @property
    def pages(self) -> int:
        return len(self.owner)

    @property
    def page_bytes(self) -> int:
        return self.page_size * slot_bytes(self.tier, self.offset_bytes)

    def held_bytes(self) -> int:
        """Bytes of the tensors that make up the pages (codes, side information, offsets)."""
        return self.key.nbytes + self.value.nbytes + self.offset.numel() * self.offset_bytes

    def readable(self) -> tuple[Codes, Codes]:
        """The key and value codes for a reader that needs rows to point at: an empty pool's
        are one zeroed page (no run reads them)."""
        if self.pages:
            return self.key, self.value
        return tuple(_empty(t, self.page_size) for t in self.templates)

    def key_rows(self, slots: torch.Tensor) -> Codes:
        """Key codes of ``slots`` (any shape); paged keys carry their page's statistics in full
        (``[..., d]`` per slot), as the key codec decodes them."""
        d = self.tier.key.d
        if not self.paged_keys:
            return self.key.rows(slots)
        p = self.page_size
        stripes = (slots // p * p).unsqueeze(-1) + torch.arange(p, device=slots.device)
        return Codes(self.key.payload[slots],
                     {k: v[stripes].flatten(-2) for k, v in self.key.side.items()},
                     torch.Size((*slots.shape, d)))


@dataclass
class Runs:
    """Runs of one tier for several groups (:meth:`PagedStore.runs`).

    Attributes
    ----------
    pages : numpy.ndarray or torch.Tensor
        int32 ``[groups, max_pages]``: page ids of each run in its order (0 past it); a tensor
        on the store's device from :meth:`PagedStore.block_tables`.
    lengths : numpy.ndarray or torch.Tensor
        int32 ``[groups]``: tokens of each run (as ``pages``).
    positions : torch.Tensor or None
        int64 ``[groups, max_pages · P]`` on the store's device: each run token's position in
        run order (ascending in an ordered group), the largest int64 past the run.
    """

    pages: np.ndarray
    lengths: np.ndarray
    positions: torch.Tensor | None


class PagedStore:
    """Pools of tier-homogeneous pages and one page table per group.

    Parameters
    ----------
    tiers : TierSet
        The ladder; every non-drop tier gets a pool.
    groups : int
        Number of page tables, one per (sequence, layer, kv-head).
    page_size : int
        Slots per page, P.
    device : torch.device or str
        Where the pools live (the page tables stay on the host).
    ordered : bool or array of bool
        Per group (or for all): whether its runs stay sorted by position. A reader that bounds
        a run by position (a sliding layer's kernel path) needs it; an unordered run is packed
        as densely and its writes cost in proportion to the tokens they move, not the run.
    offset_bytes : {2, 4}
        Width of the per-slot position offsets: 2 serves positions below 2^16 (a page must
        span fewer than 2^16 positions, and a page of a sparse tier can span the context);
        4 any position.
    """

    def __init__(self, tiers: TierSet, groups: int, page_size: int = 16,
                 device: torch.device | str = "cpu", ordered=True,
                 offset_bytes: int = OFFSET_BYTES):
        if not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be a positive integer, got {page_size!r}")
        if not isinstance(groups, int) or groups < 1:
            raise ValueError(f"groups must be a positive integer, got {groups!r}")
        if offset_bytes not in _OFFSET_FORMATS or isinstance(offset_bytes, bool):
            raise ValueError(f"offset_bytes must be 2 or 4, got {offset_bytes!r}")
        self.offset_bytes = offset_bytes
        ordered = np.asarray(ordered)
        if ordered.dtype != bool or ordered.shape not in ((), (groups,)):
            raise ValueError(f"ordered must be a bool or a bool array of {groups} (groups), got "
                             f"dtype {ordered.dtype}, shape {ordered.shape}")
        self.ordered = np.broadcast_to(ordered, (groups,)).copy()
        self.tiers, self.page_size, self.d = tiers, page_size, tiers.d
        self.device = torch.device(device)
        self.pools = {t: TierPool(tier, t, page_size, len(tiers), self.device, offset_bytes)
                      for t, tier in enumerate(tiers) if not tier.is_drop}
        self.groups = groups
        #: page-table entries per tier, every group's run in (group, position) order
        self.entries = {t: np.zeros(0, PAGE_TABLE_ENTRY) for t in self.pools}
        #: items per (group, tier), int64 ``[groups, T]``
        self.counts = np.zeros((groups, len(tiers)), dtype=np.int64)
        #: counts the writes: readers may keep what they decoded while it stays the same
        self.version = 0

    # --- accounting --------------------------------------------------------------------------
    @property
    def slot_costs(self) -> np.ndarray:
        """Bytes per slot of each tier, ``[T]`` (0 for drop): the item cost of allocations."""
        return np.array([slot_bytes(t, self.offset_bytes) for t in self.tiers],
                        dtype=np.float64)

    def nbytes(self) -> int:
        """Accounted bytes: whole pages (partial ones included) and one page-table entry each
        (every page is listed once, so the entries are counted from the pools, in O(tiers))."""
        return sum(pool.pages * (pool.page_bytes + PAGE_TABLE_ENTRY.itemsize)
                   for pool in self.pools.values())

    def held_bytes(self) -> int:
        """Bytes of the tensors and page tables the store really holds."""
        return (sum(p.held_bytes() for p in self.pools.values())
                + sum(e.nbytes for e in self.entries.values()))

    @property
    def tables(self) -> list[np.ndarray]:
        """Each group's page table (a copy), its entries sorted by (tier, first position)."""
        parts = {t: np.split(e, self._starts(t)[1:-1]) for t, e in self.entries.items()}
        return [np.concatenate([parts[t][g] for t in self.entries]) if parts
                else np.zeros(0, PAGE_TABLE_ENTRY) for g in range(self.groups)]

    # --- reading -----------------------------------------------------------------------------
    def _slots(self, group: int, tier: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot rows ``[n]`` (on the store's device) and positions ``[n]`` (on the CPU) of the
        tokens of ``group`` at ``tier``, by position."""
        (lo, hi), = self._blocks(np.array([group]), tier)
        entries = self.entries[tier][lo:hi]
        if not len(entries):
            return (torch.zeros(0, dtype=torch.long, device=self.device),
                    torch.zeros(0, dtype=torch.long))
        valid = entries["valid"].astype(np.int64)
        # token j of entry e sits in slot page_id[e]·P + j, j < valid[e]
        within = np.arange(valid.sum()) - np.repeat(np.cumsum(valid) - valid, valid)
        slots = np.repeat(entries["page_id"].astype(np.int64) * self.page_size, valid) + within
        slots = torch.from_numpy(slots).to(self.device)
        first = torch.from_numpy(np.repeat(entries["first_position"].astype(np.int64), valid))
        pool = self.pools[tier]
        positions = first + pool.offset[slots].long().cpu() + pool.shift
        order = torch.argsort(positions)
        return slots[order.to(self.device)], positions[order]

    def count(self, group: int, tier: int) -> int:
        return int(self.counts[group, tier])

    def positions(self, group: int) -> dict[int, torch.Tensor]:
        """Positions of the tokens kept for ``group``, per tier (sorted)."""
        return {t: self._slots(group, t)[1] for t in self.pools if self.count(group, t)}

    def distortion(self, group: int, tier: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positions [n], distortion [n, T])`` of a run, without its codes."""
        slots, pos = self._slots(group, tier)
        return pos, self.pools[tier].distortion[slots]

    def runs(self, tier: int, groups: list[int], positions: bool = False) -> Runs:
        """Each group's run at ``tier`` as page ids in position order, for readers of the pools
        (the decode kernels): one vectorised pass over the groups' page tables.

        Parameters
        ----------
        positions : bool
            Also give each run token's position (on the store's device).

        Raises
        ------
        RuntimeError
            A run with a partial page before its last (the store packs runs densely).
        """
        blocks = self._blocks(np.asarray(groups, dtype=np.int64), tier)
        count = blocks[:, 1] - blocks[:, 0]
        # a run's block is in position order
        table = self.entries[tier][_ranges(blocks[:, 0], blocks[:, 1])]
        owner = np.repeat(np.arange(len(groups)), count)
        rank = np.arange(len(owner)) - np.repeat(np.cumsum(count) - count, count)
        if (table["valid"][rank < count[owner] - 1] != self.page_size).any():
            raise RuntimeError(f"tier {tier} has a run with a partial page before its last")
        width = max(int(count.max(initial=0)), 1)
        pages = np.zeros((len(groups), width), dtype=np.int32)
        pages[owner, rank] = table["page_id"]
        lengths = np.bincount(owner, weights=table["valid"],
                              minlength=len(groups)).astype(np.int32)
        out = Runs(pages, lengths, None)
        if positions:
            first = np.zeros((len(groups), width), dtype=np.int64)
            first[owner, rank] = table["first_position"]
            dev = self.device
            out.positions = self._run_positions(tier, torch.from_numpy(pages).to(dev),
                                                torch.from_numpy(first).to(dev),
                                                torch.from_numpy(lengths).to(dev))
        return out

    def block_tables(self, tier: int, positions: bool = False) -> Runs:
        """Every group's run at ``tier`` as :meth:`runs` gives it (without its check), built on
        the store's device from one transfer of the tier's page ids: ``pages`` and ``lengths``
        are int32 tensors there. What the decode kernels read after each write."""
        p, dev, entries = self.page_size, self.device, self.entries[tier]
        count = self.counts[:, tier]
        n = -(-count // p)  # pages of each group's run, its block of entries
        width = max(int(n.max(initial=0)), 1)
        owner = torch.repeat_interleave(torch.arange(self.groups, device=dev),
                                        torch.from_numpy(n).to(dev), output_size=len(entries))
        rank = (torch.arange(len(entries), device=dev)
                - torch.from_numpy(np.cumsum(n) - n).to(dev)[owner])
        pages = torch.zeros(self.groups, width, dtype=torch.int32, device=dev)
        pages[owner, rank] = torch.from_numpy(entries["page_id"].astype(np.int32)).to(dev)
        lengths = torch.from_numpy(count.astype(np.int32)).to(dev)
        out = Runs(pages, lengths, None)
        if positions:
            first = torch.zeros(self.groups, width, dtype=torch.long, device=dev)
            first[owner, rank] = torch.from_numpy(
                entries["first_position"].astype(np.int64)).to(dev)
            out.positions = self._run_positions(tier, pages, first, lengths)
        return out

    def _run_positions(self, tier: int, pages: torch.Tensor, first: torch.Tensor,
                       lengths: torch.Tensor) -> torch.Tensor:
        """int64 ``[groups, width · P]``: each run token's position from its page's first and
        its offset, the largest int64 past the run (``pages``, ``first`` ``[groups, width]``
        and ``lengths`` on the store's device)."""
        p, dev = self.page_size, self.device
        width = pages.shape[1]
        if not self.pools[tier].offset.numel():  # the pool has no rows to index
            return torch.full((len(pages), width * p), torch.iinfo(torch.int64).max,
                              device=dev)
        slots = pages.long()[..., None] * p + torch.arange(p, device=dev)
        pool = self.pools[tier]
        pos = (first[..., None] + pool.offset[slots].long() + pool.shift).flatten(1)
        past = torch.arange(width * p, device=dev) >= lengths.to(dev)[:, None]
        return pos.masked_fill_(past, torch.iinfo(torch.int64).max)

    def gather(self, tier: int, groups: list[int]):
        """The slots of several groups' runs at ``tier``, padded to the longest
        (:meth:`codes` reads them).

        Returns
        -------
        slots : torch.Tensor
            int64 ``[len(groups), n_max]`` on the store's device (padding repeats slot 0).
        valid : torch.Tensor
            bool ``[len(groups), n_max]`` on the store's device.
        positions : torch.Tensor
            int64 ``[len(groups), n_max]`` (on the CPU; -1 at padding slots).
        """
        runs, p = self.runs(tier, groups, positions=True), self.page_size
        slots = (torch.from_numpy(runs.pages).long()[..., None] * p + torch.arange(p)).flatten(1)
        valid = torch.arange(slots.shape[1]) < torch.from_numpy(runs.lengths)[:, None]
        n_max = int(runs.lengths.max(initial=0))
        slots, valid = slots[:, :n_max].masked_fill(~valid[:, :n_max], 0), valid[:, :n_max]
        positions = runs.positions[:, :n_max].cpu().masked_fill(~valid, -1)
        return slots.to(self.device), valid.to(self.device), positions

    def codes(self, tier: int, slots: torch.Tensor) -> tuple[Codes, Codes]:
        """Key and value codes of ``slots`` (any shape) of ``tier``'s pool."""
        pool = self.pools[tier]
        return pool.key_rows(slots), pool.value.rows(slots)

    def contents(self, tier: int):
        """Every token kept at ``tier``, in slot order.

        Returns
        -------
        group : numpy.ndarray
            int64 ``[n]``, each token's group.
        positions : torch.Tensor
            int64 ``[n]`` (on the CPU).
        key, value : Codes
            ``[n]`` vectors.
        distortion : torch.Tensor
            ``[n, T]``.
        """
        pool, p = self.pools[tier], self.page_size
        first = np.zeros(pool.pages, np.int64)
        valid = np.zeros(pool.pages, np.int64)
        entries = self.entries[tier]
        first[entries["page_id"]] = entries["first_position"]
        valid[entries["page_id"]] = entries["valid"]
        page = np.repeat(np.arange(pool.pages), valid)
        within = np.arange(len(page)) - np.repeat(np.cumsum(valid) - valid, valid)
        slots = torch.from_numpy(page * p + within).to(self.device)
        positions = (torch.from_numpy(first[page]) + pool.offset[slots].long().cpu()
                     + pool.shift)
        return (np.asarray(pool.owner, dtype=np.int64)[page], positions,
                pool.key_rows(slots), pool.value.rows(slots),
                pool.distortion[slots])

    def add(self, tier: int, group: np.ndarray, positions: torch.Tensor, key: Codes,
            value: Codes, distortion: torch.Tensor, pinned: torch.Tensor) -> None:
        """Add tokens to ``tier``'s pool (any order, already encoded by the tier's codecs):
        appended behind their groups' runs — into each run's last partial page,
        then new pages at the pool's end, no other slot moving — when every group's new
        positions follow its run and no page would span too many positions; else the runs
        they join are rewritten (:meth:`update`). A tier whose keys are quantized per page
        always rewrites them (its partial pages change their statistics).

        Parameters
        ----------
        group : numpy.ndarray
            int ``[n]``.
        positions : torch.Tensor
            int ``[n]``, distinct within a group and from the group's kept positions.
        key : Codes or torch.Tensor
            ``[n]`` vectors' codes; for a tier whose keys are quantized per channel over a page
            (:class:`~sphkv.codec.KiviCodec` with ``axis="channel"``), the vectors ``[n, d]``
            themselves, encoded here page by page.
        value : Codes
            ``[n]`` vectors.
        distortion : torch.Tensor
            ``[n, T]``.
        pinned : torch.Tensor
            bool ``[n]``: items that keep their tier.

        Raises
        ------
        ValueError
            A page would span 2^16 positions or more with 16-bit offsets; nothing is written.
        """
        pool, p = self.pools[tier], self.page_size
        arrivals = (group, positions, key, value, distortion, pinned)
        if pool.paged_keys:
            self.update(tier, new=arrivals)
            return
        group = np.asarray(group, dtype=np.int64)
        pos = positions.long().cpu().numpy()
        # sorted by (group, position): one int64 key (positions are below 2^32), several times
        # faster than a lexsort of the two, and nothing to sort when they come in order
        by = group << 32 | pos
        order = (np.arange(len(by)) if bool(np.all(by[1:] > by[:-1]))
                 else np.argsort(by, kind="stable"))
        group, pos = group[order], pos[order]
        start = np.flatnonzero(np.diff(group, prepend=-1))  # each group's first
        touched, n_new = group[start], np.diff(np.append(start, len(group)))
        # each touched run's block of page-table entries and its last entry (zero if none)
        blocks = self._blocks(touched, tier)
        has = blocks[:, 1] > blocks[:, 0]
        last = np.zeros(len(touched), PAGE_TABLE_ENTRY)
        last[has] = self.entries[tier][blocks[has, 1] - 1]
        # the position of each ordered run's last token (-1 if none)
        end = torch.full((len(touched),), -1, dtype=torch.long)
        read = has & self.ordered[touched]
        if read.any():
            tail = torch.from_numpy(last["page_id"][read].astype(np.int64) * p
                                    + last["valid"][read] - 1)
            end[torch.from_numpy(read)] = pool.position[tail.to(self.device)].cpu()
        room = np.where(has, p - last["valid"], 0)  # free slots of the run's last page
        rank = np.arange(len(group)) - np.repeat(start, n_new)
        run = np.repeat(np.arange(len(touched)), n_new)
        fresh = rank >= room[run]  # goes to a new page
        q = rank - room[run]  # rank among the group's tokens on new pages
        pages = np.where(n_new > room, -(-(n_new - room) // p), 0)
        page = np.where(fresh, pool.pages + np.repeat(np.cumsum(pages) - pages, n_new) + q // p,
                        last["page_id"][run])
        lead = fresh & (q % p == 0)
        # a token's page starts at the run's last page or at the new page's lead token
        first = last["first_position"][run].astype(np.int64)
        first[fresh] = pos[lead][np.cumsum(lead)[fresh] - 1]
        span = pos - first
        # an ordered run takes only positions behind its last; any run, only spans that fit
        behind = (pos[start] > end.numpy()) | ~self.ordered[touched]
        if not behind.all() or (len(span) and (span.min() < 0 or span.max() >= pool.max_span)):
            self.update(tier, new=arrivals)
            return
        slots = np.where(fresh, page * p + q % p, page * p + last["valid"][run] + rank)
        base = pool.pages
        self._grow(pool, base + int(pages.sum()))
        pool.owner[base:] = np.repeat(touched, pages)
        src = torch.from_numpy(order).to(self.device)
        self._write_slots(pool, torch.from_numpy(slots).to(self.device), torch.from_numpy(span),
                          torch.from_numpy(pos), key.rows(src), value.rows(src),
                          distortion.float().to(self.device)[src], pinned.to(self.device)[src])
        self.counts[touched, tier] += n_new
        k = np.arange(pages.sum()) - np.repeat(np.cumsum(pages) - pages, pages)
        entries = _entries(base + np.arange(pages.sum()), pos[lead],
                           np.minimum(p, np.repeat(n_new - room, pages) - p * k), tier)
        filled = room > 0
        self.entries[tier]["valid"][blocks[filled, 1] - 1] += np.minimum(room, n_new)[
            filled].astype(np.uint16)
        self._splice(tier, blocks[:, [1, 1]], entries, pages)

    def remove(self, tier: int, slots: torch.Tensor) -> None:
        """Take the items of ``slots`` (int64, on the store's device) out of ``tier``'s pool,
        rewriting only the runs they leave (:meth:`update`)."""
        self.update(tier, gone=slots)

    def update(self, tier: int, gone: torch.Tensor | None = None,
               new: tuple | None = None) -> None:
        """Take the items of slots ``gone`` out of ``tier``'s pool and put the items ``new``
        (:meth:`add`'s arguments) in, touching only the runs they belong to.

        An ordered run is rewritten from its first page that changes: its remaining items and
        arrivals sorted by position and packed into the run's own pages, then pages other runs
        freed, then new pages at the pool's end. An unordered run moves only what it must:
        arrivals and then its last items fill the holes ``gone`` leaves, further arrivals go
        behind it (:meth:`_fill`). Pages left free are filled by moving the pool's last pages
        into them, so the pool holds exactly its pages. A tier whose keys are quantized per
        page rewrites its runs and quantizes each rewritten page again.

        Raises
        ------
        ValueError
            A page would span 2^16 positions or more with 16-bit offsets; nothing is written
            (in a store of both kinds of run, the ordered ones may already be).
        """
        pool, p, dev = self.pools[tier], self.page_size, self.device
        gone = (torch.zeros(0, dtype=torch.long, device=dev) if gone is None
                else torch.unique(gone.to(dev).long()))
        gone = gone[pool.valid[gone]]  # slots that hold nothing have nothing to take out
        new_group = np.zeros(0, np.int64) if new is None else np.asarray(new[0], np.int64)
        gone_group = pool.owner[gone.cpu().numpy() // p]
        fill = np.zeros(self.groups, dtype=bool) if pool.paged_keys else ~self.ordered
        # each kind of run written apart (first the one that may refuse), the pages they free
        # compacted once (slots stay put until then)
        holes = []
        for f, write in ((False, self._rewrite), (True, self._fill)):
            mine_gone, mine_new = fill[gone_group] == f, fill[new_group] == f
            if mine_gone.any() or mine_new.any():
                holes.append(write(tier, gone[torch.from_numpy(mine_gone).to(dev)],
                                   _select(new, mine_new)))
        self._compact(pool, tier, np.sort(np.concatenate(holes)) if holes
                      else np.zeros(0, np.int64))

    def _fill(self, tier: int, gone: torch.Tensor, new: tuple | None) -> np.ndarray:
        """:meth:`update` of unordered runs. In run order (page by page along the run's block
        of entries, slot by slot) a run of n items with h of them ``gone`` and a arrivals holds
        m = n − h + a items at indices 0 … m − 1 after the write: the holes below m and the
        indices n … m − 1 (when it grows) are filled, arrivals first, then the items at
        indices m … n − 1 that stay. Each page written gets the least position of its items
        as its first, and its offsets again; pages past ceil(m / P) are freed, new ones taken
        from those other runs freed, then from the pool's end. The work is in proportion to
        the items moved and the touched runs' entries, but for the splice of the tier's
        entries when a run's page count changes. Falls back to :meth:`_rewrite` when a
        page would span too many positions. Returns the pages left free, for
        :meth:`_compact`."""
        pool, p, dev = self.pools[tier], self.page_size, self.device
        entries = self.entries[tier]
        gone_np = gone.cpu().numpy()
        new_group = np.zeros(0, np.int64) if new is None else np.asarray(new[0], np.int64)
        touched = _present(np.concatenate([pool.owner[gone_np // p], new_group]), self.groups)
        runs, blocks = len(touched), self._blocks(touched, tier)
        lo, n_old = blocks[:, 0], blocks[:, 1] - blocks[:, 0]  # each run's entries
        size = self.counts[touched, tier]
        # the page ids of the touched runs' entries, and the entry of each of those pages
        at_old = _ranges(lo, blocks[:, 1])
        old_ids = entries["page_id"][at_old].astype(np.int64)
        entry_of = np.zeros(pool.pages, np.int64)
        entry_of[old_ids] = at_old
        # each hole's run and index in it; arrivals' runs; sizes after
        h_run = np.searchsorted(touched, pool.owner[gone_np // p])
        h_idx = (entry_of[gone_np // p] - lo[h_run]) * p + gone_np % p
        a_run = np.searchsorted(touched, new_group)
        m = (size - np.bincount(h_run, minlength=runs)
             + np.bincount(a_run, minlength=runs)).astype(np.int64)
        # targets: holes below m, then n … m − 1; sources: arrivals, then the staying items
        # at m … n − 1 (equal counts per run)
        low = h_idx < m[h_run]
        t_run = np.concatenate([h_run[low], np.repeat(np.arange(runs), np.maximum(m - size, 0))])
        t_idx = np.concatenate([h_idx[low], _ranges(size, np.maximum(m, size))])
        cut = np.minimum(m, size)
        tail_run, tail_idx = np.repeat(np.arange(runs), size - cut), _ranges(cut, size)
        staying = np.ones(len(tail_idx), dtype=bool)
        high = ~low  # holes at m … n − 1, in the tail
        staying[(np.cumsum(size - cut) - (size - cut))[h_run[high]] + h_idx[high]
                - cut[h_run[high]]] = False
        mv_run, mv_idx = tail_run[staying], tail_idx[staying]
        t_order = np.argsort(t_run, kind="stable")
        t_run, t_idx = t_run[t_order], t_idx[t_order]
        s_order = np.argsort(np.concatenate([a_run, mv_run]), kind="stable")
        # pages: a run keeps its first ceil(m / P), frees the rest, takes new ones
        need = -(-m // p)
        keep = np.minimum(need, n_old)
        freed = np.sort(entries["page_id"][_ranges(lo + keep, lo + n_old)].astype(np.int64))
        grow = need - keep
        extra, before = int(grow.sum()), pool.pages
        fresh = np.concatenate([freed[:extra], before + np.arange(max(extra - len(freed), 0))])
        start_new = np.cumsum(grow) - grow
        old_pad, fresh_pad = np.append(old_ids, 0), np.append(fresh, 0)
        old_start = np.cumsum(n_old) - n_old  # each run's first in ``old_ids``

        def page_id(run, idx):
            """The page of index ``idx`` of run ``run`` after the write."""
            k = idx // p
            own = k < n_old[run]
            return np.where(own, old_pad[np.where(own, old_start[run] + k, -1)],
                            fresh_pad[np.where(own, -1, start_new[run] + k - n_old[run])])

        t_page = page_id(t_run, t_idx)
        t_slot = t_page * p + t_idx % p
        mv_slot = torch.from_numpy(page_id(mv_run, mv_idx) * p + mv_idx % p).to(dev)
        # the sources' data (arrivals, then the moved items), read before anything is written;
        # source s_order[j] goes to target j
        key, value = pool.key.rows(mv_slot), pool.value.rows(mv_slot)
        pos, dist, pinned = pool.position[mv_slot], pool.distortion[mv_slot], pool.pinned[mv_slot]
        if new is not None:
            _, new_pos, new_key, new_value, new_dist, new_pinned = new
            key, value = Codes.cat([new_key.to(dev), key]), Codes.cat([new_value.to(dev), value])
            pos = torch.cat([new_pos.long().to(dev), pos])
            dist = torch.cat([new_dist.float().to(dev), dist])
            pinned = torch.cat([new_pinned.to(dev), pinned])
        to_target = _inverse(s_order)
        # every page written (its targets share run and rank), with its positions after the
        # write: first and span
        written = np.zeros(before + extra, dtype=bool)
        written[t_page] = True
        pages = np.flatnonzero(written)
        inverse = np.cumsum(written)[t_page] - 1  # each target's page among ``pages``
        one = np.empty(len(pages), np.int64)
        one[inverse] = np.arange(len(t_page))  # a target of each page
        w_run, w_k = t_run[one], t_idx[one] // p
        holds = np.clip(m[w_run] - w_k * p, 0, p)  # valid slots of each page after
        page_slots = torch.from_numpy(pages).to(dev)[:, None] * p + torch.arange(p, device=dev)
        rows = pool.position.numel()
        # (slots of pages not yet grown read any row: they are all targets or not live)
        after = (pool.position[page_slots.clamp(max=rows - 1)] if rows
                 else torch.zeros_like(page_slots))
        after.view(-1)[torch.from_numpy((inverse * p + t_slot % p)[to_target]).to(dev)] = pos
        live = torch.arange(p, device=dev) < torch.from_numpy(holds).to(dev)[:, None]
        first = torch.where(live, after, torch.iinfo(torch.int64).max).amin(1)
        span = torch.where(live, after - first[:, None], 0)
        if len(pages) and int(span.max()) >= pool.max_span:
            return self._rewrite(tier, gone, new)
        # write: the run tails out, the targets in, the written pages' offsets again
        self._grow(pool, before + max(extra - len(freed), 0))
        tail_slot = page_id(tail_run, tail_idx) * p + tail_idx % p
        pool.valid[torch.from_numpy(tail_slot).to(dev)] = False
        self._write_slots(pool, torch.from_numpy(t_slot[to_target]).to(dev), None, pos, key,
                          value, dist, pinned)
        pool.offset[page_slots.flatten()] = (span - pool.shift).to(pool.offset.dtype).flatten()
        # page table: the kept entries in place (firsts of written pages, the valid counts of
        # a run's old and new last page), then each run's end spliced (entries of new pages
        # in, of freed ones out)
        first = first.cpu().numpy()
        own = w_k < n_old[w_run]
        entries["first_position"][lo[w_run[own]] + w_k[own]] = first[own]
        for rank in (n_old - 1, keep - 1):
            at = (rank >= 0) & (rank < keep)
            entries["valid"][lo[at] + rank[at]] = np.minimum(p, m[at] - p * rank[at])
        of = np.repeat(np.arange(runs), grow)
        k = n_old[of] + np.arange(extra) - start_new[of]
        ids = fresh[:extra]
        pool.owner[ids] = touched[of]
        self.counts[touched, tier] = m
        if (need != n_old).any():
            added = _entries(ids, first[np.searchsorted(pages, ids)], np.minimum(p, m[of] - p * k),
                             tier)
            self._splice(tier, np.stack([lo + keep, lo + n_old], axis=1), added, grow)
        return freed[extra:]

    def _rewrite(self, tier: int, gone: torch.Tensor, new: tuple | None) -> np.ndarray:
        """:meth:`update` of ordered runs (and of any run of a tier quantizing keys per
        page). Each run is rewritten from its first page that changes (:meth:`_unchanged`):
        the pages before it keep their items, ranks and entries. Returns the pages left free,
        for :meth:`_compact`."""
        pool, p, dev = self.pools[tier], self.page_size, self.device
        new_group = np.zeros(0, np.int64) if new is None else np.asarray(new[0], np.int64)
        gone_np = gone.cpu().numpy()
        touched = _present(np.concatenate([pool.owner[gone_np // p], new_group]), self.groups)
        blocks = self._blocks(touched, tier)
        skip = self._unchanged(tier, touched, blocks, gone_np, new_group,
                               None if new is None else new[1])
        # from here on a run is its pages from ``skip`` on: their ranks, entries and items
        blocks = blocks + np.stack([skip, np.zeros_like(skip)], axis=1)
        n_old = blocks[:, 1] - blocks[:, 0]
        old_ids = self.entries[tier]["page_id"][_ranges(blocks[:, 0], blocks[:, 1])].astype(
            np.int64)
        # the items that stay: the touched runs' valid slots but ``gone``
        runs = len(touched)
        page_slots = (torch.from_numpy(old_ids).to(dev)[:, None] * p
                      + torch.arange(p, device=dev)).flatten()
        keep = pool.valid.clone()
        keep[gone] = False
        stays = keep[page_slots]
        src = page_slots[stays]
        run = torch.from_numpy(np.repeat(np.arange(runs), n_old)).to(dev).repeat_interleave(p)
        run, pos = run[stays], pool.position[src]
        dist, pinned = pool.distortion[src], pool.pinned[src]
        key = (self.tiers[tier].key.decode(pool.key_rows(src)).float() if pool.paged_keys
               else pool.key.rows(src))
        value = pool.value.rows(src)
        if new is not None:
            _, positions, new_key, new_value, new_dist, new_pinned = new
            run = torch.cat([run, torch.from_numpy(np.searchsorted(touched, new_group)).to(dev)])
            pos = torch.cat([pos, positions.long().to(dev)])
            dist = torch.cat([dist, new_dist.float().to(dev)])
            pinned = torch.cat([pinned, new_pinned.to(dev)])
            key = (torch.cat([key, new_key.float().to(dev)]) if pool.paged_keys
                   else Codes.cat([key, new_key.to(dev)]))
            value = Codes.cat([value, new_value.to(dev)])
        # sorted by (run, position); positions are below 2^32 (page tables hold them as u4).
        # The items are written where they are, each to its slot in sorted order: ``back``
        # takes sorted order back to theirs
        unsorted_pos = pos
        order = torch.argsort(run << 32 | pos)
        back = torch.empty_like(order)
        back[order] = torch.arange(len(order), device=dev)
        run, pos = run[order], pos[order]
        size = torch.bincount(run, minlength=runs).cpu().numpy()
        rank = (torch.arange(len(run), device=dev)
                - torch.from_numpy(np.cumsum(size) - size).to(dev)[run])
        # page k of run r: its own k-th page while it has one, else a freed page, else a new one
        need = -(-size // p)
        k = np.arange(need.sum()) - np.repeat(np.cumsum(need) - need, need)
        of = np.repeat(np.arange(runs), need)
        own = k < n_old[of]
        k_old = np.arange(len(old_ids)) - np.repeat(np.cumsum(n_old) - n_old, n_old)
        freed = np.sort(old_ids[k_old >= np.repeat(need, n_old)])
        extra = int((~own).sum())
        before = pool.pages
        fresh = np.concatenate([freed[:extra], before + np.arange(max(extra - len(freed), 0))])
        ids = np.zeros(len(k), dtype=np.int64)
        ids[own] = old_ids[(np.cumsum(n_old) - n_old)[of[own]] + k[own]]
        ids[~own] = fresh
        page = (torch.from_numpy(np.cumsum(need) - need).to(dev)[run] + rank // p)
        lead = rank % p == 0
        first = pos[lead]
        span = pos - first[page]
        if len(span) and int(span.max()) >= pool.max_span:
            raise ValueError(f"a page of tier {tier} would span {int(span.max()) + 1} positions;"
                             f" offsets are {8 * pool.offset_bytes}-bit, so pages must span "
                             f"fewer than {pool.max_span} (a store whose positions reach 2^16 "
                             "needs offset_bytes=4)")
        ids_t = torch.from_numpy(ids).to(dev)
        slots = ids_t[page] * p + rank % p
        self._grow(pool, before + max(extra - len(freed), 0))
        pool.valid[page_slots] = False
        pool.owner[ids] = touched[of]
        if pool.paged_keys and len(run):
            # each rewritten page quantized again as one group; a partial page's empty slots
            # repeat its first token, leaving its minima and maxima as they are
            x = key[order]
            grid = x[lead].unsqueeze(1).repeat(1, p, 1)
            grid.view(-1, self.d)[page * p + rank % p] = x
            striped = _stripe(pool.tier.key.encode(grid), p)
            rows = (ids_t[:, None] * p + torch.arange(p, device=dev)).flatten()
            pool.key.payload[rows] = striped.payload
            for name, v in striped.side.items():
                pool.key.side[name][rows] = v
            key = striped.rows((page * p + rank % p)[back])
        elif pool.paged_keys:  # nothing to write
            key = pool.key.rows(slots)
        self._write_slots(pool, slots[back], span[back], unsorted_pos, key, value, dist, pinned)
        self.counts[touched, tier] = size + skip * p
        self._splice(tier, blocks, _entries(ids, first.cpu().numpy(),
                                            np.minimum(p, np.repeat(size, need) - p * k),
                                            tier), need)
        return freed[extra:]

    def _unchanged(self, tier: int, touched: np.ndarray, blocks: np.ndarray,
                   gone: np.ndarray, new_group: np.ndarray,
                   new_positions: torch.Tensor | None) -> np.ndarray:
        """int64 ``[len(touched)]``: the leading pages of each touched run that a rewrite
        leaves as they are. In an ordered run, page k keeps its items and their ranks while no
        slot of pages 0 … k is ``gone`` and no arrival goes before its last item: an arrival
        at q goes after every item of the pages before the last page whose first position is
        below q. None of an unordered run (the rewrite sorts it) nor of a tier quantizing keys
        per page (its rewritten pages are quantized again)."""
        lo, hi = blocks[:, 0], blocks[:, 1]
        n_old = hi - lo
        pool, p, entries = self.pools[tier], self.page_size, self.entries[tier]
        if pool.paged_keys:
            return np.zeros(len(touched), np.int64)
        at = _ranges(lo, hi)
        run_of = np.repeat(np.arange(len(touched)), n_old)  # the run of each of those entries
        skip = n_old.copy()
        if len(gone):
            rank_of = np.zeros(pool.pages, np.int64)
            rank_of[entries["page_id"][at]] = at - lo[run_of]
            np.minimum.at(skip, np.searchsorted(touched, pool.owner[gone // p]),
                          rank_of[gone // p])
        if len(new_group):
            least = np.full(len(touched), np.iinfo(np.int64).max)
            np.minimum.at(least, np.searchsorted(touched, new_group),
                          new_positions.long().cpu().numpy())
            first = entries["first_position"][at].astype(np.int64)
            below = np.bincount(run_of[first < least[run_of]], minlength=len(touched))
            skip = np.minimum(skip, np.maximum(below - 1, 0))
        return np.where(self.ordered[touched], skip, 0)

    def _starts(self, tier: int) -> np.ndarray:
        """int64 ``[groups + 1]``: where each group's block starts in ``entries[tier]`` (a run
        of f items fills ceil(f / P) pages), and the end."""
        return np.concatenate([[0], np.cumsum(-(-self.counts[:, tier] // self.page_size))])

    def _blocks(self, groups: np.ndarray, tier: int) -> np.ndarray:
        """int64 ``[len(groups), 2]``: where each group's block of ``entries[tier]`` starts and
        ends."""
        starts = self._starts(tier)
        return np.stack([starts[groups], starts[groups + 1]], axis=1)

    def _splice(self, tier: int, blocks: np.ndarray, entries: np.ndarray,
                sizes: np.ndarray) -> None:
        """Put the next ``sizes[i]`` of ``entries`` in place of the block ``blocks[i]`` of
        ``entries[tier]`` (blocks ascending and disjoint; an empty block inserts before the
        entry it starts at), in one vectorised pass: an old entry outside the blocks moves by
        the entries the blocks starting at or before it add less those they remove, and block
        i's new entries start where its old ones did, moved as much by the blocks before it."""
        old = self.entries[tier]
        lo, hi = blocks[:, 0], blocks[:, 1]
        moved = np.concatenate([[0], np.cumsum(sizes - (hi - lo))])  # by the first i blocks
        kept = np.ones(len(old), dtype=bool)
        kept[_ranges(lo, hi)] = False
        kept = np.flatnonzero(kept)
        out = np.empty(len(old) + int(moved[-1]), old.dtype)
        out[kept + moved[np.searchsorted(lo, kept, side="right")]] = old[kept]
        start = lo + moved[:-1]
        out[_ranges(start, start + sizes)] = entries[:int(sizes.sum())]
        self.entries[tier] = out

    def _grow(self, pool: TierPool, pages: int) -> None:
        """Zeroed pages at the end of ``pool`` up to ``pages``."""
        grow = pages * self.page_size - pool.offset.numel()
        if grow <= 0:
            return
        pool.key, pool.value = (Codes.cat([c, _empty(t, grow)])
                                for c, t in ((pool.key, pool.templates[0]),
                                             (pool.value, pool.templates[1])))
        pool.offset, pool.distortion, pool.position, pool.valid, pool.pinned = (
            torch.cat([x, x.new_zeros(grow, *x.shape[1:])])
            for x in (pool.offset, pool.distortion, pool.position, pool.valid, pool.pinned))
        pool.owner = np.concatenate([pool.owner, np.zeros(pages - len(pool.owner), np.int64)])

    def _compact(self, pool: TierPool, tier: int, holes: np.ndarray) -> None:
        """Fill the free pages ``holes`` by moving the pool's last pages into them, then drop
        the pool's tail: pages keep their contents, their page-table entries follow."""
        if not len(holes):  # nothing to fill or drop: the pool stays as it is
            return
        p, end = self.page_size, pool.pages - len(holes)
        movers = np.setdiff1d(np.arange(end, pool.pages), holes)
        targets = holes[holes < end]
        if len(movers):
            dst = torch.from_numpy(targets[:, None] * p + np.arange(p)).flatten().to(self.device)
            src = torch.from_numpy(movers[:, None] * p + np.arange(p)).flatten().to(self.device)
            for c in (pool.key, pool.value):
                c.payload[dst] = c.payload[src]
                for v in c.side.values():
                    v[dst] = v[src]
            for x in (pool.offset, pool.distortion, pool.position, pool.valid, pool.pinned):
                x[dst] = x[src]
            pool.owner[targets] = pool.owner[movers]
            renamed = np.arange(pool.pages)
            renamed[movers] = targets
            self.entries[tier]["page_id"] = renamed[self.entries[tier]["page_id"]]
        rows = end * p
        pool.key, pool.value = (Codes(c.payload[:rows].clone(),
                                      {k: v[:rows].clone() for k, v in c.side.items()},
                                      torch.Size((rows, c.shape[-1])))
                                for c in (pool.key, pool.value))
        pool.offset, pool.distortion, pool.position, pool.valid, pool.pinned = (
            x[:rows].clone()
            for x in (pool.offset, pool.distortion, pool.position, pool.valid, pool.pinned))
        pool.owner = pool.owner[:end].copy()

    def _write_slots(self, pool: TierPool, slots: torch.Tensor, span: torch.Tensor | None,
                     position: torch.Tensor, key: Codes, value: Codes, distortion: torch.Tensor,
                     pinned: torch.Tensor) -> None:
        """Write items into ``slots``; their offsets from ``span`` (None: the caller writes
        them)."""
        self.version += 1
        for dst, src in ((pool.key, key), (pool.value, value)):
            dst.payload[slots] = src.payload
            for k, v in src.side.items():
                dst.side[k][slots] = v
        if span is not None:
            pool.offset[slots] = (span - pool.shift).to(pool.offset.dtype).to(pool.offset.device)
        pool.distortion[slots] = distortion
        pool.position[slots] = position.to(pool.position.device)
        pool.valid[slots] = True
        pool.pinned[slots] = pinned
