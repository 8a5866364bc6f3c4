"""Render throughput of the website: pages/s of `website.build_site` over a synthetic store.

A synthetic store is written first, with fixed seeds, entirely through the
Store's public write API, in the order build.py uses (write_dataset,
write_scan, write_model, add_featurevis, write_embedding, write_meta, then
the example images with media.write_example_images), so every page is as full
as in the demo:
- one model, 10 classes, 500 examples (8x8 grey images, written as WebP media
  the way the build writes them), predictions for all of them;
- five layers totalling --units units (20,000 by default): conv1 (64 units,
  8x8 maps: small enough for the unit-map inset on its unit pages, and the
  first layer, so it has weight heatmaps), conv2 (8x8), conv3 and conv4 (4x4),
  and a flat fc layer (10% of the units); the conv layers share the rest 1:2:3;
- per unit: statistics from a sampled activation matrix (a few dead,
  saturated, redundant and non-finite units), a 30-bin histogram, class means
  and selectivity (scan.histogram, scan.class_selectivity), top-9 examples
  with positions and activation maps (conv layers) and bottom-9;
- when this checkout's scan records them, the input pages' activations
  (50 inputs, each layer's 8 most active units with maps);
- feature visualization records for every unit (positive image, animation,
  negative image: tiny WebP files in the media folder);
- the embed stage's rows: the all-layer unit map, one unit map and one input
  map per layer (PCA and UMAP coordinates), 8 nearest units per unit.
Building the store is not timed. Timed: one full `build_site` (every page:
home, model, layers, units, inputs, search, about, 404; the JSON exports,
assets, media links, size report, swap) into an empty site folder, as the
build calls it (default [site] section with the bench's title, progress bars
off). pages = every HTML file in the site. Everything lives in a temporary
folder (TMPDIR, or --dir); file and folder creation costs differ a lot
between file systems, so the mount is printed.

Also printed, not figures: the CPU time of the build, the mean size of a unit
page (index.html) and what it is made of, the time of a second build over the
site just built (nothing changed: the incremental path), and on a 2,000-unit
store: cProfile's top 15 functions by cumulative time and top 10 by own time,
then a breakdown of one build's wall time got by wrapping the main functions
(store reads, page contexts, charts, Jinja2, writes...) with timers.

Run: .venv/bin/python bench/render.py [--units N] [--quick] [--repeats R] [--no-profile] [--dir PATH]
--units: units in the store (default 20000); --quick: 2,000 units (the
profile reuses that store); --repeats: time R full builds, each into an empty
folder, and report the median; --dir: where the temporary folder goes.
The machine should be otherwise idle: the load average is printed at the
start and the end.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import inspect
import io
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from atlas_builder import atomic, charts, media, urls, website  # noqa: E402
from atlas_builder.embed import Map2D, ModelEmbedding  # noqa: E402
from atlas_builder.ids import UnitId  # noqa: E402
from atlas_builder.hooks import LayerInfo  # noqa: E402
from atlas_builder import scan as scan_module  # noqa: E402
from atlas_builder.scan import LayerScan, ModelScan, TopKResult, class_selectivity, histogram  # noqa: E402
from atlas_builder.sources import AtlasDataset  # noqa: E402
from atlas_builder.store import ModelRecord, Store  # noqa: E402

MODEL = "synthetic-cnn"
CLASSES = tuple(f"class {i}" for i in range(10))
N_EXAMPLES = 500  # dataset examples (8x8 grey images)
N_SAMPLE = 400  # sampled examples (sample matrix, input maps)
TOP_K = 9
BINS = 30
NEIGHBOURS = 8
INPUT_PAGES = 50  # inputs that get an input page (site.input_pages's default), when the scan records them
INPUT_UNITS = getattr(scan_module, "INPUT_UNITS", 8)
SITE_TITLE = "Neuron Atlas: render bench"


class Tensors(Dataset):
    def __init__(self, images: torch.Tensor, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def layer_infos(n_units: int) -> list[LayerInfo]:
    """conv1 64 units, conv2..conv4 sharing the rest 1:2:3, fc 10% of all (at least one unit each)."""
    fc = max(1, n_units // 10)
    conv1 = min(64, max(1, n_units - fc - 3))
    rest = n_units - fc - conv1
    conv2 = max(1, rest // 6)
    conv3 = max(1, rest // 3)
    conv4 = rest - conv2 - conv3
    if conv4 < 1:
        raise SystemExit(f"--units {n_units} is too small; use at least 16")
    return [LayerInfo("conv1", "Conv2d", (conv1, 8, 8), True), LayerInfo("conv2", "Conv2d", (conv2, 8, 8), True),
            LayerInfo("conv3", "Conv2d", (conv3, 4, 4), True), LayerInfo("conv4", "Conv2d", (conv4, 4, 4), True),
            LayerInfo("fc", "Linear", (fc,), True)]


def fake_layer(info: LayerInfo, rng: np.random.Generator, labels: np.ndarray, sample_ids: np.ndarray) -> LayerScan:
    """What scan.summarize would hand the store for one layer, from a synthetic sampled activation matrix."""
    u = info.n_units
    m = info.spatial[0] * info.spatial[1] if info.spatial else 0
    # sampled activations [S, U]: ReLU of a class-dependent signal plus noise; some units dead, some always on
    class_pref = rng.standard_normal((len(CLASSES), u)) * rng.random(u) * 2
    pre = class_pref[labels[sample_ids]] + rng.standard_normal((len(sample_ids), u)) + rng.normal(-0.3, 0.5, u)
    dead = rng.random(u) < 0.03
    pre[:, dead] = -1.0
    always = ~dead & (rng.random(u) < 0.02)
    pre[:, always] = np.abs(pre[:, always]) + 0.5
    sample = np.maximum(pre, 0).astype(np.float16)
    acts = sample.astype(np.float64)
    active = acts > 0
    class_means = np.stack([acts[labels[sample_ids] == c].mean(0) for c in range(len(CLASSES))], axis=1)
    selectivity, top_class = class_selectivity(class_means)
    redundant = ~dead & ~always & (rng.random(u) < 0.02) & (np.arange(u) > 0)
    std = acts.std(0)
    stats = {"count": np.full(u, N_EXAMPLES * max(m, 1)), "nonfinite": np.where(rng.random(u) < 0.005, 3, 0),
             "mean": acts.mean(0), "std": std, "min": acts.min(0), "max": acts.max(0),
             "frac_active": active.mean(0), "position_activity": np.where(always, 0.99, active.mean(0) * 0.6),
             "selectivity": selectivity, "top_class": top_class, "dead": dead, "saturated": always,
             "redundant_with": np.where(redundant, np.arange(u) - 1, -1),
             "redundant_corr": np.where(redundant, 0.95 + 0.04 * rng.random(u), np.nan)}
    names = []
    for i in range(u):
        if dead[i]:
            names.append("dead")
        elif always[i]:
            names.append("saturated")
        elif not np.isnan(selectivity[i]) and selectivity[i] >= 0.6:
            names.append(f"class-selective: {CLASSES[top_class[i]]}")
        else:
            names.append("feature-selective (broad)")
    counts, lo, hi = histogram(sample, BINS)

    def ranked(sign: int) -> TopKResult:
        ids = np.argpartition(rng.random((u, N_EXAMPLES)), TOP_K, axis=1)[:, :TOP_K]  # k distinct examples per unit
        base = np.where(sign > 0, stats["max"], stats["min"])[:, None]
        values = (base - sign * np.sort(rng.random((u, TOP_K)), axis=1) * (std[:, None] + 0.1)).astype(np.float32)
        positions = rng.integers(0, m, (u, TOP_K)) if m else np.full((u, TOP_K), -1)
        maps = None
        if m and sign > 0:  # a blob around the argmax position, plus noise
            h, w = info.spatial
            rows, cols = np.divmod(np.arange(m), w)
            pr, pc = np.divmod(positions, w)
            dist2 = (rows[None, None] - pr[..., None]) ** 2 + (cols[None, None] - pc[..., None]) ** 2
            maps = (np.exp(-dist2 / 2.0) * values[..., None] + 0.1 * rng.random((u, TOP_K, m))).astype(np.float32)
        return TopKResult(values, ids, positions, maps, np.ones((u, TOP_K), dtype=bool))

    return LayerScan(info, ranked(1), ranked(-1), stats, names, counts, lo, hi, class_means, sample)


def fake_inputs(rng: np.random.Generator, infos: list[LayerInfo]):
    """What scan.input_activations records for the input pages: per layer the most active units on a few inputs."""
    examples = np.sort(rng.choice(N_EXAMPLES, INPUT_PAGES, replace=False)).astype(np.int64)
    units, values, maps = {}, {}, {}
    for info in infos:
        n = min(INPUT_UNITS, info.n_units)
        m = info.spatial[0] * info.spatial[1] if info.spatial else 0
        units[info.name] = np.argpartition(rng.random((INPUT_PAGES, info.n_units)), n - 1, axis=1)[:, :n]
        values[info.name] = -np.sort(-rng.uniform(0.5, 5.0, (INPUT_PAGES, n)), axis=1).astype(np.float32)
        maps[info.name] = rng.random((INPUT_PAGES, n, m)).astype(np.float32) if m else None
    return scan_module.InputActivations(examples, units, values, maps)


def fake_map(rng: np.random.Generator, n: int, note: str) -> Map2D:
    centres = rng.standard_normal((8, 2)) * 5
    umap = centres[rng.integers(0, 8, n)] + rng.standard_normal((n, 2))
    return Map2D(rng.standard_normal((n, 2)) * [3.0, 1.5], umap, True, note)


def fake_neighbours(rng: np.random.Generator, u: int) -> tuple[np.ndarray, np.ndarray]:
    k = min(NEIGHBOURS, u - 1)
    ids = np.stack([(i + 1 + rng.choice(u - 1, k, replace=False)) % u for i in range(u)]) if k > 0 \
        else np.zeros((u, 0), dtype=np.int64)
    sims = -np.sort(-rng.uniform(0.3, 0.99, (u, k)), axis=1)
    return ids, sims


def write_store(folder: Path, n_units: int, seed: int = 0) -> None:
    """The synthetic store of `n_units` units under folder, through Store's write API only."""
    rng = np.random.default_rng(seed)
    labels = np.arange(N_EXAMPLES) % len(CLASSES)
    rng.shuffle(labels)
    images = torch.from_numpy(rng.random((N_EXAMPLES, 1, 8, 8)).astype(np.float32))
    dataset = AtlasDataset(Tensors(images, labels), CLASSES, (), (), "synthetic 8x8", f"synthetic-{seed}")
    sample_ids = np.sort(rng.choice(N_EXAMPLES, N_SAMPLE, replace=False))
    infos = layer_infos(n_units)
    layers = [fake_layer(info, rng, labels, sample_ids) for info in infos]
    predicted = np.where(rng.random(N_EXAMPLES) < 0.9, labels, rng.integers(0, len(CLASSES), N_EXAMPLES))
    accuracy = float((predicted == labels).mean())
    scan = ModelScan(MODEL, layers, labels, predicted, rng.uniform(0.4, 1.0, N_EXAMPLES), N_EXAMPLES, 1.0,
                     accuracy, sample_ids)
    if hasattr(scan_module, "InputActivations") and hasattr(scan, "inputs"):  # input pages, where the scan has them
        scan.inputs = fake_inputs(rng, infos)
    fp = f"bench-{seed}-{n_units}"
    with Store(folder) as store:
        store.write_dataset(CLASSES, labels, dataset.fingerprint)  # as build.py: before the first scan
        store.write_scan(scan, fp)
        store.write_model(ModelRecord(MODEL, 0, "Synthetic CNN (render bench)", "builtin:synthetic", fp,
                                      1_234_567, accuracy, {"parameters": 1_234_567, "test_accuracy": accuracy,
                                                            "epochs": 10, "train_examples": 1257, "seed": seed}))
        # feature vis: what visualize.run writes (three files per unit, weights of the first layer) and returns
        rows, weights = [], []
        poster = media.encode_webp(media.tensor_image(images[0]))
        animation = media.encode_animation([media.tensor_image(images[i]) for i in range(4)])
        heat = media.encode_webp(media.weight_heatmap(rng.standard_normal((3, 3))))
        for info in infos:
            fv = {kind: [urls.featurevis_media(MODEL, info.name, unit, kind) for unit in range(info.n_units)]
                  for kind in ("positive", "animation", "negative")}
            (store.media_dir / fv["positive"][0]).parent.mkdir(parents=True, exist_ok=True)
            for unit in range(info.n_units):
                for kind, data in (("positive", poster), ("animation", animation), ("negative", poster)):
                    (store.media_dir / fv[kind][unit]).write_bytes(data)
                act = float(rng.uniform(1, 10))
                rows.append((info.name, unit, "positive", act, fv["positive"][unit], fv["animation"][unit], act / 2,
                             "output"))
                rows.append((info.name, unit, "negative", -act, fv["negative"][unit], None, -act / 2,
                             "input" if info.module_type == "ReLU" else "output"))
        first = infos[0]
        for unit in range(first.n_units):
            path = urls.featurevis_media(MODEL, first.name, unit, "weights")
            (store.media_dir / path).write_bytes(heat)
            weights.append((first.name, unit, path))
        store.add_featurevis(MODEL, rows, weights, {r[0]: fp for r in rows + weights})
        store.mark_stage(f"featurevis:{MODEL}", fp, 1.0)
        note = "UMAP (n_neighbors=15, cosine)"
        emb = ModelEmbedding(
            units={"": fake_map(rng, n_units, note), **{i.name: fake_map(rng, i.n_units, note) for i in infos}},
            inputs={i.name: fake_map(rng, N_SAMPLE, note) for i in infos},
            neighbours={i.name: fake_neighbours(rng, i.n_units) for i in infos}, seconds=1.0)
        store.write_embedding(MODEL, emb, sample_ids, fp)
        store.write_meta({"title": SITE_TITLE, "dataset": "synthetic 8x8", "torch": torch.__version__,
                          "seed": str(seed)})
        media.write_example_images(dataset, store.referenced_examples(), store.media_dir / "examples")


