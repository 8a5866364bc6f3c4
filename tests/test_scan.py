"""The scan: summary helpers against brute force, and whole scans of small models against every layer's
output computed directly (all of it in memory), on the CPU and (when present) on CUDA."""

from __future__ import annotations

import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import fixtures_models
from atlas_builder.accumulators import POSITION_SAMPLE, LayerAccumulator, active_fraction, sample_ids, unit_values
from atlas_builder.config import ModelSection, ScanSection
from atlas_builder.errors import AtlasError
from atlas_builder.hooks import LayerInfo
from atlas_builder.scan import (class_selectivity, finish_scan, histogram, redundancy, scan_model, scan_part,
                                shard_range, summarize)
from atlas_builder.sources import AtlasDataset, LoadedModel
from test_accumulators import (DEVICES, MOMENT_RTOL, assert_results_equal, brute_class_means, check_moments,
                               check_topk, same)

CLASSES = ("zero", "one", "two")


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


# --- histogram, selectivity, redundancy ----------------------------------------------------

def test_histogram_matches_numpy_with_the_same_edges():
    rng = np.random.default_rng(50)
    sample = np.column_stack([rng.normal(size=300), rng.exponential(size=300) * 7, rng.uniform(-2, 5, size=300),
                              rng.normal(size=300), np.full(300, 0.75), np.full(300, np.nan)]).astype(np.float16)
    sample[rng.choice(300, 40, replace=False), 3] = np.nan
    sample[rng.choice(300, 10, replace=False), 3] = np.inf
    sample[rng.choice(300, 10, replace=False), 0] = -np.inf
    counts, lo, hi = histogram(sample, 30)
    assert counts.shape == (6, 30)
    for u in range(4):
        col = sample[:, u].astype(np.float64)
        finite = col[np.isfinite(col)]
        assert lo[u] == finite.min() and hi[u] == finite.max()
        expected, _ = np.histogram(finite, bins=30, range=(finite.min(), finite.max()))
        np.testing.assert_array_equal(counts[u], expected, err_msg=f"unit {u}")
    assert counts[4].sum() == 300 and lo[4] == hi[4] == 0.75  # constant: every value in one bin
    assert counts[5].sum() == 0 and lo[5] == hi[5] == 0  # no finite value
    assert histogram(np.zeros((0, 3), np.float16), 5)[0].shape == (3, 5)  # no sample at all


def test_class_selectivity_hand_computed():
    nan = np.nan
    means = np.array([
        [0.0, 0.0, 5.0],  # fires for class 2 only -> 1
        [3.0, 3.0, 3.0],  # equal for all -> 0
        [-2.0, 4.0, -1.0],  # negative means clipped to 0 -> 1, class 1
        [-3.0, -1.0, -2.0],  # never positive -> 0, top class 1 (the highest mean)
        [4.0, 2.0, 0.0],  # mu_rest = 1 -> (4 - 1) / (4 + 1)
        [2.0, 1.0, nan],  # two classes present: (2 - 1) / 3
        [nan, 4.0, nan],  # one class present -> NaN, top class still known
        [nan, nan, nan],  # none -> NaN, top -1
    ])
    index, top = class_selectivity(means)
    np.testing.assert_allclose(index, [1.0, 0.0, 1.0, 0.0, 0.6, 1 / 3, nan, nan], equal_nan=True)
    # the top class is the highest mean itself, also where every mean is negative (clipped, all tie at 0)
    np.testing.assert_array_equal(top, [2, 0, 1, 1, 0, 0, 1, -1])


