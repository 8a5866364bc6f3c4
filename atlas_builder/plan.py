"""Plan: what a build will cost before it runs (`atlas plan CONFIG`, and the first line of `atlas build`).

Owns the estimates, per model and layer: units, scan and feature-vis time
on this device, and site bytes, with the totals against GitHub Pages' 1 GB.

- Time comes from a short calibration run: the scan of one and of three
  batches (their difference is the time per example), and feature
  visualization of one batch of units at the shallowest and the deepest
  probed layer for one and for three steps (the difference is the time per
  step); a layer between gets the time of its depth, measured as the share
  of one forward pass spent before its output.
- Bytes come from rendering, with the site's own templates, one unit page,
  its JSON export and the layer page of each layer from stand-in records of
  the layer's real shape (its examples, maps, classes, neighbours, map), and
  from encoding a few of the dataset's images; the feature-vis media are
  estimated per stored pixel (`MEDIA_BYTES_PER_PIXEL`, measured on
  ResNet-18 images after 128 steps at the default qualities), at most the
  byte caps of `media`.

Writes nothing and keeps nothing: it reads the config, the models and the
dataset.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import charts, featurevis as fv, media, visualize
from .config import AtlasConfig
from .explain import attention_modules
from .hooks import Capture, describe_layer, unit_count

PAGES_LIMIT = 10**9  # GitHub Pages' published-site limit, in bytes
# feature-vis media per unit, bytes per stored pixel (stills at most media.STILL_SIDE a side, animation frames
# at most media.ANIMATION_SIDE), measured on ResNet-18 images after 128 steps at the default qualities;
# lossless below media.LOSSLESS_MAX_PIXELS
MEDIA_BYTES_PER_PIXEL = {"positive": 0.2, "negative": 0.12, "frame": 0.1}
LOSSLESS_BYTES_PER_PIXEL = {"positive": 2.2, "negative": 2.2, "frame": 1.6}
NEIGHBOURS = 8  # nearest units listed on a unit page (embed.neighbours default)


@dataclass
class LayerPlan:
    layer: str
    title: str
    units: int
    featurevis_s: float
    unit_bytes: int  # page + JSON export + feature-vis media of one unit
    layer_bytes: int  # the layer page


@dataclass
class ModelPlan:
    model: str
    layers: list[LayerPlan]
    scan_s: float

    @property
    def units(self) -> int:
        return sum(l.units for l in self.layers)

    @property
    def featurevis_s(self) -> float:
        return sum(l.featurevis_s for l in self.layers)

    @property
    def bytes(self) -> int:
        return sum(l.units * l.unit_bytes + l.layer_bytes for l in self.layers)


@dataclass
class Plan:
    models: list[ModelPlan]
    shared_bytes: int  # dataset images, search index, home, model, input and other pages
    device: str
    notes: list[str] = field(default_factory=list)

    @property
    def units(self) -> int:
        return sum(m.units for m in self.models)

    @property
    def seconds(self) -> float:
        return sum(m.scan_s + m.featurevis_s for m in self.models)

    @property
    def bytes(self) -> int:
        return self.shared_bytes + sum(m.bytes for m in self.models)

    @property
    def over(self) -> bool:
        return self.bytes > PAGES_LIMIT

    def total_line(self) -> str:
        return (f"plan: {len(self.models)} models, {self.units:,} units; about {clock(self.seconds)} of scan and "
                f"feature vis on {self.device}; site about {self.bytes / 1e6:,.1f} MB "
                f"({100 * self.bytes / PAGES_LIMIT:.1f}% of GitHub Pages' 1 GB"
                f"{', OVER it' if self.over else ''}; {self.bytes / max(self.units, 1) / 1e3:.1f} KB a unit)")

    def table(self) -> list[str]:
        lines = [f"{'model / layer':<40} {'units':>7} {'scan':>9} {'featurevis':>11} {'site MB':>9}"]
        for m in self.models:
            lines.append(f"{m.model:<40} {m.units:>7,} {clock(m.scan_s):>9} {clock(m.featurevis_s):>11} "
                         f"{m.bytes / 1e6:>9.1f}")
            for l in m.layers:
                name = f"  {l.layer} · {l.title}"
                lines.append(f"{name[:40]:<40} {l.units:>7,} {'':>9} {clock(l.featurevis_s):>11} "
                             f"{(l.units * l.unit_bytes + l.layer_bytes) / 1e6:>9.1f}")
        lines.append(f"{'shared pages and dataset images':<40} {'':>7} {'':>9} {'':>11} {self.shared_bytes / 1e6:>9.1f}")
        return lines + [self.total_line()] + self.notes


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def scan_seconds(model, dataset, layers, cfg: AtlasConfig, device: torch.device) -> float:
    """The scan's time: one batch and three batches timed, the difference scaled to the dataset."""
    from .scan import scan_part

    n, batch = len(dataset), cfg.scan.batch_size
    if n == 0:
        return 0.0
    run = lambda k: scan_part(model, dataset, layers, cfg.scan, device, cfg.atlas.seed, 0, k, False,  # noqa: E731
                              units=model.section.units)
    one, three = min(n, batch), min(n, 3 * batch)
    t1 = _timed(lambda: run(one))
    if three == one:
        return t1
    t3 = _timed(lambda: run(three))
    per_example = max(t3 - t1, 1e-9) / (three - one)
    return max(t1 - one * per_example, 0.0) + n * per_example


