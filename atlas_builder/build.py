"""Build: run the stages in order for one config and report what it took.

config -> sources (model, dataset) -> scan, feature vis, embed (per model) -> media -> website.
Each compute stage records a fingerprint of its inputs in the store (config
section, model weights, dataset, layers) and is skipped when it has not
changed, so a re-run of `make site` only re-renders. The website reads the
store alone. This module owns the order and the timings; it computes nothing
itself.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import media, visualize
from .config import AtlasConfig
from .errors import AtlasError
from .probe import resolve_layers
from .scan import scan_model
from .sources import load_dataset, load_model
from .store import ModelRecord, Store
from .website import build_site

SCAN_VERSION = 2  # bump when scan's output changes meaning (invalidates stored scans)
FEATUREVIS_VERSION = 1  # likewise for the feature-vis stage
EMBED_VERSION = 2  # and the embed stage


@dataclass
class BuildReport:
    models: int = 0
    layers: int = 0
    units: int = 0
    pages: int = 0
    site_bytes: int = 0
    site_path: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # per stage
    skipped: list[str] = field(default_factory=list)
    accuracy: dict[str, float | None] = field(default_factory=dict)
    rendered: int = 0  # pages rendered (the others were unchanged and linked from the previous site)
    size_report: list[str] = field(default_factory=list)

    def add_time(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def summary(self) -> str:
        total = sum(self.seconds.values())
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        skipped = f"; unchanged, skipped: {', '.join(self.skipped)}" if self.skipped else ""
        line = (f"built {self.models} models, {self.layers} layers, {self.units} units, {self.pages} pages "
                f"({self.rendered} rendered, {self.pages - self.rendered} unchanged) in "
                f"{total:.1f} s ({parts}){skipped}; site {self.site_bytes / 1e6:.2f} MB in {self.site_path}")
        return "\n".join([line] + self.size_report)


def versions() -> dict[str, str]:
    """The versions an atlas was built with (shown on its about page)."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for package in ("neuron-atlas", "torch", "torchvision", "numpy", "scikit-learn", "umap-learn", "duckdb",
                    "jinja2", "pillow"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise AtlasError("atlas.device = \"cuda\" but no CUDA device is available; use \"auto\" or \"cpu\"")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def fingerprint(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build(cfg: AtlasConfig, progress: bool = True) -> BuildReport:
    report = BuildReport()
    device = resolve_device(cfg.atlas.device)
    torch.manual_seed(cfg.atlas.seed)
    dataset = load_dataset(cfg)
    with Store(cfg.store_dir) as store:
        labels_written = store.stage_fingerprint("dataset") == dataset.fingerprint
        if not labels_written:
            media.clear(store.media_dir)
        for position, section in enumerate(cfg.models):
            start = time.perf_counter()
            model = load_model(section, cfg)
            report.add_time("train/load", time.perf_counter() - start)
            layers = resolve_layers(model.module, section.layers, section.name)
            fp = fingerprint(SCAN_VERSION, model.fingerprint, dataset.fingerprint, layers, cfg.scan.__dict__,
                             cfg.atlas.seed, cfg.site.input_pages)
            stage = f"scan:{section.name}"
            if labels_written and store.stage_fingerprint(stage) == fp:
                report.skipped.append(stage)
                accuracy = next((m.accuracy for m in store.models() if m.model == section.name), None)
            else:
                start = time.perf_counter()
                result = scan_model(model, dataset, layers, cfg.scan, device, cfg.atlas.seed, progress,
                                    cfg.site.input_pages)
                if not labels_written:
                    store.write_dataset(dataset.class_names, result.labels, dataset.fingerprint)
                    labels_written = True
                store.write_scan(result, fp)
                accuracy = result.accuracy
                report.add_time("scan", time.perf_counter() - start)
            store.write_model(ModelRecord(section.name, position, section.display_title, section.source,
                                          model.fingerprint, model.info["parameters"], accuracy, model.info))
            run_featurevis(cfg, store, model, layers, dataset, device, report, progress)
            run_embed(cfg, store, section.name, report)
            report.accuracy[section.name] = accuracy
        store.keep_models([m.name for m in cfg.models])
        store.write_meta({"title": cfg.site.title, "dataset": cfg.dataset.source, "seed": str(cfg.atlas.seed),
                          "versions": json.dumps(versions(), sort_keys=True),
                          "config_name": cfg.path.name if cfg.path else "",
                          "config_toml": cfg.path.read_text(encoding="utf-8") if cfg.path else ""})
        start = time.perf_counter()
        media.write_example_images(dataset, store.referenced_examples(), store.media_dir / "examples")
        report.add_time("media", time.perf_counter() - start)
        start = time.perf_counter()
        site = build_site(store, cfg.atlas.site_dir, cfg.site, progress)
        report.add_time("render", time.perf_counter() - start)
        report.models = len(cfg.models)
        for m in store.models():
            layers = store.layers(m.model)
            report.layers += len(layers)
            report.units += sum(l.n_units for l in layers)
    report.pages, report.site_bytes, report.site_path = site.pages, site.bytes, site.path
    report.rendered, report.size_report = site.rendered, site.size_report
    return report


def run_featurevis(cfg: AtlasConfig, store: Store, model, layers: list[str], dataset, device: torch.device,
                   report: BuildReport, progress: bool) -> None:
    """The feature-vis stage of one model, skipped when its inputs have not changed."""
    stage = f"featurevis:{model.name}"
    if not cfg.featurevis.enabled:
        store.clear_featurevis(model.name)
        return
    shape = visualize.input_shape(dataset, cfg.featurevis)
    fp = fingerprint(FEATUREVIS_VERSION, model.fingerprint, layers, cfg.featurevis.__dict__, cfg.atlas.seed, shape,
                     dataset.mean, dataset.std)
    if store.stage_fingerprint(stage) == fp:
        report.skipped.append(stage)
        return
    n_units = {l.layer: l.n_units for l in store.layers(model.name)}
    rows, weights, seconds = visualize.run(model, {name: n_units[name] for name in layers}, dataset, cfg.featurevis,
                                           cfg.atlas.seed, device, store.media_dir, progress)
    store.write_featurevis(model.name, rows, weights, fp, seconds)
    report.add_time("featurevis", seconds)


def run_embed(cfg: AtlasConfig, store: Store, model: str, report: BuildReport) -> None:
    """The embed stage of one model: maps and nearest units from the stored sample matrices."""
    from . import embed

    stage = f"embed:{model}"
    if not cfg.embed.enabled:
        return
    fp = fingerprint(EMBED_VERSION, store.stage_fingerprint(f"scan:{model}"), cfg.embed.__dict__, cfg.atlas.seed)
    if store.stage_fingerprint(stage) == fp:
        report.skipped.append(stage)
        return
    samples = {}
    sample_ids = np.zeros(0, dtype=np.int64)
    for layer in store.layers(model):
        samples[layer.layer], sample_ids = store.sample(model, layer.layer)
    emb = embed.embed_model(samples, cfg.atlas.seed, cfg.embed.n_neighbors, cfg.embed.neighbours)
    store.write_embedding(model, emb, sample_ids, fp)
    report.add_time("embed", emb.seconds)


def layer_table(cfg: AtlasConfig) -> list[tuple[str, list]]:
    """For `atlas layers`: each model's modules with output shapes on one dataset example."""
    from .probe import list_layers

    dataset = load_dataset(cfg)
    x, _ = dataset.data[0]
    out = []
    for section in cfg.models:
        model = load_model(section, cfg)
        out.append((section.name, list_layers(model.module, x[None])))
    return out
