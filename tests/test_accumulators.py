"""Accumulators against brute-force computations, on the CPU and (when present) on CUDA.

Every brute force holds all values in memory (numpy) and computes the statistic
directly; the streaming accumulators must agree with it for every batch size, for
shards merged in either order, and with NaN/Inf values mixed in.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atlas_builder import accumulators as acc_mod
from atlas_builder.accumulators import (Activity, ClassMeans, LayerAccumulator, Moments, SampleRows, TopK,
                                        active_fraction, key_values, order_keys, sample_ids, unit_maps, unit_values)
from atlas_builder.errors import AtlasError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(params=["compact", "every-slot"])
def writes(request, monkeypatch) -> str:
    """Both ways a top-k update writes its slots: the CPU's (the changed ones, found by nonzero) and the other
    devices' (every slot, unchanged ones to a spare), the second forced on the CPU too."""
    if request.param == "every-slot":
        monkeypatch.setattr(acc_mod, "COMPACT_WRITES", ())
    return request.param


# --- brute force ----------------------------------------------------------------------

def brute_topk(values: np.ndarray, k: int, largest: bool = True):
    """values [N, U] -> per unit the k largest (smallest) finite values, ties to the lower id: values [U, k],
    ids [U, k], valid [U, k] (entries past the number of finite values: NaN, -1, False)."""
    n, n_units = values.shape
    out_v = np.full((n_units, k), np.nan)
    out_i = np.full((n_units, k), -1, dtype=np.int64)
    valid = np.zeros((n_units, k), dtype=bool)
    for u in range(n_units):
        col = values[:, u].astype(np.float64)
        finite = np.flatnonzero(np.isfinite(col))
        key = -col[finite] if largest else col[finite]
        order = finite[np.lexsort((finite, key))][:k]  # by key, then by id
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


