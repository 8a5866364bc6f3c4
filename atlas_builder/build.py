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
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import distributed, media, visualize
from .config import AtlasConfig
from .distributed import Cluster
from .errors import AtlasError
from .probe import Probe, check_called, resolve_layers
from .scan import finish_scan, scan_part, shard_range
from .sources import load_dataset, load_model
from .store import ModelRecord, Store
from .website import build_site

SCAN_VERSION = 3  # bump when scan's output changes meaning (invalidates stored scans)
FEATUREVIS_VERSION = 2  # likewise for the feature-vis stage
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
    writer: bool = True  # False on the other ranks of a sharded build (they print nothing)
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
    """Build the atlas of `cfg`; under torchrun, as one rank of a sharded build (rank 0 writes)."""
    device = resolve_device(cfg.atlas.device)
    cluster = distributed.from_environment(device)
    try:
        return _build(cfg, cluster, cluster.device(device), progress and cluster.writer)
    finally:
        cluster.close()


def _build(cfg: AtlasConfig, cluster: Cluster, device: torch.device, progress: bool) -> BuildReport:
    report = BuildReport(writer=cluster.writer)
    torch.manual_seed(cfg.atlas.seed)
    dataset = load_dataset(cfg)
    with (Store(cfg.store_dir) if cluster.writer else nullcontext()) as store:
        labels_written = cluster.broadcast(store.stage_fingerprint("dataset") == dataset.fingerprint
                                           if cluster.writer else None)
        start = time.perf_counter()
        loaded = load_and_check_models(cfg, dataset, cluster)  # before anything is written: bad input stops here
        report.add_time("train/load", time.perf_counter() - start)
        for position, (section, model, layers) in enumerate(loaded):
            fp = fingerprint(SCAN_VERSION, model.fingerprint, dataset.fingerprint, layers, cfg.scan.__dict__,
                             cfg.atlas.seed, cfg.site.input_pages)
            stage = f"scan:{section.name}"
            skip = cluster.broadcast(labels_written and store.stage_fingerprint(stage) == fp
                                     if cluster.writer else None)
            accuracy = None
            if skip:
                report.skipped.append(stage)
                if cluster.writer:
                    accuracy = next((m.accuracy for m in store.models() if m.model == section.name), None)
            else:
                start = time.perf_counter()
                first, last = shard_range(len(dataset), cluster.rank, cluster.world)
                part = scan_part(model, dataset, layers, cfg.scan, device, cfg.atlas.seed, first, last, progress,
                                 workers=cfg.scan.workers)
                parts = cluster.gather(part)
                if cluster.writer:
                    merged = parts[0]
                    for other in parts[1:]:
                        merged = merged.merge(other)
                    result = finish_scan(model, dataset, layers, cfg.scan, merged, device, cfg.atlas.seed,
                                         cfg.site.input_pages)
                    model.module.to("cpu")
                    if not labels_written:  # a new dataset: its example images replace the old ones
                        media.clear(store.media_dir / "examples")
                        store.write_dataset(dataset.class_names, result.labels, dataset.fingerprint)
                    store.write_scan(result, fp)
                    accuracy = result.accuracy
                labels_written = True
                report.add_time("scan", time.perf_counter() - start)
            if cluster.writer:
                store.write_model(ModelRecord(section.name, position, section.display_title, section.source,
                                              model.fingerprint, model.info["parameters"], accuracy, model.info))
            run_featurevis(cfg, store, model, layers, dataset, device, report, progress, cluster)
            if cluster.writer:
                run_embed(cfg, store, section.name, report)
            report.accuracy[section.name] = accuracy
        if not cluster.writer:
            cluster.barrier()  # wait for the writer's site, so every rank ends together
            return report
        store.keep_models([m.name for m in cfg.models])
        store.write_meta({"title": cfg.site.title, "dataset": cfg.dataset.source, "seed": str(cfg.atlas.seed),
                          "versions": json.dumps(versions(), sort_keys=True),
                          "config_name": cfg.path.name if cfg.path else "",
                          "config_toml": cfg.path.read_text(encoding="utf-8") if cfg.path else ""})
        start = time.perf_counter()
        media.write_example_images(dataset, store.referenced_examples(), store.media_dir / "examples")
        report.add_time("media", time.perf_counter() - start)
        start = time.perf_counter()
        try:
            site = build_site(store, cfg.atlas.site_dir, cfg.site, progress)
        finally:
            cluster.barrier()
        report.add_time("render", time.perf_counter() - start)
        report.models = len(cfg.models)
        for m in store.models():
            layers = store.layers(m.model)
            report.layers += len(layers)
            report.units += sum(l.n_units for l in layers)
    report.pages, report.site_bytes, report.site_path = site.pages, site.bytes, site.path
    report.rendered, report.size_report = site.rendered, site.size_report
    return report