def logits_seconds(model, dataset, layers, device: torch.device) -> float:
    """A language model's top logits stage (`scan.token_logits`): its first layer timed, times the layers."""
    from .scan import token_logits

    if not dataset.is_text or not layers or not len(dataset):
        return 0.0
    return len(layers) * _timed(lambda: token_logits(model, dataset, layers[:1], device, model.section.units))


def depth_fractions(net, layers, x, device) -> dict[str, float]:
    """For each layer, the share of one forward pass spent before its output (0 = first, 1 = the end)."""
    stamps = {}

    def sink(name, out):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps[name] = time.perf_counter()
    with Capture(net, layers, sink=sink) as capture, torch.inference_mode():
        capture(x)  # warm
        stamps.clear()
        start = time.perf_counter()
        capture(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        end = time.perf_counter()
    return {name: (stamps[name] - start) / max(end - start, 1e-9) for name in layers}


def featurevis_seconds(model, dataset, layers: dict[str, int], cfg: AtlasConfig, device) -> dict[str, float]:
    """Per layer, the feature-vis time of its units (see the module docstring)."""
    f = cfg.featurevis
    shape = visualize.input_shape(dataset, f)
    if not f.enabled or shape is None or not layers:
        return dict.fromkeys(layers, 0.0)
    net = model.module.to(device)
    try:
        c, h, w = shape
        batch = min(f.batch_size, max(layers.values()))
        x = torch.as_tensor(dataset.data[0][0])[None].repeat(batch, *([1] * len(shape))).to(device)
        if x.shape[-2:] != (h, w):
            x = torch.nn.functional.interpolate(x, size=(h, w))
        depth = depth_fractions(net, list(layers), x, device)
        shallow, deep = min(layers, key=depth.get), max(layers, key=depth.get)

        def step_seconds(layer: str) -> float:
            units = list(range(min(batch, layers[layer])))
            objective = (fv.channel if f.objective == "channel" else fv.neuron)(units)

            def render(steps):
                param = fv.FourierImage(len(units), c, h, w, list(range(len(units)))).to(device)
                fv.render(net, layer, objective, param, steps=steps, lr=f.lr, n_frames=min(f.frames, steps))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            t1, t3 = _timed(lambda: render(1)), _timed(lambda: render(3))
            return max(t3 - t1, 1e-9) / 2 * batch / len(units)  # a full batch's step
        ends = {shallow: step_seconds(shallow)}
        ends[deep] = step_seconds(deep) if deep != shallow else ends[shallow]
        span = depth[deep] - depth[shallow]
        kinds = (2 if f.negative else 1) + f.diversity  # a diversity image costs about what one more kind does
        out = {}
        for name, n_units in layers.items():
            t = ends[shallow] if span <= 0 else \
                ends[shallow] + (ends[deep] - ends[shallow]) * (depth[name] - depth[shallow]) / span
            batches = n_units / batch if device.type == "cpu" else math.ceil(n_units / batch)  # CPU: per unit
            out[name] = kinds * f.steps * max(t, 0.0) * batches
        return out
    finally:
        net.to("cpu")


def media_bytes(cfg: AtlasConfig, shape) -> int:
    """Feature-vis media of one unit: final image, negative image and animation (see MEDIA_BYTES_PER_PIXEL)."""
    f = cfg.featurevis
    if not f.enabled or shape is None:
        return 0
    pixels = shape[1] * shape[2]
    if pixels <= media.LOSSLESS_MAX_PIXELS:
        rate, still, frame = LOSSLESS_BYTES_PER_PIXEL, pixels, pixels
    else:
        rate = MEDIA_BYTES_PER_PIXEL
        scale = lambda side: min(1.0, side / max(shape[1:])) ** 2  # noqa: E731
        still, frame = pixels * scale(media.STILL_SIDE), pixels * scale(media.ANIMATION_SIDE)
    frames = len(fv.frame_schedule(f.steps, f.frames))
    positive, negative, animation = still * rate["positive"], still * rate["negative"], frame * frames * rate["frame"]
    if pixels > media.LOSSLESS_MAX_PIXELS:  # lossy media are capped in bytes
        positive, negative = min(positive, media.POSITIVE_MAX_BYTES), min(negative, media.NEGATIVE_MAX_BYTES)
        animation = min(animation, media.ANIMATION_MAX_BYTES)
    diverse = f.diversity * min(visualize.DIVERSE_MAX_BYTES,
                                rate["positive"] * min(pixels, visualize.DIVERSE_SIDE ** 2))
    return int(positive + (negative if f.negative else 0) + animation + diverse + 300)  # + the files' overhead


def page_bytes(cfg: AtlasConfig, model, layer: str, title: str, shape: tuple[int, ...], n_units: int,
               class_names: list[str], seed: int = 0) -> tuple[int, int]:
    """(one unit page + its embed card + its JSON export, the layer page + its dot map), rendered from stand-in
    records of this shape."""
    from . import urls, website
    from .website.builder import LIST_SAMPLE
    from .store import (EffectsRecord, FeatureVisRecord, LayerRecord, ModelRecord, RangeRecord, TopKRecord, UnitRecord,
                        VisualRecord)

    rng = np.random.default_rng(seed)
    k, n_classes = cfg.scan.top_k, max(len(class_names), 1)
    spatial = (shape[1], shape[2]) if len(shape) == 3 else (1, shape[0]) if len(shape) == 2 else None
    m = ModelRecord(model.name, 0, model.section.display_title, model.section.source, "", 0, None, model.info)
    rec = LayerRecord(model.name, layer, 0, "", tuple(shape), n_units, spatial, title)

    def smooth_map():
        if spatial is None:
            return None
        yy, xx = np.mgrid[0:spatial[0], 0:spatial[1]]
        cy, cx = rng.uniform(0, spatial[0]), rng.uniform(0, spatial[1])
        return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * max(spatial) / 4) ** 2).astype(np.float32)

    def unit(i: int) -> UnitRecord:
        top = tuple(TopKRecord(r, int(rng.integers(0, 50000)), float(rng.normal(5, 1)),
                               int(rng.integers(0, spatial[0] * spatial[1])) if spatial else -1, smooth_map())
                    for r in range(k))
        bottom = tuple(TopKRecord(r, int(rng.integers(0, 50000)), float(rng.normal()), -1 if not spatial else 0)
                       for r in range(k))
        return UnitRecord(model.name, layer, i, 50000, 0, 1.2345, 0.54321, -0.12345, 7.6543, 0.987, 0.4321,
                          0.123, int(rng.integers(0, n_classes)), False, False, -1, None,
                          "feature-selective (broad)", -1.2345, 7.6543,
                          tuple(int(v) for v in rng.integers(0, 200, cfg.scan.histogram_bins)),
                          tuple(float(v) for v in rng.normal(size=n_classes)), top, bottom,
                          ranges=tuple(RangeRecord(b, float(b), b + 0.5, tuple(
                              TopKRecord(r, int(rng.integers(0, 50000)), float(rng.normal(b, 0.1)), -1)
                              for r in range(cfg.scan.range_examples)))
                              for b in range(cfg.scan.range_bins if cfg.scan.range_examples else 0)),
                          effects=EffectsRecord(tuple((int(c), float(rng.random())) for c in range(min(5, n_classes))),
                                                tuple((int(c), -float(rng.random())) for c in range(min(5, n_classes))),
                                                False) if cfg.scan.effect_per_class and n_classes > 1 else None)
    units = [unit(i) for i in range(min(n_units, 64))]
    vis = VisualRecord(FeatureVisRecord(urls.featurevis_media(model.name, layer, 0, "positive"),
                                        urls.featurevis_media(model.name, layer, 0, "animation"), 1.2345),
                       FeatureVisRecord(urls.featurevis_media(model.name, layer, 0, "negative"), None, -1.2345)
                       if cfg.featurevis.negative else None)
    pages = website.Pages(cfg.site, "static/style.0123456789.css", class_names, np.zeros(50000, np.int64),
                          "static/atlas.0123456789.js")
    n_near = min(NEIGHBOURS, n_units - 1) if cfg.embed.enabled else 0
    near = [(units[1 + j % (len(units) - 1)], 0.5, vis) for j in range(n_near)] if len(units) > 1 else []
    points = [(layer, i, float(x), float(y)) for i, (x, y) in enumerate(rng.normal(size=(n_units, 2)))]
    unit_map = {"umap": points, "pca": points, "umap_ran": True, "note": "UMAP"} if cfg.embed.enabled else {}
    predictions = {t.example: (1, 0.9) for u in units[:1] for t in u.top + u.bottom}
    u = units[0]
    listed = min(cfg.scan.sample_size, LIST_SAMPLE)  # the sample's first examples in each unit's JSON
    sample = (rng.normal(size=listed).astype(np.float32), np.arange(listed))
    model_page = pages.unit(m, rec, u, n_units, predictions, vis, near, unit_map, sample)
    html = website.render("unit.html", model_page.html) + website.render("embed.html", model_page.embed)
    export = json.dumps(model_page.export, sort_keys=True, separators=(",", ":"))
    layer_units = [units[i % len(units)] for i in range(n_units)]
    layer_html = website.render("layer.html", pages.layer(m, rec, [
        UnitRecord(**{**x.__dict__, "unit": i}) for i, x in enumerate(layer_units)], (rec, rec),
        {i: vis for i in range(n_units)}, unit_map))
    dot_map = len(charts.dots_svg([(x, y) for _, _, x, y in points])) if cfg.embed.enabled else 0
    return len(html.encode()) + len(export.encode()), len(layer_html.encode()) + dot_map


