"""Media: images encoded as WebP in the store's media folder.

Owns the encodings (lossless for small images such as 8x8 digits, where it
is also the smallest; lossy otherwise, at sizes and qualities chosen for
the budget of about 30 KB per unit all-in: dataset images at quality 80;
feature visualizations at most 160 px a side, the size the unit page shows
them (a 224-px image after 128 steps is 10 KB at quality 65, 5 KB at 160 px),
the one that excites a unit at 60, the one that inhibits it at 45; the
optimization animation at most 80 px a side, quality 45 (8 frames: about
5 KB); each capped in bytes, the three at 10 KB a unit, by a lower quality
where an image has more detail; a red/blue heatmap for weights) and the
rule that each dataset example's image is written once and referenced by id
from every page. Does
not decide which files are needed (the store and the stages say) and does
not build pages.
"""

from __future__ import annotations

import io
import shutil

import numpy as np
import torch
from pathlib import Path

from PIL import Image

from . import atomic
from .sources import AtlasDataset

LOSSLESS_MAX_PIXELS = 64 * 64  # at or below this size lossless WebP is both exact and tiny
EXAMPLE_QUALITY = 80  # dataset images (stored once, shown on many pages)
POSITIVE_QUALITY = 60  # the image that excites a unit: the unit page's main picture and its thumbnail
NEGATIVE_QUALITY = 45  # the image that inhibits it
STILL_SIDE = 160  # feature visualizations are stored at most this many pixels a side (the page shows 160)
ANIMATION_QUALITY = 45  # the optimization's frames ...
ANIMATION_SIDE = 80  # ... at most this many pixels a side (shown at the page's 160 px)
# byte caps of a unit's feature-vis media (an image with more detail than these allow, as after many steps on
# a trained model, is encoded at a lower quality, down to MIN_QUALITY): 10 KB a unit at most
POSITIVE_MAX_BYTES = 4500
NEGATIVE_MAX_BYTES = 2000
ANIMATION_MAX_BYTES = 3500
MIN_QUALITY = 20


def fit(image: Image.Image, side: int) -> Image.Image:
    """The image scaled down (Lanczos) so that its longer side is at most `side`; unchanged if it is."""
    if max(image.size) <= side:
        return image
    scale = side / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.LANCZOS)


def capped(encode, quality: int, max_bytes: int = 0) -> bytes:
    """encode(quality), or at qualities 10 lower in turn (not below MIN_QUALITY) until at most max_bytes
    (0: no cap)."""
    data = encode(quality)
    while max_bytes and len(data) > max_bytes and quality > MIN_QUALITY:
        quality = max(MIN_QUALITY, quality - 10)
        data = encode(quality)
    return data


def encode_webp(image: Image.Image, quality: int = EXAMPLE_QUALITY, side: int | None = None,
                max_bytes: int = 0) -> bytes:
    """WebP bytes of an image (scaled to at most `side` pixels a side when given; lossy ones capped at
    max_bytes, see `capped`)."""
    image = fit(image, side) if side else image

    def encode(q: int) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format="WEBP", quality=q, method=4)
        return buf.getvalue()
    if image.width * image.height <= LOSSLESS_MAX_PIXELS:
        buf = io.BytesIO()
        image.save(buf, format="WEBP", lossless=True, quality=100, method=6)
        return buf.getvalue()
    return capped(encode, quality, max_bytes)


def write_example_images(dataset: AtlasDataset, examples: list[int], folder: Path) -> int:
    """Write the image of each listed example that is not there yet; returns how many were written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for example in examples:
        path = folder / f"{example}.webp"
        if path.exists():
            continue
        x, _ = dataset.data[example]
        atomic.write_bytes(path, encode_webp(dataset.to_image(x)))
        written += 1
    return written


def clear(folder: Path) -> None:
    """Forget every image (the dataset they came from changed)."""
    shutil.rmtree(folder, ignore_errors=True)


def tensor_image(x: torch.Tensor) -> Image.Image:
    """[C, H, W] in [0, 1] (C = 1 or 3) as an L or RGB image."""
    arr = (x.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    if arr.shape[0] == 1:
        return Image.fromarray(arr[0], mode="L")
    return Image.fromarray(np.ascontiguousarray(arr[:3].transpose(1, 2, 0)), mode="RGB")


def encode_animation(frames: list[Image.Image], frame_ms: int = 120, hold_ms: int = 1500) -> bytes:
    """An animated WebP that plays the frames once per loop and holds the last one (frames at most
    ANIMATION_SIDE pixels a side: the final image is stored larger beside it)."""
    durations = [frame_ms] * (len(frames) - 1) + [hold_ms]
    small = frames[0].width * frames[0].height <= LOSSLESS_MAX_PIXELS
    if not small:
        frames = [fit(f, ANIMATION_SIDE) for f in frames]

    def encode(q: int) -> bytes:
        buf = io.BytesIO()
        frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:], duration=durations, loop=0,
                       lossless=small, quality=q, method=4)
        return buf.getvalue()
    return encode(100) if small else capped(encode, ANIMATION_QUALITY, ANIMATION_MAX_BYTES)


def weight_heatmap(weights: np.ndarray) -> Image.Image:
    """A 2-D weight array as RGB: red excitatory, blue inhibitory, white zero (scaled by max |w|)."""
    w = np.nan_to_num(weights.astype(np.float64))
    scale = np.abs(w).max() or 1.0
    t = np.clip(w / scale, -1, 1)
    rgb = np.ones(w.shape + (3,))
    pos, neg = np.clip(t, 0, 1), np.clip(-t, 0, 1)
    rgb[..., 1] -= pos * 0.85 + neg * 0.55  # green falls either way
    rgb[..., 2] -= pos * 0.85  # red: less blue
    rgb[..., 0] -= neg * 0.85  # blue: less red
    return Image.fromarray((rgb * 255).round().astype(np.uint8), mode="RGB")
