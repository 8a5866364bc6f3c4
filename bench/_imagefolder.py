"""A synthetic ImageNet-style imagefolder for the full-size benches (no downloads).

`make_imagefolder(root, classes, per_class, size, seed)` writes `root/<class>/<i>.jpg`:
smooth colour gradients with a few soft ellipses, so the images compress like
photographs rather than like noise (noise would overstate every byte figure).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def make_image(rng: np.random.Generator, size: int) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([rng.uniform(0, 1) * x + rng.uniform(0, 1) * y + rng.uniform(0, 0.5) for _ in range(3)], -1)
    image = Image.fromarray((np.clip(base / base.max(), 0, 1) * 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        cx, cy, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(size / 12, size / 4)]
        draw.ellipse([cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r],
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image.filter(ImageFilter.GaussianBlur(size / 100))


def make_imagefolder(root: Path, classes: int = 4, per_class: int = 16, size: int = 224, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = Path(root) / f"class{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_image(rng, size).save(folder / f"{i}.jpg", quality=90)
    return Path(root)