def load_and_check_models(cfg: AtlasConfig, dataset, cluster: Cluster) -> list[tuple]:
    """Every model loaded, its layers resolved and one forward pass over two examples tried, before any write.

    So a model that cannot load, an unknown or non-tensor layer, or a forward
    that fails on the dataset's inputs stops the build with the store and the
    site as they were. The writer loads first (a demo model is then trained
    and cached once), the other ranks after it.
    """
    loaded = []
    for section in cfg.models:
        if not cluster.writer:
            cluster.barrier()
        model = load_model(section, cfg)
        if cluster.writer:
            cluster.barrier()
        layers = resolve_layers(model.module, section.layers, section.name)
        if len(dataset):
            x = torch.stack([torch.as_tensor(dataset.data[i][0]) for i in range(min(2, len(dataset)))])
            with Probe(model.module, layers, cfg.scan.reduce, model_name=section.name) as probe, \
                    torch.inference_mode():
                model.module(x)
            check_called(layers, probe.shapes, section.name)
        loaded.append((section, model, layers))
    return loaded


def run_featurevis(cfg: AtlasConfig, store: Store | None, model, layers: list[str], dataset, device: torch.device,
                   report: BuildReport, progress: bool, cluster: Cluster = Cluster()) -> None:
    """The feature-vis stage of one model, skipped when its inputs have not changed; ranks split the batches."""
    stage = f"featurevis:{model.name}"
    if not cfg.featurevis.enabled:
        if cluster.writer:
            store.clear_featurevis(model.name)
        return
    shape = visualize.input_shape(dataset, cfg.featurevis)
    fp = fingerprint(FEATUREVIS_VERSION, model.fingerprint, layers, cfg.featurevis.__dict__, cfg.atlas.seed, shape,
                     dataset.mean, dataset.std)
    plan = None
    if cluster.writer and store.stage_fingerprint(stage) != fp:
        n_units = {l.layer: l.n_units for l in store.layers(model.name)}
        plan = {name: n_units[name] for name in layers}
        store.clear_featurevis(model.name)  # the store forgets the old images before they are deleted
        visualize.clear(store.media_dir, model.name)  # before any rank writes the new images
    plan = cluster.broadcast(plan)
    if plan is None:
        report.skipped.append(stage)
        return
    media_dir = cluster.broadcast(store.media_dir if cluster.writer else None)
    rows, weights, seconds = visualize.run(model, plan, dataset, cfg.featurevis, cfg.atlas.seed, device, media_dir,
                                           progress, part=(cluster.rank, cluster.world))
    gathered = cluster.gather((rows, weights, seconds))
    if cluster.writer:
        order = {name: i for i, name in enumerate(plan)}
        rows = sorted((r for g in gathered for r in g[0]), key=lambda r: (order[r[0]], r[1], r[2]))
        weights = sorted((w for g in gathered for w in g[1]), key=lambda w: (order[w[0]], w[1]))
        seconds = max(g[2] for g in gathered)
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