def brute_class_means(values: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.full((values.shape[1], n_classes), np.nan)
    for c in range(n_classes):
        for u in range(values.shape[1]):
            col = values[labels == c, u].astype(np.float64)
            col = col[np.isfinite(col)]
            if len(col):
                out[u, c] = col.mean()
    return out


def check_topk(result, values, maps, k, largest, rtol=0.0, kept_maps=True):
    """A TopKResult against the brute force over all values [N, U] and maps [N, U, M] (None: no maps, positions
    -1); a kept position is its map's first maximum; kept_maps False: the maps themselves are not kept."""
    bv, bi, bvalid = brute_topk(values, k, largest)
    np.testing.assert_array_equal(result.valid, bvalid)
    np.testing.assert_array_equal(result.ids, bi)
    same(result.values, bv.astype(np.float32), rtol, "values")
    units = np.broadcast_to(np.arange(values.shape[1])[:, None], bi.shape)
    if maps is None:
        assert result.maps is None and (result.positions == -1).all()
        return
    expected = maps[bi[bvalid], units[bvalid]].astype(np.float32)
    np.testing.assert_array_equal(result.positions[bvalid], expected.argmax(1))
    assert (result.positions[~bvalid] == -1).all()
    if not kept_maps:
        assert result.maps is None
        return
    same(result.maps[bvalid], expected, rtol, "maps")
    assert (result.maps[~bvalid] == 0).all()


def same(x, y, rtol: float = 0.0, name: str = ""):
    """Arrays identical; with rtol, float arrays equal up to that."""
    x, y = np.asarray(x), np.asarray(y)
    if rtol and x.dtype.kind == "f":
        finite = y[np.isfinite(y)]
        atol = rtol * float(np.abs(finite).max()) if finite.size else 0.0
        np.testing.assert_allclose(x.astype(np.float64), y.astype(np.float64), rtol=rtol, atol=atol, equal_nan=True,
                                   err_msg=name)
    else:
        np.testing.assert_array_equal(x, y, err_msg=name)


def assert_results_equal(a, b):
    for name in ("values", "ids", "positions", "valid"):
        same(getattr(a, name), getattr(b, name), name=name)
    assert (a.maps is None) == (b.maps is None)
    if a.maps is not None:
        same(a.maps, b.maps, name="maps")


def random_activations(n=60, n_units=6, n_map=5, seed=0, decimals=1):
    """values [N, U] rounded (many ties) with planted ties at the top and bottom, and float32 maps [N, U, M]."""
    rng = np.random.default_rng(seed)
    values = np.round(rng.normal(size=(n, n_units)), decimals).astype(np.float32)
    if n > 41:
        values[[11, 23, 40, 41], 2] = 9.0  # four-way tie at the top of unit 2: ids 11, 23, 40, 41 in that order
        values[[5, 33, 34], 4] = -9.0  # three-way tie at the bottom of unit 4
    maps = np.round(rng.normal(size=(n, n_units, n_map)), 1).astype(np.float32)  # ties within maps too
    return values, maps


def with_nonfinite(values: np.ndarray, seed=1, kinds=(np.nan, np.inf, -np.inf)) -> np.ndarray:
    """A copy with non-finite values in units 0, 1 and 3 only: unit 0 in a third of the rows, unit 1 everywhere
    but ids 7 and N-3, unit 3 everywhere."""
    rng = np.random.default_rng(seed)
    dirty = values.copy()
    n = len(values)
    dirty[rng.choice(n, size=n // 3, replace=False), 0] = rng.choice(kinds, size=n // 3)
    dirty[:, 1] = rng.choice(kinds, size=n)
    dirty[[7, n - 3], 1] = [0.25, -0.5]
    dirty[:, 3] = rng.choice(kinds, size=n)
    return dirty


NAN_ONLY = (np.nan,)
MIXED = (np.nan, np.inf, -np.inf)


def topk_pass(values, maps, k, largest, batch, device="cpu", ids=None, with_maps=True) -> TopK:
    """A TopK fed `batch` rows at a time (ids ascending within the pass)."""
    ids = np.arange(len(values)) if ids is None else ids
    top = TopK(values.shape[1], k, largest, device)
    for i in range(0, len(ids), batch):
        rows = ids[i:i + batch]
        top.update(torch.from_numpy(values[rows]).to(device), torch.from_numpy(rows).to(device),
                   torch.from_numpy(maps[rows]).to(device) if with_maps else None)
    return top


# --- keys --------------------------------------------------------------------------------

FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(FLOATS, st.integers(0, 2**32 - 1)), min_size=1, max_size=40))
def test_keys_order_by_value_then_lower_id_and_decode_exactly(entries):
    values = torch.tensor([[v] for v, _ in entries], dtype=torch.float32)
    ids = torch.tensor([i for _, i in entries])
    for largest in (True, False):
        keys = order_keys(values, ids, largest)[0]
        finite = torch.isfinite(values[:, 0])
        assert (keys[~finite] == acc_mod.EMPTY).all() and (keys[finite] > acc_mod.EMPTY).all()
        decoded, got_ids = key_values(keys[finite], largest)
        assert torch.equal(decoded, values[finite, 0] + 0.0) and torch.equal(got_ids, ids[finite])
        sign = 1.0 if largest else -1.0
        rank = sorted((i for i in range(len(entries)) if finite[i]),
                      key=lambda i: (-sign * (float(values[i, 0]) + 0.0), int(ids[i])))
        by_key = sorted((i for i in range(len(entries)) if finite[i]), key=lambda i: -int(keys[i]))
        assert [(float(values[i, 0]) + 0.0, int(ids[i])) for i in by_key] == \
            [(float(values[i, 0]) + 0.0, int(ids[i])) for i in rank]


# --- TopK ------------------------------------------------------------------------------

@pytest.mark.parametrize("largest", [True, False])
def test_topk_matches_brute_force_for_every_batch_size(largest, device, writes):
    values, maps = random_activations()
    k = 5
    results = [topk_pass(values, maps, k, largest, batch, device).finalize() for batch in (1, 4, 7, 60, 100)]
    for result in results:
        check_topk(result, values, maps, k, largest)
        assert_results_equal(result, results[0])
        assert result.valid.all() and result.values.shape == (6, k)
    best = results[0]
    if largest:
        np.testing.assert_array_equal(best.ids[2, :4], [11, 23, 40, 41])  # planted tie: lower ids first
        assert (np.diff(best.values, axis=1) <= 0).all()
    else:
        np.testing.assert_array_equal(best.ids[4, :3], [5, 33, 34])
        assert (np.diff(best.values, axis=1) >= 0).all()


@pytest.mark.parametrize("largest", [True, False])
def test_topk_ties_across_batches_go_to_lower_ids(largest, device, writes):
    """All values equal (a ReLU's zeros, say): the k lowest ids win, whatever the batch boundaries."""
    n, k = 23, 6
    values = np.full((n, 2), 1.5, dtype=np.float32)
    maps = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None], (n, 2, 3)).copy()
    for batch in (1, 2, 5, 23):
        result = topk_pass(values, maps, k, largest, batch, device).finalize()
        np.testing.assert_array_equal(result.ids, [list(range(k))] * 2)
        np.testing.assert_array_equal(result.maps[:, :, 0], result.ids)


