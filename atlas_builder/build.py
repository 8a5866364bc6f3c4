"""Build: run the stages in order for one config and report what it took.

config -> sources (model, dataset) -> scan, architecture, top logits (a language model's), feature vis,
embed (per model) -> site.
Each is a `Stage` with one protocol: the fingerprint of its inputs (config
section, model weights, dataset, layers), `run`, and `write` (what it puts in
the store, with the fingerprint, in one transaction); `run_stage` skips a
stage whose stored fingerprint is unchanged, so a re-run of `make site` only
re-renders. The website reads the store alone. This module owns the order,
the hand-offs between ranks and the timings; it computes nothing itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import distributed, media, progress as progress_lines, text, visualize
from .config import AtlasConfig
from .distributed import Cluster
from .errors import AtlasError
from .hooks import Capture, list_layers, mlp_activations, resolve_layers
from .plan import PAGES_LIMIT, fit_diversity
from .scan import finish_scan, scan_part, shard_range, token_logits
from .sources import AtlasDataset, fit_dataset, load_dataset, load_model
from .store import ModelRecord, Store
from .website import build_site

SCAN_VERSION = 11  # bump when scan's output changes meaning (invalidates stored scans)
FEATUREVIS_VERSION = 8  # likewise for the feature-vis stage
EMBED_VERSION = 2  # and the embed stage
ARCHITECTURE_VERSION = 1  # and the architecture view's
LOGITS_VERSION = 1  # and a language model's top logits'


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
    log: bool = False  # say when each stage starts and ends (progress on, on the writer)

    def add_time(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def summary(self) -> str:
        total = sum(self.seconds.values())
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        skipped = f"; unchanged, skipped: {', '.join(self.skipped)}" if self.skipped else ""
        line = (f"built {self.models} models, {self.layers} layers, {self.units} units, {self.pages} pages "
                f"({self.rendered} rendered, {self.pages - self.rendered} unchanged) in "
                f"{total:.1f} s ({parts}){skipped}; site {self.site_bytes / 1e6:.2f} MB "
                f"({100 * self.site_bytes / PAGES_LIMIT:.1f}% of GitHub Pages' 1 GB) in {self.site_path}")
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


def build(cfg: AtlasConfig, progress: bool = True, plan=None) -> BuildReport:
    """Build the atlas of `cfg`; under torchrun, as one rank of a sharded build (rank 0 writes). Diversity
    rows that would take the planned site over GitHub Pages' 1 GB are left out (`plan.fit_diversity`, from
    `plan`, the caller's `make_plan(cfg)` when it has one)."""
    device = resolve_device(cfg.atlas.device)
    cluster = distributed.from_environment(device)
    cfg, note = fit_diversity(cfg, plan)
    if note and cluster.writer:
        progress_lines.say(note)
    try:
        return _build(cfg, cluster, cluster.device(device), progress and cluster.writer)
    finally:
        cluster.close()


# --- stages -------------------------------------------------------------------------------

class Stage:
    """One step of a build, with one protocol: the fingerprint of its inputs, `run`, and what it writes.

    `run(store)` computes (on every rank when `every_rank`, else on the
    writer alone; `store` is None on the other ranks) and returns what the
    writer's `write(store, result, fingerprint)` puts in the store, in one
    transaction with the fingerprint. A stage whose stored fingerprint equals
    its current one is skipped (a fingerprint of None: always run).
    """
    name = ""  # as recorded in the store's stages table, e.g. "scan:resnet18"
    kind = ""  # the report's timing line it adds to
    every_rank = False

    def fingerprint(self, store: Store) -> str | None:
        raise NotImplementedError

    def run(self, store: Store | None):
        raise NotImplementedError

    def write(self, store: Store, result, fingerprint: str | None) -> None:
        raise NotImplementedError


