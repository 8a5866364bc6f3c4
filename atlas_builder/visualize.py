"""Feature-vis stage: render every probed unit of a model and store the images.

For each probed layer, units are rendered in batches of
`featurevis.batch_size` (one `featurevis.render` run per batch): the image
that maximizes the unit, its optimization as an animated WebP (frames at
log-spaced steps; the final image doubles as the poster), and, with
`featurevis.negative`, the image that minimizes it. Units of the model's
first conv/linear layer also get their weights drawn as a heatmap (a conv
filter, or a linear unit's weight vector reshaped to the input image).

Each image's seed comes from (atlas seed, model, layer, unit, kind) alone,
and the transforms' seed from (atlas seed, model, layer), so a unit's image
does not depend on how units are batched. Writes media files under the
store's media folder (`fv/<model>/<layer>/<unit>.<kind>.webp`) and returns
the rows for the store; the build records them.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from .progress import bar as progress_bar

from . import atomic, featurevis as fv, media, urls
from .config import FeatureVisSection
from .hooks import LINEAR_TYPES, final_activations, layer_sources
from .scan import nonlinearity
from .sources import AtlasDataset, LoadedModel


def derived_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha1(repr(parts).encode()).digest()[:4], "little")


def input_shape(dataset: AtlasDataset, cfg: FeatureVisSection) -> tuple[int, int, int] | None:
    """(C, H, W) of the images to optimize, or None when the inputs are not images."""
    x, _ = dataset.data[0]
    if x.dim() != 3:
        return None
    c, h, w = x.shape
    return (c, cfg.size, cfg.size) if cfg.size else (c, h, w)


def first_layer(model: nn.Module) -> str | None:
    """The first conv/linear module in definition order: the one that sees the input."""
    return next((name for name, m in model.named_modules() if isinstance(m, LINEAR_TYPES)), None)


def weight_maps(module: nn.Module, shape: tuple[int, int, int]) -> np.ndarray | None:
    """[U, h, w] weights of each unit of a first layer (mean over input channels), or None."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        return None
    w = w.detach().float().cpu()
    if isinstance(module, nn.Conv2d):
        return w.mean(1).numpy()
    if isinstance(module, nn.Linear) and w.shape[1] == shape[0] * shape[1] * shape[2]:
        return w.view(w.shape[0], *shape).mean(1).numpy()
    return None


def batches_of(layers: dict[str, int], batch_size: int) -> list[tuple[str, list[int]]]:
    """Every layer's units in batches of `batch_size` on a fixed grid (0..b-1, b..2b-1, ...), so that a
    resumed build renders exactly the batches an uninterrupted one would."""
    return [(layer, list(range(first, min(first + batch_size, n_units))))
            for layer, n_units in layers.items() for first in range(0, n_units, batch_size)]