def test_topk_without_maps_and_with_fewer_examples_than_k(device):
    values, maps = random_activations(seed=3)
    check_topk(topk_pass(values, maps, 4, True, 9, device, with_maps=False).finalize(), values, None, 4, True)
    values, maps = random_activations(n=3, seed=4)
    result = topk_pass(values, maps, 10, True, 2, device).finalize()
    np.testing.assert_array_equal(result.valid, np.broadcast_to(np.arange(10) < 3, (6, 10)))
    check_topk(result, values, maps, 10, True)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("split", ["contiguous", "interleaved"])
def test_topk_merge_of_two_shards_in_either_order_equals_one_pass(largest, split, device, writes):
    values, maps = random_activations(n=70, seed=5)
    values = with_nonfinite(values, seed=6)
    k = 6
    whole = topk_pass(values, maps, k, largest, 8, device).finalize()
    check_topk(whole, values, maps, k, largest)
    ids = np.arange(70)
    a_ids, b_ids = (ids[:31], ids[31:]) if split == "contiguous" else (ids[::2], ids[1::2])
    for first, second in ((a_ids, b_ids), (b_ids, a_ids)):
        top = topk_pass(values, maps, k, largest, 5, device, ids=first)
        top.merge(topk_pass(values, maps, k, largest, 3, device, ids=second))
        assert_results_equal(top.finalize(), whole)


@pytest.mark.parametrize("split", ["contiguous", "interleaved"])
def test_topk_keeping_positions_only_merges_like_one_pass(split, device, writes):
    """keep_maps=False (the bottom-k's): each entry keeps its map's first maximum, not the map."""
    values, maps = random_activations(n=70, seed=15)
    ids = np.arange(70)
    a_ids, b_ids = (ids[:31], ids[31:]) if split == "contiguous" else (ids[::2], ids[1::2])

    def run(part, batch):
        top = TopK(6, 5, False, device, keep_maps=False)
        for i in range(0, len(part), batch):
            rows = part[i:i + batch]
            top.update(torch.from_numpy(values[rows]).to(device), torch.from_numpy(rows).to(device),
                       torch.from_numpy(maps[rows]).to(device))
        return top

    whole = run(ids, 9).finalize()
    check_topk(whole, values, maps, 5, False, kept_maps=False)
    merged = run(a_ids, 4)
    merged.merge(run(b_ids, 6))
    assert_results_equal(merged.finalize(), whole)


