"""Accumulators: every per-unit statistic of a scan, streamed as torch operations on the model's device.

Owns what a unit's value on one example is (`unit_values`: a conv channel's
spatial max or mean, a token feature's max or mean over tokens, a flat
feature itself) and the accumulators that gather those values over a
dataset. Each has update / merge / finalize: `update` takes a batch or a
chunk on the device the model runs on, `merge` folds in another shard's
accumulator (any order), `finalize` returns host arrays, the one move to the
host. Memory does not grow with the dataset.

- `TopK`: the k highest (or lowest) values of every unit with example id
  and, for conv/token layers, the unit's whole map on that example (the
  bottom-k: only where its map peaks); ties go to the lower example id (each
  entry is one int64 key that orders by value, then id), so results depend
  on neither batch size nor shard order;
- `Moments`: count, mean, std (Chan's parallel update, float64), min, max and
  the number of NaN/Inf values, which every statistic leaves out;
- `Activity`: the fraction of examples on which a unit is active and, on a
  few examples, the fraction of its positions that are;
- `ClassMeans`: the mean finite value per class (unlabelled examples apart);
- `SampleRows`: the values of a seeded sample of examples (float16), from
  which the summary takes histograms and the correlations behind redundancy.

`LayerAccumulator` feeds all of them from one layer's live output: the
reduction and the top-/bottom-k (whose maps must come from the output
itself) per batch, the rest from buffered values in chunks. The maps are
taken in the same forward that produced the values, so they agree with them
even under random augmentation (a second pass would see other inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import AtlasError

EMPTY = torch.iinfo(torch.int64).min  # the key of an empty top-k slot: below every real entry
POSITION_SAMPLE = 256  # examples (spread over the sample) on which the fraction of active positions is measured
ACTIVITY_CHUNK = 8 * 2**20  # bytes of activity rows copied at once: in the cache, twice as fast as larger copies
COMPACT_WRITES = ("cpu",)  # devices where a top-k update finds its few changed slots by nonzero (no sync to wait on)


def unit_maps(out: torch.Tensor) -> torch.Tensor | None:
    """[B, U, M] view of a layer output: each unit's values over its M positions (conv) or tokens; None if flat."""
    if out.dim() == 2:
        return None
    if out.dim() == 4:
        return out.flatten(2)
    if out.dim() == 3:
        return out.transpose(1, 2)
    raise AtlasError(f"layer output of shape {tuple(out.shape)} is not supported; "
                     f"probe layers whose outputs are [B, F], [B, T, D] or [B, C, H, W]")


def first_units(out: torch.Tensor, n: int) -> torch.Tensor:
    """A view of the first n units of a layer output (channels of [B, C, H, W], features of [B, F] and
    [B, T, D]); all of them when n is 0."""
    dim = 2 if out.dim() == 3 else 1
    return out if not n or out.shape[dim] <= n else out.narrow(dim, 0, n)


def unit_values(out: torch.Tensor, reduce: str = "max") -> torch.Tensor:
    """[B, U] float32: each unit's value on each example (`reduce_positions` of its map)."""
    maps = unit_maps(out)
    if maps is None:  # a copy: an in-place op later in the forward (a ReLU after a Linear) must not reach it
        return out.to(torch.float32, copy=True)
    return reduce_positions(maps, reduce, out.dim() == 3).float()


def reduce_positions(maps: torch.Tensor, reduce: str, tokens: bool) -> torch.Tensor:
    """A unit's value from its values over positions (the last dim): their max or mean, or for token outputs
    under "cls" the first token's (a ViT's class token; conv maps take their max)."""
    if reduce == "cls" and tokens:
        return maps[..., 0]
    return maps.mean(-1) if reduce == "mean" else torch.amax(maps, -1)


