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
  positions on which it is active;
- `ClassMeans`: mean activation per class (examples with a label);
- `SampleRows`: the activations of a seeded sample of examples (float16),
  bounded by `scan.sample_size`; the histogram and the correlations behind the
  redundancy flag are computed from it, and the embedding stage uses it.

Activations are buffered between batches (at most `scan.buffer_mb`) so the
accumulators run on large chunks; that keeps the scan close to the speed of a
bare forward pass while memory stays flat.

`summarize` turns the accumulators into what a unit page shows: histogram,
class-selectivity index, health flags (dead, saturated, redundant,
non-finite) and an automatic label. The definitions are documented there.
Runs under `torch.inference_mode()`. Writes nothing: the caller hands the
`ModelScan` to the store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .config import ScanSection
from .probe import LayerInfo, Probe
from .sources import AtlasDataset, LoadedModel


# --- accumulators ---------------------------------------------------------------

@dataclass
class TopKResult:
    values: np.ndarray  # [U, k] float32, best first (largest for top-k, smallest for bottom-k)
    ids: np.ndarray  # [U, k] example ids
    positions: np.ndarray  # [U, k] flat argmax position, -1 for flat outputs
    maps: np.ndarray | None  # [U, k, H*W] float16 spatial maps, conv top-k only
    valid: np.ndarray  # [U, k] False where fewer than k finite activations existed


class TopK:
    """Streaming top-k (or bottom-k) of every unit, optionally carrying each winner's spatial map.

    `update` expects example ids that increase from call to call (the scan's
    order); `merge` combines shards in any order.
    """

    def __init__(self, n_units: int, k: int, largest: bool = True):
        self.k, self.sign = k, 1.0 if largest else -1.0
        self.values = torch.empty(n_units, 0)
        self.ids = torch.empty(n_units, 0, dtype=torch.long)
        self.positions = torch.empty(n_units, 0, dtype=torch.long)
        self.maps: torch.Tensor | None = None  # [U, k, M]

    def _key(self, values: torch.Tensor) -> torch.Tensor:
        v = values.float() * self.sign
        return torch.where(torch.isfinite(v), v, torch.tensor(-torch.inf))  # non-finite never wins

    def update(self, values: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor,
               maps: torch.Tensor | None = None) -> None:
        """values, positions: [R, U]; ids: [R]; maps: [R, U, M] or None."""
        n_units = values.shape[1]
        k_old = self.values.shape[1]
        values = torch.cat([self.values, self._key(values).T], 1)
        ids = torch.cat([self.ids, ids.view(1, -1).expand(n_units, -1)], 1)
        positions = torch.cat([self.positions, positions.T], 1)
        # existing entries have lower ids than new ones, so a stable sort breaks ties by id
        order = torch.argsort(values, dim=1, descending=True, stable=True)[:, : self.k]
        self.values, self.ids, self.positions = values.gather(1, order), ids.gather(1, order), positions.gather(1, order)
        if maps is not None:
            new_rows = (order - k_old).clamp(min=0)
            chosen = maps[new_rows, torch.arange(n_units).view(-1, 1)]  # [U, k, M]
            if k_old:
                old = self.maps.gather(1, order.clamp(max=k_old - 1).unsqueeze(2).expand(-1, -1, maps.shape[2]))
                chosen = torch.where((order < k_old).unsqueeze(2), old, chosen)
            self.maps = chosen

    def merge(self, other: "TopK") -> None:
        values = torch.cat([self.values, other.values], 1)
        ids = torch.cat([self.ids, other.ids], 1)
        positions = torch.cat([self.positions, other.positions], 1)
        by_id = torch.argsort(ids, dim=1, stable=True)
        values, ids, positions = values.gather(1, by_id), ids.gather(1, by_id), positions.gather(1, by_id)
        order = torch.argsort(values, dim=1, descending=True, stable=True)[:, : self.k]
        self.values, self.ids, self.positions = values.gather(1, order), ids.gather(1, order), positions.gather(1, order)
        if self.maps is not None or other.maps is not None:
            maps = torch.cat([m for m in (self.maps, other.maps) if m is not None], 1)
            index = by_id.gather(1, order).unsqueeze(2).expand(-1, -1, maps.shape[2])
            self.maps = maps.gather(1, index)

    def finalize(self) -> TopKResult:
        valid = torch.isfinite(self.values)
        return TopKResult((self.values * self.sign).numpy(), self.ids.numpy(), self.positions.numpy(),
                          None if self.maps is None else self.maps.numpy(), valid.numpy())