def call_build_site(store: Store, site_dir: Path):
    """website.build_site as the build calls it, whichever of its signatures this checkout has.

    (store, site_dir, site: SiteSection, progress) or (store, site_dir, site_title, base_url, progress); the
    site section is the default one (base_url "", as in the demo; default size budget) with the bench's title.
    """
    params = inspect.signature(website.build_site).parameters
    known = {"store": store, "site_dir": site_dir, "site_title": SITE_TITLE, "base_url": "", "progress": False}
    if "site" in params:
        from atlas_builder.config import SiteSection

        known["site"] = SiteSection(title=SITE_TITLE)
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in known]
    if missing:
        raise SystemExit(f"bench/render.py does not know build_site's parameters {missing}; update call_build_site")
    return website.build_site(**{k: v for k, v in known.items() if k in params})


def unit_pages(store: Store) -> list[str]:
    return [urls.unit_page(UnitId(m.model, layer.layer, u))
            for m in store.models() for layer in store.layers(m.model) for u in range(layer.n_units)]


def timed_build(store_dir: Path, site_dir: Path):
    """(wall seconds, CPU seconds of this process, summary) of one build_site call; the store is opened before."""
    with Store(store_dir, read_only=True) as store:
        start, cpu = time.perf_counter(), time.process_time()
        summary = call_build_site(store, site_dir)
        return time.perf_counter() - start, time.process_time() - cpu, summary