def signed_bytes(side: int) -> int:
    """The data URI of a side x side signed overlay (`charts.signed_uri`), measured on noise (PNG's worst case)."""
    return len(charts.signed_uri(np.random.default_rng(0).standard_normal((side, side))))


def explanation_bytes(cfg: AtlasConfig, dataset, listed: int, heads: int) -> int:
    """An input page's bytes of one model's explanations: attributions of the class and of the `listed` units
    (site.attribution_steps > 0), the attention of `heads` heads (all layers) and the rollout; each map's
    data URI measured on noise (PNG's worst case) at the size the build draws it, plus its markup."""
    from .explain import ATTRIBUTION_SIDE

    side = min(ATTRIBUTION_SIDE, max(visualize.input_shape(dataset, cfg.featurevis)[1:]))
    signed = signed_bytes(side) + 150
    attention = len(charts.heat_uri(np.random.default_rng(0).random((14, 14)))) + 260  # ViT-B/16's 14 x 14 grid
    attributions = (2 + listed) * signed if cfg.site.attribution_steps else 0
    return attributions + (heads + 1) * attention if heads else attributions


def unit_attribution_bytes(cfg: AtlasConfig, shape) -> int:
    """A unit page's bytes of its top examples' attributions (site.unit_attributions), measured on noise."""
    from .explain import TOP_ATTRIBUTION_SIDE

    if not cfg.site.unit_attributions:
        return 0
    side = min(TOP_ATTRIBUTION_SIDE, max(shape[1:]))
    return cfg.scan.top_k * (signed_bytes(side) + 70)