def test_topk_merge_with_an_empty_shard(device):
    values, maps = random_activations(seed=7)
    whole = topk_pass(values, maps, 4, True, 10, device)
    empty = TopK(6, 4, device=device)
    empty.merge(whole)
    assert_results_equal(empty.finalize(), whole.finalize())
    whole.merge(TopK(6, 4, device=device))
    check_topk(whole.finalize(), values, maps, 4, True)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("kinds,batch", [(NAN_ONLY, 1), (NAN_ONLY, 50), (MIXED, 1), (MIXED, 4), (MIXED, 50)],
                         ids=["nan-1", "nan-50", "mixed-1", "mixed-4", "mixed-50"])
def test_topk_nonfinite_never_kept_and_other_units_unchanged(largest, kinds, batch, device, writes):
    values, maps = random_activations(n=50, seed=8)
    dirty = with_nonfinite(values, kinds=kinds)
    k = 5
    clean = topk_pass(values, maps, k, largest, batch, device).finalize()
    result = topk_pass(dirty, maps, k, largest, batch, device).finalize()
    check_topk(result, dirty, maps, k, largest)
    assert result.valid[0].all()
    np.testing.assert_array_equal(result.valid[1], [True, True, False, False, False])
    assert set(result.ids[1, :2]) == {7, 47}
    assert not result.valid[3].any()
    for u in (2, 4, 5):
        for name in ("values", "ids", "positions", "valid", "maps"):
            np.testing.assert_array_equal(getattr(result, name)[u], getattr(clean, name)[u])


@pytest.mark.parametrize("largest", [True, False])
def test_topk_infinite_values_do_not_crowd_out_finite_ones(largest, device):
    values = torch.arange(20, dtype=torch.float32).view(20, 1).repeat(1, 2)
    values[15:, 0] = torch.inf if largest else -torch.inf
    if not largest:
        values[:, 0] = values[:, 0].flip(0)
    top = TopK(2, 3, largest, device)
    top.update(values.to(device), torch.arange(20, device=device))
    result = top.finalize()
    assert result.valid.all(), result.values
    check_topk(result, values.numpy(), None, 3, largest)


def test_topk_maps_of_token_outputs_any_strides(device):
    """Maps given as a transposed view ([B, T, D] token outputs seen as [B, D, T]) are copied right."""
    out = torch.randn(30, 7, 4, generator=torch.Generator().manual_seed(9)).to(device)
    maps = unit_maps(out)
    assert not maps.is_contiguous()
    values = unit_values(out)
    top = TopK(4, 3, device=device)
    for i in range(0, 30, 8):
        top.update(values[i:i + 8], torch.arange(i, min(i + 8, 30), device=device), maps[i:i + 8])
    check_topk(top.finalize(), values.cpu().numpy(), maps.cpu().numpy(), 3, True)


# --- Moments ---------------------------------------------------------------------------

def moments_pass(values: np.ndarray, batch: int, device="cpu") -> Moments:
    moments = Moments(values.shape[1], device)
    for i in range(0, len(values), batch):
        moments.update(torch.from_numpy(values[i:i + batch]).to(device))
    return moments


MOMENT_RTOL = {"mean": 1e-12, "std": 1e-10, "min": 0.0, "max": 0.0}  # float64 statistics: summation order only


def check_moments(result, values):
    brute = brute_moments(values)
    np.testing.assert_array_equal(result["count"], brute["count"])
    np.testing.assert_array_equal(result["nonfinite"], brute["nonfinite"])
    for name, rtol in MOMENT_RTOL.items():
        np.testing.assert_allclose(result[name], brute[name], rtol=rtol, atol=1e-12, equal_nan=True, err_msg=name)


def test_moments_match_brute_force_for_every_batch_size_and_merge(device):
    rng = np.random.default_rng(10)
    values = (rng.normal(size=(101, 5)) * [1, 3, 0.01, 100, 1] + [0, 1, 5, -40, 1e3]).astype(np.float32)
    for batch in (1, 13, 50, 101):
        check_moments(moments_pass(values, batch, device).finalize(), values)
    for cut in (1, 30, 100):
        for first, second in ((values[:cut], values[cut:]), (values[cut:], values[:cut])):
            moments = moments_pass(first, 7, device)
            moments.merge(moments_pass(second, 11, device))
            check_moments(moments.finalize(), values)