def fresh_build(store_dir: Path, site_dir: Path):
    """A full render: into an empty folder, so no page can be linked from a previous build."""
    shutil.rmtree(site_dir, ignore_errors=True)
    return timed_build(store_dir, site_dir)


def profile(store_dir: Path, site_dir: Path) -> None:
    """cProfile of one full build: the functions with the most cumulative and own time."""
    prof = cProfile.Profile()
    with Store(store_dir, read_only=True) as store:
        n = len(unit_pages(store))
        prof.enable()
        start = time.perf_counter()
        call_build_site(store, site_dir)
        seconds = time.perf_counter() - start
        prof.disable()
    print(f"\ncProfile of one full build_site over {n:,} units: {seconds:.2f} s under the profiler "
          f"(its overhead inflates many small Python calls; see the timed breakdown below for real costs)")
    for key, count in (("cumulative", 15), ("tottime", 10)):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).strip_dirs().sort_stats(key).print_stats(count)
        lines = out.getvalue().splitlines()
        head = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
        print(f"top {count} by {key} time:")
        print("\n".join(lines[head:head + count + 1]))


STORE_READS = ("models", "layers", "units", "visuals", "map_points", "neighbours", "predictions", "labels",
               "class_names", "meta", "media_files", "referenced_examples", "input_examples", "input_units",
               "stages", "sample")
