"""Scan: one streaming pass of a model over the dataset, every per-unit statistic out.

Owns the loop that feeds each probed layer's `LayerAccumulator` from a
`hooks.Capture` (the accumulators run on the model's device; their values
are buffered up to `scan.buffer_mb` and taken in chunks), the model's
predictions, and the summary of what a unit page shows (`summarize`:
histogram, class selectivity, health flags and an automatic label, defined
there). A scan of examples [start, stop) is a `ScanPart`; parts of one
dataset (shards of several processes) merge into what one pass gives.
Runs under `torch.inference_mode()`. Writes nothing: the caller hands the
`ModelScan` to the store.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from .progress import bar as progress_bar

from .accumulators import (POSITION_SAMPLE, LayerAccumulator, TopKResult, first_units, sample_ids, unit_maps,
                           unit_values)
from .config import ScanSection
from . import text
from .errors import AtlasError, AtlasWarning
from .explain import (Explanations, class_effects, effect_examples, explain_inputs, top_attributions,
                      top_effects, top_token_logits)
from .hooks import Capture, LayerInfo, describe_layer
from .sources import AtlasDataset, LoadedModel


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
    title: str = ""  # what the layer is: "Conv2d+ReLU 64×112×112", "Bottleneck 1024×14×14"
    nonlinearity: str = "raw"  # the family its health was judged by (see `Nonlinearity`)
    top_attributions: np.ndarray | None = None  # [U, k, h, w] gradient x input of each top example (site option)
    ranges: "ActivationRanges | None" = None  # examples across the activation range (`range_examples`)
    # effect on the output (`unit_effects`): (up classes [U, k], up values, down classes, down values, exact)
    effects: tuple | None = None


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


# --- health follows the layer's nonlinearity ---------------------------------------

@dataclass(frozen=True)
class Nonlinearity:
    """What "dead" and "saturated" mean for the function a layer's values come out of.

    - relu (ReLU, ReLU6, LeakyReLU, PReLU, ELU, SELU, CELU) and smooth
      (GELU, SiLU, Mish, Hardswish, Softplus): active where the input of the
      function is positive; dead = never active on any position of any
      input; saturated (always on, so the unit is linear) = active on at
      least `scan.saturated_fraction` of the positions of the inputs, or not
      dead but constant;
    - sigmoid (Sigmoid, Hardsigmoid) and tanh (Tanh, Hardtanh): saturated =
      pinned in the tails (within 0.02 of 0 or 1, of -1 or 1) on at least
      `saturated_fraction` of the positions; dead = constant otherwise;
    - raw (conv, linear, norm and block outputs): dead = constant; never
      saturated. A block whose values are never negative (a ResNet block
      ends in a ReLU) is judged as relu.
    Constant: std <= 1e-6 * (1 + |mean|) over the inputs.
    """
    family: str  # relu | smooth | sigmoid | tanh | raw
    threshold: float  # active above this value
    tails: tuple[float, float] | None = None  # squashing functions: pinned at or beyond (low, high)


RELU_TYPES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU)
SMOOTH_TYPES = (nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish)
TAIL = 0.02  # within this of a squashing function's bound is pinned


def nonlinearity(module: nn.Module | None, threshold: float = 0.0) -> Nonlinearity:
    """The health rule of a layer whose module is `module`; `threshold` (scan.active_threshold) for the
    relu-like and raw families."""
    if isinstance(module, RELU_TYPES):
        return Nonlinearity("relu", threshold)
    if isinstance(module, SMOOTH_TYPES):
        return Nonlinearity("smooth", threshold)
    if isinstance(module, nn.Softplus):  # softplus(x) > log(2) / beta exactly where x > 0
        return Nonlinearity("smooth", math.log(2) / module.beta)
    if isinstance(module, (nn.Sigmoid, nn.Hardsigmoid)):
        return Nonlinearity("sigmoid", 0.5, (TAIL, 1 - TAIL))
    if isinstance(module, nn.Hardtanh):  # before Tanh's check: ReLU6 is a Hardtanh too, caught above
        lo, hi = float(module.min_val), float(module.max_val)
        return Nonlinearity("tanh", (lo + hi) / 2, (lo + TAIL * (hi - lo) / 2, hi - TAIL * (hi - lo) / 2))
    if isinstance(module, nn.Tanh):
        return Nonlinearity("tanh", 0.0, (-1 + TAIL, 1 - TAIL))
    return Nonlinearity("raw", threshold)


def health(stats: dict[str, np.ndarray], rule: Nonlinearity, saturated_fraction: float):
    """(dead, saturated, the family judged by) of every unit, from its finalized statistics."""
    family = rule.family
    finite_min = stats["min"][np.isfinite(stats["min"])]
    if family == "raw" and len(finite_min) and finite_min.min() >= 0:
        family = "relu"  # never negative: the output of a ReLU (a ResNet block's last op)
    constant = stats["std"] <= 1e-6 * (1 + np.abs(np.nan_to_num(stats["mean"])))
    seen = stats["count"] > 0
    if family in ("relu", "smooth"):
        dead = stats["frac_active"] == 0
        saturated = ~dead & ((stats["position_activity"] >= saturated_fraction) | constant)
    elif family in ("sigmoid", "tanh"):
        saturated = seen & (stats["tail_activity"] >= saturated_fraction)
        dead = seen & constant & ~saturated
    else:
        dead, saturated = seen & constant, np.zeros(len(constant), dtype=bool)
    return dead, saturated, family


# --- what a unit page shows -------------------------------------------------------

def histogram(sample, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per unit of a sample [S, U]: `bins` equal bins between the min and max of its finite values (lo = hi = 0
    if none); the bin of x is floor((x - lo) / width * bins) in float32, clipped to the last bin."""
    x = torch.as_tensor(sample).float().T
    finite = torch.isfinite(x)
    empty = torch.zeros(len(x), device=x.device)
    lo = torch.where(finite, x, torch.inf).amin(1) if x.shape[1] else empty
    hi = torch.where(finite, x, -torch.inf).amax(1) if x.shape[1] else empty
    none = ~torch.isfinite(lo)
    lo, hi = lo.masked_fill(none, 0.0), hi.masked_fill(none, 0.0)
    width = (hi - lo).clamp(min=1e-12)
    index = torch.floor((x - lo[:, None]) / width[:, None] * bins).clamp_(0, bins - 1).long()
    index = torch.where(finite, index, bins)  # the non-finite count in a last bin, dropped
    counts = torch.zeros(len(x), bins + 1, dtype=torch.long, device=x.device).scatter_add_(1, index,
                                                                                          torch.ones_like(index))
    return counts[:, :bins].cpu().numpy(), lo.cpu().numpy(), hi.cpu().numpy()