def test_moments_std_of_a_large_offset_small_spread_unit(device):
    rng = np.random.default_rng(13)
    values = (3000 + 0.01 * rng.normal(size=(1000, 2))).astype(np.float32)
    values[:, 1] = 1e4 + 1e-3 * rng.normal(size=1000)
    for batch in (1000, 64):
        result = moments_pass(values, batch, device).finalize()
        np.testing.assert_allclose(result["std"], values.astype(np.float64).std(0), rtol=1e-9)


def test_moments_nonfinite_counted_and_other_units_unchanged(device):
    values = np.random.default_rng(11).normal(size=(60, 6)).astype(np.float32)
    dirty = with_nonfinite(values, seed=12)
    for batch in (1, 8, 60):
        clean = moments_pass(values, batch, device).finalize()
        result = moments_pass(dirty, batch, device).finalize()
        check_moments(result, dirty)
        assert result["count"][3] == 0 and result["nonfinite"][3] == 60
        assert np.isnan([result[name][3] for name in ("mean", "std", "min", "max")]).all()
        assert result["count"][1] == 2 and result["min"][1] == -0.5 and result["max"][1] == 0.25
        for name in clean:
            np.testing.assert_allclose(result[name][[2, 4, 5]], clean[name][[2, 4, 5]],
                                       rtol=MOMENT_RTOL.get(name, 0.0), err_msg=name)


# --- Activity --------------------------------------------------------------------------

def random_conv(n=45, seed=20):
    """[N, U, H, W] conv outputs with an always-active unit 1 and a never-active unit 2."""
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(n, 5, 3, 4, generator=g)
    out[:, 1] = out[:, 1].abs() + 1.0
    out[:, 2] = -out[:, 2].abs()
    return out


def activity_pass(out: torch.Tensor, threshold: float, batch: int, device="cpu") -> Activity:
    activity = Activity(out.shape[1], threshold, device)
    for i in range(0, len(out), batch):
        chunk = out[i:i + batch].to(device)
        activity.update(unit_values(chunk), active_fraction(chunk, threshold))
    return activity


@pytest.mark.parametrize("threshold", [0.0, 0.7])
def test_activity_matches_brute_force_and_merge(threshold, device):
    out = random_conv()
    o = out.numpy().astype(np.float64)
    brute_frac = (o.max(axis=(2, 3)) > threshold).mean(0)
    brute_pos = (o > threshold).mean(axis=(2, 3)).mean(0)
    for batch in (1, 7, 45):
        result = activity_pass(out, threshold, batch, device).finalize()
        np.testing.assert_allclose(result["frac_active"], brute_frac, rtol=1e-12)
        np.testing.assert_allclose(result["position_activity"], brute_pos, rtol=1e-6)
    assert result["frac_active"][1] == 1 and result["position_activity"][1] == 1
    assert result["frac_active"][2] == 0 and result["position_activity"][2] == 0
    assert 0 < result["position_activity"][0] < result["frac_active"][0] <= 1
    for first, second in ((out[:20], out[20:]), (out[20:], out[:20])):
        activity = activity_pass(first, threshold, 6, device)
        activity.merge(activity_pass(second, threshold, 4, device))
        merged = activity.finalize()
        np.testing.assert_allclose(merged["frac_active"], brute_frac, rtol=1e-12)
        np.testing.assert_allclose(merged["position_activity"], brute_pos, rtol=1e-6)


def test_activity_flat_outputs_and_nonfinite_positions():
    values = torch.randn(30, 4, generator=torch.Generator().manual_seed(21))
    activity = Activity(4, 0.2)
    activity.update(values, active_fraction(values, 0.2))
    result = activity.finalize()
    np.testing.assert_allclose(result["frac_active"], (values.numpy() > 0.2).mean(0))
    np.testing.assert_array_equal(result["position_activity"], result["frac_active"])
    dirty = random_conv(seed=22)
    dirty[::3, 0, 1, 2] = torch.nan
    dirty[2::5, 3, 2, 1] = torch.inf
    result = activity_pass(dirty, 0.0, 8).finalize()
    np.testing.assert_allclose(result["position_activity"], (dirty.numpy() > 0).mean(axis=(2, 3)).mean(0), rtol=1e-6)