def shared_bytes(cfg: AtlasConfig, dataset, layer_units: list[list[int]], heads: list[int] | None = None) -> int:
    """Dataset images (those pages show, each once), the search index, the model and input pages and the
    pages every site has; layer_units: each model's layers' unit counts; heads: each model's attention heads
    (all layers) drawn on the input pages. Per-item bytes measured on built sites (the tiny test site, the
    demo, ResNet-18)."""
    from . import sql_engine
    from .website import INPUT_MAP_POINTS, MAX_MAP_POINTS, TEMPLATES
    from .charts import HEATMAP_CELLS
    from .scan import INPUT_UNITS

    n = len(dataset)
    sample = [int(i) for i in np.linspace(0, n - 1, min(n, 8))] if n and not dataset.is_text else []  # text: no images
    per_image = np.mean([len(media.encode_webp(dataset.to_image(dataset.data[i][0]))) for i in sample]) \
        if sample else 0
    units = sum(map(sum, layer_units))
    layers = sum(map(len, layer_units))
    ranged = min(cfg.scan.sample_size, cfg.scan.range_bins * cfg.scan.range_examples * units)  # from the sample
    shown = min(n, 2 * cfg.scan.top_k * units + cfg.site.input_pages + ranged)  # examples some page shows
    static = sum(p.stat().st_size for p in (TEMPLATES / "static").glob("*") if p.is_file())
    static += sum(p.stat().st_size for p in sql_engine.engine_files().values())  # the SQL page's DuckDB-WASM
    inputs = 0 if dataset.is_text else min(cfg.site.input_pages, n)  # text gets no input pages
    model_pages = sum(8000 + 500 * len(ls) + 170 * sum(min(u, HEATMAP_CELLS) for u in ls)
                      + 360 * min(sum(ls), MAX_MAP_POINTS) + 420 * len(ls) * min(n, INPUT_MAP_POINTS)
                      for ls in layer_units) if cfg.embed.enabled else 8000 * len(layer_units)
    input_pages = inputs and inputs * (3500 + 1300 * layers + 400 + sum(
        explanation_bytes(cfg, dataset, sum(min(INPUT_UNITS, u) for u in ls), h)
        for ls, h in zip(layer_units, heads or [0] * len(layer_units))))
    fixed = static + 25_000 + 100 * (units + layers)  # home, search, about, 404; the manifest's line per page
    return int(shown * per_image + model_pages + input_pages + fixed + 12 * units)