def active_fraction(out: torch.Tensor, threshold: float, scratch: bool = False) -> torch.Tensor:
    """[B, U] fraction of each unit's positions (0/1 for flat outputs) above `threshold`; NaN is not active.
    scratch: `out` is the caller's own copy: a float32 one is compared in place (no second copy)."""
    maps = unit_maps(out)
    if maps is None:
        return (out > threshold).float()
    # a float copy compared in place: 1.0 where above, 0.0 elsewhere (NaN too), then its mean; four times
    # faster on the CPU than comparing into booleans and counting them
    own = scratch and maps.dtype == torch.float32
    return (maps if own else maps.to(torch.float32, copy=True)).gt_(threshold).mean(2)


def tail_fraction(out: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """[B, U] fraction of each unit's positions pinned in a squashing function's tails: <= low or >= high."""
    maps = unit_maps(out)
    x = (out if maps is None else maps).float()
    pinned = ((x <= low) | (x >= high)).float()
    return pinned if maps is None else pinned.mean(2)


# --- top-k --------------------------------------------------------------------------

def order_keys(values: torch.Tensor, ids: torch.Tensor, largest: bool = True) -> torch.Tensor:
    """[U, B] int64 keys of values [B, U] of examples ids [B]: ordered by value (descending for the top-k,
    ascending for the bottom-k), then lower id first, no two alike; EMPTY for NaN and +-Inf (never kept).
    Ids must lie in [0, 2**32)."""
    return key_pair(values, ids)[0 if largest else 1]


def key_pair(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k and the bottom-k keys of the same values (one conversion, two orders)."""
    v = values.T.float().contiguous()
    v += 0.0  # -0.0 -> +0.0
    bits = v.view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # IEEE order as signed integers; ~ordered reverses it
    tie = 2**32 - 1 - ids.long()  # the lower id first
    empty = ~torch.isfinite(v)
    return tuple(((o.long() << 32) | tie).masked_fill_(empty, EMPTY) for o in (ordered, ~ordered))


def key_values(keys: torch.Tensor, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 values and int64 example ids that `order_keys` made `keys` of."""
    ordered = (keys >> 32).to(torch.int32)
    if not largest:
        ordered = ~ordered
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32) + 0.0, 2**32 - 1 - (keys & 0xFFFFFFFF)


def take_maps(maps: torch.Tensor, rows: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """[N, M] maps of (batch row, unit) pairs rows [N], units [N] from maps [B, U, M]."""
    b, n_units, m = maps.shape
    if maps.is_contiguous():  # whole contiguous rows: much faster than advanced indexing
        return maps.reshape(b * n_units, m).index_select(0, rows * n_units + units)
    return maps[rows, units]


class Accumulator:
    """update / merge / finalize, and `to`: the state's tensors moved to a device (to the host before a shard is
    sent to another process; a merge needs both on one device)."""

    def to(self, device):
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self


@dataclass
class TopKResult:
    values: np.ndarray  # [U, k] float32, best first (largest for top-k, smallest for bottom-k); NaN where invalid
    ids: np.ndarray  # [U, k] example ids; -1 where invalid
    positions: np.ndarray  # [U, k] flat position of the map's first maximum; -1 for flat outputs or where invalid
    maps: np.ndarray | None  # [U, k, M] float32 map of each entry over its M positions (conv/token layers)
    valid: np.ndarray  # [U, k] False where fewer than k finite values existed


class TopK(Accumulator):
    """Streaming top-k (largest=False: bottom-k) of every unit, with each entry's map when given maps.

    Entries live in slots: one keeps its slot, and its map stays where it is,
    while it stays in; an update writes the keys and maps of just the
    entries that enter, into the slots of those that leave. On the CPU those
    pairs are found by `nonzero` (nothing else is copied: no large
    temporaries, whose fresh pages would slow the model's own ops); on other
    devices, not to wait for them, every (unit, place) pair is written and
    the pairs that change nothing write to a spare slot (index k).
    """

    def __init__(self, n_units: int, k: int, largest: bool = True, device: torch.device | str = "cpu",
                 positions: int = 0, dtype: torch.dtype = torch.float32, keep_maps: bool = True):
        """positions: M of the maps it will be given (0: allocated at the first maps), of `dtype`; keep_maps
        False: of each entry's map only its position (its first maximum) is kept."""
        self.k, self.largest, self.keep_maps = k, largest, keep_maps
        self.keys = torch.full((n_units, k + 1), EMPTY, dtype=torch.int64, device=device)  # slot order, + spare
        self.maps: torch.Tensor | None = None  # [U, k + 1, M] in slot order
        self.places: torch.Tensor | None = None  # [U, k + 1] their positions, when the maps are not kept
        if positions:
            self._allocate(n_units, positions, dtype, device)

    def _allocate(self, n_units: int, positions: int, dtype: torch.dtype, device) -> None:
        if self.keep_maps:
            self.maps = torch.zeros(n_units, self.k + 1, positions, dtype=dtype, device=device)
        else:
            self.places = torch.full((n_units, self.k + 1), -1, dtype=torch.int64, device=device)

    def update(self, values: torch.Tensor, ids: torch.Tensor, maps: torch.Tensor | None = None) -> None:
        """values [B, U]; ids [B] (on the same device); maps [B, U, M] (any strides) or None."""
        self.enter(order_keys(values, ids, self.largest), maps)

    def enter(self, keys: torch.Tensor, maps: torch.Tensor | None = None,
              positions: torch.Tensor | None = None) -> None:
        """A batch by its `order_keys` [U, B] (of this order), with its maps [B, U, M] or None; positions
        [B, U]: its maps' first maxima, which serve instead when the maps are not kept."""
        if positions is not None and not self.keep_maps:
            self._enter(keys, lambda units, rows: positions[rows, units])
            return
        self._enter(keys, None if maps is None else lambda units, rows: take_maps(maps, rows, units))

    def merge(self, other: "TopK") -> None:
        kept = other.maps if other.maps is not None else other.places
        self._enter(other.keys[:, :self.k], None if kept is None else lambda units, rows: kept[units, rows])

    def _enter(self, keys: torch.Tensor, source) -> None:
        """Candidate keys [U, n] into the slots; source(units, rows) -> the maps [N, M] (or positions [N]) of
        candidates rows."""
        n_units, k = len(keys), self.k
        pick = torch.cat([self.keys[:, :k], keys], 1).topk(k, 1, sorted=False)[1]  # [U, k]
        entering = pick >= k
        stays = torch.zeros_like(self.keys, dtype=torch.bool).scatter_(1, pick.clamp(max=k), True)[:, :k]
        if keys.device.type in COMPACT_WRITES:
            units, slots = (~stays).nonzero(as_tuple=True)  # by unit, then slot
            if not len(units):
                return
            rows = pick[entering] - k  # by unit, then place: as many per unit as it frees, so aligned
        else:
            freed = torch.argsort(stays.to(torch.uint8), dim=1, stable=True)  # each unit's freed slots first
            order = torch.argsort((~entering).to(torch.uint8), dim=1, stable=True)  # its entering places first
            valid = torch.arange(k, device=keys.device) < entering.sum(1, keepdim=True)
            units = torch.arange(n_units, device=keys.device).repeat_interleave(k)
            slots = torch.where(valid, freed, k).view(-1)
            rows = torch.where(valid, pick.gather(1, order) - k, 0).view(-1)
        self.keys[units, slots] = keys[units, rows]
        if source is not None:
            new = source(units, rows)
            if self.maps is None and self.places is None:
                self._allocate(n_units, new.shape[-1], new.dtype, new.device)
            if self.keep_maps:
                self.maps[units, slots] = new
            else:
                self.places[units, slots] = new.argmax(1) if new.dim() == 2 else new

    def finalize(self) -> TopKResult:
        keys, order = self.keys[:, :self.k].sort(1, descending=True)
        valid = keys != EMPTY
        values, ids = key_values(keys, self.largest)
        values = torch.where(valid, values, torch.nan)
        ids = torch.where(valid, ids, -1)
        maps = None
        positions = torch.full_like(ids, -1)
        if self.maps is not None:
            maps = self.maps.gather(1, order[..., None].expand(-1, -1, self.maps.shape[2])).float()
            maps = torch.where(valid[..., None], maps, 0.0)
            positions = torch.where(valid, maps.argmax(2), -1)
        elif self.places is not None:
            positions = torch.where(valid, self.places.gather(1, order), -1)
        return TopKResult(values.cpu().numpy(), ids.cpu().numpy(), positions.cpu().numpy(),
                          None if maps is None else maps.cpu().numpy(), valid.cpu().numpy())


# --- the other statistics -------------------------------------------------------------

class Moments(Accumulator):
    """Streaming count, mean, std, min, max of the finite values, and the count of the others (float64)."""

    def __init__(self, n_units: int, device: torch.device | str = "cpu"):
        def full(value):
            return torch.full((n_units,), value, dtype=torch.float64, device=device)
        self.count, self.mean, self.m2, self.nonfinite = full(0.0), full(0.0), full(0.0), full(0.0)
        self.min, self.max = full(torch.inf), full(-torch.inf)

    def update(self, values: torch.Tensor) -> None:
        """values [R, U]: a chunk's moments (two passes, float64), combined with the state's."""
        v = values.double()
        finite = torch.isfinite(v)
        n = finite.sum(0, dtype=torch.float64)
        v = torch.where(finite, v, 0.0)
        mean = v.sum(0) / n.clamp(min=1)
        m2 = torch.where(finite, v - mean, 0.0).square().sum(0)
        lo = torch.where(finite, v, torch.inf).amin(0)
        hi = torch.where(finite, v, -torch.inf).amax(0)
        self._combine(n, mean, m2, lo, hi, len(v) - n)

    def merge(self, other: "Moments") -> None:
        self._combine(other.count, other.mean, other.m2, other.min, other.max, other.nonfinite)

    def _combine(self, n, mean, m2, lo, hi, nonfinite) -> None:
        total = self.count + n
        delta = mean - self.mean
        safe = total.clamp(min=1)
        self.m2 = self.m2 + m2 + delta.square() * self.count * n / safe
        self.mean = self.mean + delta * n / safe
        self.count, self.nonfinite = total, self.nonfinite + nonfinite
        self.min, self.max = torch.minimum(self.min, lo), torch.maximum(self.max, hi)

    def finalize(self) -> dict[str, np.ndarray]:
        none = self.count == 0
        out = {"count": self.count.long(), "nonfinite": self.nonfinite.long(), "mean": self.mean,
               "std": (self.m2 / self.count.clamp(min=1)).sqrt(), "min": self.min, "max": self.max}
        return {k: (v if k in ("count", "nonfinite") else torch.where(none, torch.nan, v)).cpu().numpy()
                for k, v in out.items()}


class Activity(Accumulator):
    """Fraction of examples on which each unit is active, mean fraction of its active positions, and (for a
    squashing nonlinearity, `tails` = (low, high)) mean fraction of its positions pinned in the tails.

    The position fractions may come from some of the examples only (the scan
    measures them on POSITION_SAMPLE rows of the sample), so they keep their own count.
    """

    def __init__(self, n_units: int, threshold: float, device: torch.device | str = "cpu",
                 tails: tuple[float, float] | None = None):
        self.threshold, self.tails, self.n, self.position_n = threshold, tails, 0, 0
        self.examples_active = torch.zeros(n_units, dtype=torch.float64, device=device)
        self.position_sum = torch.zeros(n_units, dtype=torch.float64, device=device)
        self.tail_sum = torch.zeros(n_units, dtype=torch.float64, device=device)

    def update(self, values: torch.Tensor, position_fraction: torch.Tensor | None = None) -> None:
        """values [R, U]; position_fraction [R', U] from `active_fraction`, for some examples (or None)."""
        self.n += len(values)
        self.examples_active += (values > self.threshold).sum(0, dtype=torch.float64)
        if position_fraction is not None:
            self.add_positions(position_fraction)

    def add_positions(self, position_fraction: torch.Tensor, tail: torch.Tensor | None = None) -> None:
        self.position_n += len(position_fraction)
        self.position_sum += position_fraction.sum(0, dtype=torch.float64)
        if tail is not None:
            self.tail_sum += tail.sum(0, dtype=torch.float64)

    def observe(self, rows: torch.Tensor, scratch: bool = False) -> None:
        """The position fractions of some whole outputs rows [R, ...] (R of the examples); scratch: rows are the
        caller's own copy, which this may overwrite."""
        tail = tail_fraction(rows, *self.tails) if self.tails else None  # before active_fraction may overwrite
        self.add_positions(active_fraction(rows, self.threshold, scratch), tail)

    def merge(self, other: "Activity") -> None:
        self.n += other.n
        self.position_n += other.position_n
        self.examples_active += other.examples_active
        self.position_sum += other.position_sum
        self.tail_sum += other.tail_sum

    def finalize(self) -> dict[str, np.ndarray]:
        return {"frac_active": (self.examples_active / max(self.n, 1)).cpu().numpy(),
                "position_activity": (self.position_sum / max(self.position_n, 1)).cpu().numpy(),
                "tail_activity": (self.tail_sum / max(self.position_n, 1)).cpu().numpy()}


class ClassMeans(Accumulator):
    """Mean finite value of every unit per class; examples labelled -1 (or past the classes) are left out."""

    def __init__(self, n_classes: int, n_units: int, device: torch.device | str = "cpu"):
        self.n_classes = n_classes
        # [C + 1, U] float64: row C gathers the unlabelled examples (no masking: one index_add per chunk)
        self.sums = torch.zeros(n_classes + 1, n_units, dtype=torch.float64, device=device)
        self.counts = torch.zeros(n_classes + 1, n_units, dtype=torch.float64, device=device)

    def update(self, values: torch.Tensor, labels: torch.Tensor) -> None:
        """values [R, U]; labels [R], -1 for unknown."""
        labels = labels.to(values.device).long()
        rows = torch.where((labels >= 0) & (labels < self.n_classes), labels, self.n_classes)
        finite = torch.isfinite(values)
        self.sums.index_add_(0, rows, torch.where(finite, values.double(), 0.0))
        self.counts.index_add_(0, rows, finite.double())

    def merge(self, other: "ClassMeans") -> None:
        self.sums += other.sums
        self.counts += other.counts

    def finalize(self) -> np.ndarray:
        """[U, C] class means, NaN for classes with no finite value."""
        sums, counts = self.sums[:-1].T, self.counts[:-1].T
        return torch.where(counts > 0, sums / counts.clamp(min=1), torch.nan).cpu().numpy()


def sample_ids(n_examples: int, size: int, seed: int) -> np.ndarray:
    """The seeded sample of example ids (ascending) kept by `SampleRows`: all of them if n <= size."""
    if size >= n_examples:
        return np.arange(n_examples)
    return np.sort(np.random.default_rng(seed).choice(n_examples, size=size, replace=False))


class SampleRows(Accumulator):
    """The values [S, U] (float16) of a fixed, seeded sample of examples (`sample_ids`); with `positions`, also
    where in each sampled example each unit peaked ([S, U] int16, its map's first maximum, as `TopK` keeps
    for its entries; -1 until placed): a text unit's examples across its activation range show their token."""

    def __init__(self, ids: np.ndarray, n_units: int, device: torch.device | str = "cpu", positions: bool = False):
        self.ids = np.asarray(ids, dtype=np.int64)
        self.matrix = torch.zeros(len(self.ids), n_units, dtype=torch.float16, device=device)
        self.filled = torch.zeros(len(self.ids), dtype=torch.bool, device=device)
        self.places = torch.full((len(self.ids), n_units), -1, dtype=torch.int16, device=device) if positions \
            else None

    def slots(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indices into ids of the sampled ones, their sample rows)."""
        ids = np.asarray(ids)
        slot = np.searchsorted(self.ids, ids).clip(max=max(len(self.ids) - 1, 0))
        hit = np.flatnonzero(self.ids[slot] == ids) if len(self.ids) else np.zeros(0, np.int64)
        return hit, slot[hit]

    def update(self, values: torch.Tensor, ids: np.ndarray) -> None:
        """values [R, U] of examples ids [R] (a host array)."""
        hit, slot = self.slots(ids)
        if len(hit):
            slots = torch.as_tensor(slot, device=self.matrix.device)
            self.matrix[slots] = values[torch.as_tensor(hit, device=values.device)].to(self.matrix)
            self.filled[slots] = True

    def place(self, positions: torch.Tensor, first: int) -> None:
        """positions [B, U] (each unit's first maximum) of examples first, first + 1, ...: the sampled ones'."""
        if self.places is None:
            return
        hit, slot = self.slots(np.arange(first, first + len(positions)))
        if len(hit):
            rows = positions.index_select(0, torch.as_tensor(hit, device=positions.device))
            self.places[torch.as_tensor(slot, device=self.places.device)] = rows.to(self.places)

    def merge(self, other: "SampleRows") -> None:
        self.matrix[other.filled] = other.matrix[other.filled]
        if self.places is not None:
            self.places[other.filled] = other.places[other.filled]
        self.filled |= other.filled

    def finalize(self) -> np.ndarray:
        return self.matrix.cpu().numpy()

    def positions(self) -> np.ndarray | None:
        """[S, U] int64 peak positions (-1: none), or None when not kept."""
        return None if self.places is None else self.places.cpu().numpy().astype(np.int64)


# --- one layer -------------------------------------------------------------------------

class LayerAccumulator(Accumulator):
    """Every accumulator of one layer, fed its live output batch by batch (`update`, in the forward hook).

    Per batch, what needs the whole output: the reduction to one value per
    unit, the top-/bottom-k with their maps, and the position activity of
    the batch's activity rows. The [B, U] values wait in a buffer and feed
    the other accumulators as one chunk at `flush` (fewer, larger ops).
    """

    def __init__(self, shape: tuple[int, ...], top_k: int, n_classes: int, sample: np.ndarray, activity: np.ndarray,
                 device: torch.device | str = "cpu", reduce: str = "max", threshold: float = 0.0,
                 dtype: torch.dtype = torch.float32, tails: tuple[float, float] | None = None,
                 buffer_rows: int = 256):
        """shape: the layer's output for one example (C x H x W, T x D or F); dtype: its type in the scan;
        threshold: active above it; tails: (low, high) of a squashing nonlinearity (see `Activity`);
        buffer_rows: examples whose values are buffered between chunk updates (a fuller buffer flushes)."""
        self.reduce, self.threshold, self.shape = reduce, threshold, tuple(shape)
        n_units = shape[0] if len(shape) == 3 else shape[-1]
        positions = int(np.prod(shape[1:])) if len(shape) == 3 else shape[0] if len(shape) == 2 else 0
        # the maps' state is allocated now, before the scan's first forward: made amid the model's large
        # temporaries, such long-lived blocks keep the allocator from reusing their memory, and every batch
        # then pays fresh pages (on resnet50, about 2.5M more page faults per 200 images)
        self.top = TopK(n_units, top_k, True, device, positions, dtype)
        self.bottom = TopK(n_units, top_k, False, device, positions, dtype, keep_maps=False)  # pages draw no maps
        self.moments = Moments(n_units, device)
        self.activity = Activity(n_units, threshold, device, tails)
        self.classes = ClassMeans(n_classes, n_units, device)
        # a token layer's (T x D) sample rows keep their peak tokens too (int16: T below 32,768)
        self.sample = SampleRows(sample, n_units, device, positions=len(shape) == 2 and shape[0] < 2**15)
        self.activity_ids = np.asarray(activity, np.int64)  # the examples whose position activity counts
        # the buffered values [rows, U] and labels of examples first, first + 1, ...: made once, as the maps'
        # state (a list of per-batch blocks, alive until the flush, scattered amid the forward's temporaries,
        # kept the allocator from returning their memory: the peak then grew with the dataset)
        self._values = torch.empty((max(1, buffer_rows), n_units), dtype=torch.float32, device=device)
        self._labels = torch.empty(max(1, buffer_rows), dtype=torch.long, device=device)
        self._rows, self._first = 0, 0

    def update(self, output: torch.Tensor, first: int, labels: torch.Tensor) -> None:
        """output: the live output [B, ...] of examples first, first + 1, ... (each batch follows the one
        before); labels [B] on its device."""
        maps = unit_maps(output)
        # where: a token layer's [B, U] first maxima over its tokens (for the bottom-k and the sample), else None
        if output.dim() == 3 and self.reduce == "max":
            values, where = output.max(dim=1)  # one pass for both
            values = values.float()
        else:
            values = unit_values(output, self.reduce)
            where = output.argmax(dim=1) if output.dim() == 3 else None
        top, bottom = key_pair(values, torch.arange(first, first + len(values), device=values.device))
        self.top.enter(top, maps)
        self.bottom.enter(bottom, maps, where)
        if where is not None:
            self.sample.place(where, first)
        lo, hi = np.searchsorted(self.activity_ids, [first, first + len(values)])
        rows = self.activity_ids[lo:hi] - first  # the batch's few activity rows (POSITION_SAMPLE in the scan)
        per = max(1, ACTIVITY_CHUNK // max(output[0].numel() * output.element_size(), 1))
        for at in range(0, len(rows), per):  # copied in chunks that stay in the cache
            chunk = torch.as_tensor(rows[at:at + per], device=output.device)
            self.activity.observe(output.index_select(0, chunk), scratch=True)
        if self._rows + len(values) > len(self._values):
            self.flush()
        if len(values) > len(self._values):  # a batch larger than the buffer: a chunk of its own
            self._feed(values, labels, first)
            return
        if not self._rows:
            self._first = first
        self._values[self._rows:self._rows + len(values)] = values
        self._labels[self._rows:self._rows + len(values)] = labels
        self._rows += len(values)

    @torch.inference_mode()  # the state was made in the scan's inference mode
    def flush(self) -> None:
        """Feed the buffered values to the moments, activity, class means and sample, as one chunk."""
        if self._rows:
            rows, self._rows = self._rows, 0
            self._feed(self._values[:rows], self._labels[:rows], self._first)

    def _feed(self, values: torch.Tensor, labels: torch.Tensor, first: int) -> None:
        self.moments.update(values)
        self.activity.update(values)
        self.classes.update(values, labels)
        self.sample.update(values, np.arange(first, first + len(values)))

    def parts(self) -> tuple:
        return self.top, self.bottom, self.moments, self.activity, self.classes, self.sample

    @torch.inference_mode()  # the state was made in the scan's inference mode
    def merge(self, other: "LayerAccumulator") -> None:
        self.flush()
        other.flush()
        for mine, theirs in zip(self.parts(), other.parts()):
            mine.merge(theirs)

    @torch.inference_mode()  # the state was made in the scan's inference mode
    def to(self, device) -> "LayerAccumulator":
        self.flush()
        for part in self.parts():
            part.to(device)
        return self