# --- ClassMeans, SampleRows ---------------------------------------------------------------

def class_pass(values: np.ndarray, labels: np.ndarray, n_classes: int, batch: int, device="cpu") -> ClassMeans:
    means = ClassMeans(n_classes, values.shape[1], device)
    for i in range(0, len(values), batch):
        means.update(torch.from_numpy(values[i:i + batch]).to(device), torch.from_numpy(labels[i:i + batch]))
    return means


def test_class_means_match_brute_force_ignore_unlabelled_and_merge(device):
    rng = np.random.default_rng(30)
    n, n_classes = 80, 4
    values = rng.normal(size=(n, 5)).astype(np.float32)
    labels = rng.choice([-1, 0, 1, 2, 7], size=n)  # class 3 has no example; 7 is no class
    values[(labels == -1) | (labels == 7)] = 1000.0  # unlabelled examples would move every mean
    brute = brute_class_means(values, labels, n_classes)
    assert np.isnan(brute[:, 3]).all() and np.isfinite(brute[:, :3]).all()
    for batch in (1, 9, 80):
        result = class_pass(values, labels, n_classes, batch, device).finalize()
        assert result.shape == (5, n_classes)
        np.testing.assert_allclose(result, brute, rtol=1e-12, equal_nan=True)
    assert (np.abs(result[:, :3]) < 10).all()
    means = class_pass(values[33:], labels[33:], n_classes, 5, device)
    means.merge(class_pass(values[:33], labels[:33], n_classes, 7, device))
    np.testing.assert_allclose(means.finalize(), brute, rtol=1e-12, equal_nan=True)


def test_class_means_nonfinite_left_out_and_other_units_unchanged(device):
    values = np.random.default_rng(31).normal(size=(60, 6)).astype(np.float32)
    labels = np.arange(60) % 3
    dirty = with_nonfinite(values, seed=32)
    clean = class_pass(values, labels, 3, 7, device).finalize()
    result = class_pass(dirty, labels, 3, 7, device).finalize()
    np.testing.assert_allclose(result, brute_class_means(dirty, labels, 3), rtol=1e-12, equal_nan=True)
    assert np.isnan(result[3]).all()
    np.testing.assert_array_equal(result[[2, 4, 5]], clean[[2, 4, 5]])


def test_sample_ids_deterministic_sorted_and_all_when_large():
    a = sample_ids(100, 17, seed=5)
    np.testing.assert_array_equal(a, sample_ids(100, 17, seed=5))
    assert len(a) == 17 and len(set(a)) == 17 and (np.diff(a) > 0).all() and a.min() >= 0 and a.max() < 100
    assert not np.array_equal(a, sample_ids(100, 17, seed=6))
    np.testing.assert_array_equal(sample_ids(100, 100, seed=5), np.arange(100))
    np.testing.assert_array_equal(sample_ids(40, 2000, seed=0), np.arange(40))
    assert len(sample_ids(40, 0, seed=0)) == 0


