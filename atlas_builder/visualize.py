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
from tqdm import tqdm

from . import atomic, featurevis as fv, media, urls
from .config import FeatureVisSection
from .hooks import LINEAR_TYPES
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


def run(model: LoadedModel, layers: dict[str, int], dataset: AtlasDataset, cfg: FeatureVisSection, seed: int,
        device: torch.device, media_dir: Path, progress: bool = True,
        part: tuple[int, int] = (0, 1)) -> tuple[list[tuple], list[tuple], float]:
    """Render every unit of `layers` ({name: n_units}); returns (featurevis rows, weight rows, seconds).

    part = (rank, world): render only every world-th batch of units, from
    the rank-th (a sharded build; the batches, hence the images, are those of
    a single process). Part 0 also draws the weight heatmaps. The caller
    clears the model's previous images first (`clear`).
    """
    start = time.perf_counter()
    shape = input_shape(dataset, cfg)
    rows: list[tuple] = []
    weights: list[tuple] = []
    rank, world = part
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
    batches = [(layer, list(range(first, min(first + cfg.batch_size, n_units))))
               for layer, n_units in layers.items() for first in range(0, n_units, cfg.batch_size)]
    mine = batches[rank::world]
    bar = tqdm(total=sum(len(u) for _, u in mine) * len(kinds), desc=f"featurevis {model.name}", unit="unit",
               disable=not progress, leave=False)
    try:
        for layer, units in mine:
            for kind, sign in kinds:
                seeds = [derived_seed(seed, model.name, layer, u, kind) for u in units]
                param = fv.FourierImage(len(units), c, h, w, seeds).to(device)
                result = fv.render(net, layer, objective(units) * sign, param, steps=cfg.steps, lr=cfg.lr,
                                   transforms=transforms, normalize=normalize,
                                   seed=derived_seed(seed, model.name, layer), n_frames=cfg.frames)
                for i, unit in enumerate(units):
                    image = urls.featurevis_media(model.name, layer, unit, kind)
                    atomic.write_bytes(media_dir / image, media.encode_webp(media.tensor_image(result.images[i])))
                    animation = None
                    if kind == "positive":
                        animation = urls.featurevis_media(model.name, layer, unit, "animation")
                        frames = [media.tensor_image(f[i]) for f in result.frames]
                        atomic.write_bytes(media_dir / animation, media.encode_animation(frames))
                    rows.append((layer, unit, kind, float(sign * result.activation[i]), image, animation))
                bar.update(len(units))
        input_layer = first_layer(net)
        if input_layer in layers and rank == 0:
            maps = weight_maps(dict(net.named_modules())[input_layer], (c, h, w))
            for unit in range(len(maps) if maps is not None else 0):
                path = urls.featurevis_media(model.name, input_layer, unit, "weights")
                atomic.write_bytes(media_dir / path, media.encode_webp(media.weight_heatmap(maps[unit])))
                weights.append((input_layer, unit, path))
    finally:
        bar.close()
        net.to("cpu")
    return rows, weights, time.perf_counter() - start


def clear(media_dir: Path, model: str) -> None:
    """Remove a model's previous feature-vis images (before a run writes the new ones)."""
    shutil.rmtree(media_dir / "fv" / model, ignore_errors=True)
