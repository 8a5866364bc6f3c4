"""Building the site: reads the store, builds every page's model (pages.py), renders and writes them
through an Emitter into a fresh tree beside the site, checks the budget and swaps the tree in.

Owns the order of the build and what files a site has; not the pages' content.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import atomic, charts, sql_engine, urls
from ..config import SiteSection
from ..errors import AtlasError
from ..ids import UnitId
from ..progress import bar as progress_bar
from ..store import Store
from .emit import (MARKER, carry_nested, marker_text, nested_sites, sizes_of, PERMALINKS, Emitter, check_budget, check_replaceable, link_or_copy, previous_permalinks,
                   sizes_of, size_report, swap_in)
from .pages import Pages, gone_page
from .parts import DOT_MAP_SIZE, featured_units, sql_examples
from .rendering import TEMPLATES
from .search import search_index, search_rows


@dataclass
class SiteSummary:
    pages: int
    unit_pages: int
    files: int
    bytes: int
    path: Path
    rendered: int = 0  # pages rendered this time (the others were unchanged, linked from the previous site)
    size_report: list[str] = field(default_factory=list)  # lines printed at the end of the build
    sizes: dict[str, int] = field(default_factory=dict, repr=False)  # every file's size



def build_site(store: Store, site_dir: Path, site: SiteSection | None = None, progress: bool = True) -> SiteSummary:
    """Render every page from the store into a fresh tree and swap it in for `site_dir`.

    Pages unchanged since the previous build are linked, not rendered. The
    budget is checked before the swap, so a site over budget leaves the old one.
    """
    site = site or SiteSection()
    site_dir = Path(site_dir)
    check_replaceable(site_dir)
    site_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{site_dir.name}.", suffix=".tmp", dir=site_dir.parent))
    tmp.chmod(0o777 & ~atomic.UMASK)
    try:
        previous = site_dir if (site_dir / MARKER).is_file() else None
        nested = nested_sites(site_dir)  # other atlases' sites in its sub-folders: kept, and listed on its home
        summary = _write_tree(store, tmp, site, previous, progress, nested)
        carry_nested(site_dir, tmp, nested)
        check_budget(tmp, site, {**summary.sizes, **{f"{folder}/{path}": size for folder, _ in nested  # all of it
                                                     for path, size in sizes_of(tmp / folder).items()}})
        swap_in(tmp, site_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary.path = site_dir
    return summary


def _write_tree(store: Store, out: Path, site: SiteSection, previous: Path | None, progress: bool,
                nested: list[tuple[str, str]] = ()) -> SiteSummary:
    emit = Emitter(out, previous)
    models = store.models()
    layers = {m.model: store.layers(m.model) for m in models}
    all_units = {m.model: {layer.layer: store.units(m.model, layer.layer) for layer in layers[m.model]}
                 for m in models}
    visuals = {m.model: {layer.layer: store.visuals(m.model, layer.layer) for layer in layers[m.model]}
               for m in models}
    flat = [(m, u) for m in models for layer in layers[m.model] for u in all_units[m.model][layer.layer]]
    class_names = store.class_names()

    assets = {}
    files = {name: (TEMPLATES / "static" / name).read_bytes()
             for name in ("style.css", "atlas.js", "search.js", "lists.js", "embed.css", "embed.js",
                                                            "sql.js")}
    peak_tokens = store.peak_tokens()  # a text atlas's units: the tokens they fire on (pages and search)
    windows, vocab = store.windows()
    files["search-index.js"] = search_index(search_rows(flat, class_names, peak_tokens, vocab)).encode()
    for name, data in files.items():
        stem, ext = name.rsplit(".", 1)
        assets[name] = (urls.static(f"{stem}.{hashlib.sha1(data).hexdigest()[:10]}.{ext}"), data)
    pages = Pages(site, assets["style.css"][0], class_names, store.labels(), assets["atlas.js"][0],
                  (assets["search.js"][0], assets["search-index.js"][0]))
    meta = store.meta()
    pages.measure, pages.objective = meta.get("measure", "max"), meta.get("objective", "channel")
    pages.embed_css, pages.embed_js = assets["embed.css"][0], assets["embed.js"][0]
    pages.windows, pages.vocab = windows, vocab
    pages.peak_tokens = peak_tokens
    predictions = {m.model: store.predictions(m.model) for m in models}
    inputs = store.input_examples()
    featured = [(why, m, u, visuals[m.model][u.layer].get(u.unit)) for why, m, u in featured_units(flat)]
    emit.page(urls.HOME, "home.html", pages.home(models, layers, len(pages.labels), meta.get("dataset", ""),
                                                 featured, len(inputs), nested))
    example = next((UnitId(m.model, u.layer, u.unit) for m, u in flat if u.unit > 0), None)  # the help's examples
    emit.page(urls.SEARCH, "search.html", pages.search(example, class_names[-1] if class_names else ""))
    emit.page(urls.NOT_FOUND, "404.html", pages.not_found())
    emit.page(urls.LISTS, "lists.html", pages.lists(assets["lists.js"][0]))
    engine = sql_engine.engine_files()  # DuckDB-WASM, vendored from npm ({} where it is not installed)
    emit.page(urls.SQL, "sql.html", pages.sql(assets["sql.js"][0], sorted(engine),
                                              list(Store.OPEN_DATA), sql_examples(flat, class_names, bool(peak_tokens))))
    for name, src in engine.items():
        emit.file(urls.sql_engine(name), src)
    unit_jobs = []  # (model, layer, units, layer visuals, neighbours, unit map, predictions, list sample) per layer
    for m in models:
        model_layers = layers[m.model]
        units_of = all_units[m.model]
        input_maps = {layer.layer: store.map_points(m.model, layer.layer, "inputs") for layer in model_layers}
        emit.page(urls.model_page(m.model), "model.html", pages.model(
            m, model_layers, units_of, store.map_points(m.model, "", "units"), input_maps, predictions[m.model],
            store.architecture(m.model)))
        for i, layer in enumerate(model_layers):
            units = units_of[layer.layer]
            layer_visuals = visuals[m.model][layer.layer]
            unit_map = store.map_points(m.model, layer.layer, "units")
            neighbours = (model_layers[i - 1] if i > 0 else None,
                          model_layers[i + 1] if i + 1 < len(model_layers) else None)
            emit.page(urls.layer_page(m.model, layer.layer), "layer.html",
                      pages.layer(m, layer, units, neighbours, layer_visuals, unit_map))
            if unit_map and unit_map["umap"]:
                emit.data(urls.layer_dot_map(m.model, layer.layer),
                          charts.dots_svg([(x, y) for _, _, x, y in unit_map["umap"]], DOT_MAP_SIZE).encode())
            unit_jobs.append((m, layer, units, layer_visuals, store.neighbours(m.model, layer.layer), unit_map,
                              predictions[m.model], list_sample(store, m.model, layer.layer)))
    unit_pages = render_unit_pages(pages, emit, unit_jobs, progress)
    per_input = {m.model: store.input_units(m.model) for m in models}
    explained = {m.model: store.input_maps(m.model) for m in models}
    emit.page(urls.INPUTS, "inputs.html", pages.inputs_index(inputs, models, predictions))
    for i, e in enumerate(inputs):
        around = (inputs[i - 1] if i > 0 else None, inputs[i + 1] if i + 1 < len(inputs) else None)
        emit.page(urls.input_page(e), "input.html", pages.input_page(
            e, models, layers, {m: per_input[m].get(e, {}) for m in per_input}, predictions, around,
            {m: (maps.get(e, {}), notes) for m, (maps, notes) in explained.items()}))
    counts = {"models": len(models), "layers": sum(len(v) for v in layers.values()), "units": len(flat),
              "examples": len(pages.labels), "inputs": len(inputs)}
    emit.page(urls.ABOUT, "about.html", pages.about(meta, store.stages(), counts, store.open_data_schema()))
    for path, data in assets.values():
        emit.data(path, data)
    for name, data in store.open_data().items():  # site/data/*.parquet and atlas.duckdb (see the about page)
        emit.data(urls.open_data(name), data)
    emit.data(".nojekyll", b"")
    emit.data(MARKER, marker_text(site.title))
    if site.base_url:
        emit.data(urls.SITEMAP, sitemap(site.base_url, sorted(emit.keys)).encode())
    for path in store.media_files():
        src = store.media_dir / path
        if not src.is_file():
            raise AtlasError(f"the store lacks the media file {path} ({src}); rebuild with `atlas build`")
        link_or_copy(src, emit.target(urls.media(path)))
    # permalinks that last: every unit address any build published; one this build lacks gets a page there
    published = {urls.unit_page(UnitId(m.model, u.layer, u.unit)): [m.model, u.layer, u.unit] for m, u in flat}
    earlier = previous_permalinks(previous)
    for path, (model, layer, unit) in sorted(earlier.items()):
        uid = UnitId(model, layer, unit)
        if path not in published and path not in emit.keys:  # its page, and its embed card (in papers' iframes)
            for gone in (path, urls.unit_embed(uid)):
                emit.page(gone, "gone.html", gone_page(pages, gone, uid, layers, models))
    emit.data(PERMALINKS, json.dumps({**earlier, **published}, sort_keys=True, indent=0).encode())
    emit.finish()
    sizes = sizes_of(out)
    summary = SiteSummary(emit.pages, unit_pages, len(sizes), sum(sizes.values()), out, emit.rendered)
    summary.size_report = size_report(sizes, [m.model for m in models], unit_pages)
    summary.sizes = sizes
    return summary


PARALLEL_FROM = 400  # unit pages from which rendering is split over processes (a pool costs ~0.1 s)
CHUNKS_PER_WORKER = 4  # slices per process, so one slow slice does not hold up the rest
_SHARED: dict = {}  # what forked render workers read (set just before the pool forks)


def render_unit_pages(pages: Pages, emit: Emitter, jobs: list[tuple], progress: bool) -> int:
    """Every unit page and JSON export; on several cores, slices of units rendered by forked processes.

    Rendering is pure and each file has its own path, so slices are
    independent; each worker returns the manifest keys of what it wrote.
    """
    slices = [(j, lo, min(lo + 64, len(job[2]))) for j, job in enumerate(jobs) for lo in range(0, len(job[2]), 64)]
    total = sum(len(job[2]) for job in jobs)
    workers = min(os.cpu_count() or 1, max(1, len(slices) // CHUNKS_PER_WORKER))
    bar = progress_bar(total, "render", "page", progress)
    try:
        if total < PARALLEL_FROM or workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
            for piece in slices:
                bar.update(_render_slice(pages, emit, jobs, *piece))
            return total
        _SHARED.update(pages=pages, emit=emit, jobs=jobs)
        try:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for keys, n_pages, n_rendered, n_units in pool.imap_unordered(_render_slice_in_worker, slices):
                    emit.keys.update(keys)
                    emit.pages += n_pages
                    emit.rendered += n_rendered
                    bar.update(n_units)
        finally:
            _SHARED.clear()
        return total
    finally:
        bar.close()


def _render_slice_in_worker(piece: tuple[int, int, int]) -> tuple[dict[str, str], int, int, int]:
    emit: Emitter = _SHARED["emit"]
    mine = Emitter.__new__(Emitter)  # the parent's settings and previous manifest, fresh counters
    mine.__dict__.update(emit.__dict__, keys={}, pages=0, rendered=0, _folders=set())
    n = _render_slice(_SHARED["pages"], mine, _SHARED["jobs"], *piece)
    return mine.keys, mine.pages, mine.rendered, n


def _render_slice(pages: Pages, emit: Emitter, jobs: list[tuple], job: int, lo: int, hi: int) -> int:
    m, layer, units, layer_visuals, near, unit_map, predictions, (values, ids) = jobs[job]
    for u in units[lo:hi]:
        close = [(units[o], sim, layer_visuals.get(o)) for o, sim in near.get(u.unit, [])]
        uid = UnitId(m.model, layer.layer, u.unit)
        sample = (values[u.unit], ids) if values is not None and u.unit < len(values) else None
        model = pages.unit(m, layer, u, len(units), predictions, layer_visuals.get(u.unit), close, unit_map, sample)
        emit.page(urls.unit_page(uid), "unit.html", model.html)
        emit.page(urls.unit_embed(uid), "embed.html", model.embed)
        emit.data(urls.unit_json(uid), json.dumps(model.export, sort_keys=True, separators=(",", ":"),
                                                  allow_nan=False).encode())
    return hi - lo


LIST_SAMPLE = 64  # examples of the seeded sample in each unit's JSON export (the list page plots units over them)


def list_sample(store: Store, model: str, layer: str) -> tuple[np.ndarray | None, np.ndarray]:
    """A layer's values [U, n] on the first LIST_SAMPLE examples of the model's seeded sample, and their ids."""
    values, ids = store.sample(model, layer)
    if not values.size:
        return None, ids
    return values[:, :LIST_SAMPLE].astype(np.float32), ids[:LIST_SAMPLE]


def sitemap(base_url: str, paths: list[str]) -> str:
    """sitemap.xml of every HTML page, by its public folder URL (only with a base URL: it needs absolute URLs)."""
    from xml.sax.saxutils import escape as xml_escape

    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             '<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">']
    for path in paths:
        if path.endswith(".html") and path != urls.NOT_FOUND:
            lines.append(f"  <url><loc>{xml_escape(urls.page_url(base_url, path))}</loc></url>")
    return "\n".join(lines + ["</urlset>", ""])