def fit_diversity(cfg: AtlasConfig, plan: Plan | None = None) -> tuple[AtlasConfig, str | None]:
    """`cfg` as the build runs it: with featurevis.diversity = N set and the planned site (`plan`, the plan of
    `cfg`; without it, one of bytes only, no calibration) over GitHub Pages' 1 GB, the diversity rows are left
    out, with a line saying so (None when nothing changed); a site within the budget keeps them."""
    n = cfg.featurevis.diversity
    if not n or not cfg.featurevis.enabled:
        return cfg, None
    with_rows = plan or make_plan(cfg, calibrate=False)
    if not with_rows.over:
        return cfg, None
    off = dataclasses.replace(cfg, featurevis=dataclasses.replace(cfg.featurevis, diversity=0))
    without = make_plan(off, calibrate=False)
    return off, (f"featurevis.diversity = {n} left out: with it the site would be about {with_rows.bytes / 1e6:,.0f} "
                 f"MB, over GitHub Pages' 1 GB (about {without.bytes / 1e6:,.0f} MB without it); probe fewer layers "
                 f"or units (layers = [...], units = N) to have it (`atlas plan CONFIG`)")


def make_plan(cfg: AtlasConfig, calibrate: bool = True) -> Plan:
    """The plan of a build of `cfg` (models loaded and checked; with `calibrate`, the timing runs)."""
    from .build import load_and_check_models, resolve_device
    from .distributed import Cluster
    from .sources import load_dataset

    device = resolve_device(cfg.atlas.device)
    dataset = load_dataset(cfg)
    loaded, dataset = load_and_check_models(cfg, dataset, Cluster())
    shape = visualize.input_shape(dataset, cfg.featurevis)
    plans, heads = [], []
    for section, model, layers in loaded:
        x = torch.as_tensor(dataset.data[0][0])[None]
        with Capture(model.module, layers, sink=lambda name, out: None) as capture, torch.inference_mode():
            capture(x)
        shapes = {name: capture.shapes[name] for name in layers}
        n_units = {name: min(unit_count(shapes[name]), section.units or 10**12) for name in layers}
        fv_s = featurevis_seconds(model, dataset, n_units, cfg, device) if calibrate and not dataset.is_text \
            else dict.fromkeys(layers, 0.0)  # text: no feature vis
        # the scan's time, with a language model's top logits (their own stage, counted with it)
        scan_s = scan_seconds(model, dataset, layers, cfg, device) + logits_seconds(model, dataset, layers, device) \
            if calibrate else 0.0
        model.module.to("cpu")
        names = list(model.info.get("classes") or dataset.class_names)
        rows = []
        for name in layers:
            title = describe_layer(model.module, name, shapes[name])
            unit_b, layer_b = page_bytes(cfg, model, name, title, shapes[name], n_units[name], names)
            rows.append(LayerPlan(name, title, n_units[name], fv_s[name],
                                  unit_b + media_bytes(cfg, shape) + unit_attribution_bytes(cfg, shape), layer_b))
        plans.append(ModelPlan(section.name, rows, scan_s))
        readable = set(attention_modules(model.module)[0])
        heads.append(sum(m.num_heads for name, m in model.module.named_modules() if name in readable))
    plan = Plan(plans, shared_bytes(cfg, dataset, [[l.units for l in p.layers] for p in plans], heads), str(device))
    if not calibrate:
        plan.notes.append("(times not measured: no calibration run)")
    if cfg.featurevis.enabled and cfg.featurevis.diversity and plan.over:
        plan.notes.append(f"featurevis.diversity = {cfg.featurevis.diversity} takes the site over 1 GB: the build "
                          f"leaves the diversity rows out (probe fewer layers or units to have them)")
    return plan
