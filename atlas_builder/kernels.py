"""Compiled loops behind the scan's accumulators: one pass over each unit's row of a chunk.

Owns two numba kernels over plain numpy arrays, unit-major ([U, R]: each
unit's R values contiguous, which is how the scan buffers them):

- `chunk_stats`: in one read of the chunk, every per-unit sum the streaming
  accumulators need (count, centred sum and sum of squares, min, max,
  non-finite count, active count, per-class sums and counts);
- `insert_top`: a running top-k per unit, updated in place by insertion.

It does not own what the numbers mean (which values count, how chunks
merge, ties): the accumulators in `scan.py` do, and test these kernels
through them against brute force. The torch ops they replace made about ten
passes over the chunk, which on a small model cost as much as its forward.
Compiled on first use and cached on disk (numba `cache=True`), so only the
first scan after an install pays the compile (about a second each).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def chunk_stats(vt, labels, n_classes, threshold):  # pragma: no cover - compiled
    """Per-unit sums of a chunk vt [U, R] float32; labels [R] int64 (outside [0, n_classes): no class).

    Returns (count, total, squares, shift, lo, hi, nonfinite, active,
    class_sums [C, U], class_counts [C, U]): count, lo and hi over the finite
    values; total and squares of (value - shift) in float64, shift being the
    unit's first finite value (a shift close to the data, so the variance
    loses nothing to cancellation); active: values above `threshold` (NaN
    never is, +Inf is); class sums are of the uncentred finite values.
    """
    n_units, n_rows = vt.shape
    count = np.zeros(n_units, np.int64)
    total = np.zeros(n_units)
    squares = np.zeros(n_units)
    shift = np.zeros(n_units)
    lo = np.full(n_units, np.inf)
    hi = np.full(n_units, -np.inf)
    nonfinite = np.zeros(n_units, np.int64)
    active = np.zeros(n_units, np.int64)
    class_sums = np.zeros((n_classes, n_units))
    class_counts = np.zeros((n_classes, n_units))
    sums = np.zeros(n_classes)
    counts = np.zeros(n_classes)
    for u in range(n_units):
        row = vt[u]
        s = 0.0
        for r in range(n_rows):
            if np.isfinite(row[r]):
                s = np.float64(row[r])
                break
        n = 0
        bad = 0
        on = 0
        t = 0.0
        q = 0.0
        low = np.inf
        high = -np.inf
        sums[:] = 0.0
        counts[:] = 0.0
        for r in range(n_rows):
            x = row[r]
            if x > threshold:
                on += 1
            if not np.isfinite(x):
                bad += 1
                continue
            c = np.float64(x) - s
            t += c
            q += c * c
            n += 1
            if x < low:
                low = x
            if x > high:
                high = x
            label = labels[r]
            if 0 <= label < n_classes:
                sums[label] += c
                counts[label] += 1.0
        count[u], total[u], squares[u], shift[u] = n, t, q, s
        lo[u], hi[u], nonfinite[u], active[u] = low, high, bad, on
        for label in range(n_classes):
            class_sums[label, u] = sums[label] + counts[label] * s
            class_counts[label, u] = counts[label]
    return count, total, squares, shift, lo, hi, nonfinite, active, class_sums, class_counts


@numba.njit(cache=True, nogil=True)
def insert_top(vt, ids, sign, keys, kept_ids, positions):  # pragma: no cover - compiled
    """Offer a chunk vt [U, R] float32 (row r is example ids[r]) to each unit's top-k keys [U, k], in place.

    A key is sign * value; keys are kept best first, -inf for an empty slot,
    with their example ids and positions (-1 for a new entry). A key enters
    when it beats the k-th strictly, and goes after the keys equal to it: so
    with ids ascending, and above every id already kept, ties go to the
    lower id. NaN and +-Inf never enter.
    """
    n_units, n_rows = vt.shape
    k = keys.shape[1]
    for u in range(n_units):
        worst = keys[u, k - 1]
        for r in range(n_rows):
            key = sign * vt[u, r]
            if key > worst and key < np.inf:
                j = k - 1
                while j > 0 and keys[u, j - 1] < key:
                    keys[u, j] = keys[u, j - 1]
                    kept_ids[u, j] = kept_ids[u, j - 1]
                    positions[u, j] = positions[u, j - 1]
                    j -= 1
                keys[u, j] = key
                kept_ids[u, j] = ids[r]
                positions[u, j] = -1
                worst = keys[u, k - 1]
