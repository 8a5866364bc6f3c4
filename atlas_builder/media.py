"""Media: dataset example images encoded once each as WebP in the store's media folder.

Owns the encoding (lossless for small images such as 8x8 digits, where it is
also the smallest; quality 80 otherwise) and the rule that each example's
image is written once and referenced by id from every page. Does not decide
which examples are needed (the store says) and does not build pages.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

from PIL import Image

from . import atomic
from .sources import AtlasDataset

LOSSLESS_MAX_PIXELS = 64 * 64  # at or below this size lossless WebP is both exact and tiny


def encode_webp(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    if image.width * image.height <= LOSSLESS_MAX_PIXELS:
        image.save(buf, format="WEBP", lossless=True, quality=100, method=6)
    else:
        image.save(buf, format="WEBP", quality=80, method=4)
    return buf.getvalue()


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