def class_selectivity(class_means) -> tuple[np.ndarray, np.ndarray]:
    """Selectivity index and top class of every unit.

    index = (mu_max - mu_rest) / (mu_max + mu_rest), mu_max the largest class
    mean and mu_rest the mean of the other classes' means (Morcos et al.,
    2018). Class means below 0 (pre-activation layers) are clipped to 0 first,
    so the index lies in [0, 1]: 1 = fires for one class only, 0 = the same
    for every class (or never positive). NaN where fewer than 2 classes have
    examples; the top class is the one of the highest mean, not clipped (the
    first of equal maxima), -1 for none.
    """
    means = torch.as_tensor(np.asarray(class_means, dtype=np.float64))
    present = ~torch.isnan(means)
    clipped = means.clamp(min=0)
    n = present.sum(1)
    best = torch.where(present, clipped, -torch.inf).amax(1)
    top = torch.where(present, means, -torch.inf).argmax(1)  # the first of equal maxima
    rest = (torch.where(present, clipped, 0.0).sum(1) - best) / (n - 1).clamp(min=1)
    index = torch.where(best + rest > 0, (best - rest) / (best + rest), 0.0)
    return torch.where(n >= 2, index, torch.nan).numpy(), torch.where(n > 0, top, -1).numpy()


REDUNDANCY_CHUNK = 64 * 2**20  # bytes of the correlation matrix held at once (a 65,536-latent SAE's whole is 17 GB)
REDUNDANCY_CANDIDATES = 4  # partners per unit that the float32 screen hands to the float64 rescoring