# (label, [(owner, attribute)]): wall time inside those functions, outermost calls only (a group's calls nested in
# one another count once). Lines starting with two spaces are parts of the line above; groups may overlap.
TIMED = [
    ("store reads (Store.*)", [(Store, n) for n in STORE_READS]),
    ("unit page models: page, embed card, JSON export (Pages.unit)", [("Pages", "unit")]),
    ("  charts.heat_uri (PNG overlays, 9 a conv unit)", [(charts, "heat_uri")]),
    ("  histogram_svg + class_bars", [(charts, "histogram_svg"), (charts, "class_bars")]),
    ("  position_map (scatter inset, layers <= 128 units)", [(website.pages, "position_map")]),
    ("other page contexts (home/model/layer/input/...)",
     [("Pages", n) for n in ("home", "model", "layer", "search", "not_found", "inputs_index", "input_page",
                             "about")]),
    ("Emitter.page (key + render + write, per page)", [("Emitter", "page")]),
    ("  Jinja2 (website.rendering.render)", [(website.rendering, "render")]),
    ("  atomic.write_text", [(atomic, "write_text")]),
    ("Emitter.data (JSON exports, assets)", [("Emitter", "data")]),
    ("media links (link_or_copy)", [(website.emit, "link_or_copy"), (website.builder, "link_or_copy")]),
    ("size_report + check_budget (tree walks)", [(website.builder, "size_report"), (website.builder, "check_budget")]),
    ("swap_in", [(website.builder, "swap_in")]),
    ("urls.rel, all callers (overlaps the lines above)", [(urls, "rel")]),
    ("json.dumps, all callers (page keys, exports, index)", [(json, "dumps")]),
]


