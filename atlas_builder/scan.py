"""Scan: one streaming pass of a model over the dataset, every per-unit statistic out.

Owns the accumulators and the loop that feeds them from a `Probe`. Every
accumulator has update / merge / finalize and memory independent of the
dataset's size, so shards from several processes can be combined:

- `TopK`: the k highest (or, `largest=False`, lowest) activations of every
  unit with example id, argmax position and, for conv layers, the unit's
  whole spatial map on that example. Ties go to the lower example id, so
  the result does not depend on batch size or shard order;
- `Moments`: count, mean, std (Chan's parallel update), min, max and the
  number of NaN/Inf activations, which are left out of every statistic;
- `Activity`: fraction of examples on which the unit is active (value above
  `scan.active_threshold`) and, for conv/token outputs, the mean fraction of
  positions on which it is active (measured on up to POSITION_SAMPLE
  examples spread over the seeded sample: a full pass over every position
  of every example would cost as much as the layer itself);
- `ClassMeans`: mean activation per class (examples with a label);
- `SampleRows`: the activations of a seeded sample of examples (float16),
  bounded by `scan.sample_size`; the histogram and the correlations behind the
  redundancy flag are computed from it, and the embedding stage uses it.

Activations are buffered between batches (at most `scan.buffer_mb`) so the
accumulators run on large chunks, unit-major (each unit's values contiguous),
and their inner loops are compiled (`kernels`): one read of a chunk gives a
layer's sums and those of the ReLUs derived from it. That keeps the scan
close to the speed of a bare forward pass while memory stays flat. The top-k
maps come one of two ways (`defer_maps` chooses, from shapes and the device
alone): in the hook (`HookTopK`: one compiled call per layer and batch
copies the maps of just the examples that enter and stay), or — when the dataset is
much larger than the number of top-/bottom-k slots, and always off the CPU
— from a second pass over just the examples that ended in some top- or
bottom-k, the scan itself keeping only the values. A ReLU right after a
probed layer in a plain `nn.Sequential` is not hooked: its values and maps
are derived from that layer (`derived_layers`).

A module the forward calls several times (a shared ReLU) counts its last
call once per example, as the Probe's own values do. A scan sets glibc's
allocator to keep freed memory for the process (`keep_freed_memory`).

`summarize` turns the accumulators into what a unit page shows: histogram,
class-selectivity index, health flags (dead, saturated, redundant,
non-finite) and an automatic label. The definitions are documented there.
Runs under `torch.inference_mode()`. Writes nothing: the caller hands the
`ModelScan` to the store.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import re
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from . import kernels
from .config import ScanSection
from .errors import AtlasError
from .probe import LayerInfo, Probe, active_fraction, check_called, reduce_output, unit_count, unit_maps
from .sources import AtlasDataset, LoadedModel


# --- accumulators ---------------------------------------------------------------

@dataclass
class TopKResult:
    values: np.ndarray  # [U, k] float32, best first (largest for top-k, smallest for bottom-k); NaN where invalid
    ids: np.ndarray  # [U, k] example ids; -1 where invalid
    positions: np.ndarray  # [U, k] flat argmax position of the map, -1 for flat outputs or where invalid
    maps: np.ndarray | None  # [U, k, M] float32 map of each entry over its M positions (conv/token layers)
    valid: np.ndarray  # [U, k] False where fewer than k finite activations existed


class TopK:
    """Streaming top-k (or bottom-k) of every unit, optionally carrying each winner's spatial map.

    `offer` is cheap enough to call on every batch from a forward hook: it
    keeps only the (example, unit) pairs that beat the unit's current k-th
    value (copying the maps of just those), and `fold` merges them into the
    state. Ties go to the lower example id. Offers must come in increasing
    example-id order (the scan's order); `merge` combines shards in any order.
    """

    def __init__(self, n_units: int, k: int, largest: bool = True):
        self.n_units, self.k, self.sign = n_units, k, 1.0 if largest else -1.0
        self.keys = torch.full((n_units, k), -torch.inf)  # sign * value; -inf = empty slot
        self.ids = torch.full((n_units, k), -1, dtype=torch.long)
        self.positions = torch.full((n_units, k), -1, dtype=torch.long)
        self.maps: torch.Tensor | None = None  # [U, k, M] float32, in slot order: rank r's map is slot slots[u, r]
        self.slots = torch.arange(k).repeat(n_units, 1)  # an entry keeps its slot while it stays: a fold copies
        # only the maps of new entries, not the whole state (large conv maps made every fold a big copy)
        self._device_bound: torch.Tensor | None = None  # the k-th value, on the device of the activations
        self._pending: list[tuple] = []
        self._pending_rows = 0

    def offer(self, values: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor | None = None,
              maps: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> None:
        """values: [B, U]; ids: [B]; positions: [B, U] or None (then argmax of maps, or -1); maps: [B, U, M].

        mask: `might_take(values)` when the caller has it already.
        """
        if mask is None:
            mask = self.might_take(values)
        b, u = mask.nonzero(as_tuple=True)  # NaN never passes; +-Inf is dropped in fold
        if len(b) == 0:
            return
        if len(b) > self.k * self.n_units and values.shape[0] > self.k:
            # a flood (the first batches): only the batch's own k best per unit can matter
            keys = values.float() if self.sign > 0 else -values.float()
            rows = torch.topk(exact_order(keys, ids), self.k, dim=0).indices  # [k, U], ties to the lower id
            chosen = torch.zeros_like(mask)
            chosen.scatter_(0, rows, True)
            b, u = (mask & chosen).nonzero(as_tuple=True)
        self.queue(u, ids[b], values[b, u], None if maps is None else maps[b, u].float(),
                   None if positions is None else positions[b, u].long())

    def queue(self, units: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, maps: torch.Tensor | None,
              positions: torch.Tensor | None = None) -> None:
        """Queue candidates ([N] each, maps [N, M] float32) and fold when enough wait.

        A candidate need not beat the current k-th value: `fold` ranks it with
        the rest, so one gather can be queued on a top-k and a bottom-k alike.
        positions None: the argmax of the map once chosen (or -1 without maps).
        """
        self._pending.append((units.cpu(), ids.cpu(), values.cpu(), None if positions is None else positions.cpu(),
                              None if maps is None else maps.cpu()))
        self._pending_rows += len(units)
        if self._pending_rows >= self.n_units * self.k:  # keep the thresholds fresh
            self.fold()

    def update(self, values: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor | None = None,
               maps: torch.Tensor | None = None) -> None:
        self.offer(values, ids, positions, maps)
        self.fold()

    def ranked_maps(self) -> torch.Tensor | None:
        """[U, k, M] maps in rank order (zeros where there is no entry), or None without maps."""
        if self.maps is None:
            return None
        ranked = self.maps[torch.arange(self.n_units)[:, None], self.slots]  # whole maps copied, not gathered
        empty = ~(self.keys > -torch.inf)
        return ranked.masked_fill_(empty[:, :, None], 0.0) if empty.any() else ranked  # usually every slot is filled

    def _state_entries(self, with_maps: bool = True) -> tuple:
        """The kept entries as candidates: units, ids, values, positions, maps (None without)."""
        filled = self.keys > -torch.inf
        units = torch.arange(self.n_units).view(-1, 1).expand_as(self.keys)[filled]
        maps = self.ranked_maps()[filled] if with_maps and self.maps is not None else None
        return units, self.ids[filled], self.keys[filled] * self.sign, self.positions[filled], maps

    def fold(self) -> None:
        """Merge pending candidates into the state: per unit the k best keys, ties to the lower id."""
        if not self._pending:
            return
        filled = self.keys > -torch.inf
        state_slots = self.slots[filled]
        pending = self._pending
        entries = [self._state_entries(with_maps=False)] + pending
        n_state = len(entries[0][0])
        self._pending, self._pending_rows = [], 0
        units, ids, values = (torch.cat([e[i] for e in entries]) for i in range(3))
        positions = torch.cat([e[3] if e[3] is not None else torch.full((len(e[0]),), -2, dtype=torch.long)
                               for e in entries])  # -2: take the argmax of the map once chosen
        keys = values.float() * self.sign
        keys = torch.where(torch.isfinite(keys), keys, -torch.inf)
        order = torch.argsort(ids, stable=True)
        order = order[torch.argsort(keys[order], descending=True, stable=True)]
        order = order[torch.argsort(units[order], stable=True)]
        grouped = units[order]
        counts = torch.bincount(grouped, minlength=self.n_units)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(order)) - starts[grouped]
        keep = (rank < self.k) & (keys[order] > -torch.inf)
        chosen, unit, rank = order[keep], grouped[keep], rank[keep]
        self.keys = torch.full((self.n_units, self.k), -torch.inf)
        self.ids = torch.full((self.n_units, self.k), -1, dtype=torch.long)
        self.positions = torch.full((self.n_units, self.k), -1, dtype=torch.long)
        self.keys[unit, rank], self.ids[unit, rank], self.positions[unit, rank] = \
            keys[chosen], ids[chosen], positions[chosen]
        widths = [e[4].shape[1] for e in pending if e[4] is not None]
        if widths or self.maps is not None:
            self._fold_maps(pending, widths[0] if widths else self.maps.shape[2], n_state, state_slots, chosen,
                            unit, rank)
        self.positions[self.positions == -2] = -1
        self._device_bound = None

    def _fold_maps(self, pending: list[tuple], width: int, n_state: int, state_slots: torch.Tensor,
                   chosen: torch.Tensor, unit: torch.Tensor, rank: torch.Tensor) -> None:
        """After a fold's ranking: kept entries keep their slots, new ones take freed slots and bring their maps."""
        if self.maps is None:
            self.maps = torch.zeros(self.n_units, self.k, width)
        from_state = chosen < n_state
        slots = torch.zeros_like(chosen)
        slots[from_state] = state_slots[chosen[from_state]]
        new = (~from_state).nonzero().view(-1)
        if len(new):
            used = torch.zeros(self.n_units, self.k, dtype=torch.uint8)
            used[unit[from_state], slots[from_state]] = 1
            free = torch.argsort(used, dim=1, stable=True)  # each unit's free slots first
            new_units = unit[new]
            counts = torch.bincount(new_units, minlength=self.n_units)
            nth = torch.arange(len(new)) - (torch.cumsum(counts, 0) - counts)[new_units]
            slots[new] = free[new_units, nth]
            parts = [e[4] if e[4] is not None else torch.zeros(len(e[0]), width) for e in pending]
            maps = parts[0] if len(parts) == 1 else torch.cat(parts)
            new_maps = maps[chosen[new] - n_state]
            self.maps[new_units, slots[new]] = new_maps
            derive = self.positions[new_units, rank[new]] == -2
            self.positions[new_units[derive], rank[new][derive]] = new_maps[derive].argmax(1)
        self.slots = torch.arange(self.k).repeat(self.n_units, 1)
        self.slots[unit, rank] = slots

    def offer_chunk(self, values: "torch.Tensor | Chunk", ids: torch.Tensor) -> None:
        """Offer a whole chunk at once: values [R, U] (fastest as the transpose of a unit-major [U, R]), ids [R].

        The values-only state of a deferred scan (no maps yet: `set_maps`
        adds them from a second pass). The insertion pass of the scan's own
        flush (`family_sums`) updates the state; ties go to the lower id
        because ids must ascend and exceed every id offered before (the
        scan's order; shards combine by `merge`).
        """
        chunk = as_chunk(values)
        if chunk.n == 0:
            return
        ids = ids.cpu()
        self.fold()
        if len(self.ids) and int(ids[0]) <= int(self.ids.max()):
            raise ValueError("offer_chunk needs example ids above every id offered before")
        pair = (self, None) if self.sign > 0 else (None, self)
        family_sums(chunk.unit_major(), np.full(chunk.n, -1, np.int64), 0, 0.0, ids, np.array([False]), [pair])

    def kept(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(unit, rank) of every kept entry, unit-major."""
        self.fold()
        return (self.keys > -torch.inf).nonzero(as_tuple=True)

    def set_maps(self, unit: torch.Tensor, rank: torch.Tensor, maps: torch.Tensor) -> None:
        """Give kept entries (unit, rank) their maps [N, M] (from a second pass) and, from them, their positions."""
        if self.maps is None:
            self.maps = torch.zeros(self.n_units, self.k, maps.shape[1])
        if len(unit):
            self.maps[unit, self.slots[unit, rank]] = maps.float()
            self.positions[unit, rank] = maps.float().argmax(1)

    def might_take(self, values: torch.Tensor) -> torch.Tensor:
        """[B, U] mask of activations that beat the current k-th (cheap pre-check before `offer`)."""
        if self._device_bound is None or self._device_bound.device != values.device:
            self._device_bound = (self.keys[:, -1] * self.sign).to(values.device)  # the state stays on the CPU
        return values > self._device_bound if self.sign > 0 else values < self._device_bound

    def merge(self, other: "TopK") -> None:
        other.fold()
        self._pending.append(other._state_entries())
        self.fold()

    def finalize(self) -> TopKResult:
        self.fold()
        valid = self.keys > -torch.inf
        values = torch.where(valid, self.keys * self.sign, torch.nan)
        maps = self.ranked_maps()
        return TopKResult(values.numpy(), self.ids.numpy(), self.positions.numpy(),
                          None if maps is None else maps.numpy(), valid.numpy())


def family_sums(unit_major: np.ndarray, labels: np.ndarray, n_classes: int, threshold: float, ids: torch.Tensor,
                rectify: np.ndarray, tops: "list[tuple[TopK | None, TopK | None]] | None" = None,
                classes: "list[ClassMeans] | None" = None) -> tuple:
    """`kernels.chunk_family` of a unit-major chunk [U, R] (examples ids [R], ascending and above all before).

    tops: per member, its (top-k, bottom-k), either None for none, fed the
    chunk in bulk (values only: their maps, if any, come later) and updated
    here; None: no top-k at all. classes: per member, the class means the
    chunk is added to here (one member's in place); None: the chunk's own.
    Returns the kernel's per-member sums, then per member the chunk's class
    sums, missing counts [U, C] and class rows [C] (zeros when `classes`
    took them).
    """
    n_units, n_members = unit_major.shape[0], len(rectify)
    shape = (n_members, n_units, n_classes)
    if classes is not None and n_members == 1:  # added in place
        class_sums, class_missing = classes[0].sums[None], classes[0].missing[None]
    else:
        class_sums, class_missing = np.zeros(shape), np.zeros(shape)
    present = [top for pair in tops or [] for top in pair if top is not None]
    k = present[0].k if present else 1
    keys = np.full((2 * len(tops or []), n_units, k), np.inf, np.float32)  # +inf: a state that takes nothing
    kept = np.full(keys.shape, -1, np.int64)
    positions = np.full(keys.shape, -1, np.int64)
    for s, top in enumerate(top for pair in tops or [] for top in pair):
        if top is not None:
            top.fold()  # nothing pending in a scan
            if top.maps is not None:
                raise ValueError("a top-k with maps cannot take a chunk in bulk")
            keys[s], kept[s], positions[s] = top.keys, top.ids, top.positions
    *sums, class_rows = kernels.chunk_family(unit_major, labels, n_classes, np.float32(threshold), ids.numpy(),
                                             rectify, keys, kept, positions, class_sums, class_missing)
    for s, top in enumerate(top for pair in tops or [] for top in pair):
        if top is not None:
            top.keys, top.ids, top.positions = (torch.from_numpy(a[s]) for a in (keys, kept, positions))
            top._device_bound = None
    if classes is not None:
        for f, means in enumerate(classes):
            if n_members > 1:
                means.sums += class_sums[f]
                means.missing += class_missing[f]
            means.labelled += class_rows
        class_sums = class_missing = np.broadcast_to(0.0, shape)  # taken: zeros, read-only, no memory
        class_rows = np.broadcast_to(0.0, class_rows.shape)
    return (*sums, class_sums, class_missing, np.broadcast_to(class_rows, (n_members, n_classes)))


class HookTopK:
    """The top- and bottom-k of one hooked layer and of the ReLUs derived from it, fed together in the hook.

    On the CPU, one compiled call per batch (`kernels.offer_maps`) updates
    all of them in place from the live output, copying the maps of just the
    examples that enter and stay for the rest of the batch. While the pass runs, each TopK's tensors are views
    of the joint arrays (a later `fold`, as in a merge, gives them their own).
    """

    def __init__(self, tops: list[tuple[TopK, bool]], width: int, is_max: bool = True):
        """tops: (TopK, rectify) pairs, rectify for a derived ReLU's; width: positions per map; is_max:
        the values offered are their maps' max (`scan.reduce = "max"`), which finds the argmax faster."""
        first = tops[0][0]
        n, u, k = len(tops), first.n_units, first.k
        self.tops = [top for top, _ in tops]
        self.keys = np.empty((n, u, k), np.float32)
        self.ints = np.empty((n, 3, u, k), np.int64)  # example ids, positions (rank order), slot of each rank
        self.maps = np.zeros((n, u, k, width), np.float32)  # slot order
        self.signs = np.array([top.sign for top in self.tops], np.float32)
        self.rectify = np.array([rectify for _, rectify in tops])
        self.is_max = is_max
        for s, top in enumerate(self.tops):
            top.fold()
            self.keys[s], self.ints[s, 0], self.ints[s, 1], self.ints[s, 2] = top.keys, top.ids, top.positions, top.slots
            if top.maps is not None:
                self.maps[s] = top.maps
            top.keys, top.ids, top.positions, top.slots, top.maps = (
                torch.from_numpy(a) for a in (self.keys[s], *self.ints[s], self.maps[s]))

    def offer(self, values: torch.Tensor, maps: torch.Tensor, first: int) -> None:
        """values [B, U] float32, maps [B, U, M] float32 on the CPU, of examples first, first + 1, ... (above all before)."""
        kernels.offer_maps(values.numpy(), maps.numpy(), first, self.signs, self.rectify, self.is_max, self.keys,
                           self.ints, self.maps)
        for top in self.tops:
            top._device_bound = None


def compiled_reads(maps: torch.Tensor) -> bool:
    """Whether the compiled kernels can read these maps where they are (float32 in CPU memory); else torch ops."""
    return maps.device.type == "cpu" and maps.dtype == torch.float32


MEASURE_AT_ONCE = 2**15  # per-row map size from which the second pass measures activity rows at once, not copied
POSITION_SAMPLE = 256  # examples (a subset of the sample) on which the fraction of active positions is measured


def exact_order(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys that order like (key descending, id ascending) with no ties: keys [B, U] float, ids [B]."""
    k = keys.float() + 0.0  # -0.0 -> +0.0
    k = torch.where(torch.isfinite(k), k, -torch.inf)  # non-finite never wins (fold drops it anyway)
    bits = k.view(torch.int32).long()
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # IEEE order as signed integers
    return ordered * 2**32 + (2**32 - 1 - ids.long()).view(-1, 1)


class Chunk:
    """A chunk of reduced activations [R, U] and the per-unit sums several accumulators read from it.

    Kept unit-major (`unit_major()` [U, R]): each unit's values contiguous,
    so one compiled pass per unit (`kernels.chunk_family`) gives the
    moments, the active count (above `threshold`) and the per-class sums
    (`labels` [R], -1 or >= n_classes for none) together, computed once on
    first use (or handed in as `stats`). rectify: the chunk is ReLU of
    `values` (a derived layer's), which is never materialized whole.
    """

    def __init__(self, values: torch.Tensor, labels: torch.Tensor | None = None, n_classes: int = 0,
                 threshold: float = 0.0, rectify: bool = False, stats: tuple | None = None):
        self.values = values
        self.n = values.shape[0]
        self.labels, self.n_classes, self.threshold, self.rectify = labels, n_classes, threshold, rectify
        self._unit_major: np.ndarray | None = None
        self._stats = stats

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def like(self, labels: torch.Tensor | None = None, n_classes: int = 0, threshold: float = 0.0) -> "Chunk":
        """The same values with other labels or threshold (their sums computed afresh)."""
        return Chunk(self.values, labels, n_classes, threshold, self.rectify)

    def rows(self, index: "np.ndarray | slice") -> torch.Tensor:
        """The chunk's rows `index` [n, U] (a copy; gathered along each unit's contiguous row)."""
        picked = torch.from_numpy(np.array(self.unit_major()[:, index])).T
        return picked.relu_() if self.rectify else picked

    def unit_major(self) -> np.ndarray:
        """[U, R] float32, C-contiguous (a view of the buffer when the values came unit-major)."""
        if self._unit_major is None:
            self._unit_major = np.ascontiguousarray(self.values.detach().cpu().float().T.numpy())
        return self._unit_major

    def stats(self) -> tuple:
        """The chunk's per-unit sums: count, total, squares, shift, lo, hi, nonfinite, active [U], class sums and
        missing counts [U, C], rows of each class [C]."""
        if self._stats is None:
            labels = (np.full(self.n, -1, np.int64) if self.labels is None
                      else self.labels.cpu().long().numpy())
            family = family_sums(self.unit_major(), labels, self.n_classes, self.threshold,
                                 torch.zeros(0, dtype=torch.long), np.array([self.rectify]))
            self._stats = tuple(a[0] for a in family)
        return self._stats


def as_chunk(values) -> Chunk:
    return values if isinstance(values, Chunk) else Chunk(values)


class Moments:
    """Streaming count, mean, std, min, max of the finite activations, and the count of the others."""

    def __init__(self, n_units: int):
        self.count = torch.zeros(n_units, dtype=torch.float64)
        self.mean = torch.zeros(n_units, dtype=torch.float64)
        self.m2 = torch.zeros(n_units, dtype=torch.float64)
        self.min = torch.full((n_units,), torch.inf, dtype=torch.float64)
        self.max = torch.full((n_units,), -torch.inf, dtype=torch.float64)
        self.nonfinite = torch.zeros(n_units, dtype=torch.float64)

    def update(self, values: "torch.Tensor | Chunk") -> None:
        """values: [R, U] (fastest as the transpose of a unit-major [U, R]), or a Chunk of them."""
        count, total, squares, shift, lo, hi, nonfinite = (torch.from_numpy(a) for a in as_chunk(values).stats()[:7])
        other = Moments.__new__(Moments)
        n = count.double()
        safe = n.clamp(min=1)
        other.count = n
        other.mean = torch.where(n > 0, shift + total / safe, 0.0)
        other.m2 = (squares - total.square() / safe).clamp(min=0)
        other.min, other.max = lo, hi
        other.nonfinite = nonfinite.double()
        self.merge(other)

    def merge(self, other: "Moments") -> None:
        n = self.count + other.count
        delta = other.mean - self.mean
        safe = n.clamp(min=1)
        self.mean = self.mean + delta * other.count / safe
        self.m2 = self.m2 + other.m2 + delta.square() * self.count * other.count / safe
        self.count = n
        self.min = torch.minimum(self.min, other.min)
        self.max = torch.maximum(self.max, other.max)
        self.nonfinite = self.nonfinite + other.nonfinite

    def finalize(self) -> dict[str, np.ndarray]:
        none = self.count == 0
        nan = torch.tensor(torch.nan, dtype=torch.float64)
        return {"count": self.count.long().numpy(), "nonfinite": self.nonfinite.long().numpy(),
                "mean": torch.where(none, nan, self.mean).numpy(),
                "std": torch.where(none, nan, (self.m2 / self.count.clamp(min=1)).sqrt()).numpy(),
                "min": torch.where(none, nan, self.min).numpy(), "max": torch.where(none, nan, self.max).numpy()}


class Activity:
    """Fraction of examples on which each unit is active, and mean fraction of its active positions.

    The position fraction may come from a subset of the examples (the scan
    passes the seeded sample's rows), so it keeps its own count.
    """

    def __init__(self, n_units: int, threshold: float):
        self.threshold = threshold
        self.n = 0
        self.position_n = 0
        self.examples_active = torch.zeros(n_units, dtype=torch.float64)
        self.position_sum = torch.zeros(n_units, dtype=torch.float64)

    def update(self, values: "torch.Tensor | Chunk", position_fraction: torch.Tensor | None = None) -> None:
        """values: [R, U] reduced activations (or a Chunk); position_fraction: [R', U] from probe.active_fraction."""
        chunk = as_chunk(values)
        if chunk.threshold != self.threshold:
            chunk = chunk.like(chunk.labels, chunk.n_classes, self.threshold)
        self.n += chunk.n
        self.examples_active += torch.from_numpy(chunk.stats()[7]).double()  # NaN is not active
        if position_fraction is not None:
            self.add_positions(position_fraction)

    def add_positions(self, position_fraction: torch.Tensor) -> None:
        """position_fraction: [R', U] from probe.active_fraction, for some examples (the activity rows)."""
        self.position_n += position_fraction.shape[0]
        self.position_sum += position_fraction.sum(0, dtype=torch.float64)

    def merge(self, other: "Activity") -> None:
        self.n += other.n
        self.position_n += other.position_n
        self.examples_active += other.examples_active
        self.position_sum += other.position_sum

    def finalize(self) -> dict[str, np.ndarray]:
        return {"frac_active": (self.examples_active / max(self.n, 1)).numpy(),
                "position_activity": (self.position_sum / max(self.position_n, 1)).numpy()}


class ClassMeans:
    """Mean finite activation of every unit per class; examples labelled -1 (unknown) are left out.

    Unit-major float64 sums [U, C] of the finite activations; a unit's count
    for a class is the class's examples less its non-finite activations on
    them (`missing`, all zero but for units that had some).
    """

    def __init__(self, n_classes: int, n_units: int):
        self.n_classes = n_classes
        self.sums = np.zeros((n_units, n_classes))
        self.missing = np.zeros((n_units, n_classes))
        self.labelled = np.zeros(n_classes)  # examples of each class seen

    def update(self, values: "torch.Tensor | Chunk", labels: torch.Tensor) -> None:
        """values: [R, U] (or a Chunk of them); labels: [R], -1 for unknown."""
        chunk = as_chunk(values)
        if chunk.labels is not labels or chunk.n_classes != self.n_classes:
            chunk = chunk.like(labels, self.n_classes, chunk.threshold)
        sums, missing, labelled = chunk.stats()[8:]
        self.sums += sums
        self.missing += missing
        self.labelled += labelled

    def merge(self, other: "ClassMeans") -> None:
        self.sums += other.sums
        self.missing += other.missing
        self.labelled += other.labelled

    def finalize(self) -> np.ndarray:
        """[U, C] class means, NaN for classes with no example."""
        counts = self.labelled - self.missing if self.missing.any() else self.labelled  # [U, C], or [C] for all
        means = np.full(self.sums.shape, np.nan)
        return np.divide(self.sums, counts, out=means, where=counts > 0)


def sample_ids(n_examples: int, size: int, seed: int) -> np.ndarray:
    """The seeded sample of example ids (ascending) kept by `SampleRows`: all of them if n <= size."""
    return _drawn_sample(n_examples, size, seed).copy()


@functools.lru_cache(maxsize=16)  # a scan and its summary draw the same sample: drawn once
def _drawn_sample(n_examples: int, size: int, seed: int) -> np.ndarray:
    if size >= n_examples:
        return np.arange(n_examples)
    return np.sort(np.random.default_rng(seed).choice(n_examples, size=size, replace=False))


def common_rows(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple:
    """(slots, rows): where the ids that `ids` [R] (ascending) shares with `sorted_ids` lie in each, as slices
    when `ids` are consecutive (the scan's chunks), else as index arrays."""
    if len(ids) and int(ids[-1]) - int(ids[0]) == len(ids) - 1:
        lo, hi = np.searchsorted(sorted_ids, [ids[0], ids[-1] + 1])
        rows = sorted_ids[lo:hi] - ids[0]
        return slice(lo, hi), (slice(0, len(ids)) if hi - lo == len(ids) else rows)
    if not len(sorted_ids):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    slot = np.searchsorted(sorted_ids, ids).clip(max=len(sorted_ids) - 1)
    hit = sorted_ids[slot] == ids
    return slot[hit], np.flatnonzero(hit)


class SampleRows:
    """The activations [S, U] (float16) of a fixed, seeded sample of examples.

    Kept unit-major ([U, S]: each unit's samples contiguous, as the chunks,
    the summary's per-unit passes and the store read them); `finalize`
    gives its [S, U] transpose.
    """

    def __init__(self, ids: np.ndarray, n_units: int):
        self.ids = np.asarray(ids, dtype=np.int64)
        self.unit_major = torch.zeros(n_units, len(self.ids), dtype=torch.float16)
        self.filled = np.zeros(len(self.ids), bool)

    def update(self, values: "torch.Tensor | Chunk", ids: torch.Tensor) -> None:
        """values: [R, U] (or a Chunk of them) of examples ids [R]."""
        if not len(self.ids):
            return
        chunk = as_chunk(values)
        slots, rows = common_rows(self.ids, ids.cpu().numpy())
        picked = torch.from_numpy(chunk.unit_major()[:, rows])
        self.unit_major[:, slots] = (picked.relu() if chunk.rectify else picked).half()  # torch's conversion: vectorized
        self.filled[slots] = True

    def merge(self, other: "SampleRows") -> None:
        self.unit_major[:, other.filled] = other.unit_major[:, other.filled]
        self.filled |= other.filled

    def finalize(self) -> np.ndarray:
        return self.unit_major.numpy().T


class LayerAccumulator:
    """Every accumulator of one layer. `observe` runs in the forward hook; the rest is buffered.

    Per batch, only what needs the full output is done at once, in the hook
    (before any later in-place op can change the output): the reduction to
    one value per unit, the active positions of the activity rows (measured
    in place, `kernels.active_positions`) and the top-/bottom-k of a
    conv/token layer with the maps of the examples that enter (`HookTopK`,
    compiled). The [B, U] values
    wait in a buffer and feed the other accumulators in chunks at `flush`
    (and the top-/bottom-k of flat layers, in bulk). `followers`: the
    accumulators of ReLUs derived from this layer (`derived_layers`), fed
    from its output. `deferred` (`defer_maps`: a dataset much larger than the
    map slots, or a device the compiled kernels cannot read): the
    top-/bottom-k are taken in bulk at flush, values only, and the maps and
    position activity come from a second pass (`plan_maps`, `fill`,
    `finish_maps`).
    """

    def __init__(self, n_units: int, cfg: ScanSection, n_classes: int, sample: np.ndarray, deferred: bool = False,
                 activity_ids: np.ndarray | None = None, flat: bool | None = None,
                 followers: "list[LayerAccumulator] | None" = None):
        self.reduce, self.threshold = cfg.reduce, cfg.active_threshold
        self.deferred = deferred  # top-/bottom-k in bulk at flush, maps from a second pass (`fill`)
        # the examples whose position activity counts (flat layers: from the values at flush); deferred only
        self.activity_ids = None if activity_ids is None else np.asarray(activity_ids, np.int64)
        self.flat = flat  # whether the output has no positions (None: known at the first observe)
        self.followers = followers or []  # derived ReLUs: fed ReLU of this layer's values, rows and maps
        self._rectify = np.array([False] + [True] * len(self.followers))  # per member of `_family()`
        self.top = TopK(n_units, cfg.top_k, largest=True)
        self.bottom = TopK(n_units, cfg.top_k, largest=False)
        self.moments = Moments(n_units)
        self.activity = Activity(n_units, cfg.active_threshold)
        self.classes = ClassMeans(n_classes, n_units)
        self.sample = SampleRows(sample, n_units)
        self._hook_top: HookTopK | None = None
        self._buffer: list[tuple] = []  # (values, first id, labels, sampled rows or None, their fractions or None)
        # the buffered values' storage [rows, U] float32, reused from chunk to chunk (`_reserve`)
        self._rows = torch.empty(0)
        self._capacity = 0  # its rows
        self._filled = 0  # rows of it the chunk holds

    def _reserve(self, n: int, n_units: int, device: torch.device) -> torch.Tensor:
        """The next n rows [n, U] of the values' storage, which grows (doubling) until it holds a whole chunk.

        One storage, reused from chunk to chunk, rather than a new tensor per
        batch kept until the flush: those small long-lived tensors scattered
        the heap between the model's large temporaries, which then took fresh
        memory and page faults (on resnet18 at 128 px, faults tripled the
        system time of a forward).
        """
        start = self._filled
        if start + n > self._capacity or self._rows.device != device:  # an int, not len(): paid every batch and layer
            self._capacity = max(n, 2 * self._capacity)
            self._rows = torch.empty(self._capacity, n_units, device=device)  # the old one lives on in the views
            start = 0
        self._filled = start + n
        return self._rows[start:start + n]

    def observe(self, output: torch.Tensor, first: int, labels: torch.Tensor, sampled: torch.Tensor | None) -> int:
        """output: the live layer output [B, ...] of examples first, first + 1, ... (above every example before);
        labels [B]; sampled: rows of the batch whose active positions count.

        Returns the bytes this call added to the buffer. Every op here is
        paid on every batch of every layer, so only what needs the live
        output is done.
        """
        maps = unit_maps(output)
        values = self._reserve(output.shape[0], output.shape[-1] if maps is None else maps.shape[1], output.device)
        if maps is None:
            values.copy_(output)  # buffered: an in-place op later in the forward must not reach it
        elif maps.dtype != torch.float32:
            values.copy_(maps.amax(2) if self.reduce == "max" else maps.mean(2))
        elif self.reduce == "max":
            torch.amax(maps, 2, out=values)
        else:
            torch.mean(maps, 2, out=values)
        self.flat = maps is None
        if self.deferred:
            self._buffer.append((values, first, labels, None, None))
            return values.numel() * 16
        if maps is not None:
            if self._hook_top is None:
                self._hook_top = HookTopK([(top, rectify) for acc, rectify in self._family()
                                           for top in (acc.top, acc.bottom)], maps.shape[2],
                                          self.reduce == "max")
            live = maps if maps.dtype == torch.float32 else maps.float()
            self._hook_top.offer(values, live, first)
        rows = fractions = None
        if sampled is not None and maps is not None:  # measured now, for this layer and its followers
            fractions = self._fractions(output, sampled)
        elif sampled is not None:
            rows = output.index_select(0, sampled)  # a copy: later in-place ops cannot reach it
        self._buffer.append((values, first, labels, rows, fractions))
        kept = [rows] if rows is not None else fractions or []
        return values.numel() * 16 + sum(t.numel() * t.element_size() for t in kept)

    def _family(self) -> "list[tuple[LayerAccumulator, bool]]":
        """This accumulator and its followers, with whether each one's values are ReLU of this layer's."""
        return [(self, False)] + [(follower, True) for follower in self.followers]

    def _fractions(self, output: torch.Tensor, rows: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The active positions of rows `rows` (all when None) of an output of this layer, for this layer and
        each follower (ReLU of the rows).

        One compiled read in place where the kernels can read the output
        (`kernels.active_positions`: no copy of a live output), else a copy
        of the rows and one torch pass per member.
        """
        maps = unit_maps(output)
        if maps is not None and compiled_reads(maps):
            picked = np.arange(len(output)) if rows is None else rows.cpu().numpy()
            return list(torch.from_numpy(kernels.active_positions(maps.numpy(), picked, np.float32(self.threshold),
                                                                  self._rectify)))
        if rows is not None:
            output = output.index_select(0, rows)  # a copy: later in-place ops cannot reach it
        return [active_fraction(output if not rectify else torch.relu(output), self.threshold)
                for _, rectify in self._family()]

    def _add_positions(self, fractions: list[torch.Tensor]) -> None:
        for (acc, _), fraction in zip(self._family(), fractions):
            acc.activity.add_positions(fraction.cpu())

    def flush(self) -> None:
        """Feed the buffered batches to the accumulators (and the followers'), as one unit-major chunk.

        One compiled read of the chunk (`kernels.chunk_family`) gives every
        sum of this layer and of its followers (ReLU of its values) and, for
        the top-/bottom-k not taken in the hook, their insertions.
        """
        if not self._buffer:
            return
        # unit-major [U, R] (used as its [R, U] transpose): the accumulators reduce over contiguous rows
        values = torch.cat([b[0].T for b in self._buffer], dim=1).cpu().T
        labels = torch.cat([b[2] for b in self._buffer]).cpu()
        ids = torch.arange(self._buffer[0][1], self._buffer[0][1] + len(values))  # each batch follows the one before
        rows = [b[3] for b in self._buffer if b[3] is not None]
        measured = [b[4] for b in self._buffer if b[4] is not None]
        self._buffer = []
        self._filled = 0  # the storage is free again
        if rows:
            measured.append(self._fractions(torch.cat(rows)))  # flat rows: the torch path
        family = self._family()
        n_classes = self.classes.n_classes
        stats = family_sums(np.ascontiguousarray(values.T.numpy()), labels.numpy(), n_classes, self.threshold, ids,
                            self._rectify, [(acc.top, acc.bottom) for acc, _ in family]
                            if self.deferred or self.flat else None, [acc.classes for acc, _ in family])
        for f, (acc, rectify) in enumerate(family):
            chunk = Chunk(values, labels, n_classes, self.threshold, rectify, tuple(a[f] for a in stats))
            acc.absorb(chunk, ids, torch.cat([m[f] for m in measured]).cpu() if measured else None)

    def absorb(self, chunk: Chunk, ids: torch.Tensor, fraction: torch.Tensor | None = None) -> None:
        """One chunk (ids ascending, its sums computed, its class sums added by them) into the moments,
        activity and sample."""
        self.moments.update(chunk)
        self.activity.update(chunk, fraction)
        self.sample.update(chunk, ids)
        if self.deferred and self.flat and self.activity_ids is not None:  # a flat unit's one position: its value
            rows = common_rows(self.activity_ids, ids.cpu().numpy())[1]
            self.activity.add_positions(active_fraction(chunk.rows(rows), self.threshold))

    def needed(self) -> torch.Tensor:
        """Example ids a deferred layer's second pass must see: those of its kept top- and bottom-k entries."""
        self.flush()
        return torch.cat([self.top.ids[self.top.keys > -torch.inf], self.bottom.ids[self.bottom.keys > -torch.inf]])

    def plan_maps(self, ids: torch.Tensor) -> None:
        """Before a second pass over examples `ids` (ascending): which pass row each kept entry's map comes from."""
        entries = []
        for which, top in enumerate((self.top, self.bottom)):
            unit, rank = top.kept()
            rows = torch.searchsorted(ids, top.ids[unit, rank])
            entries.append((torch.full_like(unit, which), unit, rank, rows))
        which, unit, rank, rows = (torch.cat(parts) for parts in zip(*entries))
        order = torch.argsort(rows, stable=True)
        self._plan = [t[order] for t in (which, unit, rank, rows)]
        self._plan_rows = self._plan[3].numpy()
        which, unit, rank = self._plan[:3]
        slots = torch.where(which == 0, self.top.slots[unit, rank], self.bottom.slots[unit, rank])
        self._plan_arrays = (self._plan_rows, unit.numpy(), slots.numpy(), rank.numpy(), (which == 1).numpy())
        self._plan_maps: list[torch.Tensor] = []  # the torch path's copies (off the CPU), given out at the end
        self._activity_rows: list[torch.Tensor] = []  # copies of the pass's activity rows, measured at the end

    def fill(self, output: torch.Tensor, first: int, sampled: torch.Tensor | None, rectify: bool = False) -> None:
        """Second pass of a deferred layer, on pass rows [first, first + B): keep the maps its entries need.

        sampled: rows of this batch that are activity rows; they are copied
        and their active positions measured all at once in `finish_maps`,
        for this layer and its followers (large maps: measured here). A
        follower is given none. rectify: this is a ReLU derived from the
        layer whose output this is (ReLU of the maps).
        """
        maps = unit_maps(output)
        if maps is not None and compiled_reads(maps):
            for top in (self.top, self.bottom):  # copied straight into place by a compiled loop
                if top.maps is None:
                    top.maps = torch.zeros(top.n_units, top.k, maps.shape[2])
            kernels.fill_maps(maps.numpy(), first, *self._plan_arrays, rectify, self.top.maps.numpy(),
                              self.bottom.maps.numpy(), self.top.positions.numpy(), self.bottom.positions.numpy())
        elif maps is not None:
            lo, hi = np.searchsorted(self._plan_rows, [first, first + len(output)])
            if hi > lo:
                rows = self._plan[3][lo:hi] - first
                units = self._plan[1][lo:hi]
                if maps.device.type != "cpu":
                    rows, units = rows.to(maps.device), units.to(maps.device)
                chosen = maps[rows, units].float()  # a copy: in-place ops cannot reach it
                self._plan_maps.append((chosen.relu_() if rectify else chosen).cpu())
        if sampled is not None:
            rows = output.index_select(0, sampled)  # a copy
            if rows.numel() >= MEASURE_AT_ONCE * rows.shape[0]:
                self._add_positions(self._fractions(rows))
            else:
                self._activity_rows.append(rows)

    def finish_maps(self) -> None:
        """After the second pass: every kept entry's map and argmax position, and the activity rows' positions."""
        if self._activity_rows:
            self._add_positions(self._fractions(torch.cat(self._activity_rows)))
            self._activity_rows = []
        if self._plan_maps:  # the torch path's copies
            which, unit, rank, _ = self._plan
            maps = torch.cat(self._plan_maps)
            for i, top in enumerate((self.top, self.bottom)):
                mine = which == i
                top.set_maps(unit[mine], rank[mine], maps[mine])
        self._plan = self._plan_arrays = self._plan_maps = None

    def update(self, values, ids, labels, positions=None, maps=None, position_fraction=None) -> None:
        """Feed already-reduced activations directly (tests, shard tools): values [R, U], maps [R, U, M]."""
        self.top.update(values, ids, positions, maps)
        self.bottom.update(values, ids, positions, maps)
        self.moments.update(values)
        self.activity.update(values, position_fraction)
        self.classes.update(values, labels)
        self.sample.update(values, ids)

    def to_cpu(self) -> None:
        """Flush, and drop device copies, so the state can be pickled and sent to another process."""
        self.flush()
        self.top._device_bound = self.bottom._device_bound = None
        self._rows, self._capacity = torch.empty(0), 0

    def merge(self, other: "LayerAccumulator") -> None:
        self.flush()
        other.flush()
        for name in ("top", "bottom", "moments", "activity", "classes", "sample"):
            getattr(self, name).merge(getattr(other, name))


# --- what a unit page shows -------------------------------------------------------

@dataclass
class LayerScan:
    info: LayerInfo
    top: TopKResult
    bottom: TopKResult
    stats: dict[str, np.ndarray]  # per unit: see `summarize`
    labels: list[str]  # automatic label of every unit
    hist_counts: np.ndarray  # [U, bins] over the sample
    hist_lo: np.ndarray  # [U] left edge of the first bin
    hist_hi: np.ndarray  # [U] right edge of the last bin
    class_means: np.ndarray  # [U, C]
    sample: np.ndarray  # [S, U] float16 activations of the sampled examples


@dataclass
class ModelScan:
    model: str
    layers: list[LayerScan]
    labels: np.ndarray  # [N] label of every example, -1 when unknown
    predicted: np.ndarray | None  # [N] int, or None when the output is not [N, classes]
    confidence: np.ndarray | None  # [N] softmax probability of the prediction
    n_examples: int
    seconds: float
    accuracy: float | None = None  # on labelled examples whose label is a valid class index
    sample_ids: np.ndarray | None = None  # [S] example ids of the sample rows
    inputs: "InputActivations | None" = None  # the input pages' most active units per layer


INPUT_UNITS = 8  # most active units of each layer shown on an input page


@dataclass
class InputActivations:
    """For a few inputs (the input pages), each layer's most active units and their maps."""
    examples: np.ndarray  # [E] example ids, ascending
    units: dict[str, np.ndarray]  # layer -> [E, n] unit indices, most active first
    values: dict[str, np.ndarray]  # layer -> [E, n] their activations
    maps: dict[str, np.ndarray | None]  # layer -> [E, n, M] float32 maps (conv/token layers), None for flat


def input_examples(n_examples: int, count: int, seed: int) -> np.ndarray:
    """The seeded sample of examples that get an input page (ascending ids)."""
    return sample_ids(n_examples, count, seed + 1)  # +1: not the same draw as the scan's sample


def input_activations(net: torch.nn.Module, dataset: AtlasDataset, layers: list[str], examples: np.ndarray,
                      reduce: str, device: torch.device, top: int = INPUT_UNITS) -> InputActivations:
    """A second, small pass over `examples`: per layer the `top` units with the highest activation on each."""
    outputs: dict[str, torch.Tensor] = {}
    units, values, maps = {}, {}, {}
    if len(examples):
        x = torch.stack([torch.as_tensor(dataset.data[int(i)][0]) for i in examples]).to(device)
        with Probe(net, layers, reduce, sink=lambda name, out: outputs.__setitem__(name, out.clone())), \
                torch.inference_mode():
            net(x)
    for name in layers:
        if name not in outputs:
            units[name] = np.zeros((len(examples), 0), np.int64)
            values[name], maps[name] = np.zeros((len(examples), 0), np.float32), None
            continue
        out = outputs[name].float().cpu()
        reduced = reduce_output(out, reduce)[0]
        finite = torch.where(torch.isfinite(reduced), reduced, -torch.inf)
        best = torch.argsort(finite, dim=1, descending=True, stable=True)[:, :top]  # ties to the lower unit
        units[name] = best.numpy().astype(np.int64)
        values[name] = torch.gather(reduced, 1, best).numpy()
        layer_maps = unit_maps(out)
        maps[name] = None if layer_maps is None else \
            torch.gather(layer_maps, 1, best[:, :, None].expand(-1, -1, layer_maps.shape[2])).numpy()
    return InputActivations(np.asarray(examples, dtype=np.int64), units, values, maps)


def unit_major(sample: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """[U, S] C-contiguous copy of a sample [S, U] in `dtype` (torch converts float16 several times faster than numpy)."""
    return torch.from_numpy(np.asarray(sample).T).to(dtype).contiguous().numpy()


def histogram(sample: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per unit: `bins` equal bins between the min and max of its finite sampled activations (lo = hi = 0 if none)."""
    return kernels.histogram_rows(unit_major(sample, torch.float32), bins)


def class_selectivity(class_means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Selectivity index and top class of every unit.

    index = (mu_max - mu_rest) / (mu_max + mu_rest), mu_max the largest class
    mean and mu_rest the mean of the other classes' means (Morcos et al.,
    2018). Class means below 0 (pre-activation layers) are clipped to 0 first,
    so the index lies in [0, 1]: 1 = fires for one class only, 0 = the same
    for every class (or never positive). NaN where fewer than 2 classes have
    examples.
    """
    return kernels.selectivity_rows(np.ascontiguousarray(class_means, dtype=np.float64))


def redundancy(sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every unit, the unit of the same layer whose sampled activations correlate most with it.

    Pearson correlation over the sample; units with no variance correlate
    with nothing (partner -1, correlation NaN).
    """
    z = torch.from_numpy(unit_major(sample, torch.float64))  # a copy worked on in place
    n_units = z.shape[0]
    if n_units < 2 or z.shape[1] < 2:
        return np.full(n_units, -1), np.full(n_units, np.nan)
    torch.nan_to_num_(z, nan=0.0, posinf=0.0, neginf=0.0)
    scale = max(1.0, *(abs(float(v)) for v in torch.aminmax(z)))
    z -= z.mean(1, keepdim=True)
    norm = torch.linalg.vector_norm(z, dim=1)
    ok = norm > 1e-9 * scale
    z *= torch.where(ok, 1.0 / torch.where(ok, norm, 1.0), 0.0)[:, None]
    corr = z @ z.T  # torch's GEMM: numpy's (OpenBLAS, its threads beside torch's) doubled resnet18's summary
    corr.fill_diagonal_(-torch.inf)
    corr[:, ~ok] = -torch.inf
    best, partner = corr.max(1)  # the first of equal maxima
    valid = ok & torch.isfinite(best)
    return torch.where(valid, partner, -1).numpy(), torch.where(valid, best, torch.nan).numpy()


def summarize(info: LayerInfo, acc: LayerAccumulator, cfg: ScanSection, class_names: tuple[str, ...]) -> LayerScan:
    """Finalize a layer's accumulators into statistics, health flags and labels.

    Health flags (thresholds from [scan]):
    - dead: never active (no example where the activation exceeds
      `active_threshold`);
    - saturated (always on): active on at least `saturated_fraction` of the
      positions of every input (of every input, for flat layers), or not dead
      but constant (std <= 1e-6 * (1 + |mean|));
    - redundant: Pearson correlation with another unit of the same layer of
      at least `redundant_correlation` over the sample (the partner is named);
    - non-finite: some activations were NaN or Inf (counted, left out of the
      statistics, never in the top-k).
    Label: "dead", "saturated", "non-finite" (no finite activation at all),
    "class-selective: <class>" when the selectivity index is at least
    `class_selective`, else "feature-selective (broad)" — the split of the
    classic analysis of an MNIST net's hidden units into units that answer
    one digit and units that answer a stroke shared by several.
    """
    stats = acc.moments.finalize()
    stats.update(acc.activity.finalize())
    class_means = acc.classes.finalize()
    sample = acc.sample.finalize()
    selectivity, top_class = class_selectivity(class_means)
    partner, corr = redundancy(sample)
    dead = stats["frac_active"] == 0
    constant = stats["std"] <= 1e-6 * (1 + np.abs(np.nan_to_num(stats["mean"])))
    saturated = ~dead & ((stats["position_activity"] >= cfg.saturated_fraction) | constant)
    redundant = np.nan_to_num(corr, nan=-np.inf) >= cfg.redundant_correlation
    stats.update(selectivity=selectivity, top_class=top_class, dead=dead, saturated=saturated,
                 redundant=redundant, redundant_with=np.where(redundant, partner, -1),
                 redundant_corr=np.where(redundant, corr, np.nan), best_partner=partner, best_corr=corr)
    selective = np.nan_to_num(selectivity, nan=-np.inf) >= cfg.class_selective
    labels = []
    for none, is_dead, is_saturated, is_selective, top in zip(  # Python values: numpy scalars cost more per unit
            (stats["count"] == 0).tolist(), dead.tolist(), saturated.tolist(), selective.tolist(), top_class.tolist()):
        if none:
            labels.append("non-finite")
        elif is_dead:
            labels.append("dead")
        elif is_saturated:
            labels.append("saturated")
        elif is_selective:
            labels.append(f"class-selective: {class_names[top] if 0 <= top < len(class_names) else top}")
        else:
            labels.append("feature-selective (broad)")
    counts, lo, hi = histogram(sample, cfg.histogram_bins)
    return LayerScan(info, acc.top.finalize(), acc.bottom.finalize(), stats, labels, counts, lo, hi,
                     class_means, sample)


# --- the pass ------------------------------------------------------------------------

@dataclass
class ScanPart:
    """The mergeable state of a scan over examples [start, stop): what one process sends to the one that writes."""
    start: int
    stop: int
    accs: dict[str, LayerAccumulator]
    shapes: dict[str, tuple[int, ...]]
    labels: torch.Tensor  # [n] of this part's examples
    predicted: torch.Tensor | None  # [n], None when the output is not [B, classes]
    confidence: torch.Tensor | None
    seconds: float

    def merge(self, other: "ScanPart") -> "ScanPart":
        """The part over both ranges; `other` must start where this one stops (parts merge in order)."""
        if other.start != self.stop:
            raise ValueError(f"scan parts must be adjacent: [{self.start}, {self.stop}) then [{other.start}, ...)")
        for name, acc in other.accs.items():
            if name in self.accs:
                self.accs[name].merge(acc)
            else:
                self.accs[name] = acc
        self.shapes.update(other.shapes)
        both = self.predicted is not None and other.predicted is not None
        return ScanPart(self.start, other.stop, self.accs, self.shapes, torch.cat([self.labels, other.labels]),
                        torch.cat([self.predicted, other.predicted]) if both else None,
                        torch.cat([self.confidence, other.confidence]) if both else None,
                        max(self.seconds, other.seconds))


@contextmanager
def worker_errors():
    """An AtlasError raised in a DataLoader worker comes back wrapped in its traceback: keep its one line."""
    try:
        yield
    except AtlasError as exc:
        text = str(exc)
        if "DataLoader worker" not in text:
            raise
        last = text.strip().splitlines()[-1]
        raise AtlasError(re.sub(r"^[\w.]*(Error|Exception): ", "", last)) from None


@functools.cache  # once per process
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse, for the rest of the process; False where it cannot.

    A forward pass allocates and frees large temporaries on every batch.
    By default glibc maps each block above its mmap threshold (32 MB at
    most) afresh and hands freed heap tops back to the OS, so each batch
    faults those pages in again: on resnet18 at 128 px in batches of 64,
    about 0.8M page faults per 2,000 images for a bare forward, and twice
    that under a scan, whose long-lived small allocations (accumulator
    state, buffers) split the heap's free blocks, so that the model's
    temporaries took fresh memory more often. With no mmap for large blocks
    (`M_MMAP_MAX` 0; glibc still maps one when the heap cannot grow) and no
    trimming below 1 GiB (`M_TRIM_THRESHOLD`), freed blocks are reused
    without faults. The cost: the process keeps its peak heap until it
    exits (a build is one process that ends). Other C libraries: nothing.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-4, 0)) and bool(mallopt(-1, 2**30))  # M_MMAP_MAX, M_TRIM_THRESHOLD


def shard_range(n_examples: int, rank: int, world: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous block of example ids (the first ranks take one more when it does not divide)."""
    base, extra = divmod(n_examples, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def scan_part(model: LoadedModel, dataset: AtlasDataset, layers: list[str], cfg: ScanSection, device: torch.device,
              seed: int = 0, start: int = 0, stop: int | None = None, progress: bool = True,
              workers: int = 0) -> ScanPart:
    """Stream examples [start, stop) through the model once, feeding every layer's accumulators.

    Example ids are global (a shard's top-k, sample rows and tie-breaks are
    those of the whole dataset), so parts of one dataset merge into exactly
    what one pass gives.
    """
    began = time.perf_counter()
    keep_freed_memory()
    stop = len(dataset) if stop is None else stop
    net = model.module.to(device)
    n_classes = max(len(dataset.class_names), 1)
    sample = sample_ids(len(dataset), cfg.sample_size, seed)
    activity_rows = sample[:: max(1, -(-len(sample) // POSITION_SAMPLE))]  # evenly spread over the sample
    data = dataset.data if (start, stop) == (0, len(dataset)) else Subset(dataset.data, range(start, stop))
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    accs: dict[str, LayerAccumulator] = {}
    batch: dict = {"calls": {}}  # what the hooks need to know about the batch in flight
    plan = forward_plan(net, torch.as_tensor(dataset.data[start][0])[None], layers, device) if stop > start else None
    deferred = plan is not None and defer_maps(plan, cfg, len(dataset), device)
    derived = derived_layers(net, layers, plan, cfg)  # {relu: the layer it follows}
    # the second pass reruns the kept inputs (no reloading; the same inputs even under random augmentation)
    kept: list[torch.Tensor] | None = [] if deferred and keeps_inputs(plan, cfg, stop - start) else None
    hooked = [name for name in layers if name not in derived]
    followers = {name: [relu for relu, source in derived.items() if source == name] for name in hooked}
    expected_calls = plan.hooked_calls(derived) if plan else {}

    def new_accumulator(shape: tuple[int, ...], followers=None) -> LayerAccumulator:
        return LayerAccumulator(unit_count(shape), cfg, n_classes, sample, deferred,
                                activity_rows if deferred else None, len(shape) == 1, followers)

    def sink(name: str, output: torch.Tensor) -> None:
        calls = batch["calls"][name] = batch["calls"].get(name, 0) + 1
        if calls < plan.calls.get(name, 1):  # a module called several times per forward: its last call counts
            return
        if name not in accs:
            for relu in followers[name]:
                accs[relu] = new_accumulator(plan.shapes[relu])
            accs[name] = new_accumulator(tuple(output.shape[1:]), [accs[relu] for relu in followers[name]])
        batch["bytes"] += accs[name].observe(output, batch["first"], batch["labels"], batch["sampled"])

    predicted, confidence, label_batches, outputs = [], [], [], []
    seen = start
    batch["bytes"] = 0

    def flush() -> None:
        for name in hooked:  # each also feeds its followers
            if name in accs:
                accs[name].flush()
        if outputs:  # the model's prediction and confidence, a chunk of batches at a time
            logits = torch.cat(outputs).float()
            top, pred = logits.max(1)  # the softmax's largest probability: 1 / sum(exp(logit - max))
            conf = torch.exp(logits - top[:, None]).sum(1).reciprocal_()
            predicted.append(pred.cpu())
            confidence.append(conf.cpu())
            outputs.clear()
        batch["bytes"] = 0

    autocast = (torch.autocast(device.type, dtype=getattr(torch, cfg.precision)) if cfg.precision != "float32"
                else nullcontext())
    with Probe(net, hooked, cfg.reduce, sink=sink, model_name=model.name) as probe, torch.inference_mode(), \
            worker_errors():
        for x, y in tqdm(loader, desc=f"scan {model.name}", unit="batch", disable=not progress, leave=False):
            n = x.shape[0]
            labels = torch.as_tensor(y).view(-1).long()
            batch["first"], batch["labels"] = seen, labels.to(device)
            batch["sampled"] = None
            if not deferred:  # the rows whose active positions are measured in the hook
                lo, hi = np.searchsorted(activity_rows, [seen, seen + n])
                if hi > lo:
                    batch["sampled"] = torch.as_tensor(activity_rows[lo:hi] - seen, device=device)
            batch["calls"] = {}
            if kept is not None:
                kept.append(x)
            with autocast:
                out = net(x.to(device, non_blocking=True))
            plan.check_calls(batch["calls"], model.name, expected_calls)
            seen += n
            label_batches.append(labels)
            if isinstance(out, torch.Tensor) and out.dim() == 2:
                outputs.append(out)
                batch["bytes"] += out.numel() * out.element_size()
            if batch["bytes"] >= cfg.buffer_mb * 2**20:  # chunks of bounded memory
                flush()
        flush()
    if deferred:
        maps_pass(net, data, start, accs, plan, activity_rows[(activity_rows >= start) & (activity_rows < stop)], cfg,
                  device, autocast, derived, torch.cat(kept) if kept else None)
    for acc in accs.values():
        acc.to_cpu()
    labels = torch.cat(label_batches) if label_batches else torch.zeros(0, dtype=torch.long)
    complete = predicted and sum(len(p) for p in predicted) == stop - start
    shapes = {**probe.shapes, **{relu: plan.shapes[relu] for relu in derived if relu in accs}}
    return ScanPart(start, stop, accs, shapes, labels,
                    torch.cat(predicted) if complete else None, torch.cat(confidence) if complete else None,
                    time.perf_counter() - began)


@dataclass
class ForwardPlan:
    """What one forward of one example shows about the probed layers: output shapes and calls, in call order."""
    shapes: dict[str, tuple[int, ...]]
    calls: dict[str, int]  # hook calls per forward: more than one for a module the forward uses several times
    input_bytes: int = 0  # of one example's input tensor

    def hooked_calls(self, skipped=()) -> dict[str, int]:
        """The hook calls per forward of the layers hooked in a pass (`skipped`: those that are not)."""
        return {name: calls for name, calls in self.calls.items() if name not in skipped}

    def check_calls(self, calls: dict[str, int], model: str, expected: dict[str, int]) -> None:
        """Fail when a forward's hook calls differ from `expected` (`hooked_calls`): one dict comparison, paid
        on every batch."""
        if calls == expected:
            return
        name = next(n for n in {**expected, **calls} if calls.get(n, 0) != expected.get(n, 0))
        raise AtlasError(f"layer {name!r} of model {model!r} ran {calls.get(name, 0)} times in one forward pass "
                         f"but {expected.get(name, 0)} times in another; probe layers that every forward uses alike")


class _StopForward(Exception):
    """Raised from a hook to end a forward once the layers it is run for have reported."""


def forward_plan(net: torch.nn.Module, x: torch.Tensor, layers: list[str], device: torch.device) -> ForwardPlan:
    calls: dict[str, int] = {}
    with Probe(net, layers, sink=lambda name, out: calls.__setitem__(name, calls.get(name, 0) + 1)) as probe, \
            torch.inference_mode():
        net(x.to(device))
    return ForwardPlan(dict(probe.shapes), calls, x[0].numel() * x.element_size())


def derived_layers(net: torch.nn.Module, layers: list[str], plan: ForwardPlan, cfg: ScanSection) -> dict[str, str]:
    """Probed ReLUs whose values follow exactly from the probed layer just before them: {relu: that layer}.

    ReLU is monotone, so the max over a unit's positions of ReLU(x) is
    ReLU(max of x), bit for bit, and its maps are ReLU of the maps: such a
    layer needs no hook of its own (its hook and spatial max can cost as much
    as the layer itself on small models). Only where nothing can run
    between the two: consecutive children of a plain `nn.Sequential` (its own
    forward), each called once per forward, no other hooks on either, the
    first one hooked itself, and `scan.reduce = "max"`.
    """
    if cfg.reduce != "max" or plan is None:
        return {}
    probed, derived = set(layers), {}
    for parent_name, parent in net.named_modules():
        if not isinstance(parent, torch.nn.Sequential) or type(parent).forward is not torch.nn.Sequential.forward:
            continue
        children = [(f"{parent_name}.{n}" if parent_name else n, m) for n, m in parent.named_children()]
        for (source, first), (name, relu) in zip(children, children[1:]):
            if (type(relu) is torch.nn.ReLU and name in probed and source in probed and source not in derived
                    and plan.calls.get(name) == 1 and plan.calls.get(source) == 1
                    and not first._forward_hooks and not relu._forward_pre_hooks and not relu._forward_hooks):
                derived[name] = source
    return derived


HOOK_MAPS_DEVICES = ("cpu",)  # devices whose outputs the compiled kernels can read in the hook
DEFER_MAPS = 8  # maps from a second pass when the dataset has this many times more examples than map slots


def defer_maps(plan: ForwardPlan, cfg: ScanSection, n_examples: int, device: torch.device) -> bool:
    """Whether the maps of top-/bottom-k examples come from a second pass rather than from the hook.

    In the hook, a compiled kernel (`HookTopK`) tests each batch against
    every unit's current k-th values and copies the maps of just the
    examples that enter: a few microseconds per layer and batch, which on a
    small model still adds up to a good part of its forward. A second pass
    over just the examples that end up in some top- or bottom-k (plus the
    activity rows), stopped after the last conv/token layer, costs at most
    `2 * top_k * units` examples; when the dataset is more than DEFER_MAPS
    times larger than that, the scan keeps only the values (top-k in bulk,
    one compiled pass per chunk) and the second pass adds the maps. Off the
    CPU (a GPU), where the kernels cannot read the output, always so. The
    choice depends on shapes alone, so it is the same in every run and on
    every rank.
    """
    if device.type not in HOOK_MAPS_DEVICES:
        return True
    slots = sum(2 * cfg.top_k * unit_count(shape) for shape in plan.shapes.values() if len(shape) in (2, 3))
    return slots > 0 and slots * DEFER_MAPS <= n_examples


def keeps_inputs(plan: ForwardPlan, cfg: ScanSection, n_examples: int) -> bool:
    """Whether a deferred scan keeps its `n_examples` inputs for the second pass: when they fit in
    `scan.buffer_mb` (the second pass then neither reloads nor re-transforms them); otherwise it reloads
    just the examples it needs. The batches are kept as the loader gave them, not copied (a model that
    changed its own input in place would change them too; torchvision's models do not)."""
    return plan.input_bytes * n_examples <= cfg.buffer_mb * 2**20


def second_pass_batch(plan: ForwardPlan, cfg: ScanSection, n_examples: int) -> int:
    """Examples per batch of a second pass (loading and forwards): as many as `scan.buffer_mb` of the probed
    conv/token outputs allows (at least `scan.batch_size`, at most all `n_examples`), so its few examples
    load and run in a few large batches (on the demo CNN, one forward of about 1,000 examples: 12.5 against
    16.8 ms for the pass in batches of 128, the per-batch costs of the hooks and the copies being paid
    once)."""
    per_example = 4 * sum(int(np.prod(shape)) for shape in plan.shapes.values() if len(shape) in (2, 3))
    fits = cfg.buffer_mb * 2**20 // max(per_example, 1)
    return max(cfg.batch_size, min(n_examples, fits))


def maps_pass(net: torch.nn.Module, data, start: int, accs: dict[str, LayerAccumulator], plan: ForwardPlan,
              activity_rows: np.ndarray, cfg: ScanSection, device: torch.device, autocast,
              derived: dict[str, str] | None = None, inputs: torch.Tensor | None = None) -> None:
    """The second pass of a deferred scan: every conv/token layer's top-/bottom-k maps and activity rows' positions.

    data: the part's examples (index i is example start + i); inputs: all
    of their inputs, kept by the first pass (`keeps_inputs`), or None to
    reload the needed ones. Each needed example is run once, in ascending
    order, in batches of `second_pass_batch`; each forward stops once the
    last layer with maps has reported. A derived layer (`derived_layers`)
    is filled from its source's output.
    """
    derived = derived or {}
    mapped = {name: acc for name, acc in accs.items() if not acc.flat}
    if not mapped:
        return
    needed = [acc.needed() for acc in mapped.values()] + [torch.as_tensor(activity_rows, dtype=torch.long)]
    ids = torch.unique(torch.cat(needed))  # sorted
    for acc in mapped.values():
        acc.plan_maps(ids)
    activity = np.isin(ids.numpy(), activity_rows)
    hooked = [name for name in mapped if name not in derived]
    expected = sum(plan.calls[name] for name in hooked)
    batch: dict = {}

    def sink(name: str, output: torch.Tensor) -> None:  # the Probe reports the mapped layers alone
        calls = batch["calls_of"][name] = batch["calls_of"].get(name, 0) + 1
        if calls == plan.calls[name]:  # a module called several times per forward: its last call counts
            mapped[name].fill(output, batch["first"], batch["sampled"])
            for follower in mapped[name].followers:  # derived ReLUs (mapped too: same shape); rows measured above
                follower.fill(output, batch["first"], None, rectify=True)
        batch["calls"] += 1
        if batch["calls"] == expected:
            raise _StopForward  # the rest of the model is not needed

    step = second_pass_batch(plan, cfg, len(ids))
    if inputs is not None:
        loaded = inputs[ids - start].split(step)
    else:
        loaded = (x for x, _ in DataLoader(Subset(data, (ids - start).tolist()), shuffle=False, batch_size=step))
    done = 0
    with Probe(net, hooked, cfg.reduce, sink=sink), torch.inference_mode():
        for x in loaded:
            n = x.shape[0]
            sampled = np.flatnonzero(activity[done:done + n])
            batch.update(first=done, sampled=torch.as_tensor(sampled, device=device) if len(sampled) else None,
                         calls=0, calls_of={})
            try:
                with autocast:
                    net(x.to(device, non_blocking=True))
            except _StopForward:
                pass
            done += n
        for acc in mapped.values():
            acc.finish_maps()


def finish_scan(model: LoadedModel, dataset: AtlasDataset, layers: list[str], cfg: ScanSection,
                part: ScanPart, device: torch.device, seed: int = 0, input_pages: int = 0) -> ModelScan:
    """Summarize a whole-dataset part into what the store keeps (and the input pages' second small pass)."""
    start = time.perf_counter()
    if (part.start, part.stop) != (0, len(dataset)):
        raise ValueError(f"finish_scan needs the whole dataset, got examples [{part.start}, {part.stop})")
    net = model.module
    if len(dataset):
        check_called(layers, part.accs, model.name)
    modules = dict(net.named_modules())
    result_layers = [summarize(LayerInfo(name, type(modules[name]).__name__, part.shapes[name], True),
                               part.accs[name], cfg, dataset.class_names) for name in layers if name in part.accs]
    inputs = None
    if input_pages:
        inputs = input_activations(net.to(device), dataset, layers, input_examples(len(dataset), input_pages, seed),
                                   cfg.reduce, device)
        net.to("cpu")
    labels = part.labels.numpy().astype(np.int64)
    pred = part.predicted.numpy() if part.predicted is not None else None
    conf = part.confidence.numpy() if part.confidence is not None else None
    accuracy = None
    if pred is not None:
        valid = (labels >= 0) & (labels < len(dataset.class_names))
        if valid.any():
            accuracy = float((pred[valid] == labels[valid]).mean())
    return ModelScan(model.name, result_layers, labels, pred, conf, part.stop, part.seconds +
                     time.perf_counter() - start, accuracy, sample_ids(len(dataset), cfg.sample_size, seed), inputs)


def scan_model(model: LoadedModel, dataset: AtlasDataset, layers: list[str], cfg: ScanSection,
               device: torch.device, seed: int = 0, progress: bool = True, input_pages: int = 0) -> ModelScan:
    """Stream the dataset through the model once and summarize every unit of `layers`.

    input_pages: how many inputs (a seeded sample) get their layers' most
    active units recorded, by a second pass over just those.
    """
    part = scan_part(model, dataset, layers, cfg, device, seed, progress=progress)
    try:
        return finish_scan(model, dataset, layers, cfg, part, device, seed, input_pages)
    finally:
        model.module.to("cpu")
