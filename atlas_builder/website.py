"""Website: store in, static site out.

Two halves, kept apart:
- pure rendering: `render(name, context)` turns a page context (plain
  dicts, every URL already relative) into an HTML string with Jinja2
  (autoescape on, so text from models and datasets is always escaped);
- `build_site` reads the store, builds each page's context, renders it, and
  writes the whole tree into a temporary folder beside the site, which is
  swapped in only when complete, so a failed build leaves the old site.

Pages: home, model, layer, one per unit (`<model>/<layer>/<unit>/`).
Dataset images are copied once from the store's media folder and referenced
by every page. Static assets get a content hash in their names. Reads only
the store (never the model or the dataset), so the site can be rebuilt
without either. Every URL comes from urls.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jinja2
from tqdm import tqdm

from . import atomic, charts, urls
from .errors import AtlasError
from .ids import UnitId
from .store import LayerRecord, ModelRecord, Store, UnitRecord, VisualRecord

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
MARKER = ".atlas-site"  # marks a folder as ours, so we never replace a folder we did not write


@lru_cache(maxsize=4)
def environment(folder: Path = TEMPLATES) -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(folder)), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def render(template: str, context: dict) -> str:
    """Pure: the HTML of one page from its context."""
    return environment().get_template(template).render(**context)


def fmt(value: float | None, digits: int = 3) -> str:
    """Numbers as pages show them: 3 significant digits, '—' when unknown."""
    if value is None:
        return "—"
    return f"{value:.{digits}g}"


def fmt_accuracy(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


@dataclass
class SiteSummary:
    pages: int
    unit_pages: int
    files: int
    bytes: int
    path: Path


# --- page contexts (pure: records in, dicts out) -----------------------------

class Pages:
    """Builds page contexts for one store snapshot; URLs are relative to each page."""

    def __init__(self, site_title: str, base_url: str, css: str, class_names: list[str], labels, js: str = ""):
        self.site_title, self.base_url, self.css, self.js = site_title, base_url, css, js
        self.class_names, self.labels = class_names, labels  # labels: [N] label of every example

    def common(self, page: str, crumbs: list[tuple[str, str]]) -> dict:
        return {"site_title": self.site_title, "css": urls.rel(page, self.css), "home": urls.rel(page, urls.HOME),
                "js": urls.rel(page, self.js) if self.js else "",
                "breadcrumbs": [{"text": text, "href": urls.rel(page, target)} for text, target in crumbs]}

    def label(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else "?"

    def home(self, models: list[ModelRecord], layers: dict[str, list[LayerRecord]], n_examples: int,
             dataset: str) -> dict:
        page = urls.HOME
        rows = [{"title": m.title, "href": urls.rel(page, urls.model_page(m.model)), "source": m.source,
                 "parameters": m.parameters, "accuracy": fmt_accuracy(m.accuracy),
                 "n_layers": len(layers[m.model]), "n_units": sum(l.n_units for l in layers[m.model])}
                for m in models]
        return {**self.common(page, []), "models": rows, "n_models": len(models),
                "n_layers": sum(len(v) for v in layers.values()),
                "n_units": sum(l.n_units for v in layers.values() for l in v),
                "n_examples": n_examples, "dataset": dataset}

    def model(self, m: ModelRecord, layers: list[LayerRecord], units: dict[str, list[UnitRecord]],
              all_units_map: dict | None = None, input_maps: dict[str, dict] | None = None,
              predictions: dict[int, tuple[int, float]] | None = None) -> dict:
        page = urls.model_page(m.model)
        index = {l.layer: i for i, l in enumerate(layers)}
        records = {(name, u.unit): u for name, us in units.items() for u in us}

        def unit_point(layer_name, unit, x, y):
            u = records[(layer_name, unit)]
            return {"x": x, "y": y, "colour": charts.PALETTE[index[layer_name] % len(charts.PALETTE)],
                    "title": f"{layer_name} unit {unit}: {u.label}",
                    "href": urls.rel(page, urls.unit_page(UnitId(m.model, layer_name, unit)))}

        def input_point(layer_name, example, x, y):
            label = int(self.labels[example])
            pred = (predictions or {}).get(example)
            return {"x": x, "y": y, "colour": charts.class_colour(label),
                    "title": f"example {example}: label {self.label(label)}"
                             + (f", predicted {self.label(pred[0])}" if pred else ""),
                    "thumb": urls.rel(page, urls.example_image(example))}
        facts = []
        if "test_accuracy" in m.info:
            facts.append(("Held-out test accuracy (training record)", fmt_accuracy(m.info["test_accuracy"])))
        for key in ("epochs", "train_examples", "train_seconds", "seed", "checkpoint"):
            if key in m.info:
                facts.append((key.replace("_", " ").capitalize(), str(m.info[key])))
        rows = [{"position": l.position, "name": l.layer, "href": urls.rel(page, urls.layer_page(m.model, l.layer)),
                 "module_type": l.module_type, "shape": shape_text(l.shape), "n_units": l.n_units,
                 **health_counts(units[l.layer])} for l in layers]
        heat_rows = [{"layer": l.layer, "href": urls.rel(page, urls.layer_page(m.model, l.layer)),
                      "units": [{"href": urls.rel(page, urls.unit_page(UnitId(m.model, l.layer, u.unit))),
                                 "activity": u.position_activity, "dead": u.dead, "saturated": u.saturated,
                                 "label": u.label} for u in units[l.layer]]} for l in layers]
        return {**self.common(page, [(m.title, page)]),
                "model": {"title": m.title, "source": m.source, "parameters": m.parameters,
                          "accuracy": fmt_accuracy(m.accuracy), "facts": facts},
                "layers": rows, "heatmap": charts.health_heatmap_svg(heat_rows),
                "unit_map": map_views(all_units_map or {}, unit_point),
                "input_maps": [{"layer": name, "id": f"in{i}", **map_views(points, input_point, INPUT_MAP_POINTS)}
                               for i, (name, points) in enumerate((input_maps or {}).items()) if points],
                "legend": [{"colour": charts.PALETTE[i % len(charts.PALETTE)], "text": l.layer}
                           for i, l in enumerate(layers)],
                "class_legend": [{"colour": charts.class_colour(i), "text": name}
                                 for i, name in enumerate(self.class_names)]}

    def thumb(self, page: str, u: UnitRecord, vis: VisualRecord | None) -> str | None:
        """A unit's picture: its feature visualization, else its top example."""
        if vis and vis.positive:
            return urls.rel(page, urls.media(vis.positive.image))
        return urls.rel(page, urls.example_image(u.top[0].example)) if u.top else None

    def layer(self, m: ModelRecord, layer: LayerRecord, units: list[UnitRecord],
              neighbours: tuple[LayerRecord | None, LayerRecord | None], visuals: dict[int, VisualRecord],
              unit_map: dict) -> dict:
        page = urls.layer_page(m.model, layer.layer)
        by_unit = {u.unit: u for u in units}

        def point(layer_name, unit, x, y):
            u = by_unit[unit]
            return {"x": x, "y": y, "colour": unit_colour(u), "title": f"unit {unit}: {u.label}",
                    "href": urls.rel(page, urls.unit_page(UnitId(m.model, layer.layer, unit))),
                    "thumb": self.thumb(page, u, visuals.get(unit))}

        cells = []
        for u in units:
            thumb = self.thumb(page, u, visuals.get(u.unit))
            cells.append({"unit": u.unit, "href": urls.rel(page, urls.unit_page(UnitId(m.model, layer.layer, u.unit))),
                          "thumb": thumb, "max": fmt(u.max), "mean": fmt(u.mean), "label": u.label,
                          "flags": u.flags})
        prev, nxt = (None if n is None else {"text": n.layer, "href": urls.rel(page, urls.layer_page(m.model, n.layer))}
                     for n in neighbours)
        return {**self.common(page, [(m.title, urls.model_page(m.model)), (layer.layer, page)]),
                "model_title": m.title, "units": cells, "prev": prev, "next": nxt,
                "unit_map": map_views(unit_map, point),
                "up": urls.rel(page, urls.model_page(m.model)),
                "layer": {"name": layer.layer, "module_type": layer.module_type, "shape": shape_text(layer.shape),
                          "n_units": layer.n_units, **health_counts(units)}}

    def unit(self, m: ModelRecord, layer: LayerRecord, u: UnitRecord, n_units: int,
             predictions: dict[int, tuple[int, float]], vis: VisualRecord | None = None,
             near: list[tuple[UnitRecord, float, VisualRecord | None]] = (), unit_map: dict | None = None) -> dict:
        uid = UnitId(m.model, layer.layer, u.unit)
        page = urls.unit_page(uid)

        def examples(records):
            out = []
            for t in records:
                pred = predictions.get(t.example)
                out.append({"example": t.example, "src": urls.rel(page, urls.example_image(t.example)),
                            "value": fmt(t.value), "value_raw": repr(float(t.value)),
                            "label": self.label(int(self.labels[t.example])),
                            "predicted": self.label(pred[0]) if pred else None,
                            "box": position_box(t.position, layer.spatial),
                            "heat": charts.heat_uri(t.map) if t.map is not None else None})
            return out

        def sibling(i: int):
            if not 0 <= i < n_units:
                return None
            return {"text": f"unit {i}", "href": urls.rel(page, urls.unit_page(UnitId(m.model, layer.layer, i)))}

        partner = None
        if u.redundant_with >= 0:
            partner = {**sibling(u.redundant_with), "corr": fmt(u.redundant_corr)}
        stats = [("Mean", fmt(u.mean)), ("Std", fmt(u.std)), ("Min", fmt(u.min)), ("Max", fmt(u.max)),
                 ("Active on (examples)", charts.percent(u.frac_active)),
                 ("Active on (positions)", charts.percent(u.position_activity)),
                 ("Class-selectivity index", fmt(u.selectivity)),
                 ("Top class", self.label(u.top_class) if u.top_class >= 0 else "—"),
                 ("Examples seen", f"{u.count:,}"), ("NaN/Inf activations", f"{u.nonfinite:,}")]
        permalink = urls.permalink(self.base_url, uid)
        return {**self.common(page, [(m.title, urls.model_page(m.model)),
                                     (layer.layer, urls.layer_page(m.model, layer.layer)), (str(u.unit), page)]),
                "model_title": m.title,
                "unit": {"id": str(uid), "unit": u.unit, "layer": layer.layer, "label": u.label, "flags": u.flags},
                "stats": stats, "partner": partner,
                "histogram": charts.histogram_svg(u.hist, u.hist_lo, u.hist_hi),
                "class_bars": charts.class_bars_svg(u.class_means, self.class_names, u.top_class),
                "permalink": permalink, "permalink_href": permalink if self.base_url else urls.rel(page, page),
                "top": examples(u.top), "bottom": examples(u.bottom), "featurevis": visual_context(page, vis),
                "neighbours": [{"href": urls.rel(page, urls.unit_page(UnitId(m.model, layer.layer, o.unit))),
                                "text": f"unit {o.unit}", "label": o.label, "similarity": fmt(sim),
                                "thumb": self.thumb(page, o, ovis)} for o, sim, ovis in near],
                "position": position_map(unit_map, u.unit),
                "map_href": urls.rel(page, urls.layer_page(m.model, layer.layer)) + "#unit-map",
                "prev": sibling(u.unit - 1), "next": sibling(u.unit + 1),
                "up": urls.rel(page, urls.layer_page(m.model, layer.layer))}