def test_class_selectivity_matches_the_formula_on_random_means():
    rng = np.random.default_rng(64)
    means = rng.normal(size=(300, 12)) + rng.normal(size=(300, 1))
    means[rng.random(means.shape) < 0.2] = np.nan
    means[:5] = np.nan
    means[5:10, 1:] = np.nan
    index, top = class_selectivity(means)
    clipped = np.clip(means, 0, None)
    present = ~np.isnan(clipped)
    n = present.sum(1)
    mu_max = np.nanmax(np.where(present, clipped, -np.inf), 1)
    mu_rest = (np.nansum(clipped, 1) - mu_max) / np.maximum(n - 1, 1)
    with np.errstate(invalid="ignore"):
        brute = np.where(mu_max + mu_rest > 0, (mu_max - mu_rest) / (mu_max + mu_rest), 0.0)
    np.testing.assert_allclose(index, np.where(n >= 2, brute, np.nan), rtol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(top, np.where(n > 0, np.where(present, means, -np.inf).argmax(1), -1))


def brute_partners(sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every unit's most correlated other unit by np.corrcoef in float64 (-1 and NaN for constant units)."""
    x = sample.astype(np.float64)
    live = x.std(0) > 0
    full = np.full((x.shape[1],) * 2, -np.inf)
    full[np.ix_(live, live)] = np.corrcoef(x[:, live], rowvar=False)
    np.fill_diagonal(full, -np.inf)
    return np.where(live, full.argmax(1), -1), np.where(live, full.max(1), np.nan)


def test_redundancy_finds_planted_duplicate_and_skips_constant_units():
    rng = np.random.default_rng(60)
    sample = rng.normal(size=(200, 6))
    sample[:, 3] = 2 * sample[:, 1] + 0.5
    sample[:, 5] = 1.25
    sample = sample.astype(np.float16)
    partner, corr = redundancy(sample)
    assert partner[3] == 1 and partner[1] == 3 and corr[3] > 0.999 and corr[1] > 0.999
    assert partner[5] == -1 and np.isnan(corr[5]) and 5 not in partner
    brute_partner, brute_corr = brute_partners(sample)
    np.testing.assert_array_equal(partner, brute_partner)
    np.testing.assert_allclose(corr, brute_corr, atol=1e-9, equal_nan=True)


def test_redundancy_near_ties_decided_in_float64():
    rng = np.random.default_rng(62)
    base = rng.normal(size=500)
    columns = [base] + [base + scale * rng.normal(size=500) for scale in (1.0e-4, 1.00001e-4, 0.99999e-4, 1.00002e-4)]
    columns += [rng.normal(size=500) for _ in range(6)] + [np.full(500, 3.0)]
    sample = np.column_stack(columns)
    partner, corr = redundancy(sample)
    brute_partner, brute_corr = brute_partners(sample)
    np.testing.assert_array_equal(partner, brute_partner)
    np.testing.assert_allclose(corr, brute_corr, rtol=0, atol=1e-12, equal_nan=True)


def test_redundancy_in_row_chunks_equals_the_whole_matrix(monkeypatch):
    """The correlation matrix is taken a few rows at a time (a wide SAE's [U, U] would not fit) and screened in
    float32: the same partners as the float64 brute force, with chunk edges inside planted duplicates, a
    constant unit, and more near-ties than the screen hands on."""
    import atlas_builder.scan as scan_module

    rng = np.random.default_rng(64)
    sample = rng.normal(size=(120, 37))
    sample[:, 20] = -3 * sample[:, 2] + 1  # partners across chunks
    sample[:, 9] = sample[:, 8]  # within one
    sample[:, 30] = 0.5
    for j in range(21, 29):  # 8 near-copies of unit 0, closer to each other than float32 can tell apart
        sample[:, j] = sample[:, 0] + 1e-4 * rng.normal(size=120)
    monkeypatch.setattr(scan_module, "REDUNDANCY_CHUNK", 4 * 37 * 5)  # 5 rows a chunk: 8 chunks, the last short
    partner, corr = redundancy(sample)
    brute_partner, brute_corr = brute_partners(sample)
    np.testing.assert_array_equal(partner, brute_partner)
    np.testing.assert_allclose(corr, brute_corr, atol=1e-12, equal_nan=True)
    assert partner[8] == 9 and partner[30] == -1


def test_first_mode_is_the_first_of_the_most_common_valid_values():
    import atlas_builder.scan as scan_module

    rng = np.random.default_rng(65)
    values = rng.integers(0, 4, size=(300, 7))
    valid = rng.random((300, 7)) < 0.8
    first, count = scan_module.first_mode(values, valid)
    for row, ok, f, c in zip(values, valid, first, count):
        kept = row[ok].tolist()
        if not kept:
            assert c == 0
            continue
        best = max(dict.fromkeys(kept), key=kept.count)  # the first of the most common
        assert c == kept.count(best) and ok[f] and row[f] == best
        assert f == min(j for j in range(len(row)) if ok[j] and row[j] == best)


def test_redundancy_of_many_copies_and_degenerate_inputs():
    rng = np.random.default_rng(63)
    base = rng.normal(size=200)
    sample = np.column_stack([base] * 12 + [rng.normal(size=200) for _ in range(2)]).astype(np.float16)
    partner, corr = redundancy(sample)
    assert partner[:12].tolist() == [1] + [0] * 11
    np.testing.assert_allclose(corr[:12], 1.0, rtol=1e-12)
    assert redundancy(np.ones((10, 1), dtype=np.float16))[0].tolist() == [-1]
    assert redundancy(np.ones((1, 3), dtype=np.float16))[0].tolist() == [-1, -1, -1]
    x = np.random.default_rng(61).normal(size=50)
    partner, corr = redundancy(np.column_stack([x, -x, np.full(50, 2.0)]).astype(np.float16))
    assert partner.tolist() == [1, 0, -1]
    np.testing.assert_allclose(corr[:2], -1.0, atol=1e-3)


# --- summarize ---------------------------------------------------------------------------------

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


def planted_accumulator(values, labels, cfg: ScanSection, sample, batch: int) -> LayerAccumulator:
    acc = LayerAccumulator((values.shape[1],), cfg.top_k, len(CLASSES), sample, np.arange(len(values)),
                           threshold=cfg.active_threshold)
    for i in range(0, len(values), batch):
        acc.update(torch.from_numpy(values[i:i + batch]), i, torch.from_numpy(labels[i:i + batch]))
    return acc


INFO = LayerInfo("fc", "Linear", (8,), True)


def test_summarize_labels_and_flags_planted_units():
    values, labels = planted_layer()
    cfg = ScanSection(top_k=4, sample_size=150)
    sample = sample_ids(len(values), cfg.sample_size, 0)
    layer = summarize(INFO, planted_accumulator(values, labels, cfg, sample, 32), cfg, CLASSES)
    s = layer.stats
    assert layer.labels[0] == "dead" and s["dead"][0] and not s["saturated"][0]
    assert layer.labels[2] == "saturated" and s["saturated"][2] and not s["dead"][2]
    assert layer.labels[4] == "class-selective: two"
    assert s["selectivity"][4] == pytest.approx(1.0) and s["top_class"][4] == 2
    assert layer.labels[6] == "non-finite" and s["nonfinite"][6] == len(values) and s["count"][6] == 0
    for u in (1, 5, 7):
        assert layer.labels[u] == "feature-selective (broad)", (u, s["selectivity"][u])
    assert s["redundant"][3] and s["redundant_with"][3] == 1 and s["redundant_corr"][3] > 0.999
    assert s["redundant"][1] and s["redundant_with"][1] == 3
    assert not s["redundant"][[0, 2, 4, 5, 6, 7]].any() and (s["redundant_with"][[0, 2, 4, 5, 6, 7]] == -1).all()
    check_moments({k: s[k] for k in ("count", "nonfinite", "mean", "std", "min", "max")}, values)
    np.testing.assert_allclose(s["frac_active"], (values > 0).mean(0))
    np.testing.assert_allclose(s["position_activity"], (values > 0).mean(0))  # flat: its one position
    np.testing.assert_allclose(layer.class_means, brute_class_means(values, labels, 3), rtol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(layer.sample, values[sample].astype(np.float16))
    np.testing.assert_array_equal(layer.hist_counts.sum(1), np.isfinite(values[sample]).sum(0))
    check_topk(layer.top, values, None, 4, True)
    check_topk(layer.bottom, values, None, 4, False)


def test_summarize_thresholds_come_from_config():
    values, labels = planted_layer()
    sample = sample_ids(len(values), 2000, 0)
    strict = ScanSection(class_selective=1.0, redundant_correlation=1.0)
    layer = summarize(INFO, planted_accumulator(values, labels, strict, sample, 50), strict, CLASSES)
    assert layer.labels[4] == "class-selective: two"  # index exactly 1.0: at least class_selective
    assert not layer.stats["redundant"].any()  # float16 rounding keeps unit 3's correlation below 1
    high = ScanSection(active_threshold=5.0)
    layer = summarize(INFO, planted_accumulator(values, labels, high, sample, 50), high, CLASSES)
    assert layer.labels[2] == "dead"
    np.testing.assert_allclose(layer.stats["frac_active"], (values > 5.0).mean(0))


# --- scan_model end to end ---------------------------------------------------------------------

def wrap(data, model=None, name="tiny"):
    dataset = AtlasDataset(data, CLASSES, (), (), "test", "fp")
    model = fixtures_models.tiny_cnn().eval() if model is None else model.eval()
    return LoadedModel(ModelSection(name, "x:y"), model, "fp", {"parameters": 0}), dataset


LAYERS = ["conv", "relu", "fc"]


def run_scan(data, device=torch.device("cpu"), layers=LAYERS, model=None, **scan):
    loaded, dataset = wrap(data, model)
    cfg = ScanSection(**{"top_k": 4, "batch_size": 7, "buffer_mb": 1, **scan})
    return scan_model(loaded, dataset, layers, cfg, device, seed=0, progress=False), loaded.module


def outputs_of(model: nn.Module, x: torch.Tensor, layers, batch: int = 7) -> dict[str, torch.Tensor]:
    """Every layer's output on all of x, by hooks of the test's own, over the scan's batches (a conv over 40
    rows may round differently from one over 7)."""
    modules = dict(model.named_modules())
    parts = {name: [] for name in layers}
    handles = [modules[name].register_forward_hook(lambda m, i, o, name=name: parts[name].append(o.detach().clone()))
               for name in layers]
    try:
        with torch.inference_mode():
            logits = torch.cat([model(chunk) for chunk in x.split(batch)])
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(p).float() for name, p in parts.items()} | {"": logits}


def brute_layer(out: torch.Tensor, reduce: str = "max"):
    """Values [N, U] and maps [N, U, M] (None for flat outputs) of one layer output."""
    maps = out.flatten(2) if out.dim() == 4 else out.transpose(1, 2) if out.dim() == 3 else None
    return unit_values(out, reduce).numpy(), None if maps is None else maps.numpy()


def check_layer(layer, out: torch.Tensor, labels: np.ndarray, sample: np.ndarray, k: int, reduce: str = "max",
                rtol: float = 1e-6):
    v, maps = brute_layer(out, reduce)
    assert layer.info.shape == tuple(out.shape[1:])
    check_topk(layer.top, v, maps, k, True, rtol)
    check_topk(layer.bottom, v, maps, k, False, rtol, kept_maps=False)  # only the top-k's maps are drawn
    check_moments({key: layer.stats[key] for key in ("count", "nonfinite", "mean", "std", "min", "max")}, v)
    np.testing.assert_allclose(layer.stats["frac_active"], (v > 0).mean(0))
    activity = sample[:: max(1, -(-len(sample) // POSITION_SAMPLE))]
    np.testing.assert_allclose(layer.stats["position_activity"],
                               active_fraction(out[activity], 0.0).double().mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(layer.class_means, brute_class_means(v, labels, len(CLASSES)), rtol=1e-6,
                               equal_nan=True)
    np.testing.assert_array_equal(layer.sample, v[sample].astype(np.float16))
    np.testing.assert_array_equal(layer.hist_counts, histogram(v[sample].astype(np.float16), 30)[0])


@pytest.mark.parametrize("sample_size", [10, 2000])
@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_scan_model_matches_brute_force_on_tiny_cnn(sample_size, reduce, device):
    data = fixtures_models.tiny_dataset()
    result, model = run_scan(data, device, sample_size=sample_size, reduce=reduce)
    outputs = outputs_of(model.cpu(), data.images, LAYERS)
    assert [layer.info.name for layer in result.layers] == LAYERS and result.n_examples == 40
    sample = sample_ids(40, sample_size, 0)
    np.testing.assert_array_equal(result.sample_ids, sample)
    for layer in result.layers:
        check_layer(layer, outputs[layer.info.name], data.labels.numpy(), sample, 4, reduce)
        assert layer.top.valid.all() and layer.bottom.valid.all()
    assert result.layers[0].info.spatial == (8, 8) and result.layers[2].top.maps is None
    np.testing.assert_array_equal(result.predicted, outputs[""].argmax(1).numpy())
    np.testing.assert_allclose(result.confidence, outputs[""].softmax(1).amax(1).numpy(), rtol=1e-5)
    assert result.accuracy == pytest.approx(float((outputs[""].argmax(1) == data.labels).float().mean()))


def test_position_activity_in_chunks_of_one_row_matches_brute_force(monkeypatch):
    """Activity rows are copied in cache-sized chunks: a chunk of one row gives the same statistics."""
    from atlas_builder import accumulators
    monkeypatch.setattr(accumulators, "ACTIVITY_CHUNK", 1)
    data = fixtures_models.tiny_dataset()
    result, model = run_scan(data, sample_size=2000)
    outputs = outputs_of(model.cpu(), data.images, LAYERS)
    for layer in result.layers:
        check_layer(layer, outputs[layer.info.name], data.labels.numpy(), np.arange(40), 4)


class TokenNet(nn.Module):
    """A token model (outputs [B, T, D]), as a ViT block's: patches, a linear map, GELU, a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(12)
        self.proj, self.act, self.head = nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3)

    def forward(self, x):
        tokens = x.view(len(x), 16, 4)  # 8x8 image -> 16 tokens of 4 pixels
        return self.head(self.act(self.proj(tokens)).mean(1))


def test_scan_model_of_token_outputs(device):
    data = fixtures_models.tiny_dataset()
    result, model = run_scan(data, device, ["proj", "act"], TokenNet())
    outputs = outputs_of(model.cpu(), data.images, ["proj", "act"])
    for layer in result.layers:
        check_layer(layer, outputs[layer.info.name], data.labels.numpy(), np.arange(40), 4)
        # 16 tokens read as a 4 x 4 patch grid (no class token); the maps keep every token
        assert layer.info.spatial == (4, 4) and layer.info.prefix == 0 and layer.top.maps.shape == (6, 4, 16)


def test_scan_model_same_result_for_any_batch_and_buffer_size():
    data = fixtures_models.tiny_dataset()
    base, _ = run_scan(data, batch_size=7, buffer_mb=1)
    for batch, buffer in ((1, 1), (40, 1), (13, 64)):
        other, _ = run_scan(data, batch_size=batch, buffer_mb=buffer)
        scans_equal(other, base, rtol=1e-5)  # a conv over other batch sizes rounds a little differently


def test_scan_model_buffer_flushes_when_full(monkeypatch):
    """Buffered values feed the accumulators in chunks of at most scan.buffer_mb (here each batch fills it),
    and of all the buffered rows when it is larger."""
    import atlas_builder.scan as scan_module

    def chunks(**scan):
        sizes = []
        feed = LayerAccumulator._feed
        monkeypatch.setattr(LayerAccumulator, "_feed", lambda self, v, *a: (sizes.append(len(v)), feed(self, v, *a)))
        result, _ = run_scan(fixtures_models.tiny_dataset(), **scan)
        return sizes, result

    monkeypatch.setattr(scan_module, "CHUNK_COST", 2**40)  # any buffer holds a batch at most
    small, a = chunks(batch_size=8)
    n = len(fixtures_models.tiny_dataset())
    assert max(small) == 8 and len(small) == 3 * -(-n // 8) and sum(small) == 3 * n  # each batch on its own
    monkeypatch.setattr(scan_module, "CHUNK_COST", 8)
    large, b = chunks(batch_size=8)
    assert large == [n] * 3  # the whole dataset in one chunk per layer
    scans_equal(a, b, rtol=1e-6)


def scans_equal(a, b, rtol: float = 0.0):
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.predicted, b.predicted)
    same(a.confidence, b.confidence, rtol, "confidence")
    np.testing.assert_array_equal(a.sample_ids, b.sample_ids)
    assert a.accuracy == b.accuracy and a.n_examples == b.n_examples
    for x, y in zip(a.layers, b.layers, strict=True):
        assert x.info == y.info and x.labels == y.labels
        for key in x.stats:
            same(x.stats[key], y.stats[key], max(rtol, MOMENT_RTOL.get(key, 0.0)), key)
        for name in ("top", "bottom"):
            if rtol:
                for field in ("ids", "valid", "positions"):
                    same(getattr(getattr(x, name), field), getattr(getattr(y, name), field), name=field)
            else:
                assert_results_equal(getattr(x, name), getattr(y, name))
        for name in ("hist_counts", "hist_lo", "hist_hi", "class_means", "sample"):
            same(getattr(x, name), getattr(y, name), max(rtol, 1e-12) if name == "class_means" else rtol, name)


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


def test_scan_model_nonfinite_activations(device):
    data = fixtures_models.TinyDataset(n=11)
    n_bad = int((data.images[:, 0, 0, 0] > 0.5).sum())
    assert 3 < n_bad < 8  # fewer than k=8 finite values in channels 0 (11 - n_bad) and 1 (n_bad)
    result, model = run_scan(data, device, ["spoil"], SpoiltCNN(), top_k=8, batch_size=3)
    out = outputs_of(model.cpu(), data.images, ["spoil"], 3)["spoil"]
    layer = result.layers[0]
    check_layer(layer, out, data.labels.numpy(), np.arange(11), 8, rtol=0.0)
    np.testing.assert_array_equal(layer.top.valid[0], np.arange(8) < 11 - n_bad)
    np.testing.assert_array_equal(layer.top.valid[1], np.arange(8) < n_bad)
    assert layer.stats["nonfinite"].tolist() == [n_bad, 11 - n_bad, 0, 0]
    assert result.predicted is None and result.accuracy is None


def test_scan_model_unlabelled_examples_and_labels_that_are_no_class():
    data = fixtures_models.TinyDataset(n=40)
    data.labels = data.labels.clone()
    data.labels[::5] = -1
    data.labels[1::8] = 7  # neither one of the 3 class names nor one of the model's 3 outputs
    result, model = run_scan(data)
    outputs = outputs_of(model, data.images, ["fc"])
    predicted, labels = outputs[""].argmax(1), data.labels
    valid = (labels >= 0) & (labels < 3)
    np.testing.assert_array_equal(result.labels, labels.numpy())
    assert result.accuracy == pytest.approx(float((predicted[valid] == labels[valid]).float().mean()))
    np.testing.assert_allclose(result.layers[2].class_means,
                               brute_class_means(outputs["fc"].numpy(), labels.numpy(), 3), rtol=1e-6)


def test_scan_model_flat_layer_followed_by_an_inplace_op():
    """A flat layer's values are taken in the hook, before nn.ReLU(inplace=True) rewrites its output."""
    torch.manual_seed(6)
    model = nn.Sequential(OrderedDict([("fc", nn.Linear(64, 5)), ("act", nn.ReLU(inplace=True)),
                                       ("out", nn.Linear(5, 3))]))
    data = fixtures_models.tiny_dataset()
    data.images = data.images.view(40, 64)
    result, model = run_scan(data, layers=["fc"], model=model)
    with torch.inference_mode():
        v = model.fc(data.images)
    assert (v < 0).any()
    check_layer(result.layers[0], v, data.labels.numpy(), np.arange(40), 4)


@pytest.mark.parametrize("world", [2, 3])
def test_scan_parts_merged_in_order_equal_one_pass(world, device):
    """What a sharded build does: each rank scans its block of ids, the writer merges the parts in order."""
    loaded, dataset = wrap(fixtures_models.tiny_dataset())
    cfg = ScanSection(top_k=4, batch_size=7, buffer_mb=1, sample_size=10)
    whole = scan_model(loaded, dataset, LAYERS, cfg, device, seed=0, progress=False)
    ranges = [shard_range(40, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == 40 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    parts = [pickle.loads(pickle.dumps(scan_part(loaded, dataset, LAYERS, cfg, device, 0, start, stop, False)
                                       .to("cpu")))
             for start, stop in ranges]  # on the host and pickled, as torch.distributed sends them
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    scans_equal(finish_scan(loaded, dataset, LAYERS, cfg, merged, device, seed=0), whole, rtol=1e-9)
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
        if b.top.maps is not None:  # the maps come from the very forward the values do
            taken = np.take_along_axis(b.top.maps, b.top.positions[..., None], 2)[..., 0]
            np.testing.assert_array_equal(taken, b.top.values)


class Augmented(torch.utils.data.Dataset):
    """Random augmentation: each read of an example adds fresh noise (as a random crop or flip would change it)."""

    def __init__(self):
        self.base = fixtures_models.tiny_dataset()
        self.reads = 0
        self.classes = self.base.classes

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        self.reads += 1
        return x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(self.reads)), y


def test_maps_agree_with_their_values_under_random_augmentation():
    """Every top-/bottom-k map comes from the forward its value came from: its maximum is that value, even
    when each read of the dataset gives another input; each example is read once (and one more, the first,
    for the layer shapes)."""
    data = Augmented()
    result, _ = run_scan(data)
    for layer in result.layers[:2]:
        top = layer.top
        np.testing.assert_array_equal(top.maps.max(2)[top.valid], top.values[top.valid])
    assert data.reads == 1 + 40


class SharedReLU(nn.Module):
    """Calls the same ReLU twice per forward, as torchvision's BasicBlock does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(9)
        self.conv, self.conv2, self.act = nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1), nn.ReLU()
        self.fc = nn.Linear(3 * 64, 3)

    def forward(self, x):
        return self.fc(self.act(self.conv2(self.act(self.conv(x)))).flatten(1))


def test_scan_model_refuses_a_module_called_twice():
    with pytest.raises(AtlasError, match=r"layer 'act' of model 'tiny' runs more than once in one forward pass"):
        run_scan(fixtures_models.tiny_dataset(), layers=["conv", "act"], model=SharedReLU())


class SometimesTwice(nn.Module):
    """Calls its ReLU a second time on every other forward."""

    def __init__(self):
        super().__init__()
        self.conv, self.act, self.forwards = nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), 0

    def forward(self, x):
        self.forwards += 1
        out = self.act(self.conv(x))
        return self.act(out) if self.forwards % 2 == 0 else out


def test_scan_model_fails_when_a_layer_runs_twice_in_a_later_forward():
    with pytest.raises(AtlasError, match=r"layer 'act' of model 'tiny' runs more than once"):
        run_scan(fixtures_models.tiny_dataset(), layers=["conv", "act"], model=SometimesTwice())


# --- health follows the nonlinearity ----------------------------------------------------------

def planted_net(activation: nn.Module | None, dead_bias: float, saturated_bias: float) -> nn.Sequential:
    """Linear(3 -> 3) then `activation`: unit 0 constant (weight 0, `dead_bias`), unit 1 pinned by a large
    bias (`saturated_bias`, a tiny weight), unit 2 the input itself (healthy)."""
    fc = nn.Linear(3, 3)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[0.0, 0, 0], [0.01, 0, 0], [1.0, 0, 0]]))
        fc.bias.copy_(torch.tensor([dead_bias, saturated_bias, 0.0]))
    return nn.Sequential(OrderedDict([("fc", fc)] + ([("act", activation)] if activation is not None else [])))


HEALTH_CASES = [  # activation, (dead bias, saturated bias), whether the planted saturated unit is flagged
    (nn.ReLU(), (-1.0, 5.0), True), (nn.LeakyReLU(0.1), (-1.0, 5.0), True), (nn.GELU(), (-3.0, 5.0), True),
    (nn.SiLU(), (-3.0, 5.0), True), (nn.Softplus(), (-5.0, 5.0), True), (nn.Sigmoid(), (0.0, 20.0), True),
    (nn.Tanh(), (0.0, 20.0), True), (None, (3.0, 20.0), False),  # raw linear output: never saturated
]


@pytest.mark.parametrize("activation, biases, saturates", HEALTH_CASES,
                         ids=[type(a).__name__ if a is not None else "raw" for a, _, _ in HEALTH_CASES])
def test_planted_dead_saturated_and_healthy_units_behind_each_nonlinearity(activation, biases, saturates):
    g = torch.Generator().manual_seed(90)
    data = [(torch.randn(3, generator=g), i % 3) for i in range(120)]
    net = planted_net(activation, *biases)
    layer = "act" if activation is not None else "fc"
    scan, _ = run_scan(data, layers=[layer], model=net)
    s, labels = scan.layers[0].stats, scan.layers[0].labels
    assert s["dead"].tolist() == [True, False, False] and labels[0] == "dead"
    assert s["saturated"].tolist() == [False, saturates, False]
    assert (labels[1] == "saturated") == saturates
    assert labels[2] not in ("dead", "saturated")


def test_sigmoid_mlp_hidden_units_are_mostly_healthy():
    """The classic [784, 20, 10] sigmoid MLP (random weights): its hidden units are not all 'saturated'."""
    torch.manual_seed(91)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 20), nn.Sigmoid(), nn.Linear(20, 10))
    g = torch.Generator().manual_seed(92)
    data = [(torch.rand(1, 28, 28, generator=g), i % 3) for i in range(64)]
    scan, _ = run_scan(data, layers=["2"], model=net)
    s = scan.layers[0].stats
    assert scan.layers[0].nonlinearity == "sigmoid"
    assert not s["saturated"].any() and not s["dead"].any()


def test_conv_activity_is_judged_over_positions_not_each_inputs_max():
    """A channel positive on half of every image's positions has a positive max on every image: healthy;
    one positive on all of them is saturated (always on)."""
    conv = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.copy_(torch.tensor([0.0, 10.0]))
    net = nn.Sequential(OrderedDict([("conv", conv), ("relu", nn.ReLU())]))
    g = torch.Generator().manual_seed(93)
    data = [(torch.randn(1, 6, 6, generator=g), 0) for _ in range(40)]
    scan, _ = run_scan(data, layers=["relu"], model=net)
    s = scan.layers[0].stats
    assert s["frac_active"].tolist() == [1.0, 1.0]  # each input's max is positive for both
    assert 0.3 < s["position_activity"][0] < 0.7 and s["position_activity"][1] == 1.0
    assert s["saturated"].tolist() == [False, True] and not s["dead"].any()


class ReluBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x) + x)


def test_a_block_that_ends_in_a_relu_is_judged_as_relu():
    torch.manual_seed(94)
    net = nn.Sequential(OrderedDict([("block", ReluBlock()), ("conv", nn.Conv2d(2, 2, 1))]))
    g = torch.Generator().manual_seed(95)
    scan, _ = run_scan([(torch.randn(1, 8, 8, generator=g), 0) for _ in range(30)], layers=["block", "conv"],
                       model=net)
    by_name = {layer.info.name: layer for layer in scan.layers}
    assert by_name["block"].nonlinearity == "relu" and by_name["conv"].nonlinearity == "raw"


def test_label_scores_match_scikit_learn():
    """Planted: unit c of `fc` answers pixel (0, c), made bright in the images of class c (class-selective:
    c); unit 3 answers a pixel no class owns (broad). Scores: scikit-learn's roc_auc_score over the sample,
    and the top-k's share outside their most common class."""
    from sklearn.metrics import roc_auc_score

    from atlas_builder.scan import auroc

    data = fixtures_models.TinyDataset(n=60)
    g = torch.Generator().manual_seed(7)
    for i in range(len(data)):
        data.images[i, 0, 0, int(data.labels[i])] += 1.0 + torch.rand(1, generator=g).item()
    fc = nn.Linear(64, 4)
    with torch.no_grad():
        fc.weight.zero_()
        fc.bias.zero_()
        for c in range(3):
            fc.weight[c, c] = 1.0  # pixel (0, c), less 1: negative off its class (not saturated)
        fc.weight[3, 63] = 1.0  # a pixel of no class, less a half: active about half the time
        fc.bias[:] = torch.tensor([-1.0, -1.0, -1.0, -0.5])
    model = nn.Sequential(OrderedDict([("flatten", nn.Flatten()), ("fc", fc)]))
    result, _ = run_scan(data, layers=["fc"], model=model)
    layer = result.layers[0]
    assert layer.labels == ["class-selective: zero", "class-selective: one", "class-selective: two",
                            "feature-selective (broad)"]
    sample_labels = data.labels.numpy()[result.sample_ids]
    for c in range(3):
        expected = roc_auc_score(sample_labels == c, layer.sample[:, c].astype(np.float64))
        assert layer.stats["label_score"][c] == pytest.approx(expected, abs=1e-12)
        assert expected > 0.9
    ids = layer.top.ids[3][layer.top.valid[3]]
    counts = np.bincount(data.labels.numpy()[ids])
    assert layer.stats["label_score"][3] == pytest.approx(1 - counts.max() / len(ids))
    # ties count a half, as in scikit-learn
    values = np.array([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.5, 0.0]])
    positive = np.array([[True, True], [False, False], [True, False], [False, False]])
    np.testing.assert_allclose(auroc(values, positive)[:1], [roc_auc_score(positive[:, 0], values[:, 0])])
    assert auroc(values, positive)[1] == pytest.approx(roc_auc_score(positive[:, 1], values[:, 1]))


def brute_ranges(col: np.ndarray, ids: np.ndarray, bins: int):
    """Per bin: (lo, hi, the set of example ids whose value's rank puts them in it), by sorting one column."""
    finite = np.flatnonzero(np.isfinite(col))
    order = finite[np.argsort(col[finite], kind="stable")]
    n = len(order)
    out = []
    for b in range(bins):
        rows = order[-(-b * n // bins):-(-(b + 1) * n // bins)]
        out.append((col[rows].min(), col[rows].max(), set(ids[rows].tolist())) if len(rows) else None)
    return out


def test_range_examples_come_in_order_from_their_quantile():
    """Planted units (an increasing ramp, a ReLU with many zeros, a unit with NaN and Inf, a constant, one with
    fewer finite values than bins): each bin's edges and examples match a brute-force ranking, the bins
    ascend, the examples of a bin lie within it and come highest first, and the pick is seeded."""
    from atlas_builder.scan import range_examples

    rng = np.random.default_rng(3)
    s = 200
    ids = rng.permutation(5000)[:s]
    sample = np.column_stack([np.arange(s) * 0.5, np.maximum(rng.normal(size=s), 0), rng.normal(size=s),
                              np.full(s, 2.0), np.full(s, np.nan)]).astype(np.float16)
    sample[rng.choice(s, 30, replace=False), 2] = np.nan
    sample[rng.choice(s, 5, replace=False), 2] = np.inf
    sample[:4, 4] = [1.0, 2.0, 3.0, 4.0]  # four finite values for ten bins
    bins, k = 10, 3
    r = range_examples(sample, ids, bins, k, seed=0)
    assert r.examples.shape == (5, bins, k) and r.lo.shape == (5, bins)
    value_of = {int(e): i for i, e in enumerate(ids)}
    for u in range(5):
        col = sample[:, u].astype(np.float64)
        for b, expected in enumerate(brute_ranges(col, ids, bins)):
            picked = [int(e) for e in r.examples[u, b] if e >= 0]
            if expected is None:
                assert picked == [] and np.isnan(r.lo[u, b])
                continue
            lo, hi, members = expected
            assert (r.lo[u, b], r.hi[u, b]) == (lo, hi), (u, b)
            assert len(picked) == min(k, len(members)) and set(picked) <= members, (u, b)
            values = [col[value_of[e]] for e in picked]
            assert values == sorted(values, reverse=True)  # highest first
            np.testing.assert_array_equal(r.values[u, b, :len(picked)], values)
        filled = ~np.isnan(r.lo[u])
        assert np.all(np.diff(r.lo[u][filled]) >= 0) and np.all(r.hi[u][filled] >= r.lo[u][filled])  # in order
    # the ramp's bins are its tenths: 20 rows each, edges at the 20th values
    np.testing.assert_array_equal(r.lo[0], np.arange(0, s, 20) * 0.5)
    assert (r.examples[4] >= 0).sum() == 4  # one example in each of the four filled bins
    again = range_examples(sample, ids, bins, k, seed=0)
    np.testing.assert_array_equal(again.examples, r.examples)
    other = range_examples(sample, ids, bins, k, seed=1)
    assert not np.array_equal(other.examples[1:3], r.examples[1:3])  # the pick is the seed's
    assert (r.positions == -1).all()  # none recorded
    places = rng.integers(0, 64, size=sample.shape)  # each sample row's peak token, carried to its picks
    with_places = range_examples(sample, ids, bins, k, seed=0, positions=places)
    row_of = {int(e): i for i, e in enumerate(ids)}
    for u, b_, j in zip(*np.nonzero(with_places.examples >= 0)):
        assert with_places.positions[u, b_, j] == places[row_of[int(with_places.examples[u, b_, j])], u]
    assert (with_places.positions[with_places.examples < 0] == -1).all()


def test_scan_model_keeps_examples_across_the_range():
    """Through a whole scan: each unit's range rows hold examples of the sample whose scanned values fall in
    the row's range."""
    data = fixtures_models.TinyDataset(n=60)
    result, _ = run_scan(data, range_bins=5, range_examples=2)
    layer = result.layers[-1]
    assert layer.ranges is not None and layer.ranges.examples.shape == (layer.info.n_units, 5, 2)
    sampled = dict(zip(result.sample_ids.tolist(), range(len(result.sample_ids))))
    for u in range(layer.info.n_units):
        for b in range(5):
            for e, v in zip(layer.ranges.examples[u, b], layer.ranges.values[u, b]):
                if e < 0:
                    continue
                assert layer.sample[sampled[int(e)], u] == v
                assert layer.ranges.lo[u, b] <= v <= layer.ranges.hi[u, b]
    none, _ = run_scan(data, range_bins=0)
    assert none.layers[0].ranges is None


def test_scan_model_keeps_each_units_effects_on_the_output():
    """Through a whole scan: each unit's 5 classes up and down are the top of a direct per-example
    computation over the same seeded examples (test_effects.slow_effects); the output layer has none; a model
    whose outputs are not the dataset's classes gets none."""
    from atlas_builder.explain import effect_examples, top_effects
    from test_effects import slow_effects

    data = fixtures_models.TinyDataset(n=60)
    loaded, dataset = wrap(data, fixtures_models.tiny_cnn())
    loaded.info.update(outputs=3, output_layer="fc")
    cfg = ScanSection(top_k=4, batch_size=7, buffer_mb=1, effect_per_class=5)
    result = scan_model(loaded, dataset, LAYERS, cfg, torch.device("cpu"), seed=0, progress=False)
    by_name = {layer.info.name: layer for layer in result.layers}
    assert by_name["fc"].effects is None
    labels = data.labels.numpy()
    ids = effect_examples(labels, 3, 5, 0)
    assert len(ids) == 15
    for name in ("conv", "relu"):
        expected = top_effects(slow_effects(loaded.module, name, data.images, labels, ids, 3))
        *got, exact = by_name[name].effects
        assert exact is False
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6, equal_nan=True)
    loaded.info.update(outputs=10)  # its logits are not the dataset's 3 classes: no effects
    other = scan_model(loaded, dataset, LAYERS, cfg, torch.device("cpu"), seed=0, progress=False)
    assert all(layer.effects is None for layer in other.layers)