def run_stage(stage: Stage, store: Store | None, cluster: Cluster, report: BuildReport):
    """Run one stage unless its fingerprint is unchanged; returns its result (None when skipped)."""
    if not stage.every_rank and not cluster.writer:
        return None
    shared = cluster.broadcast if stage.every_rank else (lambda value: value)
    fp = shared(stage.fingerprint(store) if cluster.writer else None)
    if shared(fp is not None and store.stage_fingerprint(stage.name) == fp if cluster.writer else None):
        report.skipped.append(stage.name)
        if report.log:
            progress_lines.say(f"{stage.name}: unchanged, skipped")
        return None
    start = time.perf_counter()
    if report.log:
        progress_lines.say(f"{stage.name}: started")
    result = stage.run(store if cluster.writer else None)
    if cluster.writer:
        stage.write(store, result, fp)
    seconds = time.perf_counter() - start
    report.add_time(stage.kind, seconds)
    if report.log:
        progress_lines.say(f"{stage.name}: done in {progress_lines.clock(seconds)}")
    return result


@dataclass
class ModelStage(Stage):
    """A stage of one model that every rank of a sharded build runs its part of."""
    cfg: AtlasConfig
    model: object  # sources.LoadedModel
    layers: list[str]
    dataset: object  # sources.AtlasDataset
    device: torch.device
    cluster: Cluster
    progress: bool
    every_rank = True

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.model.name}"


class ScanStage(ModelStage):
    """The scan of one model: each rank scans its shard, the writer merges and summarizes.

    Each layer's scan has its own fingerprint: only the layers without a
    current one are scanned (one pass over the dataset for all of them), so
    adding a layer scans only that layer."""
    kind = "scan"

    def layer_fingerprints(self) -> dict[str, str]:
        common = (SCAN_VERSION, self.model.fingerprint, self.dataset.fingerprint, self.model.section.units,
                  self.cfg.scan.__dict__, self.cfg.atlas.seed, self.cfg.site.input_pages,
                  self.cfg.site.attribution_steps, self.cfg.site.unit_attributions)
        return {layer: fingerprint(*common, layer) for layer in self.layers}

    def fingerprint(self, store) -> str:
        return fingerprint(self.layer_fingerprints(), self.layers)

    def run(self, store):
        fps = self.layer_fingerprints()
        todo = None
        if self.cluster.writer:
            stored = store.layer_fingerprints(self.model.name) \
                if store.stage_fingerprint("dataset") == self.dataset.fingerprint else {}
            todo = [layer for layer in self.layers if stored.get(layer) != fps[layer]]
        todo = self.cluster.broadcast(todo)
        if not todo:  # only layers dropped: nothing to scan
            return None, fps
        first, last = shard_range(len(self.dataset), self.cluster.rank, self.cluster.world)
        part = scan_part(self.model, self.dataset, todo, self.cfg.scan, self.device, self.cfg.atlas.seed,
                         first, last, self.progress, workers=self.cfg.scan.workers, units=self.model.section.units)
        parts = self.cluster.gather(part.to("cpu") if self.cluster.distributed else part)
        if not self.cluster.writer:
            return None
        merged = parts[0]
        for other in parts[1:]:
            merged = merged.merge(other)
        try:
            return finish_scan(self.model, self.dataset, todo, self.cfg.scan, merged, self.device,
                               self.cfg.atlas.seed, self.cfg.site.input_pages, self.model.section.units,
                               self.cfg.site.attribution_steps, self.cfg.site.unit_attributions), fps
        finally:
            self.model.module.to("cpu")

    def write(self, store, result, fp) -> None:
        scan, fps = result
        if scan is None:
            store.keep_layers(self.model.name, self.layers, fp)
            return
        if store.stage_fingerprint("dataset") != self.dataset.fingerprint:  # its example images replace the old
            media.clear(store.media_dir / "examples")
            store.write_dataset(self.dataset.class_names, scan.labels, self.dataset.fingerprint)
        store.write_scan(scan, fp, self.layers, fps)