def rows_pass(values: np.ndarray, sample: np.ndarray, batch: int, ids=None, device="cpu") -> SampleRows:
    ids = np.arange(len(values)) if ids is None else ids
    rows = SampleRows(sample, values.shape[1], device)
    for i in range(0, len(ids), batch):
        chunk = np.ascontiguousarray(ids[i:i + batch])
        rows.update(torch.from_numpy(values[chunk]).to(device), chunk)
    return rows


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_sample_rows_keep_where_each_sampled_example_peaked(device, reduce):
    """A token layer's sample rows also keep each unit's peak token (the first maximum, whatever the value's
    reduction), batch by batch and across a merge, against a brute-force argmax; other layers keep none."""
    rng = np.random.default_rng(41)
    out = torch.from_numpy(rng.normal(size=(60, 12, 5)).astype(np.float32))  # [B, T, D]
    out[:, 3] = out[:, 7] = out.max(1).values + 1  # a tie: the first maximum, token 3
    out[::2, 3] -= 5
    sample = sample_ids(60, 20, seed=2)
    want = out.transpose(1, 2).argmax(2).numpy()[sample]
    for batches in ((range(0, 60, 7),), (range(0, 30, 4), range(30, 60, 9))):
        parts = []
        for starts in batches:
            acc = LayerAccumulator((12, 5), 3, 1, sample, sample[:4], device, reduce)
            for first in starts:
                stop = min(first + (starts.step), starts.stop)
                acc.update(out[first:stop].to(device), first, torch.zeros(stop - first, dtype=torch.long, device=device))
            parts.append(acc)
        for other in parts[1:]:
            parts[0].merge(other)
        np.testing.assert_array_equal(parts[0].sample.positions(), want)
    assert (want == 3).any() and (want == 7).any()
    assert LayerAccumulator((5, 4, 4), 3, 1, sample, sample[:4], device).sample.positions() is None


def test_sample_rows_keep_exactly_the_sampled_examples(device):
    rng = np.random.default_rng(40)
    values = rng.normal(size=(90, 4)).astype(np.float32) * 3
    values[5, 1], values[6, 2], values[7, 3] = np.nan, np.inf, -np.inf
    sample = sample_ids(90, 25, seed=9)
    expected = values[sample].astype(np.float16)
    for batch in (1, 8, 90):
        result = rows_pass(values, sample, batch, device=device).finalize()
        assert result.dtype == np.float16 and result.shape == (25, 4)
        np.testing.assert_array_equal(result, expected)  # NaN == NaN here
    ids = np.arange(90)
    for first, second in ((ids[:50], ids[50:]), (ids[50:], ids[:50]), (ids[::2], ids[1::2])):
        rows = rows_pass(values, sample, 6, first, device)
        rows.merge(rows_pass(values, sample, 4, second, device))
        np.testing.assert_array_equal(rows.finalize(), expected)
    np.testing.assert_array_equal(rows_pass(values, sample_ids(90, 500, 9), 13, device=device).finalize(),
                                  values.astype(np.float16))
    assert rows_pass(values, sample_ids(90, 0, 9), 13, device=device).finalize().shape == (0, 4)


# --- what a unit's value is ----------------------------------------------------------------

def test_unit_values_and_maps_of_each_output_kind():
    out = torch.tensor([[[[1.0, 9.0], [3.0, 4.0]], [[-1.0, -2.0], [-3.0, -0.5]]]])  # [1, 2, 2, 2]
    assert unit_values(out, "max").tolist() == [[9.0, -0.5]]
    assert unit_values(out, "mean").tolist() == [[4.25, -1.625]]
    tokens = torch.randn(3, 7, 5)
    assert torch.equal(unit_values(tokens), tokens.amax(1)) and torch.equal(unit_maps(tokens)[:, 2], tokens[:, :, 2])
    flat = torch.randn(2, 3).half()
    assert unit_values(flat).dtype == torch.float32 and unit_maps(flat) is None
    for shape in ((2, 3, 4, 5, 6), (7,)):
        with pytest.raises(AtlasError, match=rf"layer output of shape \({', '.join(map(str, shape))},?\) is not "
                                             rf"supported"):
            unit_values(torch.zeros(shape))


# --- LayerAccumulator: the scan's path ---------------------------------------------------

def layer_pass(out: torch.Tensor, labels: torch.Tensor, batch: int, first: int = 0, device="cpu", k=4,
               sample=None, activity=None, reduce="max", threshold=0.1, flush_every=1) -> LayerAccumulator:
    n = len(out) + first
    sample = sample_ids(n, 12, seed=2) if sample is None else sample
    activity = sample if activity is None else activity
    layer = LayerAccumulator(tuple(out.shape[1:]), k, 3, sample, activity, device,
                             reduce, threshold)
    for step, i in enumerate(range(0, len(out), batch)):
        layer.update(out[i:i + batch].to(device), first + i, labels[i:i + batch].to(device))
        if step % flush_every == 0:
            layer.flush()
    layer.flush()
    return layer


