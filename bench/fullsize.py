"""Full-size bench: a ResNet-50 atlas (weights=None) on a synthetic 224-px imagefolder (16 classes, so
that class bars and JSON weigh what ImageNet's do), four layers from the stem to fc, `units = 32`, at the
default media settings (fewer steps), measured against `atlas plan`'s estimate of it and against
torch-lucent.

Prints, with the site's bytes by kind:
- FIGURE bytes_per_unit_resnet50: all-in bytes of a unit at full size: the site's bytes without the
  dataset images (stored once for the whole atlas) and without the input pages, divided by the units (each
  unit's page, JSON and media, its share of the layer, model and search pages, and of the fixed pages,
  which a 128-unit site overstates), plus its share of the input pages of the whole ResNet-50: an input
  page holds a row per layer, so its bytes grow with the layers (18 by default), not with the units
  (16,168), and 50 of them over 128 units would count each unit's share 100 times over; likewise the SQL
  page's engine (DuckDB-WASM, ~40 MB, the same files for any atlas) counts at its share of the full ResNet-50;
- FIGURE plan_bytes_error, plan_time_error: |estimate - actual| / actual, for the whole site's bytes and
  for the scan + feature-vis time (the plan's calibration run first, then the build);
- FIGURE featurevis_s_per_unit_resnet50: the feature-vis stage's seconds per unit image (it renders each
  unit's exciting and inhibiting image, so per unit and kind; media encoding and writes included);
- FIGURE featurevis_s_per_unit_lucent_resnet50: torch-lucent's render_vis, once per unit, at the same
  steps and size, one unit of each layer; and FIGURE featurevis_speedup_vs_lucent_resnet50, their ratio.

Run: .venv/bin/python bench/fullsize.py [--steps N] [--device cpu|cuda] (bench extras: `make bench`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _imagefolder import make_imagefolder  # noqa: E402

from atlas_builder.build import build  # noqa: E402
from atlas_builder.config import load_config  # noqa: E402
from atlas_builder.plan import make_plan  # noqa: E402

LAYERS = ["relu", "layer2.0", "layer4.2", "fc"]  # the stem, one block of layer2, the last block, fc
UNITS = 32
CLASSES = 16  # a unit page shows at most 12 classes (the highest), so more weigh as much as 16
FULL_LAYERS, FULL_UNITS = 18, 16168  # ResNet-50's default layers: the stem, 16 bottlenecks, fc

CONFIG = """
[atlas]
name = "fullsize"
device = "{device}"
data_dir = "data"
site_dir = "site"
[dataset]
source = "imagefolder:images"
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
[scan]
batch_size = 32
[featurevis]
steps = {steps}
batch_size = 32
[[models]]
name = "resnet50"
source = "torchvision:resnet50"
layers = {layers}
units = {units}
"""


SITE_WIDE = ("index.html", "404.html", "lists.html", "about/", "sql/", "search/", "static/")  # the same for any atlas


def kind_of(path: str) -> str:
    if path.startswith("media/examples/"):
        return "dataset images"
    if path.startswith("static/duckdb/"):
        return "SQL engine (DuckDB-WASM)"
    if path.startswith("static/search-index."):
        return "search index"
    if path.startswith("media/fv/"):
        return "feature-vis " + path.rsplit(".", 2)[-2]
    if path.startswith("data/"):
        return "open data (data/)"
    parts = path.split("/")
    if parts[0] == "resnet50" and len(parts) == 4:
        return {"index.html": "unit pages", "embed.html": "embed cards"}.get(parts[-1], "unit JSON")
    if path == "resnet50/index.html":
        return "model page"
    if parts[0] == "resnet50":
        return "layer pages"
    if parts[0] == "inputs":
        return "input pages"
    if path.startswith(SITE_WIDE):
        return "site-wide pages and assets"
    return "other"


def lucent_seconds_per_unit(steps: int, device: torch.device) -> float:
    import torchvision

    import _lucent

    model = torchvision.models.resnet50(weights=None).eval().to(device)
    total = 0.0
    for layer in LAYERS:
        total += _lucent.lucent_per_unit(model, layer, [0], steps, 224, 3)["seconds"]
    return total / len(LAYERS)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=32, help="feature-vis steps (the default build: 256)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--keep", type=Path, help="build in this folder and keep it (to look at the site)")
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        if not (root / "images").is_dir():
            # 16 classes: more than a unit page draws (12), so pages and JSON weigh what ImageNet's 1,000 do
            make_imagefolder(root / "images", classes=CLASSES, per_class=64 // CLASSES, size=224, seed=0)
        path = root / "atlas.toml"
        path.write_text(CONFIG.format(device=args.device, steps=args.steps, units=UNITS,
                                      layers="[" + ", ".join(f'"{l}"' for l in LAYERS) + "]"))
        cfg = load_config(path)
        start = time.perf_counter()
        plan = make_plan(cfg)
        print(f"plan (calibration {time.perf_counter() - start:.1f} s):")
        print("\n".join("  " + line for line in plan.table()))
        report = build(cfg, progress=False)
        sizes = {str(p.relative_to(report.site_path)): p.stat().st_size
                 for p in report.site_path.rglob("*") if p.is_file()}
    by_kind: dict[str, int] = {}
    for p, size in sizes.items():
        by_kind[kind_of(p)] = by_kind.get(kind_of(p), 0) + size
    units = report.units
    print(f"built {units} units: {report.site_bytes:,} bytes; {report.summary().splitlines()[0]}")
    for kind, size in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<36} {size:>10,} bytes  {size / units / 1e3:7.2f} KB a unit")
    actual_s = report.seconds.get("scan", 0.0) + report.seconds.get("featurevis", 0.0)
    estimated_s = sum(m.scan_s + m.featurevis_s for m in plan.models)
    print(f"time: estimated {estimated_s:.1f} s, measured {actual_s:.1f} s "
          f"(scan {report.seconds.get('scan', 0):.1f} s, featurevis {report.seconds.get('featurevis', 0):.1f} s)")
    kinds = 2  # positive and negative images of each unit (featurevis.negative = true by default)
    ours = report.seconds.get("featurevis", 0.0) / (units * kinds)
    lucent = lucent_seconds_per_unit(args.steps, device)
    print(f"feature vis at {args.steps} steps, 224 px, on {device}: ours {ours:.3f} s a unit image, "
          f"lucent render_vis {lucent:.3f} s a unit (one unit of each layer)")
    # at the full ResNet-50's share: what does not grow with the units. The engine and the site-wide pages and
    # assets (home, about, 404, list and SQL pages, CSS/JS) are the same files for any atlas; the input pages and
    # the model page (its architecture, and a map per layer of at most INPUT_MAP_POINTS inputs) grow with the
    # layers (18 in all here 4), not the units. The rest (unit pages, JSON, embeds, media, layer pages, search
    # index, open data) counts per unit of this site.
    full = {"SQL engine (DuckDB-WASM)": 1.0, "site-wide pages and assets": 1.0,
            "input pages": FULL_LAYERS / len(LAYERS), "model page": FULL_LAYERS / len(LAYERS)}
    shared = {kind: by_kind.get(kind, 0) * scale / FULL_UNITS for kind, scale in full.items()}
    own = sum(size for kind, size in by_kind.items() if kind not in full and kind != "dataset images") / units
    for kind, share in shared.items():
        print(f"  {kind}: {by_kind.get(kind, 0):,} bytes on this site, {share:,.0f} bytes a unit at the full ResNet-50")
    print(f"all-in on this {units}-unit site, dataset images left out: "
          f"{(report.site_bytes - by_kind.get('dataset images', 0)) / units:,.0f} bytes a unit (the fixed files "
          f"over {units} units); with them at the full ResNet-50's share: {own + sum(shared.values()):,.0f}")
    print(f"FIGURE bytes_per_unit_resnet50 {own + sum(shared.values()):.0f}")
    print(f"FIGURE plan_bytes_error {abs(plan.bytes - report.site_bytes) / report.site_bytes:.3f}")
    print(f"FIGURE plan_time_error {abs(estimated_s - actual_s) / actual_s:.3f}")
    print(f"FIGURE featurevis_s_per_unit_resnet50 {ours:.3f}")
    print(f"FIGURE featurevis_s_per_unit_lucent_resnet50 {lucent:.3f}")
    print(f"FIGURE featurevis_speedup_vs_lucent_resnet50 {lucent / ours:.2f}")


if __name__ == "__main__":
    main()