class FeatureVisStage(ModelStage):
    """The feature visualizations of one model; the ranks split its batches of units.

    Each layer's images have their own fingerprint, and each batch of units is
    written to the store as soon as it is rendered (in a single-process build),
    so a build that is killed keeps the batches it finished, and one that adds
    a layer or units renders only those."""
    kind = "featurevis"

    def layer_fingerprints(self) -> dict[str, str]:
        common = (FEATUREVIS_VERSION, self.model.fingerprint, self.cfg.featurevis.__dict__, self.cfg.atlas.seed,
                  visualize.input_shape(self.dataset, self.cfg.featurevis), self.dataset.mean, self.dataset.std,
                  self.cfg.scan.reduce)
        return {layer: fingerprint(*common, layer) for layer in self.layers}

    def plan(self, store) -> dict[str, int]:
        n_units = {l.layer: l.n_units for l in store.layers(self.model.name)}
        return {name: n_units[name] for name in self.layers}

    def fingerprint(self, store) -> str:
        return fingerprint(self.layer_fingerprints(), self.plan(store))

    def run(self, store):
        fps = self.layer_fingerprints()
        plan = media_dir = done = scales = None
        if self.cluster.writer:
            plan, media_dir = self.plan(store), store.media_dir
            for gone in store.keep_featurevis(self.model.name, fps):  # layers no longer probed
                visualize.clear(store.media_dir, self.model.name, gone)
            wanted = ({"positive", "negative"} if self.cfg.featurevis.negative else {"positive"}) | \
                {f"diverse{j}" for j in range(self.cfg.featurevis.diversity)}
            done = {layer: {u for u, kinds in store.featurevis_kinds(self.model.name, layer).items()
                            if wanted <= kinds} for layer in plan}
            if self.cfg.featurevis.diversity:  # the diversity term's scale: each unit's top dataset activation
                scales = {layer: np.array([u.max for u in store.units(self.model.name, layer)]) for layer in plan}
        plan, media_dir, done, scales = self.cluster.broadcast((plan, media_dir, done, scales))
        alone = not self.cluster.distributed

        def write_batch(rows, weights):  # kept at once: a build killed later resumes after this batch
            if alone:
                store.add_featurevis(self.model.name, rows, weights, fps)
        rows, weights, seconds = visualize.run(self.model, plan, self.dataset, self.cfg.featurevis,
                                               self.cfg.atlas.seed, self.device, media_dir, self.progress,
                                               part=(self.cluster.rank, self.cluster.world), done=done,
                                               on_batch=write_batch, reduce=self.cfg.scan.reduce, scales=scales)
        gathered = self.cluster.gather((rows, weights, seconds))
        if not self.cluster.writer:
            return None
        order = {name: i for i, name in enumerate(plan)}
        rows = sorted((r for g in gathered for r in g[0]), key=lambda r: (order[r[0]], r[1], r[2]))
        weights = sorted((w for g in gathered for w in g[1]), key=lambda w: (order[w[0]], w[1]))
        return rows, weights, max(g[2] for g in gathered), fps

    def write(self, store, result, fp) -> None:
        rows, weights, seconds, fps = result
        if self.cluster.distributed:  # the other ranks' batches arrive together, at the end
            store.add_featurevis(self.model.name, rows, weights, fps)
        store.mark_stage(self.name, fp, seconds)


@dataclass
class EmbedStage(Stage):
    """Maps and nearest units of one model, from the stored sample matrices (the writer alone)."""
    cfg: AtlasConfig
    model_name: str
    kind = "embed"

    @property
    def name(self) -> str:
        return f"embed:{self.model_name}"

    def fingerprint(self, store) -> str:
        return fingerprint(EMBED_VERSION, store.stage_fingerprint(f"scan:{self.model_name}"), self.cfg.embed.__dict__,
                           self.cfg.atlas.seed)

    def run(self, store):
        from . import embed

        samples, sample_ids = {}, np.zeros(0, dtype=np.int64)
        for layer in store.layers(self.model_name):
            samples[layer.layer], sample_ids = store.sample(self.model_name, layer.layer)
        return embed.embed_model(samples, self.cfg.atlas.seed, self.cfg.embed.n_neighbors, self.cfg.embed.neighbours), \
            sample_ids

    def write(self, store, result, fp) -> None:
        store.write_embedding(self.model_name, result[0], result[1], fp)