def conv_outputs(n=50, seed=80):
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(n, 4, 3, 3, generator=g).round(decimals=1)  # rounded: ties within and across maps
    out[[3, 20, 21, 44], 1] = 4.5  # whole maps equal: a tie for unit 1's top
    labels = torch.arange(n) % 3
    labels[7] = -1
    return out, labels


@pytest.mark.parametrize("batch,flush_every", [(1, 1), (4, 3), (16, 1), (50, 100)])
@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_layer_accumulator_matches_brute_force(batch, flush_every, reduce, device, writes):
    out, labels = conv_outputs()
    sample = sample_ids(50, 12, seed=2)
    layer = layer_pass(out, labels, batch, device=device, sample=sample, reduce=reduce, flush_every=flush_every)
    maps = out.flatten(2).numpy()
    v = unit_values(out, reduce).numpy()
    check_topk(layer.top.finalize(), v, maps, 4, True, rtol=1e-6 if reduce == "mean" else 0.0)
    check_topk(layer.bottom.finalize(), v, maps, 4, False, rtol=1e-6 if reduce == "mean" else 0.0, kept_maps=False)
    if reduce == "max":
        np.testing.assert_array_equal(layer.top.finalize().ids[1], [3, 20, 21, 44])
    check_moments(layer.moments.finalize(), v)
    activity = layer.activity.finalize()
    np.testing.assert_allclose(activity["frac_active"], (v > 0.1).mean(0))
    np.testing.assert_allclose(activity["position_activity"], (maps[sample] > 0.1).mean(2).mean(0), rtol=1e-6)
    np.testing.assert_allclose(layer.classes.finalize(), brute_class_means(v, labels.numpy(), 3), rtol=1e-12)
    np.testing.assert_array_equal(layer.sample.finalize(), v[sample].astype(np.float16))


def test_layer_accumulator_of_token_outputs(device):
    g = torch.Generator().manual_seed(81)
    out = torch.randn(40, 6, 5, generator=g)  # [B, T, D]
    labels = torch.arange(40) % 3
    layer = layer_pass(out, labels, 9, device=device, activity=np.arange(40))
    v, maps = out.amax(1).numpy(), out.transpose(1, 2).numpy()
    check_topk(layer.top.finalize(), v, maps, 4, True)
    np.testing.assert_allclose(layer.activity.finalize()["position_activity"], (maps > 0.1).mean(2).mean(0),
                               rtol=1e-6)


def test_layer_accumulator_merge_in_either_order_equals_one_pass(device):
    out, labels = conv_outputs(n=60, seed=82)
    out[5, 1, 0, 0], out[9, 2, 1, 1] = torch.nan, torch.inf
    sample = sample_ids(60, 20, seed=3)
    whole = layer_pass(out, labels, 7, device=device, sample=sample)
    for cut in (25, 40):
        def part(which):
            return layer_pass(out[:cut], labels[:cut], 8, device=device, sample=sample) if which == 0 else \
                layer_pass(out[cut:], labels[cut:], 13, first=cut, device=device, sample=sample)
        for order in ((0, 1), (1, 0)):
            merged = part(order[0])
            merged.merge(part(order[1]))
            assert_results_equal(merged.top.finalize(), whole.top.finalize())
            assert_results_equal(merged.bottom.finalize(), whole.bottom.finalize())
            for name in ("moments", "activity"):
                for key, value in getattr(merged, name).finalize().items():
                    same(value, getattr(whole, name).finalize()[key], 1e-12, key)
            same(merged.classes.finalize(), whole.classes.finalize(), 1e-12)
            same(merged.sample.finalize(), whole.sample.finalize())