def first_mode(values: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of values [U, k] (only the entries where `valid`): the column of the first entry of its most
    common value (of equally common values, the one that comes first) and how many entries hold it (0 and
    column 0 for a row with none valid)."""
    first, count = np.zeros(len(values), dtype=np.int64), np.zeros(len(values), dtype=np.int64)
    rows = max(1, 2**24 // max(1, values.shape[1] ** 2))
    for start in range(0, len(values), rows):
        v, ok = values[start:start + rows], valid[start:start + rows]
        counts = ((v[:, :, None] == v[:, None, :]) & ok[:, None, :] & ok[:, :, None]).sum(2)  # [rows, k]
        first[start:start + rows] = counts.argmax(1) if counts.shape[1] else 0
        count[start:start + rows] = counts.max(1) if counts.shape[1] else 0
    return first, count


def redundancy(sample) -> tuple[np.ndarray, np.ndarray]:
    """For every unit, the unit of the same layer whose sampled activations correlate most with it.

    Pearson correlation over the sample [S, U], the same partners as float64 gives (the first of equal
    maxima); units with no variance correlate with nothing (partner -1, correlation NaN). The [U, U] matrix
    is never held whole (REDUNDANCY_CHUNK bytes of it at a time) and is screened in float32 (`_partners`).
    """
    z = torch.as_tensor(sample).T.double().clone(memory_format=torch.contiguous_format)  # rows: units
    n_units = z.shape[0]
    if n_units < 2 or z.shape[1] < 2:
        return np.full(n_units, -1), np.full(n_units, np.nan)
    torch.nan_to_num_(z, nan=0.0, posinf=0.0, neginf=0.0)
    scale = max(1.0, *(abs(float(v)) for v in torch.aminmax(z)))
    z -= z.mean(1, keepdim=True)
    norm = torch.linalg.vector_norm(z, dim=1)
    ok = norm > 1e-9 * scale
    z *= torch.where(ok, 1.0 / torch.where(ok, norm, 1.0), 0.0)[:, None]
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the screen's bound assumes float32 sums (no TF32, no bf16)
    live = torch.nonzero(ok)[:, 0]  # ascending: the first of equal maxima stays the lower unit
    try:
        found, at = _partners(z[live])
    finally:
        torch.set_float32_matmul_precision(precision)
    best = torch.full((n_units,), -torch.inf, dtype=z.dtype, device=z.device)
    partner = torch.full((n_units,), -1, dtype=torch.long, device=z.device)
    best[live], partner[live] = found, live[at]
    valid = ok & torch.isfinite(best)
    return torch.where(valid, partner, -1).cpu().numpy(), torch.where(valid, best, torch.nan).cpu().numpy()


def _partners(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's best correlation and partner among the other rows of z [U, S] (unit rows, float64):
    per chunk of rows, a float32 screen c of z @ z.T, within `bound` of the float64 value (float32 sums of S
    products of unit vectors, through Cauchy-Schwarz, and the rounding of z to float32); its
    REDUNDANCY_CANDIDATES best columns rescored in float64. That pick is float64's wherever the last
    candidate's screen value plus the bound stays below the best rescored value (no column left out can reach
    it); other rows take their plain float64 row."""
    n_units, s = z.shape
    z32 = z.float()
    bound = 1.01 * (s + 4) * 2.0 ** -24
    m = min(REDUNDANCY_CANDIDATES, n_units)
    best = torch.full((n_units,), -torch.inf, dtype=z.dtype, device=z.device)
    partner = torch.zeros(n_units, dtype=torch.long, device=z.device)
    if n_units < 2:
        return best, partner
    rows = max(1, REDUNDANCY_CHUNK // (4 * n_units))  # [rows, U] of the correlation matrix at a time, not [U, U]
    for first in range(0, n_units, rows):
        block = z32[first:first + rows] @ z32.T
        block.diagonal(first).fill_(-torch.inf)
        screen, columns = block.topk(m, dim=1)
        columns, order = columns.sort(dim=1)  # by unit: max below takes the first of equal maxima
        exact = torch.einsum("us,ums->um", z[first:first + rows], z[columns])
        exact = torch.where(torch.isfinite(screen.gather(1, order)), exact, -torch.inf)  # the diagonal
        value, at = exact.max(1)
        best[first:first + rows], partner[first:first + rows] = value, columns.gather(1, at[:, None])[:, 0]
        unsure = torch.isfinite(screen[:, -1]) & (screen[:, -1].double() + bound >= value)
        if unsure.any():
            again = first + torch.nonzero(unsure)[:, 0]
            corr = z[again] @ z.T
            corr[torch.arange(len(again), device=z.device), again] = -torch.inf
            best[again], partner[again] = corr.max(1)  # the first of equal maxima
    return best, partner


@torch.inference_mode()
def summarize(info: LayerInfo, acc: LayerAccumulator, cfg: ScanSection, class_names: tuple[str, ...],
              rule: Nonlinearity | None = None, title: str = "", example_labels: np.ndarray | None = None,
              seed: int = 0) -> LayerScan:
    """Finalize a layer's accumulators into statistics, health flags and labels.

    Health flags (thresholds from [scan]):
    - dead and saturated: as the layer's nonlinearity defines them (`Nonlinearity`;
      activity over positions of conv and token units, not each input's max);
    - redundant: Pearson correlation with another unit of the same layer of
      at least `redundant_correlation` over the sample (the partner is named);
    - non-finite: some activations were NaN or Inf (counted, left out of the
      statistics, never in the top-k).
    example_labels: every example's label (by id), for the labels' scores (`label_scores`); seed: of the
    examples picked across the activation range (`range_examples`).
    Label: "dead", "saturated", "non-finite" (no finite activation at all),
    "class-selective: <class>" when the selectivity index is at least
    `class_selective`, else "feature-selective (broad)" — the split of the
    classic analysis of an MNIST net's hidden units into units that answer
    one digit and units that answer a stroke shared by several.
    """
    acc.flush()
    stats = acc.moments.finalize()
    stats.update(acc.activity.finalize())
    class_means = acc.classes.finalize()
    selectivity, top_class = class_selectivity(class_means)
    partner, corr = redundancy(acc.sample.matrix)
    counts, lo, hi = histogram(acc.sample.matrix, cfg.histogram_bins)
    dead, saturated, family = health(stats, rule or Nonlinearity("relu", cfg.active_threshold),
                                     cfg.saturated_fraction)
    redundant = np.nan_to_num(corr, nan=-np.inf) >= cfg.redundant_correlation
    stats.update(selectivity=selectivity, top_class=top_class, dead=dead, saturated=saturated,
                 redundant=redundant, redundant_with=np.where(redundant, partner, -1),
                 redundant_corr=np.where(redundant, corr, np.nan), best_partner=partner, best_corr=corr)
    selective = np.nan_to_num(selectivity, nan=-np.inf) >= cfg.class_selective
    labels = []
    for none, is_dead, is_saturated, is_selective, top in zip(
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
    top, sample = acc.top.finalize(), acc.sample.finalize()
    stats["label_score"] = label_scores(labels, top_class, sample, acc.sample.ids, top, example_labels)
    ranges = range_examples(sample, acc.sample.ids, cfg.range_bins, cfg.range_examples, seed, acc.sample.positions()) \
        if cfg.range_bins and cfg.range_examples and len(sample) else None
    return LayerScan(info, top, acc.bottom.finalize(), stats, labels, counts, lo, hi,
                     class_means, sample, title, family, ranges=ranges)


@dataclass
class ActivationRanges:
    """Examples across each unit's activation range: per unit, `bins` quantile bins of its sampled values and a
    few examples of each (`range_examples`). Bins a unit has too few finite values for are empty (count 0)."""
    lo: np.ndarray  # [U, bins] lowest sampled value in the bin
    hi: np.ndarray  # [U, bins] highest
    examples: np.ndarray  # [U, bins, k] example ids, highest value first; -1 where the bin has fewer than k
    values: np.ndarray  # [U, bins, k] their values (NaN where no example)
    positions: np.ndarray  # [U, bins, k] where in the example the unit peaked (-1: not recorded)


def range_examples(sample: np.ndarray, ids: np.ndarray, bins: int, k: int, seed: int,
                   positions: np.ndarray | None = None) -> ActivationRanges:
    """Examples across the activation range, from the seeded sample (sample [S, U] of examples ids [S]).

    A unit's finite sampled values, ranked, fall in `bins` bins of equal count (bin of rank r = r * bins // n,
    so ties are split by rank and each bin holds a tenth of the sample for bins = 10: quantiles, not equal
    widths); each bin's k examples are a seeded uniform pick among its rows (the rows with the k smallest of a
    seeded random key per sample row and unit), shown highest first. The sample is a uniform seeded subset
    of the dataset taken in the one pass, so the bins are the dataset's quantiles up to sampling error and
    the pick is what a reservoir per bin over every example would give in distribution; memory is the
    sample's (already kept). positions [S, U] (`SampleRows.positions`, token layers): where each sample row
    peaked, carried to its picks.
    """
    x = np.asarray(sample, dtype=np.float64)
    s, n_units = x.shape
    finite = np.isfinite(x)
    n = finite.sum(0)  # [U]
    order = np.argsort(np.where(finite, x, np.inf), axis=0, kind="stable")  # rows by value, non-finite last
    rank = np.arange(s)[:, None]
    bin_of = np.where(rank < n, rank * bins // np.maximum(n, 1), bins)  # [S, U] bin of each ranked row
    keys = np.random.default_rng(seed).random((s, n_units))
    ranked_keys = np.take_along_axis(keys, order, 0)
    within = np.argsort(bin_of + ranked_keys, axis=0, kind="stable")  # by bin, then by key within it
    rows = np.take_along_axis(order, within, 0)  # sample rows: bin by bin, each bin's rows in key order
    starts = -(-np.arange(bins + 1)[:, None] * n[None, :] // bins)  # [bins + 1, U] first rank of each bin
    lo = np.full((n_units, bins), np.nan)
    hi = np.full((n_units, bins), np.nan)
    examples = np.full((n_units, bins, k), -1, dtype=np.int64)
    values = np.full((n_units, bins, k), np.nan)
    places = np.full((n_units, bins, k), -1, dtype=np.int64)
    cols = np.arange(n_units)
    for b in range(bins):
        start, stop = starts[b], starts[b + 1]
        filled = stop > start
        lo[filled, b] = x[order[start[filled], cols[filled]], cols[filled]]
        hi[filled, b] = x[order[stop[filled] - 1, cols[filled]], cols[filled]]
        for j in range(k):
            ok = start + j < stop
            r = rows[np.minimum(start + j, s - 1), cols]
            examples[ok, b, j] = np.asarray(ids)[r[ok]]
            values[ok, b, j] = x[r[ok], cols[ok]]
            if positions is not None:
                places[ok, b, j] = positions[r[ok], cols[ok]]
    by_value = np.argsort(np.where(np.isnan(values), np.inf, -values), axis=2, kind="stable")  # missing last
    return ActivationRanges(lo, hi, *(np.take_along_axis(a, by_value, 2) for a in (examples, values, places)))


def auroc(values: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """[U] area under the ROC curve of each column of values [S, U] as a score for `positive` [S, U] (ties
    count a half, as scikit-learn's roc_auc_score); NaN where a column has no positive or no negative."""
    from scipy.stats import rankdata

    ranks = rankdata(values.astype(np.float64), axis=0)
    n_pos = positive.sum(0)
    n_neg = len(values) - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        out = ((ranks * positive).sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), out, np.nan)


def label_scores(labels: list[str], top_class: np.ndarray, sample: np.ndarray, sample_ids: np.ndarray, top,
                 example_labels: np.ndarray | None) -> np.ndarray:
    """[U] how well each unit's label predicts it: for "class-selective: c", the AUROC of "the example is of
    class c" against its activation over the seeded sample (sample [S, U] of examples sample_ids [S]); for
    "feature-selective", the share of its top-k outside their most common class (0: one class, towards 1:
    many); NaN for the other labels. example_labels: every example's label (by id); None: no scores."""
    out = np.full(len(labels), np.nan)
    if example_labels is None:
        return out
    selective = np.array([label.startswith("class-selective") for label in labels], dtype=bool)
    if selective.any() and len(sample_ids):
        cols = np.flatnonzero(selective)
        positive = example_labels[sample_ids][:, None] == top_class[cols][None, :]
        out[cols] = auroc(sample[:, cols], positive)
    broad = np.array([label.startswith("feature-selective") for label in labels], dtype=bool)
    if broad.any():
        valid = top.valid[broad]
        classes = example_labels[top.ids[broad].clip(min=0)].clip(min=0)  # unlabelled (-1) with class 0
        _, most = first_mode(classes, valid)
        n = valid.sum(1)
        out[np.flatnonzero(broad)[n > 0]] = 1 - most[n > 0] / n[n > 0]
    return out


# --- input pages --------------------------------------------------------------------

INPUT_UNITS = 8  # most active units of each layer shown on an input page


@dataclass
class InputActivations:
    """For a few inputs (the input pages), each layer's most active units and their maps."""
    examples: np.ndarray  # [E] example ids, ascending
    units: dict[str, np.ndarray]  # layer -> [E, n] unit indices, most active first
    values: dict[str, np.ndarray]  # layer -> [E, n] their activations
    maps: dict[str, np.ndarray | None]  # layer -> [E, n, M] float32 maps (conv/token layers), None for flat
    explained: Explanations | None = None  # attributions and attention of the same examples (`explain`)


TOP_LOGITS = 10  # next tokens a language model's unit page lists each way (its top positive and negative logits)


def token_logits(model: LoadedModel, dataset: AtlasDataset, layers: list[str], device: torch.device,
                 units: int = 0) -> dict[str, tuple]:
    """{layer: `top_effects` of its units' logits, exact}: each unit's TOP_LOGITS top positive and negative
    next tokens through the unembedding (`explain.top_token_logits`; the first `units` units of each layer;
    layers with no direction in the residual stream are left out). They depend on the weights alone, not on
    the dataset's windows: their own build stage, so that a new dataset does not redo them. On `device` (a
    GPU's bfloat16 matmuls screen them fastest)."""
    try:
        return {name: (*top, True) for name, top in top_token_logits(
            model.module.to(device), layers, dataset.inputs([0]).to(device), text.vocab_size(dataset.tokenizer),
            TOP_LOGITS, units or None)}
    finally:
        model.module.to("cpu")


def token_labels(layer: LayerScan, tokens: np.ndarray, tokenizer) -> None:
    """A text's units' labels (it has no classes): "fires on ‹token›", the token its top examples peak on
    most often, scored by the share of them that do (ties: the token of the higher example); dead,
    saturated and non-finite units keep their label."""
    top = layer.top
    keep = top.valid & (top.positions >= 0)
    peaks = np.where(keep, tokens[top.ids.clip(min=0), top.positions.clip(min=0)], -1)  # [U, k] peak tokens
    first, count = first_mode(peaks, keep)  # the first of the most common, in rank order
    best = peaks[np.arange(len(peaks)), first]
    peaked = keep.any(1)
    units = [u for u, label in enumerate(layer.labels)
             if peaked[u] and label not in ("dead", "saturated", "non-finite")]
    shown = {int(t): text.visible(text.token_text(tokenizer, int(t))) for t in np.unique(best[units])}
    for u in units:
        layer.labels[u] = f"fires on {shown[int(best[u])]}"
    layer.stats["label_score"][units] = count[units] / keep[units].sum(1)


def input_examples(n_examples: int, count: int, seed: int) -> np.ndarray:
    """The seeded sample of examples that get an input page (ascending ids)."""
    return sample_ids(n_examples, count, seed + 1)  # +1: not the same draw as the scan's sample


def input_activations(net: torch.nn.Module, dataset: AtlasDataset, layers: list[str], examples: np.ndarray,
                      reduce: str, device: torch.device, top: int = INPUT_UNITS, limit: int = 0,
                      attribution_steps: int = 0, batch_size: int = 64) -> InputActivations:
    """A second, small pass over `examples`: per layer the `top` units with the highest activation on each
    (of its first `limit` units; 0: all), and their explanations (`explain.explain_inputs`, with
    `attribution_steps` of integrated gradients; attention for a model with token layers)."""
    units, values, maps = {}, {}, {}
    outputs: dict[str, torch.Tensor] = {}
    x = None
    if len(examples):
        x = dataset.inputs(examples).to(device)
        with Capture(net, layers) as capture, torch.inference_mode():
            capture(x)
        outputs = capture.outputs
    for name in layers:
        if name not in outputs:
            units[name] = np.zeros((len(examples), 0), np.int64)
            values[name], maps[name] = np.zeros((len(examples), 0), np.float32), None
            continue
        out = first_units(outputs[name], limit).float().cpu()
        reduced = unit_values(out, reduce)
        finite = torch.where(torch.isfinite(reduced), reduced, -torch.inf)
        best = torch.argsort(finite, dim=1, descending=True, stable=True)[:, :top]  # ties to the lower unit
        units[name] = best.numpy().astype(np.int64)
        values[name] = torch.gather(reduced, 1, best).numpy()
        layer_maps = unit_maps(out)
        maps[name] = None if layer_maps is None else \
            torch.gather(layer_maps, 1, best[:, :, None].expand(-1, -1, layer_maps.shape[2])).numpy()
    explained = None
    if x is not None:
        explained = explain_inputs(net, x, units, reduce, attribution_steps, batch_size,
                                   any(out.dim() == 3 for out in outputs.values()))
    return InputActivations(np.asarray(examples, dtype=np.int64), units, values, maps, explained)


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

    def to(self, device) -> "ScanPart":
        """The accumulators moved to `device` (to the CPU before a part is sent to another process)."""
        for acc in self.accs.values():
            acc.to(device)
        return self


CHUNK_COST = 8  # a chunk's update takes about 8 times its float32 values in float64 temporaries (buffer_mb)


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


def shard_range(n_examples: int, rank: int, world: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous block of example ids (the first ranks take one more when it does not divide)."""
    base, extra = divmod(n_examples, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def scan_part(model: LoadedModel, dataset: AtlasDataset, layers: list[str], cfg: ScanSection, device: torch.device,
              seed: int = 0, start: int = 0, stop: int | None = None, progress: bool = True,
              workers: int = 0, units: int = 0) -> ScanPart:
    """Stream examples [start, stop) through the model once, feeding every layer's accumulators.

    Example ids are global (a shard's top-k, sample rows and tie-breaks are
    those of the whole dataset), so parts of one dataset merge into exactly
    what one pass gives. The accumulators stay on `device`. units: only each
    layer's first that many units (0: all).
    """
    began = time.perf_counter()
    stop = len(dataset) if stop is None else stop
    net = model.module.to(device)
    n_classes = max(len(dataset.class_names), 1)
    sample = sample_ids(len(dataset), cfg.sample_size, seed)
    activity = sample[:: max(1, -(-len(sample) // POSITION_SAMPLE))]  # evenly spread over the sample
    data = dataset.data if (start, stop) == (0, len(dataset)) else Subset(dataset.data, range(start, stop))
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    autocast = (torch.autocast(device.type, dtype=getattr(torch, cfg.precision)) if cfg.precision != "float32"
                else nullcontext())
    accs: dict[str, LayerAccumulator] = {}
    if stop > start:  # one example's forward gives every layer's output shape: the state is allocated first
        outputs = {}
        with Capture(net, layers, sink=lambda name, out: outputs.__setitem__(
                name, (first_units(out, units).shape[1:], out.dtype)), model_name=model.name) as capture, \
                torch.inference_mode(), autocast:
            capture(torch.as_tensor(data[0][0])[None].to(device))
        modules = dict(net.named_modules())
        rules = {name: nonlinearity(modules[name], cfg.active_threshold) for name in layers}
        # every layer buffers the same examples: buffer_mb over CHUNK_COST for all their float32 values
        width = sum((shape[0] if len(shape) == 3 else shape[-1]) if shape else 1 for shape, _ in outputs.values())
        rows = max(cfg.batch_size, cfg.buffer_mb * 2**20 // (CHUNK_COST * 4 * max(width, 1)))
        accs = {name: LayerAccumulator(tuple(outputs[name][0]), cfg.top_k, n_classes, sample, activity, device,
                                       cfg.reduce, rules[name].threshold, outputs[name][1], rules[name].tails,
                                       buffer_rows=rows)
                for name in layers}
    batch = {"first": start, "labels": None}  # what the sink needs to know of the batch in flight

    def sink(name: str, output: torch.Tensor) -> None:
        accs[name].update(first_units(output, units), batch["first"], batch["labels"])

    # made once, filled batch by batch (a list of small long-lived blocks fragments the heap, see above)
    labels_all = torch.full((stop - start,), -1, dtype=torch.long)
    predicted = torch.full((stop - start,), -1, dtype=torch.long, device=device)
    confidence = torch.zeros(stop - start, device=device)
    predictions = 0
    with Capture(net, layers, sink=sink, model_name=model.name) as capture, torch.inference_mode(), \
            worker_errors():
        bar = progress_bar(len(loader), f"scan {model.name} ({len(layers)} layers)", "batch", progress)
        for x, y in loader:
            bar.update(1)
            labels = torch.as_tensor(y).view(-1).long()
            batch["labels"] = labels.to(device, non_blocking=True)
            with autocast:
                out = capture(x.to(device, non_blocking=True))
            rows = slice(batch["first"] - start, batch["first"] - start + len(labels))  # its place in the part
            batch["first"] += len(labels)
            labels_all[rows] = labels
            if isinstance(out, torch.Tensor) and out.dim() == 2:  # logits: prediction and softmax confidence
                logits = out.float()
                top, pred = logits.max(1)
                predicted[rows] = pred
                confidence[rows] = torch.exp(logits - top[:, None]).sum(1).reciprocal_()
                predictions += len(labels)
            del out  # before the next forward: a language model's [B, T, vocab] logits are not held twice
        for acc in accs.values():
            acc.flush()
        bar.close()
    complete = stop > start and predictions == stop - start
    return ScanPart(start, stop, accs, dict(capture.shapes), labels_all,
                    predicted.cpu() if complete else None, confidence.cpu() if complete else None,
                    time.perf_counter() - began)


def finish_scan(model: LoadedModel, dataset: AtlasDataset, layers: list[str], cfg: ScanSection,
                part: ScanPart, device: torch.device, seed: int = 0, input_pages: int = 0,
                units: int = 0, attribution_steps: int = 0, unit_attributions: bool = False) -> ModelScan:
    """Summarize a whole-dataset part into what the store keeps (and the input pages' second small pass;
    with `unit_attributions`, gradient × input of every unit's top examples)."""
    start = time.perf_counter()
    if (part.start, part.stop) != (0, len(dataset)):
        raise ValueError(f"finish_scan needs the whole dataset, got examples [{part.start}, {part.stop})")
    modules = dict(model.module.named_modules())
    result_layers = [summarize(LayerInfo(name, type(modules[name]).__name__, part.accs[name].shape, True,
                                         sequence=dataset.is_text),
                               part.accs[name], cfg, dataset.class_names,
                               nonlinearity(modules[name], cfg.active_threshold),
                               describe_layer(model.module, name, part.shapes[name]), part.labels.numpy(), seed)
                     for name in layers if name in part.accs]
    if dataset.is_text:  # (their top logits depend on the weights alone: `token_logits`, a stage of its own)
        for layer in result_layers:
            token_labels(layer, dataset.data.tokens, dataset.tokenizer)
    unit_effects(model, dataset, result_layers, cfg, device, seed, part.labels.numpy())
    if unit_attributions and not dataset.is_text:  # gradient x input needs real-valued inputs
        net = model.module.to(device).eval()
        for layer in result_layers:
            layer.top_attributions = top_attributions(net, layer.info.name, layer.top.ids, layer.top.valid,
                                                      dataset.inputs, cfg.reduce, cfg.batch_size, device)
        model.module.to("cpu")
    inputs = None
    if input_pages and not dataset.is_text:  # an input page draws a layer's heatmap over an image
        inputs = input_activations(model.module.to(device), dataset, layers,
                                   input_examples(len(dataset), input_pages, seed), cfg.reduce, device,
                                   limit=units, attribution_steps=attribution_steps, batch_size=cfg.batch_size)
        model.module.to("cpu")
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


def final_linear(net: nn.Module, n_outputs: int) -> str | None:
    """The module path of a model's classifier: its last nn.Linear with `n_outputs` outputs, None if none."""
    names = [name for name, m in net.named_modules() if isinstance(m, nn.Linear) and m.out_features == n_outputs]
    return names[-1] if names else None


def unit_effects(model: LoadedModel, dataset: AtlasDataset, layers: list[LayerScan], cfg: ScanSection,
                 device: torch.device, seed: int, labels: np.ndarray) -> None:
    """Each layer's `effects`: the 5 classes each unit pushes up and down most (explain.class_effects over
    `scan.effect_per_class` seeded examples of each class, by one forward and backward per batch; the weights
    for a layer that feeds the classifier directly). Only where the model's outputs are the dataset's classes
    (so a label indexes a logit); the output layer itself gets none (its units are the logits)."""
    n = model.info.get("outputs")
    if not cfg.effect_per_class or n is None or n != len(dataset.class_names) or n < 2:
        return
    examples = effect_examples(labels, n, cfg.effect_per_class, seed)
    names = [layer.info.name for layer in layers if layer.info.name != model.info.get("output_layer")]
    if not len(examples) or not names:
        return
    exact: set[str] = set()
    try:
        effects = class_effects(model.module.to(device), names, dataset.inputs, examples, labels, n,
                                cfg.batch_size, device, final_linear(model.module, n), exact)
    except RuntimeError as exc:  # autograd cannot go back through the model: its pages go without effects
        warnings.warn(AtlasWarning(f"{model.name}: no effects on the output (the gradient of its logits with "
                                   f"respect to its layers could not be taken: {str(exc).splitlines()[0]})"))
        return
    finally:
        model.module.to("cpu")
    for layer in layers:
        if layer.info.name in effects:
            layer.effects = (*top_effects(effects[layer.info.name][:layer.info.n_units]), layer.info.name in exact)


def scan_model(model: LoadedModel, dataset: AtlasDataset, layers: list[str], cfg: ScanSection,
               device: torch.device, seed: int = 0, progress: bool = True, input_pages: int = 0,
               units: int = 0) -> ModelScan:
    """Stream the dataset through the model once and summarize every unit of `layers`.

    input_pages: how many inputs (a seeded sample) get their layers' most
    active units recorded, by a second pass over just those.
    """
    part = scan_part(model, dataset, layers, cfg, device, seed, progress=progress, units=units)
    try:
        return finish_scan(model, dataset, layers, cfg, part, device, seed, input_pages, units)
    finally:
        model.module.to("cpu")