def visual_context(page: str, vis: VisualRecord | None) -> dict | None:
    """Links of a unit's feature visualization, negative image and weight heatmap (None if it has none)."""
    if vis is None:
        return None
    ctx = {"weights": urls.rel(page, urls.media(vis.weights)) if vis.weights else None}
    for kind, record in (("positive", vis.positive), ("negative", vis.negative)):
        ctx[kind] = None if record is None else {
            "image": urls.rel(page, urls.media(record.image)),
            "animation": urls.rel(page, urls.media(record.animation)) if record.animation else None,
            "activation": fmt(record.activation)}
    return ctx


MAX_POSITION_POINTS = 128  # larger layers: the unit page links to the layer's map instead of drawing it (page size)


def position_map(unit_map: dict | None, unit: int):
    """A small static UMAP of the layer with `unit` highlighted (no links, so it stays small)."""
    if not unit_map or len(unit_map["umap"]) > MAX_POSITION_POINTS:
        return None
    return charts.scatter_svg([{"x": x, "y": y, "colour": "#e0312b" if p == unit else "#b8c2cc",
                                "title": f"unit {p}", "highlight": p == unit} for _, p, x, y in unit_map["umap"]],
                              "umap", size=220, radius=3.0)


def unit_colour(u: UnitRecord) -> str:
    if u.dead:
        return "#111111"
    if u.saturated:
        return "#e0312b"
    if u.label.startswith("class-selective"):
        return charts.class_colour(u.top_class)
    return "#8a96a3"