@dataclass
class LogitsStage(Stage):
    """A language model's top positive and negative logits of every unit (`scan.token_logits`, on the build's
    device, the writer alone). From the weights alone: a new dataset or scan settings leave them as they are."""
    model: object  # sources.LoadedModel
    layers: list[str]
    dataset: object  # its tokenizer gives the vocabulary; its first window, the example the directions are found on
    device: torch.device
    kind = "logits"

    @property
    def name(self) -> str:
        return f"logits:{self.model.name}"

    def fingerprint(self, store) -> str:
        return fingerprint(LOGITS_VERSION, self.model.fingerprint, self.layers, self.model.section.units,
                           text.vocab_size(self.dataset.tokenizer))

    def run(self, store):
        return token_logits(self.model, self.dataset, self.layers, self.device, self.model.section.units)

    def write(self, store, result, fp) -> None:
        store.write_logits(self.model.name, result, fp)


@dataclass
class ArchitectureStage(Stage):
    """The model page's layer graph (architecture.describe: torch.fx, or the module tree), on one example."""
    model: object  # sources.LoadedModel
    dataset: object
    kind = "architecture"

    @property
    def name(self) -> str:
        return f"architecture:{self.model.name}"

    def example(self) -> torch.Tensor:
        return torch.as_tensor(self.dataset.data[0][0])[None]

    def fingerprint(self, store) -> str:
        return fingerprint(ARCHITECTURE_VERSION, self.model.fingerprint, list(self.example().shape))

    def run(self, store):
        from . import architecture

        return architecture.describe(self.model.module, self.example())

    def write(self, store, result, fp) -> None:
        store.write_architecture(self.model.name, result, fp)


@dataclass
class SiteStage(Stage):
    """The website from the store alone: the build's metadata, the example images, then every page.

    Always run (its fingerprint is None): the pages themselves are compared
    with the previous site's, and unchanged ones are linked, not rendered."""
    cfg: AtlasConfig
    dataset: object
    progress: bool
    name = "site"
    kind = "site"

    def fingerprint(self, store) -> None:
        return None

    def run(self, store):
        cfg = self.cfg
        store.keep_models([m.name for m in cfg.models])
        store.write_meta({"title": cfg.site.title, "dataset": cfg.dataset.source, "seed": str(cfg.atlas.seed),
                          "measure": cfg.scan.reduce,  # a unit's value on an input: max or mean over positions
                          "objective": cfg.featurevis.objective,  # what feature vis optimizes (channel, neuron)
                          "versions": json.dumps(versions(), sort_keys=True),
                          "config_name": cfg.path.name if cfg.path else "",
                          "config_toml": cfg.path.read_text(encoding="utf-8") if cfg.path else ""})
        if self.dataset.is_text:  # its examples are shown as their tokens, kept in the store
            examples = store.referenced_examples()
            tokens = self.dataset.data.tokens[examples] if examples else np.zeros((0, 0), np.int64)
            shown = np.union1d(np.unique(tokens), store.effect_classes())  # in the windows and the top logits
            vocab = {int(t): text.token_text(self.dataset.tokenizer, int(t)) for t in shown}  # as decoded
            store.write_windows(examples, tokens, vocab)
        else:
            media.write_example_images(self.dataset, store.referenced_examples(), store.media_dir / "examples")
        return build_site(store, cfg.atlas.site_dir, cfg.site, self.progress)

    def write(self, store, result, fp) -> None:
        pass  # the site is its output