def timed_breakdown(store_dir: Path, site_dir: Path) -> None:
    """Wall and CPU time of one full build split by wrapping the functions of TIMED with timers (~1 us a call)."""
    acc: dict[str, list] = {label: [0.0, 0, 0, 0.0] for label, _ in TIMED}  # seconds, calls, depth, CPU seconds
    patched = []

    def wrap(fn, label):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            entry = acc[label]
            if entry[2]:
                return fn(*args, **kwargs)
            entry[2] = 1
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                entry[0] += time.perf_counter() - start
                entry[3] += time.thread_time() - cpu
                entry[1] += 1
                entry[2] = 0
        return timed

    for label, targets in TIMED:
        for owner, name in targets:
            owner = (getattr(website.pages, owner, None) or getattr(website.emit, owner, None)) if isinstance(owner, str) \
                else owner
            if owner is None or name not in vars(owner):
                continue  # not in this checkout's website code
            original = vars(owner)[name]
            patched.append((owner, name, original))
            setattr(owner, name, wrap(original, label))
    try:
        seconds, cpu, _ = timed_build(store_dir, site_dir)
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
    print(f"\ntimed breakdown of one full build_site over the same store: {seconds:.2f} s wall, {cpu:.2f} s CPU, "
          f"with the timers (CPU: this thread's; wall well above CPU = waiting on the disk or on other processes)")
    print(f"  {'part':<52} {'wall s':>7} {'share':>6} {'CPU s':>6} {'calls':>8} {'us/call':>8}")
    for label, (sec, calls, _, cpu_s) in acc.items():
        if calls:
            print(f"  {label:<52} {sec:7.2f} {100 * sec / seconds:5.1f}% {cpu_s:6.2f} {calls:8,} "
                  f"{1e6 * sec / calls:8.1f}")


