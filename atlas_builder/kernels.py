"""Compiled loops behind the scan's accumulators, over plain numpy arrays.

Owns six numba kernels:

- `chunk_family`: in one read of a unit-major chunk ([U, R]: each unit's R
  values contiguous, as the scan buffers them), every per-unit sum the
  streaming accumulators need (count, centred sum and sum of squares, min,
  max, non-finite count, active count, per-class sums and non-finite counts), for a
  layer and the ReLUs derived from it, and their top-/bottom-k; units run
  in parallel (numba `prange`: each unit's sums and states are its own, so
  the result does not depend on the number of threads);
- `offer_maps`: the top-/bottom-k from one batch in the forward hook,
  copying each entering example's spatial map and its argmax (states and
  units in parallel);
- `active_positions`: the fraction of each unit's active positions on the
  batch's activity rows, read in place in the hook (rows and units in
  parallel);
- `fill_maps`: the second pass's copies of the maps its entries need;
- `histogram_rows`: every unit's histogram of its sampled activations (units in parallel);
- `selectivity_rows`: every unit's class-selectivity index and top class.

It does not own what the numbers mean (which values count, how chunks
merge, ties): the accumulators in `scan.py` do, and test these kernels
through them against brute force. The torch ops they replace cost, on a
small model, as much as its forward: about ten passes over each chunk, and
several small ops per layer per batch.
Compiled on first use and cached on disk (numba `cache=True`): about 22 s
for all of them once after an install (mostly the four parallel kernels),
then about 0.3 s per process to load.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, inline="always")
def _insert(keys, kept_ids, positions, s, u, key, example):  # pragma: no cover - compiled
    """Insert key (which beats keys[s, u, -1]) after the keys >= it; returns the new k-th key."""
    k = keys.shape[2]
    j = k - 1
    while j > 0 and keys[s, u, j - 1] < key:
        keys[s, u, j] = keys[s, u, j - 1]
        kept_ids[s, u, j] = kept_ids[s, u, j - 1]
        positions[s, u, j] = positions[s, u, j - 1]
        j -= 1
    keys[s, u, j] = key
    kept_ids[s, u, j] = example
    positions[s, u, j] = -1
    return keys[s, u, k - 1]


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "nsz"})
def _row_sums(row, relu, shift, threshold):  # pragma: no cover - compiled
    """(sum, sum of squares of value - shift, active count, non-finite count) of one row, vectorized.

    Reassociated (so the sums vectorize); the sums are only right when the
    row is all finite, which the non-finite count tells.
    """
    total = 0.0
    squares = 0.0
    active = 0
    bad = 0
    for r in range(row.shape[0]):
        x = row[r]
        if relu:
            x = max(x, np.float32(0.0))
        active += x > threshold
        bad += not np.isfinite(x)
        c = np.float64(x) - shift
        total += c
        squares += c * c
    return total, squares, active, bad


@numba.njit(cache=True, nogil=True, fastmath={"nnan", "nsz"})
def _row_range(row):  # pragma: no cover - compiled
    """(min, max) of a non-empty row without NaN, in 8 lanes so that it vectorizes
    (fastmath: only right without NaN)."""
    n = row.shape[0]
    lows = np.empty(8, np.float32)
    highs = np.empty(8, np.float32)
    for lane in range(8):
        lows[lane] = highs[lane] = row[0]
    whole = n - n % 8
    for j in range(0, whole, 8):
        for lane in range(8):
            x = row[j + lane]
            lows[lane] = x if x < lows[lane] else lows[lane]
            highs[lane] = x if x > highs[lane] else highs[lane]
    low, high = lows[0], highs[0]
    for lane in range(1, 8):
        low = lows[lane] if lows[lane] < low else low
        high = highs[lane] if highs[lane] > high else high
    for j in range(whole, n):
        x = row[j]
        low = x if x < low else low
        high = x if x > high else high
    return low, high


@numba.njit(cache=True, nogil=True)
def _row_hits(row, start, stop, relu, top, bottom):  # pragma: no cover - compiled
    """How many values of row[start:stop] (all finite) beat the k-th key of the top- or of the bottom-k (branch-free)."""
    hits = 0
    for r in range(start, stop):
        x = row[r]
        if relu:
            x = max(x, np.float32(0.0))
        hits += (x > top) | (-x > bottom)
    return hits


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "nsz"})
def _group_sums(row, rows, start, stop, relu):  # pragma: no cover - compiled
    """Sums (float64) of row[rows[start:stop]] and, when `relu`, of its ReLU (else 0.0), from one gather."""
    total = 0.0
    rectified = 0.0
    for j in range(start, stop):
        x = row[rows[j]]
        total += np.float64(x)
        if relu:
            rectified += np.float64(max(x, np.float32(0.0)))
    return total, rectified


OFFER_BLOCK = 64  # rows tested at once (vectorized) before any is inserted: most blocks have none to insert


@numba.njit(cache=True, nogil=True)
def _offer_row(row, relu, exact, ids, keys, kept_ids, positions, f, u):  # pragma: no cover - compiled
    """Insert one member's row into its top-k (state 2f) and bottom-k (2f + 1); non-finite values never enter.

    An all-finite row goes by blocks: a block none of whose values beats
    the current k-th keys is skipped after one vectorized test.
    """
    k = keys.shape[2]
    top = keys[2 * f, u, k - 1]
    bottom = keys[2 * f + 1, u, k - 1]
    n_rows = row.shape[0]
    for start in range(0, n_rows, OFFER_BLOCK):
        stop = min(start + OFFER_BLOCK, n_rows)
        if exact and _row_hits(row, start, stop, relu, top, bottom) == 0:
            continue
        for r in range(start, stop):
            x = row[r]
            if relu and x < 0:
                x = np.float32(0.0)
            if not exact and not np.isfinite(x):
                continue
            if x > top:
                top = _insert(keys, kept_ids, positions, 2 * f, u, x, ids[r])
            if -x > bottom:
                bottom = _insert(keys, kept_ids, positions, 2 * f + 1, u, -x, ids[r])


@numba.njit(cache=True, nogil=True, parallel=True)
def chunk_family(vt, labels, n_classes, threshold, ids, rectify, keys, kept_ids, positions, class_sums,
                 class_missing):  # pragma: no cover
    """Per-unit sums of a chunk for a layer and the ReLUs derived from it, and their top-/bottom-k, in one read.

    vt [U, R] float32; labels [R] int64 (outside [0, n_classes): no class).
    Member f sees the values as they are (rectify[f] False) or their ReLU
    (True; NaN stays NaN). Returns, each with a leading member axis [F, ...]:
    count, total, squares, shift, lo, hi, nonfinite, active [F, U], and the
    chunk's rows of each class [C]: count, lo and hi over the finite
    values; total and squares of (value - shift) in float64, shift being
    the unit's first finite value (a shift close to the data, so the
    variance loses nothing to cancellation); active: values above
    `threshold` (NaN never is, +Inf is). Adds in place, per member, unit and
    class ([F, U, C] float64, the class means' own accumulators), the sum of
    the finite values to class_sums and the count of the others to
    class_missing (a unit's class count is the class's rows less those: all
    but a few units have none, so no count is kept per unit). When keys is not empty
    ([2F, U, k]: key = sign * value, best first, -inf for an empty slot;
    kept_ids and positions alike, positions -1 for a new entry), state 2f is
    member f's top-k and 2f + 1 its bottom-k, updated in place: a key enters
    when it beats the k-th strictly and goes after the keys equal to it, so
    with ids ascending, above every id kept before, ties go to the lower id.
    NaN and +-Inf never enter; a state whose keys are +inf takes nothing.

    A unit's row is read by a few vectorized loops (sums, range, top-k
    hits) and one gathering loop per class present in the chunk and member
    for the class sums; a member whose row has NaN or Inf is summed again
    over its finite values.
    """
    n_units, n_rows = vt.shape
    n_members = rectify.shape[0]
    with_top = keys.shape[0] > 0
    count = np.zeros((n_members, n_units), np.int64)
    total = np.zeros((n_members, n_units))
    squares = np.zeros((n_members, n_units))
    shift = np.zeros((n_members, n_units))
    lo = np.full((n_members, n_units), np.inf)
    hi = np.full((n_members, n_units), -np.inf)
    nonfinite = np.zeros((n_members, n_units), np.int64)
    active = np.zeros((n_members, n_units), np.int64)
    valid = np.empty(n_rows, np.bool_)
    chunk_counts = np.zeros(n_classes)  # of every row with a class: a finite member's counts
    for r in range(n_rows):
        valid[r] = 0 <= labels[r] < n_classes
        if valid[r]:
            chunk_counts[labels[r]] += 1.0
    # the rows with a class, grouped by class (a stable counting sort): class sums read each group in turn
    bounds = np.zeros(n_classes + 1, np.int64)
    for c in range(n_classes):
        bounds[c + 1] = bounds[c] + np.int64(chunk_counts[c])
    fill = bounds[:-1].copy()
    by_class = np.empty(bounds[-1], np.int64)
    for r in range(n_rows):
        if valid[r]:
            by_class[fill[labels[r]]] = r
            fill[labels[r]] += 1
    present = np.flatnonzero(chunk_counts)  # the classes the chunk has rows of (it may be shorter than the list)
    zero = np.float32(0.0)
    any_relu = rectify.any()  # a flat layer alone needs no ReLU sums
    for u in numba.prange(n_units):
        row = vt[u]
        exact = np.empty(n_members, np.bool_)
        n_exact = 0
        ranged = False
        low = high = zero
        for f in range(n_members):
            relu = rectify[f]
            s = 0.0
            if n_rows:
                s = np.float64(max(row[0], zero)) if relu else np.float64(row[0])
            t, q, on, bad = _row_sums(row, relu, s, threshold)
            nonfinite[f, u], active[f, u] = bad, on
            exact[f] = bad == 0  # the usual case: all finite, the vectorized sums stand
            if exact[f]:
                n_exact += 1
                count[f, u], total[f, u], squares[f, u], shift[f, u] = n_rows, t, q, s
                if n_rows:
                    if not ranged:  # one read for every member: ReLU's range is ReLU of the range
                        low, high = _row_range(row)
                        ranged = True
                    lo[f, u], hi[f, u] = (max(low, zero), max(high, zero)) if relu else (low, high)
                continue
            # sums again over the finite values only, shifted by the first of them
            n, t, q, s = 0, 0.0, 0.0, 0.0
            for r in range(n_rows):
                if np.isfinite(row[r]):
                    s = np.float64(max(row[r], zero)) if relu else np.float64(row[r])
                    break
            least = np.float32(np.inf)
            most = np.float32(-np.inf)
            sums = class_sums[f, u]
            missing = class_missing[f, u]
            for r in range(n_rows):
                x = row[r]
                if relu and x < 0:
                    x = zero
                if not np.isfinite(x):
                    if valid[r]:
                        missing[labels[r]] += 1.0
                    continue
                c = np.float64(x) - s
                t += c
                q += c * c
                n += 1
                least = min(least, x)
                most = max(most, x)
                if valid[r]:
                    sums[labels[r]] += np.float64(x)
            count[f, u], total[f, u], squares[f, u], shift[f, u], lo[f, u], hi[f, u] = n, t, q, s, least, most
        if n_exact:  # the class sums of the finite members: each class's rows in turn, every member at once
            for c in present:  # (the members are the row or its ReLU: one gather gives both sums)
                plain, rectified = _group_sums(row, by_class, bounds[c], bounds[c + 1], any_relu)
                for f in range(n_members):
                    if exact[f]:
                        class_sums[f, u, c] += rectified if rectify[f] else plain
        if with_top:
            for f in range(n_members):
                _offer_row(row, rectify[f], exact[f], ids, keys, kept_ids, positions, f, u)
    return count, total, squares, shift, lo, hi, nonfinite, active, chunk_counts


@numba.njit(cache=True, nogil=True)
def _copy_map(source, target, relu):  # pragma: no cover - compiled
    """target[:] = source, or its ReLU (a map without NaN: that of an entering example); an explicit loop
    (a slice assignment costs more than a short map's copy)."""
    zero = np.float32(0.0)
    if relu:
        for m in range(source.shape[0]):
            target[m] = max(source[m], zero)
    else:
        for m in range(source.shape[0]):
            target[m] = source[m]


@numba.njit(cache=True, nogil=True)
def _first_argmax(row):  # pragma: no cover - compiled
    """The first position of a map's largest value (a map without NaN), -1 for an empty map."""
    if row.shape[0] == 0:
        return -1
    return _first_equal(row, _row_range(row)[1])


@numba.njit(cache=True, nogil=True)
def _first_equal(row, value):  # pragma: no cover - compiled
    """The first position of `value` in a non-empty map, 0 when it is not there."""
    for m in range(row.shape[0]):
        if row[m] == value:
            return m
    return 0


@numba.njit(cache=True, nogil=True)
def _map_position(row, value, is_max):  # pragma: no cover - compiled
    """The first argmax of an entering map whose value is `value`: when that is the map's max (`is_max`,
    `scan.reduce = "max"`), the first position equal to it (no pass to find the max), else `_first_argmax`."""
    return _first_equal(row, value) if is_max and row.shape[0] else _first_argmax(row)


@numba.njit(cache=True, nogil=True, parallel=True)
def offer_maps(values, maps, first, signs, rectify, is_max, keys, ints, state_maps):  # pragma: no cover - compiled
    """Offer one batch, with its maps, to S top-k states at once, in place: the forward hook's path on the CPU.

    values [B, U] float32, maps [B, U, M] float32 (the live layer output,
    any strides), of examples first .. first + B - 1, above every id offered before.
    State s (a top-k if signs[s] = 1, a bottom-k if -1; rectify[s]: of
    ReLU(values) and ReLU(maps), a ReLU derived from this layer): keys
    [S, U, k] (sign * value, best first, -inf empty); ints [S, 3, U, k]:
    example ids and positions in rank order, and the slot of each rank;
    state_maps [S, U, k, M] in slot order. A key enters when it beats the
    k-th strictly and goes after the keys equal to it (ties to the lower id);
    it takes the evicted entry's slot; once the batch is in, the entries
    from it that stayed get their maps copied to their slots and their
    positions (the map's first argmax; is_max: the values are the maps'
    max, so it is the first position equal to the value): an entry the same
    batch evicts again costs no copy. NaN and +-Inf never enter (so an
    entering map, whose max or mean its value is, holds no NaN either).
    """
    n_rows, n_units = values.shape
    n_states, _, k = keys.shape
    width = maps.shape[2]
    unit_major = np.empty((n_units, n_rows), np.float32)
    for b in range(n_rows):
        for u in range(n_units):
            unit_major[u, b] = values[b, u]
    for su in numba.prange(n_states * n_units):  # each (state, unit) writes only its own keys, ints and maps
        s, u = su // n_units, su % n_units
        sign = signs[s]
        relu = rectify[s]
        worst = keys[s, u, k - 1]
        row = unit_major[u]
        hits = 0  # usually none: a branch-free count first, the insertion loop only where needed
        for b in range(n_rows):
            x = row[b]
            if relu:
                x = x if x > 0 or x != x else np.float32(0.0)
            hits += (sign * x > worst) & (sign * x < np.float32(np.inf))
        if hits == 0:
            continue
        for b in range(n_rows):
            v = row[b]
            if relu and v < 0:
                v = np.float32(0.0)
            key = sign * v
            if not (key > worst and key < np.inf):
                continue
            slot = ints[s, 2, u, k - 1]
            j = k - 1
            while j > 0 and keys[s, u, j - 1] < key:
                keys[s, u, j] = keys[s, u, j - 1]
                for i in range(3):
                    ints[s, i, u, j] = ints[s, i, u, j - 1]
                j -= 1
            keys[s, u, j] = key
            ints[s, 0, u, j] = first + b
            ints[s, 2, u, j] = slot
            worst = keys[s, u, k - 1]
        for j in range(k):  # the maps of the entries that are still in after the whole batch, only
            if ints[s, 0, u, j] >= first:
                copied = state_maps[s, u, ints[s, 2, u, j]]
                _copy_map(maps[ints[s, 0, u, j] - first, u], copied, relu)
                ints[s, 1, u, j] = _map_position(copied, sign * keys[s, u, j], is_max)


@numba.njit(cache=True, nogil=True)
def fill_maps(maps, first, rows, units, slots, ranks, bottom, relu, top_maps, bottom_maps, top_positions,
              bottom_positions):  # pragma: no cover - compiled
    """The second pass's copies, in place: the maps of the planned entries whose pass rows lie in [first, first + B).

    maps [B, U, M] float32 (the live layer output, any strides) of pass
    rows first .. first + B - 1; entry e (rows ascending) is unit units[e],
    rank ranks[e] of the top-k (bottom[e] False) or of the bottom-k, whose
    map goes to slot slots[e] of top_maps / bottom_maps [U, k, M] (of its
    ReLU when relu) and whose position becomes the map's first argmax
    (top_positions / bottom_positions [U, k]).
    """
    lo = np.searchsorted(rows, first)
    hi = np.searchsorted(rows, first + maps.shape[0])
    for e in range(lo, hi):
        u = units[e]
        target = bottom_maps[u, slots[e]] if bottom[e] else top_maps[u, slots[e]]
        _copy_map(maps[rows[e] - first, u], target, relu)
        if bottom[e]:
            bottom_positions[u, ranks[e]] = _first_argmax(target)
        else:
            top_positions[u, ranks[e]] = _first_argmax(target)


@numba.njit(cache=True, nogil=True, parallel=True)
def histogram_rows(vt, bins):  # pragma: no cover - compiled
    """Per unit row of vt [U, S] float32: `bins` equal bins between its finite min and max.

    Returns (counts [U, bins] int64, lo [U], hi [U] float32); a unit with no
    finite value has lo = hi = 0 and no counts. The bin of x is
    floor((x - lo) / width * bins), clipped to the last bin, width = max(hi - lo, 1e-12),
    computed in float32 as numpy's histogram over the same edges would.
    """
    n_units, n_rows = vt.shape
    counts = np.zeros((n_units, bins), np.int64)
    lo = np.zeros(n_units, np.float32)
    hi = np.zeros(n_units, np.float32)
    for u in numba.prange(n_units):  # each unit's row and counts its own: the same result on any number of threads
        row = vt[u]
        low = np.float32(np.inf)
        high = np.float32(-np.inf)
        for r in range(n_rows):
            x = row[r]
            if np.isfinite(x):
                if x < low:
                    low = x
                if x > high:
                    high = x
        if not np.isfinite(low):
            continue
        lo[u], hi[u] = low, high
        width = max(high - low, np.float32(1e-12))
        for r in range(n_rows):
            x = row[r]
            if np.isfinite(x):
                i = int(np.floor((x - low) / width * np.float32(bins)))
                counts[u, min(max(i, 0), bins - 1)] += 1
    return counts, lo, hi


@numba.njit(cache=True, nogil=True, parallel=True)
def active_positions(maps, rows, threshold, rectify):  # pragma: no cover - compiled
    """Fraction of each unit's positions above `threshold` on some rows of a live output, read in place.

    maps [B, U, M] float32 (any strides), rows [n] int64: which batch rows;
    member f counts ReLU(value) when rectify[f]. Returns [F, n, U] float32
    (count / M; NaN is never above the threshold), what `probe.active_fraction`
    gives on a copy of those rows.
    """
    n_members = rectify.shape[0]
    n_units, width = maps.shape[1], maps.shape[2]
    out = np.zeros((n_members, rows.shape[0], n_units), np.float32)
    zero = np.float32(0.0)
    for iu in numba.prange(rows.shape[0] * n_units):  # each (row, unit) writes only its own counts
        i, u = iu // n_units, iu % n_units
        b = rows[i]
        for f in range(n_members):
            relu = rectify[f]
            above = 0
            for m in range(width):
                x = maps[b, u, m]
                if relu and x < 0:
                    x = zero
                above += x > threshold
            out[f, i, u] = np.float32(above) / np.float32(width)
    return out


@numba.njit(cache=True, nogil=True)
def selectivity_rows(means):  # pragma: no cover - compiled
    """Class-selectivity index and top class of each row of class means [U, C] float64 (NaN: a class without
    examples), in one read: the means are clipped at 0; mu_max is the largest (the first, on ties: its class
    is the top class, -1 for none), mu_rest the mean of the others; index (mu_max - mu_rest) / (mu_max +
    mu_rest), 0 when both are 0, NaN with fewer than 2 classes present."""
    n_units, n_classes = means.shape
    index = np.empty(n_units)
    top = np.empty(n_units, np.int64)
    for u in range(n_units):
        n = 0
        best = -np.inf
        arg = -1
        total = 0.0
        for c in range(n_classes):
            x = means[u, c]
            if x != x:
                continue
            x = max(x, 0.0)
            n += 1
            total += x
            if x > best:
                best = x
                arg = c
        top[u] = arg
        if n < 2:
            index[u] = np.nan
            continue
        rest = (total - best) / (n - 1)
        index[u] = (best - rest) / (best + rest) if best + rest > 0 else 0.0
    return index, top