def _build(cfg: AtlasConfig, cluster: Cluster, device: torch.device, progress: bool) -> BuildReport:
    report = BuildReport(writer=cluster.writer, log=progress and cluster.writer)
    torch.manual_seed(cfg.atlas.seed)
    dataset = load_dataset(cfg)
    with (Store(cfg.store_dir) if cluster.writer else nullcontext()) as store:
        start = time.perf_counter()
        # before anything is written: bad input stops here (a text dataset is tokenized by its model's tokenizer)
        loaded, dataset = load_and_check_models(cfg, dataset, cluster)
        report.add_time("train/load", time.perf_counter() - start)
        for position, (section, model, layers) in enumerate(loaded):
            stage = ScanStage(cfg, model, layers, dataset, device, cluster, progress)
            result = run_stage(stage, store, cluster, report)
            accuracy = None
            if cluster.writer:
                accuracy = result[0].accuracy if result is not None and result[0] is not None else \
                    next((m.accuracy for m in store.models() if m.model == section.name), None)
                if model.info.get("outputs") != len(dataset.class_names):
                    accuracy = None  # its outputs are not the dataset's classes (ImageNet weights on 4 folders)
                store.write_model(ModelRecord(section.name, position, section.display_title, section.source,
                                              model.fingerprint, model.info["parameters"], accuracy, model.info))
            if len(dataset):
                run_stage(ArchitectureStage(model, dataset), store, cluster, report)
            if dataset.is_text and len(dataset):
                run_stage(LogitsStage(model, layers, dataset, device), store, cluster, report)
            elif cluster.writer:
                store.clear_logits(model.name)
            if cfg.featurevis.enabled and not dataset.is_text:  # text: no image to optimize (tokens are discrete)
                run_stage(FeatureVisStage(cfg, model, layers, dataset, device, cluster, progress), store, cluster,
                          report)
            elif cluster.writer:
                store.clear_featurevis(model.name)
            if cfg.embed.enabled:
                run_stage(EmbedStage(cfg, section.name), store, cluster, report)
            report.accuracy[section.name] = accuracy
        if not cluster.writer:
            cluster.barrier()  # wait for the writer's site, so every rank ends together
            return report
        try:
            site = run_stage(SiteStage(cfg, dataset, progress), store, cluster, report)
        finally:
            cluster.barrier()
        report.models = len(cfg.models)
        for m in store.models():
            layers = store.layers(m.model)
            report.layers += len(layers)
            report.units += sum(l.n_units for l in layers)
    report.pages, report.site_bytes, report.site_path = site.pages, site.bytes, site.path
    report.rendered, report.size_report = site.rendered, site.size_report
    return report


def load_and_check_models(cfg: AtlasConfig, dataset, cluster: Cluster) -> tuple[list[tuple], "AtlasDataset"]:
    """Every model loaded, its layers resolved and one forward pass over two examples tried, before any write;
    with the dataset, a text dataset tokenized by its language model's own tokenizer (`sources.fit_dataset`).

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
        dataset = fit_dataset(cfg, model, dataset, first=not loaded)
        if len(dataset):
            x = dataset.inputs(range(min(2, len(dataset))))
            seen: dict[str, torch.Tensor] = {}
            if section.layers:  # the requested layers: each must give a tensor, once per forward
                layers = resolve_layers(model.module, section.layers, section.name)
                with Capture(model.module, layers, sink=seen.__setitem__, model_name=section.name) as capture, \
                        torch.inference_mode():
                    out = capture(x)
            else:  # by default, the rule's points that do (one forward: a model may count its calls)
                infos = list_layers(model.module, x, section.name, flat=seen)
                # a language model: the neurons of its MLPs; and any dictionary's latents
                wanted = set(mlp_activations(model.module)) if dataset.is_text else set()
                wanted = (wanted or {i.name for i in infos if i.default}) | set(model.info.get("dictionaries", ()))
                infos = [dataclasses.replace(i, default=i.name in wanted and i.probeable) for i in infos]
                layers = resolve_layers(model.module, (), section.name, infos)
                out = seen.pop("", None)
            model.info.update(output_facts(out, {name: seen[name] for name in layers if name in seen}))
        else:
            layers = resolve_layers(model.module, section.layers, section.name)
        loaded.append((section, model, layers))
    return loaded, dataset


def output_facts(out, outputs: dict[str, torch.Tensor]) -> dict:
    """What the model page and the unit titles need to know of a model's output: its width when it is
    [B, classes] logits, and which probed layer gives it (the output layer, whose units are classes)."""
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        return {}
    same = [name for name, t in outputs.items()  # the tensors are all alive: no address was reused
            if t.data_ptr() == out.data_ptr() and t.shape == out.shape]
    return {"outputs": int(out.shape[1]), **({"output_layer": same[-1]} if same else {})}


def layer_table(cfg: AtlasConfig) -> list[tuple[str, list]]:
    """For `atlas layers`: each model's modules with output shapes on one dataset example."""
    dataset = load_dataset(cfg)
    x, _ = dataset.data[0]
    out = []
    for section in cfg.models:
        model = load_model(section, cfg)
        out.append((section.name, list_layers(model.module, x[None], section.name)))
    return out