def run(model: LoadedModel, layers: dict[str, int], dataset: AtlasDataset, cfg: FeatureVisSection, seed: int,
        device: torch.device, media_dir: Path, progress: bool = True, part: tuple[int, int] = (0, 1),
        done: dict[str, set[int]] | None = None, on_batch=None, reduce: str = "max",
        scales: dict[str, np.ndarray] | None = None) -> tuple[list[tuple], list[tuple], float]:
    """Render the units of `layers` ({name: n_units}); returns (featurevis rows, weight rows, seconds).

    A row is (layer, unit, kind, activation, image, animation, objective,
    target): the activation is the unit's value on the image as the scan
    measures dataset examples (`reduce` over positions: the pages compare the
    two), the objective what the optimizer maximized (for a negative image,
    minimized) at its target, "output" or "input". The negative image of a
    unit after a ReLU-like activation minimizes the activation's input, the
    pre-activation: its output stops at 0, which any grey image reaches.
    With `cfg.diversity` = N, each unit also gets N images optimized together
    with lucid's diversity term (kinds diverse0 ... diverseN-1), weighted by
    DIVERSITY_WEIGHT times the unit's top dataset activation (`scales`:
    {layer: [units]}, from the scan), so the term has the unit's own scale.

    Batches whose every unit is in `done` ({layer: units}) are skipped (a
    resumed or extended build). After each batch, `on_batch(rows, weights)`
    gets its rows (the build writes them to the store at once, so a build
    that is killed keeps them); the weight heatmaps come first.
    part = (rank, world): render only every world-th batch of units, from
    the rank-th (a sharded build; the batches, hence the images, are those of
    a single process). Part 0 also draws the weight heatmaps.
    """
    start = time.perf_counter()
    shape = input_shape(dataset, cfg)
    rows: list[tuple] = []
    weights: list[tuple] = []
    rank, world = part
    done = done or {}
    report = on_batch or (lambda batch_rows, batch_weights: None)
    if shape is None:
        return rows, weights, 0.0
    c, h, w = shape
    net = model.module.to(device)
    normalize = None
    if dataset.mean:
        mean = torch.tensor(dataset.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(dataset.std, device=device).view(1, -1, 1, 1)
        normalize = lambda x: (x - mean) / std  # noqa: E731
    transforms = (fv.standard_transforms if cfg.transforms == "standard" else fv.no_transforms)(h, w)
    objective = fv.channel if cfg.objective == "channel" else fv.neuron
    kinds = [("positive", 1.0)] + ([("negative", -1.0)] if cfg.negative else [])
    todo = [(layer, units) for layer, units in batches_of(layers, cfg.batch_size)
            if not set(units) <= done.get(layer, set())]
    mine = todo[rank::world]
    bar = progress_bar(sum(len(u) for _, u in mine) * len(kinds), f"featurevis {model.name}", "unit", progress)
    try:
        input_layer = first_layer(net)  # probed itself, or by the activation after it (the same units)
        probed = input_layer if input_layer in layers else next(
            (layer for layer, source in layer_sources(net).items() if source == input_layer and layer in layers), None)
        if probed is not None and rank == 0 and not set(range(layers[probed])) <= done.get(probed, set()):
            maps = weight_maps(dict(net.named_modules())[input_layer], (c, h, w))
            for unit in range(min(len(maps), layers[probed]) if maps is not None else 0):
                path = urls.featurevis_media(model.name, probed, unit, "weights")
                atomic.write_bytes(media_dir / path, media.encode_webp(media.weight_heatmap(maps[unit])))
                weights.append((probed, unit, path))
            report([], list(weights))
        modules = dict(net.named_modules())
        negatives = negative_targets(net, [layer for layer, _ in mine], modules, (c, h, w), normalize, device) \
            if cfg.negative else {}
        for layer, units in mine:
            bar.set_layer(layer)
            batch_rows = []
            for kind, sign in kinds:
                where, call, target = negatives.get(layer, (layer, 1, "output")) if kind == "negative" \
                    else (layer, 1, "output")
                seeds = [derived_seed(seed, model.name, layer, u, kind) for u in units]
                param = fv.FourierImage(len(units), c, h, w, seeds).to(device)
                result = fv.render(net, where, objective(units) * sign, param, steps=cfg.steps, lr=cfg.lr,
                                   transforms=transforms, normalize=normalize,
                                   seed=derived_seed(seed, model.name, layer), n_frames=cfg.frames,
                                   measure=fv.measured(units, reduce), take="output" if target == "output"
                                   else "input", call=call)
                for i, unit in enumerate(units):
                    image = urls.featurevis_media(model.name, layer, unit, kind)
                    quality, cap = ((media.POSITIVE_QUALITY, media.POSITIVE_MAX_BYTES) if kind == "positive"
                                    else (media.NEGATIVE_QUALITY, media.NEGATIVE_MAX_BYTES))
                    atomic.write_bytes(media_dir / image, media.encode_webp(media.tensor_image(result.images[i]),
                                                                            quality, media.STILL_SIDE, cap))
                    animation = None
                    if kind == "positive":
                        animation = urls.featurevis_media(model.name, layer, unit, "animation")
                        frames = [media.tensor_image(f[i]) for f in result.frames]
                        atomic.write_bytes(media_dir / animation, media.encode_animation(frames))
                    batch_rows.append((layer, unit, kind, float(result.measured[i]), image, animation,
                                       float(sign * result.activation[i]), target))
                bar.update(len(units))
            if cfg.diversity:
                scale = (scales or {}).get(layer)
                batch_rows += diverse_rows(net, layer, units, cfg, seed, model.name, c, h, w, device, transforms,
                                           normalize, reduce, scale, media_dir)
            rows.extend(batch_rows)
            report(batch_rows, [])
    finally:
        bar.close()
        net.to("cpu")
    return rows, weights, time.perf_counter() - start


# the diversity term's weight, times the unit's top dataset activation (measured on the demo CNN's units, 4
# images each: 0.20-0.26 apart in 1 - cosine of their Gram matrices, 0.83-0.99 of a single image's activation)
DIVERSITY_WEIGHT = 0.5
DIVERSE_SIDE, DIVERSE_QUALITY, DIVERSE_MAX_BYTES = 96, 50, 1500  # the row's small images


def diversity_objective(units: list[int], n: int, scales, device) -> fv.Objective:
    """n images per unit (unit-major: units[0]'s n images first): each unit's channel objective plus lucid's
    diversity term over its n images, weighted DIVERSITY_WEIGHT x its scale (its top dataset activation;
    1 where unknown or not positive)."""
    scale = [float(v) if v is not None and np.isfinite(v) and v > 0 else 1.0 for v in (scales or [None] * len(units))]
    weights = torch.tensor(scale, device=device).repeat_interleave(n) * DIVERSITY_WEIGHT
    channel, diversity = fv.channel(torch.tensor(units).repeat_interleave(n)), fv.diversity(n)
    return fv.Objective(lambda a: channel(a) + weights * diversity(a), f"channel + diversity({n})")


def diverse_rows(net, layer, units, cfg: FeatureVisSection, seed, model_name, c, h, w, device, transforms,
                 normalize, reduce, scale, media_dir) -> list[tuple]:
    """The diversity row of some units: N images each, one batch (unit-major), written as small WebPs."""
    n = cfg.diversity
    rows = []
    per_run = max(1, cfg.batch_size // n)  # units per run: their N images each fill about one batch
    for lo in range(0, len(units), per_run):
        chunk = units[lo:lo + per_run]
        rep = torch.tensor(chunk).repeat_interleave(n)
        objective = diversity_objective(chunk, n, [scale[u] for u in chunk] if scale is not None else None, device)
        seeds = [derived_seed(seed, model_name, layer, u, "diverse", j) for u in chunk for j in range(n)]
        result = fv.render(net, layer, objective, fv.FourierImage(len(seeds), c, h, w, seeds).to(device),
                           steps=cfg.steps, lr=cfg.lr, transforms=transforms, normalize=normalize,
                           seed=derived_seed(seed, model_name, layer, "diverse"), n_frames=1,
                           measure=fv.measured(rep, reduce))
        for i, unit in enumerate(rep.tolist()):
            kind = f"diverse{i % n}"
            path = urls.featurevis_media(model_name, layer, unit, kind)
            atomic.write_bytes(media_dir / path, media.encode_webp(media.tensor_image(result.images[i]),
                                                                   DIVERSE_QUALITY, DIVERSE_SIDE, DIVERSE_MAX_BYTES))
            rows.append((layer, unit, kind, float(result.measured[i]), path, None, None, "output"))
    return rows


def negative_targets(net: nn.Module, layers: list[str], modules: dict, shape: tuple[int, int, int], normalize,
                     device: torch.device) -> dict[str, tuple[str, int, str]]:
    """{layer: (module to hook, its call, stored target)} for the layers whose negative image minimizes a
    pre-activation: an activation of the ReLU/smooth families minimizes its own input (target "input"); a
    block ending in one (`hooks.final_activations`: a ResNet block's last call of its shared `relu`, on the
    residual sum) the input of that call (target "input:<activation>"). Other layers are not listed."""
    found = {layer: (layer, 1, "input") for layer in dict.fromkeys(layers) if pre_activation(modules[layer])}
    blocks = [layer for layer in dict.fromkeys(layers) if layer not in found and any(modules[layer].children())]
    if blocks:
        example = torch.rand(1, *shape, generator=torch.Generator().manual_seed(0)).to(device)
        ends = final_activations(net, blocks, normalize(example) if normalize else example)
        found.update({layer: (act, call, f"input:{act}") for layer, (act, call) in ends.items()
                      if pre_activation(modules[act])})
    return found


def pre_activation(module: nn.Module) -> bool:
    """Whether a layer's negative image minimizes its input: an activation of the ReLU and smooth families
    (ReLU, GELU, SiLU, Softplus, ...), whose output has a floor. Sigmoid, tanh and raw outputs are minimized
    themselves."""
    return nonlinearity(module).family in ("relu", "smooth")


def clear(media_dir: Path, model: str, layer: str | None = None) -> None:
    """Remove a model's feature-vis images (of one layer only, when given)."""
    folder = media_dir / "fv" / model
    shutil.rmtree(folder / layer if layer is not None else folder, ignore_errors=True)