class Moments:
    """Streaming count, mean, std, min, max of the finite activations, and the count of the others."""

    def __init__(self, n_units: int):
        self.count = torch.zeros(n_units, dtype=torch.float64)
        self.mean = torch.zeros(n_units, dtype=torch.float64)
        self.m2 = torch.zeros(n_units, dtype=torch.float64)
        self.min = torch.full((n_units,), torch.inf, dtype=torch.float64)
        self.max = torch.full((n_units,), -torch.inf, dtype=torch.float64)
        self.nonfinite = torch.zeros(n_units, dtype=torch.float64)

    def update(self, values: torch.Tensor) -> None:
        v = values.double()
        finite = torch.isfinite(v)
        n = finite.sum(0, dtype=torch.float64)
        mean = torch.where(finite, v, 0.0).sum(0) / n.clamp(min=1)
        m2 = torch.where(finite, v - mean, 0.0).square().sum(0)
        other = Moments.__new__(Moments)
        other.count, other.mean, other.m2 = n, mean, m2
        other.min = torch.where(finite, v, torch.inf).amin(0)
        other.max = torch.where(finite, v, -torch.inf).amax(0)
        other.nonfinite = (~finite).sum(0, dtype=torch.float64)
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
    """Fraction of examples on which each unit is active, and mean fraction of active positions."""

    def __init__(self, n_units: int, threshold: float):
        self.threshold = threshold
        self.n = 0
        self.examples_active = torch.zeros(n_units, dtype=torch.float64)
        self.position_sum = torch.zeros(n_units, dtype=torch.float64)

    def update(self, values: torch.Tensor, position_fraction: torch.Tensor) -> None:
        """values: [R, U] reduced activations; position_fraction: [R, U] from probe.active_fraction."""
        self.n += values.shape[0]
        self.examples_active += (values > self.threshold).sum(0, dtype=torch.float64)
        self.position_sum += position_fraction.sum(0, dtype=torch.float64)

    def merge(self, other: "Activity") -> None:
        self.n += other.n
        self.examples_active += other.examples_active
        self.position_sum += other.position_sum

    def finalize(self) -> dict[str, np.ndarray]:
        n = max(self.n, 1)
        return {"frac_active": (self.examples_active / n).numpy(), "position_activity": (self.position_sum / n).numpy()}


class ClassMeans:
    """Mean finite activation of every unit per class; examples labelled -1 (unknown) are left out."""

    def __init__(self, n_classes: int, n_units: int):
        self.sums = torch.zeros(n_classes, n_units, dtype=torch.float64)
        self.counts = torch.zeros(n_classes, n_units, dtype=torch.float64)

    def update(self, values: torch.Tensor, labels: torch.Tensor) -> None:
        keep = (labels >= 0) & (labels < self.sums.shape[0])
        v, labels = values[keep].double(), labels[keep]
        finite = torch.isfinite(v)
        self.sums.index_add_(0, labels, torch.where(finite, v, 0.0))
        self.counts.index_add_(0, labels, finite.double())

    def merge(self, other: "ClassMeans") -> None:
        self.sums += other.sums
        self.counts += other.counts

    def finalize(self) -> np.ndarray:
        """[U, C] class means, NaN for classes with no example."""
        return torch.where(self.counts > 0, self.sums / self.counts.clamp(min=1), torch.nan).T.numpy()


def sample_ids(n_examples: int, size: int, seed: int) -> np.ndarray:
    """The seeded sample of example ids (ascending) kept by `SampleRows`: all of them if n <= size."""
    if size >= n_examples:
        return np.arange(n_examples)
    return np.sort(np.random.default_rng(seed).choice(n_examples, size=size, replace=False))


class SampleRows:
    """The activations [S, U] (float16) of a fixed, seeded sample of examples."""

    def __init__(self, ids: np.ndarray, n_units: int):
        self.ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        self.matrix = torch.zeros(len(self.ids), n_units, dtype=torch.float16)
        self.filled = torch.zeros(len(self.ids), dtype=torch.bool)

    def update(self, values: torch.Tensor, ids: torch.Tensor) -> None:
        if not len(self.ids):
            return
        slot = torch.searchsorted(self.ids, ids).clamp(max=len(self.ids) - 1)
        hit = self.ids[slot] == ids
        self.matrix[slot[hit]] = values[hit].to(torch.float16)
        self.filled[slot[hit]] = True

    def merge(self, other: "SampleRows") -> None:
        self.matrix[other.filled] = other.matrix[other.filled]
        self.filled |= other.filled

    def finalize(self) -> np.ndarray:
        return self.matrix.numpy()