def filesystem(path: Path) -> str:
    """The mount (type, device) holding path, from /proc/mounts; '' where unknown."""
    try:
        mounts = [line.split()[:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "filesystem unknown"
    best = max((m for m in mounts if str(path.resolve()).startswith(m[1].rstrip("/") + "/") or m[1] == "/"),
               key=lambda m: len(m[1]), default=None)
    return f"{best[2]} on {best[1]}, device {best[0]}" if best else "filesystem unknown"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--units", type=int, default=20_000, help="units in the synthetic store (default 20000)")
    parser.add_argument("--quick", action="store_true", help="2,000 units")
    parser.add_argument("--repeats", type=int, default=1, help="full builds timed (median reported)")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile run and the timed breakdown")
    parser.add_argument("--dir", help="folder for the temporary store and sites (default: TMPDIR); e.g. /dev/shm "
                                      "to see rendering without the disk's file-creation cost (not the figure)")
    args = parser.parse_args()
    n_units = 2_000 if args.quick else args.units
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory(prefix="atlas-render-bench.", dir=args.dir) as tmp:
        tmp = Path(tmp)
        print(f"temporary folder {tmp} ({filesystem(tmp)})")
        store_dir, site_dir = tmp / "store", tmp / "site"
        start = time.perf_counter()
        write_store(store_dir, n_units)
        print(f"synthetic store of {n_units:,} units written in {time.perf_counter() - start:.1f} s (not timed)",
              flush=True)
        runs = [fresh_build(store_dir, site_dir) for _ in range(max(1, args.repeats))]
        times = [t for t, _, _ in runs]
        seconds = statistics.median(times)
        cpu = statistics.median([c for _, c, _ in runs])
        html = list(site_dir.rglob("*.html"))
        with Store(store_dir, read_only=True) as store:
            units = [site_dir / p for p in unit_pages(store)]
        sizes = np.array([p.stat().st_size for p in units])
        files = [p for p in site_dir.rglob("*") if p.is_file()]
        site_bytes = sum(p.stat().st_size for p in files)
        pages_per_s = len(html) / seconds
        print(f"build_site, full render into an empty folder: {seconds:.2f} s" + (
            f" (median of {len(times)}: {', '.join(f'{t:.2f}' for t in times)})" if len(times) > 1 else "")
              + f"; CPU time of this process {cpu:.2f} s ({100 * cpu / seconds:.0f}% of wall)")
        print(f"pages written: {len(html):,} HTML pages, of which {len(units):,} unit pages; "
              f"{pages_per_s:,.0f} pages/s ({len(units) / seconds:,.0f} unit pages/s, "
              f"{1e3 * seconds / len(html):.2f} ms a page); the parent process used {cpu:.2f} s of CPU "
              f"(unit pages are rendered by forked workers, one per core, whose CPU this does not count)")
        print(f"site: {len(files):,} files, {site_bytes / 1e6:.1f} MB; "
              f"HTML {sum(p.stat().st_size for p in html) / 1e6:.1f} MB")
        print(f"unit page (index.html): mean {sizes.mean():,.0f} bytes, median {np.median(sizes):,.0f}, "
              f"min {sizes.min():,}, max {sizes.max():,}")
        for name, page in (("conv", units[len(units) // 2]), ("flat", units[-1])):
            text = page.read_text()
            overlay = sum(len(s.split('"', 1)[0]) for s in text.split('src="data:image/png;base64,')[1:])
            svg = sum(len(s.split("</svg>", 1)[0]) + 6 for s in text.split("<svg")[1:])
            print(f"  one {name} unit page ({page.relative_to(site_dir)}, {len(text):,} chars): heat-map data URIs "
                  f"{overlay:,}, inline SVG {svg:,}, the rest {len(text) - overlay - svg:,}")
        again, _, summary = timed_build(store_dir, site_dir)  # over the site just built: nothing changed
        rendered = getattr(summary, "rendered", None)
        print(f"rebuild over that site with nothing changed: {again:.2f} s"
              + (f" ({rendered:,} pages rendered; the rest linked from the previous site)"
                 if rendered is not None else "") + " (not the figure)")
        if not args.no_profile:
            prof_store = store_dir
            if n_units != 2_000:
                prof_store = tmp / "store-2000"
                write_store(prof_store, 2_000)
            profile(prof_store, tmp / "site-profile")
            timed_breakdown(prof_store, tmp / "site-timed")
    print(f"load average at the end {', '.join(f'{x:.2f}' for x in os.getloadavg())} (other processes slow the figure)")
    print(f"FIGURE render_pages_per_s {pages_per_s:.1f}")
    print(f"FIGURE render_bytes_per_unit {sizes.mean():.0f}")


if __name__ == "__main__":
    main()
