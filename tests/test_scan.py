"""Scan accumulators, summary helpers and the scan loop against brute-force computations.

Every brute force below holds all activations in memory (numpy) and computes the
statistic directly; the streaming accumulators must agree with it for every batch
size, for shards merged in either order, and with NaN/Inf activations mixed in.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import fixtures_models
from atlas_builder import scan as scan_mod
from atlas_builder.config import ModelSection, ScanSection
from atlas_builder.errors import AtlasError
from atlas_builder.probe import LayerInfo, active_fraction, reduce_output
from atlas_builder.scan import (Activity, ClassMeans, LayerAccumulator, Moments, SampleRows, TopK, class_selectivity,
                                histogram, redundancy, sample_ids, scan_model, summarize)
from atlas_builder.sources import AtlasDataset, LoadedModel

CPU = torch.device("cpu")


# --- brute force ----------------------------------------------------------------------

def brute_topk(values: np.ndarray, k: int, largest: bool = True):
    """values [N, U] -> per unit the k largest (smallest) finite values, ties to the lower id.

    Returns values [U, k], ids [U, k], valid [U, k]; entries past the number of finite
    values are invalid (value NaN, id -1).
    """
    n, n_units = values.shape
    cols = k
    out_v = np.full((n_units, cols), np.nan)
    out_i = np.full((n_units, cols), -1, dtype=np.int64)
    valid = np.zeros((n_units, cols), dtype=bool)
    for u in range(n_units):
        col = values[:, u].astype(np.float64)
        finite = np.flatnonzero(np.isfinite(col))
        key = -col[finite] if largest else col[finite]
        order = finite[np.lexsort((finite, key))][:cols]  # by key, then by id
        out_i[u, :len(order)] = order
        out_v[u, :len(order)] = col[order]
        valid[u, :len(order)] = True
    return out_v, out_i, valid


def brute_moments(values: np.ndarray) -> dict[str, np.ndarray]:
    v = values.astype(np.float64)
    finite = np.isfinite(v)
    m = np.where(finite, v, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns -> NaN
        return {"count": finite.sum(0), "nonfinite": (~finite).sum(0), "mean": np.nanmean(m, 0),
                "std": np.nanstd(m, 0), "min": np.nanmin(m, 0), "max": np.nanmax(m, 0)}


def check_topk(result, values, positions, maps, k, largest, rtol=0.0):
    """A TopKResult against the brute force over all activations (values/positions [N, U], maps [N, U, M]).

    rtol > 0 lets values and maps differ by float rounding (a model run on batches of another size).
    """
    bv, bi, bvalid = brute_topk(values, k, largest)
    np.testing.assert_array_equal(result.valid, bvalid)
    np.testing.assert_array_equal(result.ids[bvalid], bi[bvalid])
    same(result.values[bvalid], bv[bvalid].astype(np.float32), rtol, "values")
    assert np.isfinite(result.values[result.valid]).all()
    units = np.broadcast_to(np.arange(values.shape[1])[:, None], bi.shape)
    np.testing.assert_array_equal(result.positions[bvalid], positions[bi[bvalid], units[bvalid]])
    if maps is None:
        assert result.maps is None
    else:
        assert result.maps.shape == (*bi.shape, maps.shape[2])
        # kept as float16 (documented) or float32: either way the exact map, in that precision
        same(result.maps[bvalid], maps[bi[bvalid], units[bvalid]].astype(result.maps.dtype), rtol, "maps")


def same(x, y, rtol: float = 0.0, name: str = ""):
    """Arrays identical; with rtol, float arrays equal up to that (float16 ones up to its own precision)."""
    x, y = np.asarray(x), np.asarray(y)
    if rtol and x.dtype.kind == "f":
        r = max(rtol, 2e-3) if np.float16 in (x.dtype, y.dtype) else rtol
        finite = y[np.isfinite(y)]
        atol = r * float(np.abs(finite).max()) if finite.size else 0.0
        np.testing.assert_allclose(x.astype(np.float64), y.astype(np.float64), rtol=r, atol=atol, equal_nan=True,
                                   err_msg=name)
    else:
        np.testing.assert_array_equal(x, y, err_msg=name)


def assert_results_equal(a, b, rtol: float = 0.0):
    """Two TopKResults identical in every array (invalid entries included)."""
    for name in ("values", "ids", "positions", "valid"):
        same(getattr(a, name), getattr(b, name), rtol, name)
    if a.maps is None or b.maps is None:
        assert a.maps is None and b.maps is None
    else:
        same(a.maps, b.maps, rtol, "maps")


def random_activations(n=60, n_units=6, n_map=5, seed=0, decimals=1):
    """values [N, U] rounded (many ties) with planted ties at the top and bottom, positions, float16 maps."""
    rng = np.random.default_rng(seed)
    values = np.round(rng.normal(size=(n, n_units)), decimals).astype(np.float32)
    if n > 41:
        values[[11, 23, 40, 41], 2] = 9.0  # four-way tie at the top of unit 2: ids 11, 23, 40, 41 in that order
        values[[5, 33, 34], 4] = -9.0  # three-way tie at the bottom of unit 4
    positions = rng.integers(0, n_map, size=(n, n_units)).astype(np.int64)
    maps = rng.normal(size=(n, n_units, n_map)).astype(np.float16)
    return values, positions, maps


def with_nonfinite(values: np.ndarray, seed=1, kinds=(np.nan, np.inf, -np.inf)) -> np.ndarray:
    """A copy with non-finite values (of `kinds`) in units 0, 1 and 3 only: unit 0 in a third of the rows,
    unit 1 everywhere but ids 7 and N-3, unit 3 everywhere."""
    rng = np.random.default_rng(seed)
    dirty = values.copy()
    n = len(values)
    rows = rng.choice(n, size=n // 3, replace=False)
    dirty[rows, 0] = rng.choice(kinds, size=len(rows))
    dirty[:, 1] = rng.choice(kinds, size=n)
    dirty[[7, n - 3], 1] = [0.25, -0.5]
    dirty[:, 3] = rng.choice(kinds, size=n)
    return dirty


NAN_ONLY = (np.nan,)
MIXED = (np.nan, np.inf, -np.inf)


def feed_topk(acc: TopK, values, positions, maps, ids, batch: int, with_maps: bool = True) -> TopK:
    for i in range(0, len(ids), batch):
        sl = slice(i, i + batch)
        acc.update(torch.from_numpy(values[sl]), torch.from_numpy(ids[sl]), torch.from_numpy(positions[sl]),
                   torch.from_numpy(maps[sl]) if with_maps else None)
    return acc


def test_scan_model_mean_reduce_keeps_each_maps_first_argmax(maps_mode):
    """With scan.reduce = "mean" a value is not its map's max; the kept position is still the map's first argmax."""
    data = fixtures_models.tiny_dataset()
    result, model = run_scan(data, reduce="mean")
    outputs, _ = brute_outputs(model, data.images)
    for layer in result.layers[:2]:  # conv and relu: maps
        maps = outputs[layer.info.name].flatten(2)
        values, positions = maps.mean(2).numpy(), maps.argmax(2).numpy()
        for top, largest in ((layer.top, True), (layer.bottom, False)):
            check_topk(top, values, positions, maps.numpy(), 4, largest, rtol=1e-6)


def topk_pass(values, positions, maps, k, largest, batch, ids=None, with_maps=True) -> TopK:
    ids = np.arange(len(values)) if ids is None else ids
    return feed_topk(TopK(values.shape[1], k, largest), values[ids], positions[ids], maps[ids], ids, batch,
                     with_maps)


@pytest.fixture(params=["in-hook", "deferred"])
def maps_mode(request, monkeypatch) -> str:
    """Both ways the scan gets the top-k maps: in the hook by the compiled kernel, or from a second pass
    (scan.defer_maps: for datasets much larger than the map slots, and off the CPU)."""
    monkeypatch.setattr(scan_mod, "DEFER_MAPS", 10**12 if request.param == "in-hook" else 0)
    return request.param


def chunk_pass(values, k, largest, chunk) -> TopK:
    """A TopK fed by offer_chunk (the deferred scan's bulk path), `chunk` rows at a time, ids ascending."""
    acc = TopK(values.shape[1], k, largest)
    for i in range(0, len(values), chunk):
        unit_major = torch.from_numpy(np.ascontiguousarray(values[i:i + chunk].T))
        acc.offer_chunk(unit_major.T, torch.arange(i, min(i + chunk, len(values))))
    acc.fold()
    return acc


# --- TopK ------------------------------------------------------------------------------

@pytest.mark.parametrize("largest", [True, False])
def test_topk_matches_brute_force_for_every_batch_size(largest):
    values, positions, maps = random_activations()
    k = 5
    results = [topk_pass(values, positions, maps, k, largest, batch).finalize() for batch in (1, 4, 7, 60, 100)]
    for result in results:
        check_topk(result, values, positions, maps, k, largest)
        assert_results_equal(result, results[0])
        assert result.valid.all() and result.values.shape == (6, k)
    best = results[0]
    if largest:
        np.testing.assert_array_equal(best.ids[2, :4], [11, 23, 40, 41])  # planted tie: lower ids first
        np.testing.assert_array_equal(best.values[2, :4], [9.0] * 4)
        assert (np.diff(best.values, axis=1) <= 0).all()
    else:
        np.testing.assert_array_equal(best.ids[4, :3], [5, 33, 34])
        np.testing.assert_array_equal(best.values[4, :3], [-9.0] * 3)
        assert (np.diff(best.values, axis=1) >= 0).all()


@pytest.mark.parametrize("largest", [True, False])
def test_topk_ties_across_batches_go_to_lower_ids(largest):
    """All values equal: the k lowest ids win, whatever the batch boundaries."""
    n, k = 23, 6
    values = np.full((n, 2), 1.5, dtype=np.float32)
    positions = np.tile(np.arange(n)[:, None], (1, 2))
    maps = np.broadcast_to(np.arange(n, dtype=np.float16)[:, None, None], (n, 2, 3)).copy()
    for batch in (1, 2, 5, 23):
        result = topk_pass(values, positions, maps, k, largest, batch).finalize()
        np.testing.assert_array_equal(result.ids, [list(range(k))] * 2)
        np.testing.assert_array_equal(result.positions, result.ids)
        np.testing.assert_array_equal(result.maps[:, :, 0], result.ids.astype(np.float16))


def test_topk_without_maps_keeps_none():
    values, positions, maps = random_activations(seed=3)
    result = topk_pass(values, positions, maps, 4, True, 9, with_maps=False).finalize()
    check_topk(result, values, positions, None, 4, True)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("kinds", [None, NAN_ONLY, MIXED])
def test_topk_offer_chunk_matches_brute_force(largest, kinds):
    """The bulk path: ties at the k-th value (rounded values, planted ties, a ReLU's zeros) go to the lower ids."""
    values, _, _ = random_activations(n=300, seed=8, decimals=0)
    values[:, 5] = np.maximum(values[:, 5], 0)  # mostly zeros: the bottom-k is a tie among hundreds
    values[250:, 4] = -9.0  # the bottom tie of unit 4 again, late in the pass
    if kinds is not None:
        values = with_nonfinite(values, kinds=kinds)
    for chunk in (1, 7, 64, 300):
        for k in (1, 5):
            result = chunk_pass(values, k, largest, chunk).finalize()
            check_topk(result, values, np.full(values.shape, -1), None, k, largest)


def test_topk_offer_chunk_ties_beyond_the_searched_prefix():
    """A tie whose lowest-id entries come late in a long chunk: the k lowest ids among them win."""
    n, k = 2000, 3
    values = np.zeros((n, 2), dtype=np.float32)
    values[:, 0] = np.arange(n)  # no tie at all
    values[:1500, 1] = 5.0
    values[1500:, 1] = 1.0  # the bottom-k of unit 1: ids 1500, 1501, 1502, past the prefix
    result = chunk_pass(values, k, False, n).finalize()
    check_topk(result, values, np.full(values.shape, -1), None, k, False)
    np.testing.assert_array_equal(result.ids[1], [1500, 1501, 1502])


def test_topk_fewer_examples_than_k_keeps_all():
    values, positions, maps = random_activations(n=3, seed=4)
    result = topk_pass(values, positions, maps, 10, True, 2).finalize()
    assert result.values.shape == (6, 10)
    np.testing.assert_array_equal(result.valid, np.broadcast_to(np.arange(10) < 3, (6, 10)))
    check_topk(result, values, positions, maps, 10, True)


@pytest.mark.parametrize("largest", [True, False])
def test_topk_position_is_the_argmax_of_the_map_when_not_given(largest):
    values, positions, maps = random_activations(seed=9)
    acc = TopK(6, 4, largest)
    for i in range(0, 60, 7):
        acc.update(torch.from_numpy(values[i:i + 7]), torch.arange(i, min(i + 7, 60)), None,
                   torch.from_numpy(maps[i:i + 7]))
    result = acc.finalize()
    check_topk(result, values, maps.astype(np.float32).argmax(2), maps, 4, largest)
    bare = TopK(6, 4, largest)
    bare.update(torch.from_numpy(values), torch.arange(60))
    result = bare.finalize()
    assert result.maps is None and (result.positions == -1).all()
    check_topk(result, values, np.full(values.shape, -1), None, 4, largest)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("split", ["contiguous", "interleaved"])
def test_topk_merge_of_two_shards_in_either_order_equals_one_pass(largest, split):
    values, positions, maps = random_activations(n=70, seed=5)
    values = with_nonfinite(values, seed=6)
    k = 6
    whole = topk_pass(values, positions, maps, k, largest, 8).finalize()
    check_topk(whole, values, positions, maps, k, largest)
    ids = np.arange(70)
    a_ids, b_ids = (ids[:31], ids[31:]) if split == "contiguous" else (ids[::2], ids[1::2])
    for first, second in ((a_ids, b_ids), (b_ids, a_ids)):
        acc = topk_pass(values, positions, maps, k, largest, 5, ids=first)
        acc.merge(topk_pass(values, positions, maps, k, largest, 3, ids=second))
        assert_results_equal(acc.finalize(), whole)


def test_topk_merge_with_an_empty_shard():
    values, positions, maps = random_activations(seed=7)
    whole = topk_pass(values, positions, maps, 4, True, 10)
    empty = TopK(6, 4)
    empty.merge(whole)
    assert_results_equal(empty.finalize(), whole.finalize())
    whole.merge(TopK(6, 4))
    check_topk(whole.finalize(), values, positions, maps, 4, True)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("kinds,batch", [
    (NAN_ONLY, 1), (NAN_ONLY, 6), (NAN_ONLY, 50),
    (MIXED, 1), (MIXED, 4), (MIXED, 6), (MIXED, 50),
], ids=["nan-1", "nan-6", "nan-50", "mixed-1", "mixed-4", "mixed-6", "mixed-50"])
def test_topk_nonfinite_never_kept_and_other_units_unchanged(largest, kinds, batch):
    values, positions, maps = random_activations(n=50, seed=8)
    dirty = with_nonfinite(values, kinds=kinds)
    k = 5
    clean = topk_pass(values, positions, maps, k, largest, batch).finalize()
    result = topk_pass(dirty, positions, maps, k, largest, batch).finalize()
    check_topk(result, dirty, positions, maps, k, largest)
    assert result.valid[0].all()  # unit 0 still has plenty of finite values
    np.testing.assert_array_equal(result.valid[1], [True, True, False, False, False])
    assert set(result.ids[1, :2]) == {7, 47}
    assert not result.valid[3].any()  # no finite value at all
    for u in (2, 4, 5):  # untouched units: identical to the clean run
        for name in ("values", "ids", "positions", "valid", "maps"):
            np.testing.assert_array_equal(getattr(result, name)[u], getattr(clean, name)[u])


@pytest.mark.parametrize("largest", [True, False])
def test_topk_infinite_values_do_not_crowd_out_finite_ones(largest):
    """One batch larger than k in which unit 0 has 5 infinite values: its k best finite values must be kept.

    Regression: the flood pre-selection ranked +Inf (top) / -Inf (bottom) first, fold then dropped them.
    """
    values = torch.arange(20, dtype=torch.float32).view(20, 1).repeat(1, 2)
    values[15:, 0] = torch.inf if largest else -torch.inf
    if not largest:
        values[:, 0] = values[:, 0].flip(0)  # the infinities come first: ids 0..4
    acc = TopK(2, 3, largest)
    acc.update(values, torch.arange(20))
    result = acc.finalize()
    assert result.valid.all(), result.values
    check_topk(result, values.numpy(), np.full((20, 2), -1), None, 3, largest)


# --- Moments ---------------------------------------------------------------------------

def moments_pass(values: np.ndarray, batch: int) -> Moments:
    acc = Moments(values.shape[1])
    for i in range(0, len(values), batch):
        acc.update(torch.from_numpy(values[i:i + batch]))
    return acc


# float32 activations, float64 statistics: equal to numpy's up to float64 rounding (summation order)
MOMENT_RTOL = {"mean": 1e-12, "std": 1e-10, "min": 0.0, "max": 0.0}


def check_moments(result, values):
    brute = brute_moments(values)
    np.testing.assert_array_equal(result["count"], brute["count"])
    np.testing.assert_array_equal(result["nonfinite"], brute["nonfinite"])
    for name, rtol in MOMENT_RTOL.items():
        np.testing.assert_allclose(result[name], brute[name], rtol=rtol, atol=1e-12, equal_nan=True, err_msg=name)


def test_moments_match_brute_force_for_every_batch_size_and_merge():
    rng = np.random.default_rng(10)
    values = (rng.normal(size=(101, 5)) * [1, 3, 0.01, 100, 1] + [0, 1, 5, -40, 1e3]).astype(np.float32)
    for batch in (1, 13, 50, 101):
        check_moments(moments_pass(values, batch).finalize(), values)
    whole = moments_pass(values, 17).finalize()
    for cut in (1, 30, 100):
        for first, second in ((values[:cut], values[cut:]), (values[cut:], values[:cut])):
            acc = moments_pass(first, 7)
            acc.merge(moments_pass(second, 11))
            merged = acc.finalize()
            check_moments(merged, values)
            for name in whole:
                np.testing.assert_allclose(merged[name], whole[name], rtol=MOMENT_RTOL.get(name, 0.0), equal_nan=True)


def test_moments_std_of_a_large_offset_small_spread_unit():
    """Regression: a float32 fast path subtracting a float32-rounded mean biased such a std by ~1e-5 relative."""
    rng = np.random.default_rng(13)
    values = (3000 + 0.01 * rng.normal(size=(1000, 2))).astype(np.float32)
    values[:, 1] = 1e4 + 1e-3 * rng.normal(size=1000)
    for batch in (1000, 64):
        result = moments_pass(values, batch).finalize()
        np.testing.assert_allclose(result["std"], values.astype(np.float64).std(0), rtol=1e-9)


def test_moments_nonfinite_counted_and_other_units_unchanged():
    rng = np.random.default_rng(11)
    values = rng.normal(size=(60, 6)).astype(np.float32)
    dirty = with_nonfinite(values, seed=12)
    for batch in (1, 8, 60):
        clean = moments_pass(values, batch).finalize()
        result = moments_pass(dirty, batch).finalize()
        check_moments(result, dirty)
        assert result["count"][3] == 0 and result["nonfinite"][3] == 60
        assert np.isnan([result[name][3] for name in ("mean", "std", "min", "max")]).all()
        assert result["count"][1] == 2 and result["min"][1] == -0.5 and result["max"][1] == 0.25
        assert (result["nonfinite"][[2, 4, 5]] == 0).all()
        for name in clean:
            np.testing.assert_allclose(result[name][[2, 4, 5]], clean[name][[2, 4, 5]],
                                       rtol=MOMENT_RTOL.get(name, 0.0), err_msg=name)
    a, b = moments_pass(dirty[:25], 4), moments_pass(dirty[25:], 9)
    b.merge(a)
    check_moments(b.finalize(), dirty)


# --- Activity --------------------------------------------------------------------------

def random_conv(n=45, seed=20):
    """[N, U, H, W] conv outputs with an always-active unit 1 and a never-active unit 2."""
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(n, 5, 3, 4, generator=g)
    out[:, 1] = out[:, 1].abs() + 1.0
    out[:, 2] = -out[:, 2].abs()
    return out


def activity_pass(out: torch.Tensor, threshold: float, batch: int, reduce="max") -> Activity:
    acc = Activity(out.shape[1], threshold)
    for i in range(0, len(out), batch):
        chunk = out[i:i + batch]
        acc.update(reduce_output(chunk, reduce)[0], active_fraction(chunk, threshold))
    return acc


@pytest.mark.parametrize("threshold", [0.0, 0.7])
def test_activity_matches_brute_force_and_merge(threshold):
    out = random_conv()
    o = out.numpy().astype(np.float64)
    brute_frac = (o.max(axis=(2, 3)) > threshold).mean(0)
    brute_pos = (o > threshold).mean(axis=(2, 3)).mean(0)
    whole = None
    for batch in (1, 7, 45):
        result = activity_pass(out, threshold, batch).finalize()
        np.testing.assert_allclose(result["frac_active"], brute_frac, rtol=1e-12)
        np.testing.assert_allclose(result["position_activity"], brute_pos, rtol=1e-6)
        whole = whole or result
    assert whole["frac_active"][1] == 1 and whole["position_activity"][1] == 1
    assert whole["frac_active"][2] == 0 and whole["position_activity"][2] == 0
    assert 0 < whole["position_activity"][0] < whole["frac_active"][0] <= 1
    for first, second in ((out[:20], out[20:]), (out[20:], out[:20])):
        acc = activity_pass(first, threshold, 6)
        acc.merge(activity_pass(second, threshold, 4))
        merged = acc.finalize()
        np.testing.assert_allclose(merged["frac_active"], brute_frac, rtol=1e-12)
        np.testing.assert_allclose(merged["position_activity"], brute_pos, rtol=1e-6)


def test_activity_flat_outputs_position_activity_is_frac_active():
    values = torch.randn(30, 4, generator=torch.Generator().manual_seed(21))
    acc = Activity(4, 0.2)
    acc.update(values, active_fraction(values, 0.2))
    result = acc.finalize()
    np.testing.assert_allclose(result["frac_active"], (values.numpy() > 0.2).mean(0))
    np.testing.assert_array_equal(result["position_activity"], result["frac_active"])


def test_activity_position_fraction_of_a_subset_of_rows():
    """The position activity may be measured on some rows only (the scan's sample): it averages over those."""
    out = random_conv(n=40, seed=23)
    rows = np.array([0, 3, 4, 9, 17, 18, 30, 39])
    whole = Activity(5, 0.0)
    a, b = Activity(5, 0.0), Activity(5, 0.0)
    for i in range(0, 40, 10):
        chunk = out[i:i + 10]
        mine = torch.from_numpy(rows[(rows >= i) & (rows < i + 10)] - i)
        fraction = active_fraction(chunk[mine], 0.0) if len(mine) else None
        whole.update(reduce_output(chunk, "max")[0], fraction)
        (a if i < 20 else b).update(reduce_output(chunk, "max")[0], fraction)
    b.merge(a)
    o = out.numpy()
    for result in (whole.finalize(), b.finalize()):
        np.testing.assert_allclose(result["frac_active"], (o.max(axis=(2, 3)) > 0).mean(0))
        np.testing.assert_allclose(result["position_activity"], (o[rows] > 0).mean(axis=(2, 3)).mean(0), rtol=1e-6)


def test_activity_nonfinite_not_active_and_other_units_unchanged():
    out = random_conv(seed=22)
    dirty = out.clone()
    dirty[::3, 0, 1, 2] = torch.nan
    dirty[1::3, 0, 0, 0] = -torch.inf
    dirty[2::5, 3, 2, 1] = torch.inf
    clean = activity_pass(out, 0.0, 8).finalize()
    result = activity_pass(dirty, 0.0, 8).finalize()
    d = dirty.numpy()
    np.testing.assert_allclose(result["position_activity"], (d > 0).mean(axis=(2, 3)).mean(0), rtol=1e-6)
    for name in clean:
        np.testing.assert_array_equal(result[name][[1, 2, 4]], clean[name][[1, 2, 4]])


# --- ClassMeans ------------------------------------------------------------------------

def class_pass(values: np.ndarray, labels: np.ndarray, n_classes: int, batch: int) -> ClassMeans:
    acc = ClassMeans(n_classes, values.shape[1])
    for i in range(0, len(values), batch):
        acc.update(torch.from_numpy(values[i:i + batch]), torch.from_numpy(labels[i:i + batch]))
    return acc


def brute_class_means(values: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.full((values.shape[1], n_classes), np.nan)
    for c in range(n_classes):
        for u in range(values.shape[1]):
            col = values[labels == c, u].astype(np.float64)
            col = col[np.isfinite(col)]
            if len(col):
                out[u, c] = col.mean()
    return out


def test_class_means_match_brute_force_ignore_unlabelled_and_merge():
    rng = np.random.default_rng(30)
    n, n_classes = 80, 4
    values = rng.normal(size=(n, 5)).astype(np.float32)
    labels = rng.choice([-1, 0, 1, 2], size=n)  # class 3 has no example
    values[labels == -1] = 1000.0  # unlabelled examples would move every mean
    brute = brute_class_means(values, labels, n_classes)
    assert np.isnan(brute[:, 3]).all() and np.isfinite(brute[:, :3]).all()
    whole = None
    for batch in (1, 9, 80):
        result = class_pass(values, labels, n_classes, batch).finalize()
        assert result.shape == (5, n_classes)
        np.testing.assert_allclose(result, brute, rtol=1e-12, equal_nan=True)
        whole = result if whole is None else whole
    assert (np.abs(whole[:, :3]) < 10).all()
    for first, second in (((values[:33], labels[:33]), (values[33:], labels[33:])),
                          ((values[33:], labels[33:]), (values[:33], labels[:33]))):
        acc = class_pass(*first, n_classes, 5)
        acc.merge(class_pass(*second, n_classes, 7))
        np.testing.assert_allclose(acc.finalize(), brute, rtol=1e-12, equal_nan=True)


def test_class_means_nonfinite_left_out_and_other_units_unchanged():
    rng = np.random.default_rng(31)
    values = rng.normal(size=(60, 6)).astype(np.float32)
    labels = np.arange(60) % 3
    dirty = with_nonfinite(values, seed=32)
    clean = class_pass(values, labels, 3, 7).finalize()
    result = class_pass(dirty, labels, 3, 7).finalize()
    np.testing.assert_allclose(result, brute_class_means(dirty, labels, 3), rtol=1e-12, equal_nan=True)
    assert np.isnan(result[3]).all()
    np.testing.assert_array_equal(result[[2, 4, 5]], clean[[2, 4, 5]])


# --- SampleRows and sample_ids ---------------------------------------------------------

def test_sample_ids_deterministic_sorted_and_all_when_large():
    a = sample_ids(100, 17, seed=5)
    np.testing.assert_array_equal(a, sample_ids(100, 17, seed=5))
    assert len(a) == 17 and len(set(a)) == 17 and (np.diff(a) > 0).all() and a.min() >= 0 and a.max() < 100
    assert not np.array_equal(a, sample_ids(100, 17, seed=6))
    np.testing.assert_array_equal(sample_ids(100, 100, seed=5), np.arange(100))
    np.testing.assert_array_equal(sample_ids(40, 2000, seed=0), np.arange(40))
    assert len(sample_ids(40, 0, seed=0)) == 0


def rows_pass(values: np.ndarray, sample: np.ndarray, batch: int, ids: np.ndarray | None = None) -> SampleRows:
    ids = np.arange(len(values)) if ids is None else ids
    acc = SampleRows(sample, values.shape[1])
    for i in range(0, len(ids), batch):
        chunk = np.ascontiguousarray(ids[i:i + batch])
        acc.update(torch.from_numpy(values[chunk]), torch.from_numpy(chunk))
    return acc


def test_sample_rows_keep_exactly_the_sampled_examples():
    rng = np.random.default_rng(40)
    values = rng.normal(size=(90, 4)).astype(np.float32) * 3
    values[5, 1], values[6, 2], values[7, 3] = np.nan, np.inf, -np.inf
    sample = sample_ids(90, 25, seed=9)
    expected = values[sample].astype(np.float16)
    for batch in (1, 8, 90):
        result = rows_pass(values, sample, batch).finalize()
        assert result.dtype == np.float16 and result.shape == (25, 4)
        np.testing.assert_array_equal(result, expected)  # NaN == NaN here
    ids = np.arange(90)
    for first, second in ((ids[:50], ids[50:]), (ids[50:], ids[:50]), (ids[::2], ids[1::2])):
        acc = rows_pass(values, sample, 6, first)
        acc.merge(rows_pass(values, sample, 4, second))
        np.testing.assert_array_equal(acc.finalize(), expected)
    full = rows_pass(values, sample_ids(90, 500, seed=9), 13).finalize()
    np.testing.assert_array_equal(full, values.astype(np.float16))
    empty = rows_pass(values, sample_ids(90, 0, seed=9), 13).finalize()
    assert empty.shape == (0, 4)


# --- histogram -------------------------------------------------------------------------

def test_histogram_matches_numpy_with_the_same_edges():
    rng = np.random.default_rng(50)
    sample = np.column_stack([rng.normal(size=300), rng.exponential(size=300) * 7, rng.uniform(-2, 5, size=300),
                              rng.normal(size=300), np.full(300, 0.75), np.full(300, np.nan)]).astype(np.float16)
    sample[rng.choice(300, 40, replace=False), 3] = np.nan
    sample[rng.choice(300, 10, replace=False), 3] = np.inf
    sample[rng.choice(300, 10, replace=False), 0] = -np.inf
    bins = 30
    counts, lo, hi = histogram(sample, bins)
    assert counts.shape == (6, bins)
    for u in range(4):
        col = sample[:, u].astype(np.float64)
        finite = col[np.isfinite(col)]
        assert lo[u] == finite.min() and hi[u] == finite.max()
        expected, _ = np.histogram(finite, bins=bins, range=(finite.min(), finite.max()))
        np.testing.assert_array_equal(counts[u], expected, err_msg=f"unit {u}")
        assert counts[u].sum() == len(finite)
    assert counts[4].sum() == 300 and lo[4] == hi[4] == 0.75  # constant: every value in one bin
    assert counts[5].sum() == 0 and lo[5] == hi[5] == 0  # no finite value


# --- class_selectivity -----------------------------------------------------------------

def test_class_selectivity_hand_computed():
    nan = np.nan
    means = np.array([
        [0.0, 0.0, 5.0],  # fires for class 2 only -> 1
        [3.0, 3.0, 3.0],  # equal for all -> 0
        [-2.0, 4.0, -1.0],  # negative means clipped to 0 -> 1, class 1
        [-1.0, -2.0, -3.0],  # never positive -> 0
        [4.0, 2.0, 0.0],  # mu_rest = 1 -> (4 - 1) / (4 + 1)
        [2.0, 1.0, nan],  # two classes present: (2 - 1) / 3
        [nan, 4.0, nan],  # one class present -> NaN, top class still known
        [nan, nan, nan],  # none -> NaN, top -1
    ])
    index, top = class_selectivity(means)
    np.testing.assert_allclose(index, [1.0, 0.0, 1.0, 0.0, 0.6, 1 / 3, nan, nan], equal_nan=True)
    np.testing.assert_array_equal(top[[0, 2, 4, 5, 6, 7]], [2, 1, 0, 0, 1, -1])


# --- redundancy ------------------------------------------------------------------------

def test_redundancy_finds_planted_duplicate_and_skips_constant_units():
    rng = np.random.default_rng(60)
    sample = rng.normal(size=(200, 6))
    sample[:, 3] = 2 * sample[:, 1] + 0.5
    sample[:, 5] = 1.25  # constant
    sample = sample.astype(np.float16)
    partner, corr = redundancy(sample)
    assert partner[3] == 1 and partner[1] == 3
    assert corr[3] > 0.999 and corr[1] > 0.999
    assert partner[5] == -1 and np.isnan(corr[5])
    assert 5 not in partner
    # the rest: the best partner and correlation of np.corrcoef over the non-constant units
    live = [0, 1, 2, 3, 4]
    full = np.corrcoef(sample[:, live].astype(np.float64), rowvar=False)
    np.fill_diagonal(full, -np.inf)
    for i, u in enumerate(live):
        assert partner[u] == live[int(full[i].argmax())]
        assert corr[u] == pytest.approx(full[i].max(), abs=1e-9)


def brute_partners(sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every unit's most correlated other unit by np.corrcoef in float64 (-1 and NaN for constant units)."""
    x = sample.astype(np.float64)
    live = x.std(0) > 0
    full = np.full((x.shape[1],) * 2, -np.inf)
    full[np.ix_(live, live)] = np.corrcoef(x[:, live], rowvar=False)
    np.fill_diagonal(full, -np.inf)
    partner = np.where(live, full.argmax(1), -1)
    return partner, np.where(live, full.max(1), np.nan)


def test_redundancy_near_ties_decided_in_float64():
    """Partners whose correlations differ by less than float32 resolves are told apart exactly."""
    rng = np.random.default_rng(62)
    base = rng.normal(size=500)
    columns = [base]
    for scale in (1.0e-4, 1.00001e-4, 0.99999e-4, 1.00002e-4):  # all near 1 - 5e-9, a few 1e-13 apart
        columns.append(base + scale * rng.normal(size=500))
    columns += [rng.normal(size=500) for _ in range(6)] + [np.full(500, 3.0)]
    sample = np.column_stack(columns)
    partner, corr = redundancy(sample)
    brute_partner, brute_corr = brute_partners(sample)
    np.testing.assert_array_equal(partner, brute_partner)
    np.testing.assert_allclose(corr, brute_corr, rtol=0, atol=1e-12, equal_nan=True)


def test_redundancy_of_many_copies_of_one_unit():
    """A layer of copies (ties everywhere: every pair is checked exactly) names the lowest other copy."""
    rng = np.random.default_rng(63)
    base = rng.normal(size=200)
    sample = np.column_stack([base] * 12 + [rng.normal(size=200) for _ in range(2)]).astype(np.float16)
    partner, corr = redundancy(sample)
    assert partner[:12].tolist() == [1] + [0] * 11
    np.testing.assert_allclose(corr[:12], 1.0, rtol=1e-12)
    np.testing.assert_array_equal(partner[12:], brute_partners(sample)[0][12:])


def test_class_selectivity_matches_the_formula_on_random_means():
    rng = np.random.default_rng(64)
    means = rng.normal(size=(300, 12)) + rng.normal(size=(300, 1))
    means[rng.random(means.shape) < 0.2] = np.nan
    means[:5] = np.nan  # no class
    means[5:10, 1:] = np.nan  # one class
    index, top = class_selectivity(means)
    clipped = np.clip(means, 0, None)
    present = ~np.isnan(clipped)
    n = present.sum(1)
    mu_max = np.nanmax(np.where(present, clipped, -np.inf), 1)
    mu_rest = (np.nansum(clipped, 1) - mu_max) / np.maximum(n - 1, 1)
    with np.errstate(invalid="ignore"):
        brute = np.where(mu_max + mu_rest > 0, (mu_max - mu_rest) / (mu_max + mu_rest), 0.0)
    np.testing.assert_allclose(index, np.where(n >= 2, brute, np.nan), rtol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(top, np.where(n > 0, np.where(present, clipped, -np.inf).argmax(1), -1))


def test_redundancy_degenerate_inputs():
    partner, corr = redundancy(np.ones((10, 1), dtype=np.float16))
    assert partner.tolist() == [-1] and np.isnan(corr).all()
    partner, corr = redundancy(np.ones((1, 3), dtype=np.float16))
    assert partner.tolist() == [-1, -1, -1]
    # two anti-correlated units and a constant one: the constant unit (correlation 0) is no one's partner
    x = np.random.default_rng(61).normal(size=50)
    partner, corr = redundancy(np.column_stack([x, -x, np.full(50, 2.0)]).astype(np.float16))
    assert partner.tolist() == [1, 0, -1]
    np.testing.assert_allclose(corr[:2], -1.0, atol=1e-3)
    assert np.isnan(corr[2])


# --- summarize and LayerAccumulator ----------------------------------------------------

CLASSES = ("zero", "one", "two")


def planted_layer(n=300, seed=70):
    """Flat activations [N, 8] with planted units and labels 0..2 (a few unlabelled).

    0 dead (always <= 0); 1 relu noise (broad); 2 always positive, almost constant (saturated);
    3 = 2 * unit 1 + 0.5 (redundant with 1); 4 fires only for class 2; 5 relu noise; 6 all NaN;
    7 active on two examples only (rare, but not dead).
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    labels[::17] = -1
    v = np.zeros((n, 8), dtype=np.float32)
    v[:, 0] = -np.abs(rng.normal(size=n))
    v[::5, 0] = 0.0
    v[:, 1] = np.maximum(rng.normal(size=n), 0)
    v[:, 2] = 3.0 + 1e-3 * rng.uniform(size=n)
    v[:, 3] = 2 * v[:, 1] + 0.5
    v[:, 4] = np.where(labels == 2, 1 + np.abs(rng.normal(size=n)), 0.0)
    v[:, 5] = np.maximum(rng.normal(size=n), 0)
    v[:, 6] = np.nan
    v[:, 7] = -1.0
    v[[10, 101], 7] = 0.5
    return v, labels


def layer_pass(values, labels, cfg: ScanSection, sample, batch: int, ids=None) -> LayerAccumulator:
    ids = np.arange(len(values)) if ids is None else ids
    acc = LayerAccumulator(values.shape[1], cfg, len(CLASSES), sample)
    for i in range(0, len(ids), batch):
        chunk = ids[i:i + batch]
        v = torch.from_numpy(values[chunk])
        acc.update(v, torch.from_numpy(chunk), torch.from_numpy(labels[chunk]),
                   position_fraction=active_fraction(v, cfg.active_threshold))
    return acc


INFO = LayerInfo("fc", "Linear", (8,), True)


def test_summarize_labels_and_flags_planted_units():
    values, labels = planted_layer()
    cfg = ScanSection(top_k=4, sample_size=150)
    sample = sample_ids(len(values), cfg.sample_size, 0)
    layer = summarize(INFO, layer_pass(values, labels, cfg, sample, 32), cfg, CLASSES)
    s = layer.stats
    assert layer.labels[0] == "dead" and s["dead"][0] and not s["saturated"][0]
    assert layer.labels[2] == "saturated" and s["saturated"][2] and not s["dead"][2]
    assert layer.labels[4] == "class-selective: two"
    assert s["selectivity"][4] == pytest.approx(1.0) and s["top_class"][4] == 2
    assert layer.labels[6] == "non-finite" and s["nonfinite"][6] == len(values) and s["count"][6] == 0
    for u in (1, 5, 7):
        assert layer.labels[u] == "feature-selective (broad)", (u, s["selectivity"][u])
        assert not s["dead"][u] and not s["saturated"][u]
    assert s["redundant"][3] and s["redundant_with"][3] == 1 and s["redundant_corr"][3] > 0.999
    assert s["redundant"][1] and s["redundant_with"][1] == 3
    assert not s["redundant"][[0, 2, 4, 5, 6, 7]].any()
    assert (s["redundant_with"][[0, 2, 4, 5, 6, 7]] == -1).all()
    # the statistics are those of the brute force; the histogram and sample are over the sample rows
    check_moments({k: s[k] for k in ("count", "nonfinite", "mean", "std", "min", "max")}, values)
    np.testing.assert_allclose(s["frac_active"], (values > 0).mean(0))
    np.testing.assert_allclose(layer.class_means, brute_class_means(values, labels, 3), rtol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(layer.sample, values[sample].astype(np.float16))
    finite = np.isfinite(values[sample]).sum(0)
    np.testing.assert_array_equal(layer.hist_counts.sum(1), finite)
    assert layer.hist_counts.shape == (8, cfg.histogram_bins)
    check_topk(layer.top, values, np.full(values.shape, -1), None, 4, True)
    check_topk(layer.bottom, values, np.full(values.shape, -1), None, 4, False)


def test_summarize_thresholds_come_from_config():
    values, labels = planted_layer()
    sample = sample_ids(len(values), 2000, 0)
    strict = ScanSection(class_selective=1.0, redundant_correlation=1.0)
    layer = summarize(INFO, layer_pass(values, labels, strict, sample, 50), strict, CLASSES)
    assert layer.labels[4] == "class-selective: two"  # index exactly 1.0: at least class_selective
    assert not layer.stats["redundant"].any()  # float16 rounding keeps unit 3's correlation below 1
    high = ScanSection(active_threshold=5.0)
    layer = summarize(INFO, layer_pass(values, labels, high, sample, 50), high, CLASSES)
    assert layer.labels[2] == "dead"  # 3.0 never exceeds an active threshold of 5
    np.testing.assert_allclose(layer.stats["frac_active"], (values > 5.0).mean(0))


def layer_scans_equal(a, b, rtol: float = 0.0):
    """Equal in everything but float rounding: mean, std (MOMENT_RTOL) and class means (1e-12) since chunks of
    other sizes are summed in another order; every float to rtol when given."""
    assert a.labels == b.labels
    for key in a.stats:
        same(a.stats[key], b.stats[key], max(rtol, MOMENT_RTOL.get(key, 0.0)), key)
    assert_results_equal(a.top, b.top, rtol)
    assert_results_equal(a.bottom, b.bottom, rtol)
    for name in ("hist_counts", "hist_lo", "hist_hi", "class_means", "sample"):
        same(getattr(a, name), getattr(b, name), max(rtol, 1e-12) if name == "class_means" else rtol, name)


def test_layer_accumulator_merge_in_either_order_equals_one_pass():
    values, labels = planted_layer(n=120, seed=71)
    values[5, 1], values[9, 4], values[30, 5] = np.nan, np.inf, -np.inf
    cfg = ScanSection(top_k=5, sample_size=40)
    sample = sample_ids(len(values), cfg.sample_size, 3)
    whole = summarize(INFO, layer_pass(values, labels, cfg, sample, 11), cfg, CLASSES)
    ids = np.arange(len(values))
    for first, second in ((ids[:70], ids[70:]), (ids[70:], ids[:70])):
        acc = layer_pass(values, labels, cfg, sample, 8, first)
        acc.merge(layer_pass(values, labels, cfg, sample, 13, second))
        layer_scans_equal(summarize(INFO, acc, cfg, CLASSES), whole)
    check_topk(whole.top, values, np.full(values.shape, -1), None, 5, True)
    check_topk(whole.bottom, values, np.full(values.shape, -1), None, 5, False)


@pytest.mark.parametrize("batch,flush_every", [(1, 1), (4, 3), (16, 1), (50, 100)])
def test_layer_accumulator_observe_matches_brute_force(batch, flush_every):
    """The scan's path: raw conv outputs observed batch by batch (the top-/bottom-k and their maps taken in the
    hook by the compiled kernel), flushed now and then; the sampled rows give the position activity."""
    g = torch.Generator().manual_seed(80)
    out = torch.randn(50, 4, 3, 3, generator=g).round(decimals=1)  # rounded: ties within and across maps
    out[[3, 20, 21, 44], 1] = 4.5  # whole maps equal: a tie for unit 1's top
    labels = torch.arange(50) % 3
    labels[7] = -1
    cfg = ScanSection(top_k=4, active_threshold=0.1)
    sample = sample_ids(50, 12, seed=2)
    acc = LayerAccumulator(4, cfg, 3, sample)
    for step, i in enumerate(range(0, 50, batch)):
        n = min(batch, 50 - i)
        rows = sample[(sample >= i) & (sample < i + n)] - i
        sampled = None if not len(rows) else torch.from_numpy(rows)
        acc.observe(out[i:i + n], i, labels[i:i + n], sampled)
        if step % flush_every == 0:
            acc.flush()
    acc.flush()
    layer = summarize(LayerInfo("conv", "Conv2d", (4, 3, 3), True), acc, cfg, CLASSES)
    v, p, maps = brute_layer(out)
    p = maps.argmax(2)  # positions: the first maximum of each map
    check_topk(layer.top, v, p, maps, 4, True)
    check_topk(layer.bottom, v, p, maps if layer.bottom.maps is not None else None, 4, False)
    np.testing.assert_array_equal(layer.top.ids[1], [3, 20, 21, 44])
    check_moments({k: layer.stats[k] for k in ("count", "nonfinite", "mean", "std", "min", "max")}, v)
    np.testing.assert_allclose(layer.stats["frac_active"], (v > 0.1).mean(0))
    np.testing.assert_allclose(layer.stats["position_activity"],
                               (maps[sample] > 0.1).mean(2).mean(0), rtol=1e-6)
    np.testing.assert_allclose(layer.class_means, brute_class_means(v, labels.numpy(), 3), rtol=1e-12)
    np.testing.assert_array_equal(layer.sample, v[sample].astype(np.float16))


# --- scan_model end to end -------------------------------------------------------------

def wrap(data, class_names=CLASSES):
    dataset = AtlasDataset(data, tuple(class_names), (), (), "test", "fp")
    model = fixtures_models.tiny_cnn().eval()
    return LoadedModel(ModelSection("tiny", "fixtures_models:tiny_cnn"), model, "fp", {"parameters": 0}), dataset


LAYERS = ["conv", "relu", "fc"]


def run_scan(data, **scan):
    loaded, dataset = wrap(data)
    cfg = ScanSection(**{"top_k": 4, "batch_size": 7, "buffer_mb": 1, **scan})
    return scan_model(loaded, dataset, LAYERS, cfg, CPU, seed=0, progress=False), loaded.module


def brute_outputs(model: nn.Module, x: torch.Tensor, batch: int = 7) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every layer's output on all of x, computed over the scan's batches (run_scan's batch_size).

    The same batches: a conv or matmul over 40 rows may round differently from
    one over 7 (the CPU kernel's blocking), and the moments are compared to 1e-12.
    """
    parts = []
    with torch.inference_mode():
        for chunk in x.split(batch):
            conv = model.conv(chunk)
            relu = model.relu(conv)
            fc = model.fc(model.flatten(model.pool(relu)))
            parts.append((conv, relu, fc, model(chunk)))
    conv, relu, fc, logits = (torch.cat(p) for p in zip(*parts))
    return {"conv": conv, "relu": relu, "fc": fc}, logits


def scans_equal(a, b, rtol: float = 0.0):
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.predicted, b.predicted)
    same(a.confidence, b.confidence, rtol, "confidence")
    np.testing.assert_array_equal(a.sample_ids, b.sample_ids)
    assert a.accuracy == b.accuracy and a.n_examples == b.n_examples
    for x, y in zip(a.layers, b.layers, strict=True):
        assert x.info == y.info
        layer_scans_equal(x, y, rtol)


@pytest.fixture
def update_sizes(monkeypatch) -> list[int]:
    """Records the rows of every Moments.update call: one per layer per flush of the scan's buffer."""
    sizes: list[int] = []
    original = Moments.update

    def spy(self, values, *args, **kwargs):
        sizes.append(values.shape[0])
        return original(self, values, *args, **kwargs)

    monkeypatch.setattr(Moments, "update", spy)
    return sizes


def brute_layer(out: torch.Tensor):
    """Reduced values [N, U], positions [N, U] and maps [N, U, M] (None for flat outputs) of one layer output."""
    values, positions = reduce_output(out, "max")
    return values.numpy(), positions.numpy(), out.flatten(2).numpy() if out.dim() == 4 else None


@pytest.mark.parametrize("sample_size", [10, 2000])
def test_scan_model_matches_brute_force_on_tiny_cnn(sample_size, maps_mode):
    data = fixtures_models.tiny_dataset()
    result, model = run_scan(data, sample_size=sample_size)
    outputs, logits = brute_outputs(model, data.images)
    assert [layer.info.name for layer in result.layers] == LAYERS
    assert result.n_examples == 40 and result.model == "tiny"
    sample = sample_ids(40, sample_size, 0)
    assert len(sample) == min(sample_size, 40)
    np.testing.assert_array_equal(result.sample_ids, sample)
    for layer in result.layers:
        out = outputs[layer.info.name]
        v, p, maps = brute_layer(out)
        assert layer.info.shape == tuple(out.shape[1:])
        check_topk(layer.top, v, p, maps, 4, True, rtol=1e-6)
        # bottom-k maps are optional (documented for the top-k only), but right when present
        check_topk(layer.bottom, v, p, maps if layer.bottom.maps is not None else None, 4, False, rtol=1e-6)
        assert layer.top.valid.all() and layer.bottom.valid.all()
        if maps is not None:
            assert layer.info.spatial == (8, 8)
            # the kept position is where the kept map holds the unit's maximum
            taken = np.take_along_axis(layer.top.maps, layer.top.positions[..., None], 2)[..., 0]
            np.testing.assert_array_equal(taken, layer.top.values.astype(layer.top.maps.dtype))
        else:
            assert layer.top.maps is None and layer.bottom.maps is None
            assert (layer.top.positions == -1).all() and (layer.bottom.positions == -1).all()
        check_moments({k: layer.stats[k] for k in MOMENT_RTOL} | {"count": layer.stats["count"],
                                                                   "nonfinite": layer.stats["nonfinite"]}, v)
        np.testing.assert_allclose(layer.stats["frac_active"], (v > 0).mean(0))
        # the position activity is measured on the sample (all of it while it has at most POSITION_SAMPLE rows)
        assert len(sample) <= scan_mod.POSITION_SAMPLE
        np.testing.assert_allclose(layer.stats["position_activity"],
                                   active_fraction(out[sample], 0.0).double().mean(0).numpy(), rtol=1e-6)
        np.testing.assert_allclose(layer.class_means, brute_class_means(v, data.labels.numpy(), 3), rtol=1e-6)
        np.testing.assert_array_equal(layer.sample, v[sample].astype(np.float16))
        counts, _, _ = histogram(v[sample].astype(np.float16), 30)
        np.testing.assert_array_equal(layer.hist_counts, counts)
    relu = result.layers[1]
    assert (relu.bottom.values >= 0).all()
    np.testing.assert_array_equal(result.labels, data.labels.numpy())
    np.testing.assert_array_equal(result.predicted, logits.argmax(1).numpy())
    np.testing.assert_allclose(result.confidence, logits.softmax(1).amax(1).numpy(), rtol=1e-6)
    assert result.accuracy == pytest.approx(float((logits.argmax(1) == data.labels).float().mean()))


def test_scan_model_same_result_for_any_buffer_size(update_sizes):
    data = fixtures_models.tiny_dataset()
    base, _ = run_scan(data, batch_size=7, buffer_mb=64)
    assert len(update_sizes) <= 2 * len(LAYERS) and sum(update_sizes) == 40 * len(LAYERS)  # never full
    update_sizes.clear()
    flushing, _ = run_scan(data, batch_size=7, buffer_mb=0)  # a zero buffer flushes after every batch
    assert update_sizes == [n for n in [7] * 5 + [5] for _ in LAYERS]
    scans_equal(flushing, base)  # same forward passes: only the chunking differs


def test_scan_model_same_result_for_any_batch_size(maps_mode):
    """The model's float rounding may change with the batch size, nothing else may."""
    data = fixtures_models.tiny_dataset()
    base, _ = run_scan(data, batch_size=7)
    for batch_size, buffer_mb in ((40, 1), (1, 0), (13, 0)):
        scans_equal(run_scan(data, batch_size=batch_size, buffer_mb=buffer_mb)[0], base, rtol=1e-6)


def test_scan_model_buffer_flushes_when_full(update_sizes):
    """A 1 MiB buffer fills during a pass over 12000 examples; the result equals that of a buffer that never does."""
    data = fixtures_models.TinyDataset(n=12000)
    small, model = run_scan(data, batch_size=400, buffer_mb=1, top_k=3, sample_size=100)
    assert len(update_sizes) >= 2 * len(LAYERS) and sum(update_sizes) == 12000 * len(LAYERS)
    flushes = len(update_sizes)
    update_sizes.clear()
    big, _ = run_scan(data, batch_size=400, buffer_mb=1000, top_k=3, sample_size=100)
    assert len(update_sizes) <= 2 * len(LAYERS) and len(update_sizes) < flushes
    scans_equal(small, big)
    outputs, _ = brute_outputs(model, data.images, batch=400)
    for layer in small.layers:
        v, p, maps = brute_layer(outputs[layer.info.name])
        check_topk(layer.top, v, p, maps, 3, True, rtol=1e-6)
        check_topk(layer.bottom, v, p, maps if layer.bottom.maps is not None else None, 3, False, rtol=1e-6)
        np.testing.assert_allclose(layer.stats["mean"], v.astype(np.float64).mean(0), rtol=1e-6)


class Spoil(nn.Module):
    """Conv output with NaN in channel 0 of examples whose first pixel is > 0.5, else +Inf at one spot of channel 1."""

    def forward(self, out, image):
        out = out.clone()
        bad = image[:, 0, 0, 0] > 0.5
        out[bad, 0] = torch.nan
        out[~bad, 1, 0, 0] = torch.inf
        return out


class SpoiltCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = fixtures_models.tiny_cnn().conv
        self.spoil = Spoil()

    def forward(self, x):
        return self.spoil(self.conv(x), x)


def test_scan_model_nonfinite_activations(maps_mode):
    data = fixtures_models.TinyDataset(n=11)
    n_bad = int((data.images[:, 0, 0, 0] > 0.5).sum())
    assert 3 < n_bad < 8  # fewer than k=8 finite values in channels 0 (11 - n_bad) and 1 (n_bad)
    _, dataset = wrap(data)
    model = SpoiltCNN().eval()
    loaded = LoadedModel(ModelSection("spoilt", "x:y"), model, "fp", {"parameters": 0})
    cfg = ScanSection(top_k=8, batch_size=3, buffer_mb=1)
    result = scan_model(loaded, dataset, ["spoil"], cfg, CPU, progress=False)
    with torch.inference_mode():
        out = model(data.images)
    v, p, maps = brute_layer(out)
    layer = result.layers[0]
    check_topk(layer.top, v, p, maps, 8, True)
    check_topk(layer.bottom, v, p, maps if layer.bottom.maps is not None else None, 8, False)
    np.testing.assert_array_equal(layer.top.valid[0], np.arange(8) < 11 - n_bad)
    np.testing.assert_array_equal(layer.top.valid[1], np.arange(8) < n_bad)
    assert layer.top.valid[2:].all()
    assert layer.stats["nonfinite"].tolist() == [n_bad, 11 - n_bad, 0, 0]
    check_moments({k: layer.stats[k] for k in ("count", "nonfinite", "mean", "std", "min", "max")}, v)
    assert result.predicted is None and result.accuracy is None


def test_scan_model_unlabelled_examples(maps_mode):
    """Examples labelled -1 count in no class mean and not in the accuracy."""
    data = fixtures_models.TinyDataset(n=40)
    data.labels = data.labels.clone()
    data.labels[::5] = -1
    result, model = run_scan(data)
    outputs, logits = brute_outputs(model, data.images)
    labelled = data.labels >= 0
    predicted = logits.argmax(1)
    np.testing.assert_array_equal(result.labels, data.labels.numpy())
    assert result.accuracy == pytest.approx(float((predicted[labelled] == data.labels[labelled]).float().mean()))
    assert result.accuracy != pytest.approx(float((predicted == data.labels).float().mean()))
    v = brute_layer(outputs["fc"])[0]
    np.testing.assert_allclose(result.layers[2].class_means, brute_class_means(v, data.labels.numpy(), 3), rtol=1e-6)


def test_scan_model_accuracy_ignores_labels_that_are_no_class_index():
    """ModelScan.accuracy is over labelled examples whose label is a valid class index."""
    data = fixtures_models.TinyDataset(n=40)
    data.labels = data.labels.clone()
    data.labels[::4] = 7  # neither one of the 3 class names nor one of the model's 3 outputs
    result, model = run_scan(data)
    with torch.inference_mode():
        predicted = model(data.images).argmax(1)
    valid = data.labels < 3
    assert result.accuracy == pytest.approx(float((predicted[valid] == data.labels[valid]).float().mean()))


def inplace_net() -> nn.Module:
    torch.manual_seed(6)
    return nn.Sequential(OrderedDict([("fc", nn.Linear(4, 5)), ("act", nn.ReLU(inplace=True)),
                                      ("out", nn.Linear(5, 3))])).eval()


def test_scan_model_flat_layer_followed_by_an_inplace_op():
    """Regression: a flat layer's output was buffered uncopied, so nn.ReLU(inplace=True) after nn.Linear
    (VGG/AlexNet classifiers) rewrote it: moments, class means and sample rows saw post-ReLU values."""
    model = inplace_net()
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(7))
    labels = torch.arange(30) % 3
    dataset = AtlasDataset(TensorDataset(x, labels), CLASSES, (), (), "test", "fp")
    loaded = LoadedModel(ModelSection("inplace", "x:y"), model, "fp", {"parameters": 0})
    result = scan_model(loaded, dataset, ["fc"], ScanSection(top_k=3, batch_size=10), CPU, progress=False)
    with torch.inference_mode():
        v = model.fc(x).numpy()
    assert (v < 0).any()  # the ReLU would change something
    layer = result.layers[0]
    check_topk(layer.top, v, np.full(v.shape, -1), None, 3, True)
    check_topk(layer.bottom, v, np.full(v.shape, -1), None, 3, False)
    check_moments({k: layer.stats[k] for k in ("count", "nonfinite", "mean", "std", "min", "max")}, v)
    np.testing.assert_allclose(layer.class_means, brute_class_means(v, labels.numpy(), 3), rtol=1e-6)
    np.testing.assert_array_equal(layer.sample, v.astype(np.float16))


@pytest.mark.parametrize("world", [2, 3])
def test_scan_parts_merged_in_order_equal_one_pass(world, maps_mode):
    """What a sharded build does: each rank scans its block of ids, the writer merges the parts in order."""
    import pickle

    from atlas_builder.scan import finish_scan, scan_part, shard_range

    data = fixtures_models.tiny_dataset()
    loaded, dataset = wrap(data)
    cfg = ScanSection(top_k=4, batch_size=7, buffer_mb=1, sample_size=10)
    whole = scan_model(loaded, dataset, LAYERS, cfg, CPU, seed=0, progress=False)
    ranges = [shard_range(40, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == 40 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    parts = [pickle.loads(pickle.dumps(scan_part(loaded, dataset, LAYERS, cfg, CPU, 0, start, stop, False)))
             for start, stop in ranges]  # pickled, as torch.distributed sends them
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    sharded = finish_scan(loaded, dataset, LAYERS, cfg, merged, CPU, seed=0)
    scans_equal(sharded, whole, rtol=1e-9)
    with pytest.raises(ValueError, match="adjacent"):
        parts[1].merge(parts[0])


def test_scan_in_bfloat16_is_close_to_float32():
    """scan.precision autocasts the forward: values round to bfloat16 (ties then go to the lower id)."""
    data = fixtures_models.tiny_dataset()
    exact, _ = run_scan(data)
    half, _ = run_scan(data, precision="bfloat16")
    for a, b in zip(exact.layers, half.layers):
        np.testing.assert_allclose(b.stats["mean"], a.stats["mean"], rtol=0.05, atol=0.02)
        np.testing.assert_allclose(b.top.values[:, 0], a.top.values[:, 0], rtol=0.02, atol=0.02)


def test_sampled_rows_measured_in_the_hook_or_in_the_second_pass_agree(monkeypatch):
    """The activity rows' positions: measured in place by the kernel in the hook, or in the second pass (large
    maps at once, MEASURE_AT_ONCE; small ones copied and measured in bulk): the same result."""
    data = fixtures_models.tiny_dataset()
    in_hook, _ = run_scan(data, sample_size=30)
    monkeypatch.setattr(scan_mod, "DEFER_MAPS", 0)
    copied, _ = run_scan(data, sample_size=30)
    monkeypatch.setattr(scan_mod, "MEASURE_AT_ONCE", 1)
    at_once, _ = run_scan(data, sample_size=30)
    scans_equal(copied, in_hook, rtol=1e-6)
    scans_equal(at_once, in_hook, rtol=1e-6)
    assert in_hook.layers[0].stats["position_activity"].any()


class SharedReLU(nn.Module):
    """conv -> act -> conv2 -> act (the same ReLU module twice, as torchvision's BasicBlock) -> fc."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(9)
        self.conv, self.conv2, self.act = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1), nn.ReLU()
        self.fc = nn.Linear(3 * 64, 3)

    def forward(self, x):
        return self.fc(self.act(self.conv2(self.act(self.conv(x)))).flatten(1))


def test_scan_model_module_called_twice_counts_its_last_call_once(maps_mode):
    """Regression: the hook fired on both calls of a shared ReLU, so every example was counted twice, and the
    first call's activations were mixed in. Now the last call alone counts, as for the Probe's own values."""
    model = SharedReLU().eval()
    data = fixtures_models.tiny_dataset()
    dataset = AtlasDataset(data, CLASSES, (), (), "test", "fp")
    loaded = LoadedModel(ModelSection("shared", "x:y"), model, "fp", {"parameters": 0})
    result = scan_model(loaded, dataset, ["act", "conv"], ScanSection(top_k=4, batch_size=7), CPU, progress=False)
    with torch.inference_mode():
        last = torch.cat([model.act(model.conv2(model.act(model.conv(x)))) for x in data.images.split(7)])
    act = result.layers[0]
    v, p, maps = brute_layer(last)
    assert act.stats["count"].tolist() == [40] * 3
    check_topk(act.top, v, p, maps, 4, True, rtol=1e-6)
    check_moments({k: act.stats[k] for k in MOMENT_RTOL} | {"count": act.stats["count"],
                                                           "nonfinite": act.stats["nonfinite"]}, v)


class SometimesTwice(nn.Module):
    """Calls its ReLU a second time on every other forward: a layer whose hook calls differ between batches."""

    def __init__(self):
        super().__init__()
        self.conv, self.act, self.forwards = nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), 0

    def forward(self, x):
        self.forwards += 1
        out = self.act(self.conv(x))
        return self.act(out) if self.forwards % 2 else out


def test_scan_model_fails_when_a_layers_calls_per_forward_change():
    """The plan's forward calls the ReLU twice; a batch that calls it once fails with the layer named, not a
    wrong count."""
    dataset = AtlasDataset(fixtures_models.tiny_dataset(), CLASSES, (), (), "test", "fp")
    loaded = LoadedModel(ModelSection("varying", "x:y"), SometimesTwice().eval(), "fp", {"parameters": 0})
    with pytest.raises(AtlasError, match=r"layer 'act' of model 'varying' ran 1 times in one forward pass but 2 "
                                         r"times in another"):
        scan_model(loaded, dataset, ["conv", "act"], ScanSection(top_k=4, batch_size=7), CPU, progress=False)


def test_deferred_maps_chosen_by_shapes_and_second_pass_stops_after_the_last_map_layer(monkeypatch):
    """defer_maps: a second pass when the dataset outnumbers the map slots DEFER_MAPS times, or off the CPU;
    that pass runs each needed example once and stops the forward before layers that need nothing (here the
    flat fc); the maps from the hook and from the second pass agree bit for bit."""
    from atlas_builder.scan import ForwardPlan, defer_maps

    plan = ForwardPlan({"conv": (2, 8, 8), "relu": (2, 8, 8), "fc": (3,)}, {"conv": 1, "relu": 1, "fc": 1})
    cfg = ScanSection(top_k=4)
    slots = 2 * 4 * (2 + 2)  # top- and bottom-k of the conv/token layers' units
    assert defer_maps(plan, cfg, slots * scan_mod.DEFER_MAPS, CPU)
    assert not defer_maps(plan, cfg, slots * scan_mod.DEFER_MAPS - 1, CPU)
    assert defer_maps(plan, cfg, 1, torch.device("cuda"))  # a device the kernels cannot read
    assert not defer_maps(ForwardPlan({"fc": (3,)}, {"fc": 1}), cfg, 10**9, CPU)  # no maps: nothing to defer
    original = scan_mod.maps_pass
    loaded, dataset = wrap(fixtures_models.tiny_dataset())
    results = []
    for defer in (10**12, 0):
        monkeypatch.setattr(scan_mod, "DEFER_MAPS", defer)
        fc_calls, conv_calls, passes = [], [], []
        monkeypatch.setattr(scan_mod, "maps_pass", lambda *a, **k: (passes.append(1), original(*a, **k)))
        handles = [loaded.module.fc.register_forward_hook(lambda m, i, o: fc_calls.append(len(o))),
                   loaded.module.conv.register_forward_hook(lambda m, i, o: conv_calls.append(len(o)))]
        try:
            results.append(scan_model(loaded, dataset, LAYERS, ScanSection(top_k=4, batch_size=7), CPU,
                                      progress=False))
        finally:
            for handle in handles:
                handle.remove()
        assert passes == ([] if defer else [1])
        assert sum(fc_calls) == 1 + 40  # the plan's one example, then the scan's 40; a second pass stops earlier
        # the second pass (here every example: each is an activity row) in one batch, as its buffer allows
        assert conv_calls == [1] + [7] * 5 + [5] + ([] if defer else [40])
    scans_equal(*results)


def test_second_pass_batches_as_large_as_the_buffer_allows():
    from atlas_builder.scan import ForwardPlan, second_pass_batch

    plan = ForwardPlan({"conv": (4, 16, 16), "relu": (4, 16, 16), "fc": (10,)}, {"conv": 1, "relu": 1, "fc": 1})
    per_example = 4 * 2 * 4 * 256  # float32 conv and relu outputs; the flat fc does not count
    cfg = ScanSection(batch_size=8, buffer_mb=1)
    assert second_pass_batch(plan, cfg, 10**6) == 2**20 // per_example  # 128
    assert second_pass_batch(plan, cfg, 50) == 50  # all at once
    assert second_pass_batch(plan, cfg, 3) == 8  # never below scan.batch_size
    assert second_pass_batch(plan, ScanSection(batch_size=500, buffer_mb=1), 10**6) == 500


class Augmented(torch.utils.data.Dataset):
    """Random augmentation: each read of an example adds fresh noise (as a random crop or flip would change it)."""

    def __init__(self):
        self.base = fixtures_models.tiny_dataset()
        self.reads = 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        self.reads += 1
        return x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(self.reads)), y


def test_second_pass_reruns_the_kept_inputs_or_reloads_them_alike(monkeypatch):
    """keeps_inputs: a deferred scan keeps every input when they fit in scan.buffer_mb; the second pass then
    reruns them, or else reloads the examples it needs: the same scan either way (deterministic data)."""
    from atlas_builder.scan import ForwardPlan, keeps_inputs

    plan = ForwardPlan({"conv": (4, 8, 8)}, {"conv": 1}, input_bytes=256)
    assert keeps_inputs(plan, ScanSection(buffer_mb=1), 2**20 // 256)
    assert not keeps_inputs(plan, ScanSection(buffer_mb=1), 2**20 // 256 + 1)
    monkeypatch.setattr(scan_mod, "DEFER_MAPS", 0)
    kept, _ = run_scan(fixtures_models.tiny_dataset())
    monkeypatch.setattr(scan_mod, "keeps_inputs", lambda *a: False)
    reloaded, _ = run_scan(fixtures_models.tiny_dataset())
    scans_equal(kept, reloaded)


@pytest.mark.parametrize("keep", [True, False])
def test_second_pass_maps_are_those_of_the_inputs_scanned_under_random_augmentation(keep, monkeypatch):
    """With kept inputs, every top-/bottom-k map's max is the value it was ranked by, even when each read of
    the dataset gives other inputs; reloaded, those maps come from other draws (so the scan keeps inputs
    whenever they fit)."""
    monkeypatch.setattr(scan_mod, "DEFER_MAPS", 0)
    if not keep:
        monkeypatch.setattr(scan_mod, "keeps_inputs", lambda *a: False)
    data = Augmented()
    result, _ = run_scan(data)
    for layer in result.layers:
        if layer.info.name == "fc":
            continue
        for top in (layer.top, layer.bottom):
            matches = top.maps.max(2)[top.valid] == top.values[top.valid]
            assert matches.all() if keep else not matches.all()
    # the plan's one read, the scan's 40; reloading reads again every example the second pass needs (here
    # all 40: each is a position-activity row)
    assert data.reads == (1 + 40 if keep else 1 + 40 + 40)


def test_second_pass_torch_path_equals_the_compiled_one(monkeypatch):
    """Outputs the kernels cannot read (on a GPU, or bfloat16) take torch ops for the second pass's maps and
    activity rows: the same scan, bit for bit."""
    monkeypatch.setattr(scan_mod, "DEFER_MAPS", 0)
    compiled, _ = run_scan(fixtures_models.tiny_dataset())
    monkeypatch.setattr(scan_mod, "compiled_reads", lambda maps: False)
    torch_ops, _ = run_scan(fixtures_models.tiny_dataset())
    scans_equal(compiled, torch_ops)


class AddThenReLU(nn.Module):
    """conv, an in-place add, then ReLU: its own forward, so the ReLU's input is not the conv's output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        self.conv, self.relu, self.fc = nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Linear(3 * 64, 3)

    def forward(self, x):
        h = self.conv(x)
        h += 0.5  # a plain-Python step between the two modules
        return self.fc(self.relu(h).flatten(1))


def derivable_cnn(inplace: bool) -> nn.Module:
    torch.manual_seed(9)
    return nn.Sequential(OrderedDict([
        ("conv", nn.Conv2d(1, 3, 3, padding=1)), ("relu", nn.ReLU(inplace=inplace)), ("flat", nn.Flatten()),
        ("block", nn.Sequential(OrderedDict([("fc", nn.Linear(192, 6)), ("act", nn.ReLU())]))),
        ("out", nn.Linear(6, 3))])).eval()


def test_derived_layers_only_where_nothing_runs_between():
    """A ReLU right after a probed layer in a plain nn.Sequential is derived from it; not with mean reduce,
    its own forward, another hook, an unprobed source, or a module called twice."""
    from atlas_builder.scan import derived_layers, forward_plan

    x = torch.zeros(1, 1, 8, 8)
    net = nn.Sequential(OrderedDict([("conv", nn.Conv2d(1, 3, 3, padding=1)), ("relu", nn.ReLU()),
                                     ("pool", nn.MaxPool2d(2)), ("relu2", nn.ReLU()), ("flat", nn.Flatten()),
                                     ("fc", nn.Linear(48, 4)), ("act", nn.ReLU())])).eval()
    layers = ["conv", "relu", "relu2", "fc", "act"]
    plan = forward_plan(net, x, layers, CPU)
    # relu2 follows the unprobed pool; the flat fc -> act pair is derived too (its value is the output itself)
    assert derived_layers(net, layers, plan, ScanSection()) == {"relu": "conv", "act": "fc"}
    nested = derivable_cnn(inplace=False)
    layers = ["conv", "relu", "block.fc", "block.act", "out"]
    plan = forward_plan(nested, x, layers, CPU)
    assert derived_layers(nested, layers, plan, ScanSection()) == {"relu": "conv", "block.act": "block.fc"}
    assert derived_layers(nested, layers, plan, ScanSection(reduce="mean")) == {}
    assert derived_layers(nested, ["relu", "block.fc", "block.act"], plan, ScanSection()) == {"block.act": "block.fc"}
    custom = AddThenReLU().eval()
    plan = forward_plan(custom, x, ["conv", "relu"], CPU)
    assert derived_layers(custom, ["conv", "relu"], plan, ScanSection()) == {}
    handle = nested.relu.register_forward_pre_hook(lambda m, i: None)
    try:
        assert "relu" not in derived_layers(nested, layers, forward_plan(nested, x, layers, CPU), ScanSection())
    finally:
        handle.remove()
    shared = nn.Sequential(OrderedDict([("fc", nn.Linear(64, 4)), ("act", nn.ReLU())]))
    twice = nn.Sequential(OrderedDict([("flat", nn.Flatten()), ("a", shared), ("b", nn.Linear(4, 64)), ("c", shared)]))
    plan = forward_plan(twice, x, ["a.fc", "a.act"], CPU)
    assert plan.calls == {"a.fc": 2, "a.act": 2} and derived_layers(twice, ["a.fc", "a.act"], plan, ScanSection()) == {}


@pytest.mark.parametrize("make", [lambda: derivable_cnn(True), lambda: derivable_cnn(False), AddThenReLU],
                         ids=["inplace-relu", "relu", "own-forward"])
def test_derived_relu_scans_exactly_as_its_own_hook(make, maps_mode, monkeypatch):
    """A derived ReLU (no hook, values and maps from the layer before) gives bit for bit what hooking it
    gives, including an in-place ReLU that overwrites the conv's output; checked against brute force."""
    model = make().eval()
    layers = [n for n in ("conv", "relu", "block.fc", "block.act", "out", "fc") if n in dict(model.named_modules())]
    x = torch.randn(60, 1, 8, 8, generator=torch.Generator().manual_seed(10))
    x[:7] = 0.0  # ties: equal maxima and whole-zero ReLU maps
    labels = torch.arange(60) % 3
    dataset = AtlasDataset(TensorDataset(x, labels), CLASSES, (), (), "test", "fp")
    loaded = LoadedModel(ModelSection("d", "x:y"), model, "fp", {"parameters": 0})
    cfg = ScanSection(top_k=3, batch_size=8, sample_size=20)
    found = []
    original = scan_mod.derived_layers
    monkeypatch.setattr(scan_mod, "derived_layers", lambda *a: found.append(original(*a)) or found[-1])
    derived = scan_model(loaded, dataset, layers, cfg, CPU, progress=False)
    monkeypatch.setattr(scan_mod, "derived_layers", lambda *a: {})
    hooked = scan_model(loaded, dataset, layers, cfg, CPU, progress=False)
    scans_equal(derived, hooked)
    expect = {} if make is AddThenReLU else {"relu": "conv", "block.act": "block.fc"}
    assert found == [expect]
    outputs = {n: [] for n in layers}  # over the scan's batches (a kernel may round a batch of 60 differently)
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: outputs[n].append(o.clone())) for n in layers]
    try:
        with torch.inference_mode():
            for i in range(0, 60, 8):
                model(x[i:i + 8])
    finally:
        for h in handles:
            h.remove()
    for layer in derived.layers:
        v, p, maps = brute_layer(torch.cat(outputs[layer.info.name]))
        check_topk(layer.top, v, p, maps, 3, True)
        check_topk(layer.bottom, v, p, maps, 3, False)
        check_moments({k: layer.stats[k] for k in ("count", "nonfinite", "mean", "std", "min", "max")}, v)


FAULTS_OF_LARGE_BLOCKS = """
import resource, sys
sys.path.insert(0, {root!r})
import torch
from atlas_builder.scan import keep_freed_memory
if {keep}:
    assert keep_freed_memory()
for _ in range(3):  # the heap settles
    torch.ones(2**24)  # 64 MB, above glibc's largest mmap threshold: written, then freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.ones(2**24)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_keep_freed_memory_reuses_large_blocks_without_page_faults():
    """By default each 64 MB block is mapped afresh (16,384 page faults each); kept, it is reused (fewer faults
    in five blocks than in one)."""
    root = str(Path(scan_mod.__file__).resolve().parent.parent)
    faults = {keep: int(subprocess.run([sys.executable, "-c", FAULTS_OF_LARGE_BLOCKS.format(root=root, keep=keep)],
                                       capture_output=True, text=True, check=True).stdout)
              for keep in (False, True)}
    assert faults[False] > 5 * 16_000
    assert faults[True] < 16_000