class LayerAccumulator:
    """Every accumulator of one layer, fed together."""

    def __init__(self, n_units: int, cfg: ScanSection, n_classes: int, sample: np.ndarray):
        self.top = TopK(n_units, cfg.top_k, largest=True)
        self.bottom = TopK(n_units, cfg.top_k, largest=False)
        self.moments = Moments(n_units)
        self.activity = Activity(n_units, cfg.active_threshold)
        self.classes = ClassMeans(n_classes, n_units)
        self.sample = SampleRows(sample, n_units)

    def update(self, values, positions, activity, ids, labels, maps=None) -> None:
        self.top.update(values, ids, positions, maps)
        self.bottom.update(values, ids, positions)
        self.moments.update(values)
        self.activity.update(values, activity)
        self.classes.update(values, labels)
        self.sample.update(values, ids)

    def merge(self, other: "LayerAccumulator") -> None:
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


def histogram(sample: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per unit: `bins` equal bins between the min and max of its finite sampled activations."""
    v = torch.from_numpy(sample).float()
    finite = torch.isfinite(v)
    lo = torch.where(finite, v, torch.inf).amin(0)
    hi = torch.where(finite, v, -torch.inf).amax(0)
    empty = ~torch.isfinite(lo)
    lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
    width = (hi - lo).clamp(min=1e-12)
    idx = ((v - lo) / width * bins).floor().clamp(0, bins - 1)
    idx = torch.where(finite, idx, 0).long()
    counts = torch.zeros(v.shape[1], bins).scatter_add_(1, idx.T, finite.T.float())
    return counts.long().numpy(), lo.numpy(), hi.numpy()


def class_selectivity(class_means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Selectivity index and top class of every unit.

    index = (mu_max - mu_rest) / (mu_max + mu_rest), mu_max the largest class
    mean and mu_rest the mean of the other classes' means (Morcos et al.,
    2018). Class means below 0 (pre-activation layers) are clipped to 0 first,
    so the index lies in [0, 1]: 1 = fires for one class only, 0 = the same
    for every class (or never positive). NaN where fewer than 2 classes have
    examples.
    """
    means = np.clip(class_means, 0, None)
    present = ~np.isnan(means)
    n_present = present.sum(1)
    filled = np.where(present, means, -np.inf)
    top = filled.argmax(1)
    mu_max = np.where(n_present > 0, filled.max(1), 0.0)
    total = np.where(present, means, 0.0).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu_rest = (total - mu_max) / np.maximum(n_present - 1, 1)
        index = np.where(mu_max + mu_rest > 0, (mu_max - mu_rest) / (mu_max + mu_rest), 0.0)
    index = np.where(n_present >= 2, index, np.nan)
    return index, np.where(n_present > 0, top, -1)


def redundancy(sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every unit, the unit of the same layer whose sampled activations correlate most with it.

    Pearson correlation over the sample; units with no variance correlate
    with nothing (partner -1, correlation NaN).
    """
    v = np.nan_to_num(sample.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    n_units = v.shape[1]
    if n_units < 2 or v.shape[0] < 2:
        return np.full(n_units, -1), np.full(n_units, np.nan)
    z = v - v.mean(0)
    norm = np.sqrt((z * z).sum(0))
    ok = norm > 1e-9 * max(1.0, float(np.abs(v).max()))
    z = np.where(ok, z / np.where(ok, norm, 1), 0.0)
    corr = z.T @ z
    np.fill_diagonal(corr, -np.inf)
    corr[:, ~ok] = -np.inf
    partner = corr.argmax(1)
    best = corr[np.arange(n_units), partner]
    valid = ok & np.isfinite(best)
    return np.where(valid, partner, -1), np.where(valid, best, np.nan)


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
    labels = []
    for u in range(len(dead)):
        if stats["count"][u] == 0:
            labels.append("non-finite")
        elif dead[u]:
            labels.append("dead")
        elif saturated[u]:
            labels.append("saturated")
        elif not np.isnan(selectivity[u]) and selectivity[u] >= cfg.class_selective:
            name = class_names[top_class[u]] if 0 <= top_class[u] < len(class_names) else str(top_class[u])
            labels.append(f"class-selective: {name}")
        else:
            labels.append("feature-selective (broad)")
    counts, lo, hi = histogram(sample, cfg.histogram_bins)
    return LayerScan(info, acc.top.finalize(), acc.bottom.finalize(), stats, labels, counts, lo, hi,
                     class_means, sample)


# --- the pass ------------------------------------------------------------------------

class _Buffer:
    """Chunks of reduced activations (and conv maps) waiting for the accumulators."""

    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.clear()

    def clear(self) -> None:
        self.ids, self.labels, self.layers, self.bytes = [], [], {}, 0

    def add(self, ids: torch.Tensor, labels: torch.Tensor, probe: Probe) -> None:
        self.ids.append(ids)
        self.labels.append(labels)
        for name in probe.layers:
            parts = (probe.values[name], probe.positions[name], probe.activity[name], probe.maps.get(name))
            self.layers.setdefault(name, []).append(parts)
            self.bytes += sum(p.numel() * p.element_size() for p in parts if p is not None)

    def full(self) -> bool:
        return self.bytes >= self.limit


def scan_model(model: LoadedModel, dataset: AtlasDataset, layers: list[str], cfg: ScanSection,
               device: torch.device, seed: int = 0, progress: bool = True) -> ModelScan:
    """Stream the dataset through the model once and summarize every unit of `layers`."""
    start = time.perf_counter()
    net = model.module.to(device)
    n_classes = max(len(dataset.class_names), 1)
    sample = sample_ids(len(dataset), cfg.sample_size, seed)
    loader = DataLoader(dataset.data, batch_size=cfg.batch_size, shuffle=False,
                        pin_memory=device.type == "cuda")
    accs: dict[str, LayerAccumulator] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    buffer = _Buffer(cfg.buffer_mb * 2**20)
    predicted, confidence, label_batches = [], [], []
    seen = 0

    def flush() -> None:
        if not buffer.ids:
            return
        ids, labels = torch.cat(buffer.ids), torch.cat(buffer.labels)
        for name, chunks in buffer.layers.items():
            values, positions, activity = (torch.cat([c[i] for c in chunks]).cpu() for i in range(3))
            maps = torch.cat([c[3] for c in chunks]).cpu() if chunks[0][3] is not None else None
            accs[name].update(values, positions, activity, ids, labels, maps)
        buffer.clear()

    with Probe(net, layers, cfg.reduce, threshold=cfg.active_threshold, keep_maps=True) as probe, \
            torch.inference_mode():
        for x, y in tqdm(loader, desc=f"scan {model.name}", unit="batch", disable=not progress, leave=False):
            out = net(x.to(device, non_blocking=True))
            ids = torch.arange(seen, seen + x.shape[0])
            labels = torch.as_tensor(y).view(-1).long()
            seen += x.shape[0]
            label_batches.append(labels)
            if not accs:
                for name in layers:
                    shapes[name] = probe.shapes[name]
                    accs[name] = LayerAccumulator(probe.values[name].shape[1], cfg, n_classes, sample)
            buffer.add(ids, labels, probe)
            if buffer.full():
                flush()
            if isinstance(out, torch.Tensor) and out.dim() == 2:
                conf, pred = out.float().softmax(1).max(1)
                predicted.append(pred.cpu())
                confidence.append(conf.cpu())
        flush()
    net.to("cpu")
    modules = dict(net.named_modules())
    result_layers = [summarize(LayerInfo(name, type(modules[name]).__name__, shapes[name], True), accs[name], cfg,
                               dataset.class_names) for name in layers]
    labels = torch.cat(label_batches).numpy().astype(np.int64) if label_batches else np.zeros(0, np.int64)
    pred = torch.cat(predicted).numpy() if predicted and sum(len(p) for p in predicted) == seen else None
    conf = torch.cat(confidence).numpy() if pred is not None else None
    accuracy = None
    if pred is not None:
        valid = labels >= 0
        if valid.any():
            accuracy = float((pred[valid] == labels[valid]).mean())
    return ModelScan(model.name, result_layers, labels, pred, conf, seen, time.perf_counter() - start, accuracy,
                     sample)