INPUT_MAP_POINTS = 200  # per input map on the model page (one map per layer, all on one page)
MAX_MAP_POINTS = 1000  # points drawn per map; a larger map shows an evenly spread subset (said under it)


def map_views(points: dict, make_point, limit: int = MAX_MAP_POINTS) -> dict | None:
    """Both methods of a stored map as SVGs: {"umap", "pca", "note"}; make_point(layer, point, x, y) -> dict."""
    if not points:
        return None
    n = len(points["umap"])
    step = max(1, -(-n // limit))
    note = points["note"] + (f"; showing {len(range(0, n, step))} of its {n} points, evenly spread" if step > 1 else "")
    return {method: charts.scatter_svg([make_point(*row) for row in points[method][::step]], method)
            for method in ("umap", "pca")} | {"note": note}


def health_counts(units: list[UnitRecord]) -> dict[str, int]:
    return {"dead": sum(u.dead for u in units), "saturated": sum(u.saturated for u in units),
            "redundant": sum(u.redundant_with >= 0 for u in units),
            "nonfinite": sum(u.nonfinite > 0 for u in units)}


def shape_text(shape: tuple[int, ...]) -> str:
    return "×".join(str(s) for s in shape)


def position_box(position: int, spatial: tuple[int, int] | None) -> tuple[float, float, float, float] | None:
    """Where on the input a conv unit's max fell, as (left, top, width, height) percentages.

    The layer's grid is laid over the whole input image (each cell covers
    1/W x 1/H of it); the cell is an approximation of the receptive field's
    centre, which is what a reader needs to see where it fired.
    """
    if spatial is None or position < 0:
        return None
    h, w = spatial
    row, col = divmod(position, w)
    return (round(100 * col / w, 2), round(100 * row / h, 2), round(100 / w, 2), round(100 / h, 2))


# --- building the site ---------------------------------------------------------

def build_site(store: Store, site_dir: Path, site_title: str, base_url: str, progress: bool = True) -> SiteSummary:
    """Render every page from the store into a fresh tree and swap it in for `site_dir`."""
    site_dir = Path(site_dir)
    _check_replaceable(site_dir)
    site_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{site_dir.name}.", suffix=".tmp", dir=site_dir.parent))
    tmp.chmod(0o777 & ~atomic.UMASK)
    try:
        summary = _write_tree(store, tmp, site_title, base_url, progress)
        _swap_in(tmp, site_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary.path = site_dir
    return summary


def _write_tree(store: Store, out: Path, site_title: str, base_url: str, progress: bool) -> SiteSummary:
    assets = {}
    for name in ("style.css", "atlas.js"):
        data = (TEMPLATES / "static" / name).read_bytes()
        stem, ext = name.rsplit(".", 1)
        assets[name] = (urls.static(f"{stem}.{hashlib.sha1(data).hexdigest()[:10]}.{ext}"), data)
    pages = Pages(site_title, base_url, assets["style.css"][0], store.class_names(), store.labels(),
                  assets["atlas.js"][0])
    written: list[str] = []

    def write(path: str, html: str) -> None:
        atomic.write_text(out / path, html)
        written.append(path)

    models = store.models()
    layers = {m.model: store.layers(m.model) for m in models}
    meta = store.meta()
    write(urls.HOME, render("home.html", pages.home(models, layers, len(pages.labels), meta.get("dataset", ""))))
    unit_pages = 0
    total_units = sum(l.n_units for v in layers.values() for l in v)
    bar = tqdm(total=total_units, desc="render", unit="page", disable=not progress, leave=False)
    for m in models:
        model_layers = layers[m.model]
        all_units = {layer.layer: store.units(m.model, layer.layer) for layer in model_layers}
        predictions = store.predictions(m.model)
        input_maps = {layer.layer: store.map_points(m.model, layer.layer, "inputs") for layer in model_layers}
        write(urls.model_page(m.model), render("model.html", pages.model(
            m, model_layers, all_units, store.map_points(m.model, "", "units"), input_maps, predictions)))
        for i, layer in enumerate(model_layers):
            units = all_units[layer.layer]
            visuals = store.visuals(m.model, layer.layer)
            unit_map = store.map_points(m.model, layer.layer, "units")
            near = store.neighbours(m.model, layer.layer)
            neighbours = (model_layers[i - 1] if i > 0 else None,
                          model_layers[i + 1] if i + 1 < len(model_layers) else None)
            write(urls.layer_page(m.model, layer.layer),
                  render("layer.html", pages.layer(m, layer, units, neighbours, visuals, unit_map)))
            for u in units:
                close = [(units[o], sim, visuals.get(o)) for o, sim in near.get(u.unit, [])]
                ctx = pages.unit(m, layer, u, len(units), predictions, visuals.get(u.unit), close, unit_map)
                write(urls.unit_page(UnitId(m.model, layer.layer, u.unit)), render("unit.html", ctx))
                unit_pages += 1
                bar.update(1)
    bar.close()
    for path, data in assets.values():
        atomic.write_bytes(out / path, data)
    atomic.write_bytes(out / ".nojekyll", b"")
    atomic.write_bytes(out / MARKER, b"Built by Neuron Atlas; this folder is replaced on every build.\n")
    for path in store.media_files():
        src = store.media_dir / path
        if not src.is_file():
            raise AtlasError(f"the store lacks the media file {path} ({src}); rebuild with `atlas build`")
        dst = out / urls.media(path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(src, dst)
    files = [p for p in out.rglob("*") if p.is_file()]
    return SiteSummary(len(written), unit_pages, len(files), sum(p.stat().st_size for p in files), out)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _check_replaceable(site_dir: Path) -> None:
    if site_dir.exists() and (not site_dir.is_dir() or (any(site_dir.iterdir()) and not (site_dir / MARKER).exists())):
        raise AtlasError(f"site folder {str(site_dir)!r} exists and was not written by Neuron Atlas; "
                         f"refusing to replace it: choose another atlas.site_dir or remove it yourself")


def _swap_in(tmp: Path, site_dir: Path) -> None:
    """Replace site_dir by tmp with two renames; the old tree is deleted only after."""
    old = site_dir.with_name(f".{site_dir.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if site_dir.exists():
        os.replace(site_dir, old)
    os.replace(tmp, site_dir)
    shutil.rmtree(old, ignore_errors=True)
