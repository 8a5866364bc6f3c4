"""Website: store in, static site out.

Two halves, kept apart:
- pure rendering: `render(name, context)` turns a page context (plain
  dicts, every URL already relative) into an HTML string with Jinja2
  (autoescape on, so text from models and datasets is always escaped);
- `build_site` reads the store, builds each page's context, renders it, and
  writes the whole tree into a temporary folder beside the site, which is
  swapped in only when complete, so a failed build leaves the old site.

Pages: home, model, layer, one per unit (`<model>/<layer>/<unit>/`, with
its JSON export `data.json` beside it), input pages (`inputs/<example>/`),
search, about and 404; plus `.nojekyll`, and `sitemap.xml` when a base URL
is configured. Dataset images are linked once from the store's media folder
and referenced by every page. Static assets get a content hash in their
names. Reads only the store (never the model or the dataset), so the site
can be rebuilt without either. Every URL comes from urls.py.

Incremental: each file's key (the templates' hash and the page's context,
or the file's bytes) is kept in `.atlas-manifest.json`; a file whose key is
unchanged is hard-linked from the previous site instead of being rendered
and written again, so a re-run with nothing changed rewrites nothing (same
inodes, same mtimes), and a changed template re-renders only the pages.
The size report and budget (`site.budget_*`) are checked before the swap:
a site over budget fails the build and leaves the previous site in place.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import jinja2
import numpy as np
from .progress import bar as progress_bar

from . import architecture, atomic, charts, urls
from .config import SiteSection
from .errors import AtlasError
from .ids import UnitId
from .store import FeatureVisRecord, LayerRecord, ModelRecord, Store, UnitRecord, VisualRecord

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
    rendered: int = 0  # pages rendered this time (the others were unchanged, linked from the previous site)
    size_report: list[str] = field(default_factory=list)  # lines printed at the end of the build
    sizes: dict[str, int] = field(default_factory=dict, repr=False)  # every file's size


# --- page contexts (pure: records in, dicts out) -----------------------------

class Pages:
    """Builds page contexts for one store snapshot; URLs are relative to each page."""

    def __init__(self, site: SiteSection, css: str, class_names: list[str], labels, js: str = "",
                 search_js: tuple[str, str] = ("", "")):
        self.site, self.site_title, self.base_url = site, site.title, site.base_url
        self.css, self.js = css, js
        self.search_js = search_js  # (the search code, the index) as static paths
        self.class_names, self.labels = class_names, labels  # labels: [N] label of every example
        self.measure = "max"  # a unit's value on an input, over its positions (scan.reduce)
        self.objective = "channel"  # what feature vis optimized (featurevis.objective)

    def common(self, page: str, crumbs: list[tuple[str, str]], description: str = "",
               image: str | None = None) -> dict:
        """What every page has: header links, breadcrumbs, and Open Graph tags (absolute with a base URL)."""
        og = {"title": crumbs[-1][0] if crumbs else self.site_title, "site_name": self.site_title,
              "description": description or f"{self.site_title}: a neuron atlas built with Neuron Atlas",
              "url": urls.page_url(self.base_url, page) if self.base_url else "",
              "image": (urls.absolute(self.base_url, image) if self.base_url else urls.rel(page, image))
              if image else ""}
        return {"site_title": self.site_title, "css": urls.rel(page, self.css), "home": urls.rel(page, urls.HOME),
                "js": urls.rel(page, self.js) if self.js else "", "og": og,
                "nav": [{"text": text, "href": urls.rel(page, target), "current": target == page}
                        for text, target in (("Inputs", urls.INPUTS), ("Search", urls.SEARCH),
                                             ("About", urls.ABOUT))],
                "breadcrumbs": [{"text": text, "href": urls.rel(page, target)} for text, target in crumbs]}

    def label(self, label: int) -> str:
        """A dataset label's name; its index where the dataset names none ("class 417")."""
        if 0 <= label < len(self.class_names):
            return self.class_names[label]
        return f"class {label}" if label >= 0 else "unlabelled"

    def output_names(self, m: ModelRecord) -> list[str]:
        """The names of a model's output classes: its weights' categories, else the dataset's classes when
        there are as many as outputs, else none."""
        if m.info.get("classes"):
            return m.info["classes"]  # not copied: called for every example on every page
        return self.class_names if m.info.get("outputs") == len(self.class_names) else []

    def predicted(self, m: ModelRecord, index: int) -> str:
        """The name of a predicted class ("tiger"), or its index ("class 292") where none fits."""
        names = self.output_names(m)
        return names[index] if 0 <= index < len(names) else f"class {index}"

    def unit_class(self, m: ModelRecord, layer: LayerRecord, unit: int) -> str | None:
        """The class an output-layer unit stands for (its output index), None for other units."""
        names = self.output_names(m)
        if layer.layer != m.info.get("output_layer") or len(names) != m.info.get("outputs") or unit >= len(names):
            return None
        return names[unit]

    def home(self, models: list[ModelRecord], layers: dict[str, list[LayerRecord]], n_examples: int,
             dataset: str, featured: list[tuple[str, ModelRecord, UnitRecord, "VisualRecord | None"]] = (),
             n_inputs: int = 0) -> dict:
        page = urls.HOME
        rows = [{"title": m.title, "href": urls.rel(page, urls.model_page(m.model)), "source": m.source,
                 "parameters": m.parameters, "accuracy": fmt_accuracy(m.accuracy),
                 "n_layers": len(layers[m.model]), "n_units": sum(l.n_units for l in layers[m.model])}
                for m in models]
        cards = [{"why": why, "href": urls.rel(page, urls.unit_page(UnitId(m.model, u.layer, u.unit))),
                  "text": f"{m.title} · {u.layer} · unit {u.unit}", "label": u.label,
                  "thumb": self.thumb(page, u, vis)} for why, m, u, vis in featured]
        n_units = sum(l.n_units for v in layers.values() for l in v)
        return {**self.common(page, [], f"{len(models)} models, {n_units} units, each with its own page."),
                "models": rows, "n_models": len(models), "featured": cards,
                "n_layers": sum(len(v) for v in layers.values()), "n_units": n_units,
                "n_examples": n_examples, "dataset": dataset, "n_inputs": n_inputs,
                "search": urls.rel(page, urls.SEARCH), "inputs": urls.rel(page, urls.INPUTS)}

    def model(self, m: ModelRecord, layers: list[LayerRecord], units: dict[str, list[UnitRecord]],
              all_units_map: dict | None = None, input_maps: dict[str, dict] | None = None,
              predictions: dict[int, tuple[int, float]] | None = None,
              architecture_desc: dict | None = None) -> dict:
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
                             + (f", predicted {self.predicted(m, pred[0])}" if pred else ""),
                    "thumb": urls.rel(page, urls.example_image(example))}
        facts = []
        if "test_accuracy" in m.info:
            facts.append(("Held-out test accuracy (training record)", fmt_accuracy(m.info["test_accuracy"])))
        for key in ("epochs", "train_examples", "seed", "checkpoint"):
            if key in m.info:
                facts.append((key.replace("_", " ").capitalize(), str(m.info[key])))
        rows = [{"position": l.position, "name": l.layer, "href": urls.rel(page, urls.layer_page(m.model, l.layer)),
                 "module_type": l.module_type, "shape": shape_text(l.shape), "n_units": l.n_units,
                 "kind": layer_kind(l), "kind_type": layer_kind(l).split(" ")[0],
                 **health_counts(units[l.layer])} for l in layers]
        heat_rows = [{"layer": l.layer, "href": urls.rel(page, urls.layer_page(m.model, l.layer)),
                      "units": [{"href": urls.rel(page, urls.unit_page(UnitId(m.model, l.layer, u.unit))),
                                 "activity": u.position_activity, "dead": u.dead, "saturated": u.saturated,
                                 "label": u.label} for u in units[l.layer]]} for l in layers]
        return {**self.common(page, [(m.title, page)]),
                "model": {"title": m.title, "source": m.source, "parameters": m.parameters,
                          "accuracy": fmt_accuracy(m.accuracy), "facts": facts},
                "layers": rows, "heatmap": charts.health_heatmap_svg(heat_rows),
                "architecture": architecture.render(architecture_desc, {
                    l.layer: urls.rel(page, urls.layer_page(m.model, l.layer)) for l in layers}),
                "architecture_method": (architecture_desc or {}).get("method"),
                "unit_map": map_views(all_units_map or {}, unit_point),
                "input_maps": [{"layer": name, "id": f"in{i}", **map_views(points, input_point, INPUT_MAP_POINTS)}
                               for i, (name, points) in enumerate((input_maps or {}).items()) if points],
                "legend": [{"colour": charts.PALETTE[i % len(charts.PALETTE)], "text": l.layer}
                           for i, l in enumerate(layers)],
                "class_legend": [{"colour": charts.class_colour(i), "text": name}
                                 for i, name in enumerate(self.class_names)]}

    def thumb(self, page: str, u: UnitRecord, vis: VisualRecord | None) -> str | None:
        """A unit's picture, linked from `page`."""
        path = thumb_path(u, vis)
        return urls.rel(page, path) if path else None

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
                          "flags": u.flags, "class": self.unit_class(m, layer, u.unit)})
        prev, nxt = (None if n is None else {"text": n.layer, "href": urls.rel(page, urls.layer_page(m.model, n.layer))}
                     for n in neighbours)
        return {**self.common(page, [(m.title, urls.model_page(m.model)), (layer.layer, page)]),
                "model_title": m.title, "units": cells, "prev": prev, "next": nxt,
                "unit_map": map_views(unit_map, point),
                "fv_ratio": ratio_summary([featurevis_ratio(visuals.get(u.unit), u.top[0].value if u.top else None)
                                           for u in units]),
                "measure": self.measure_text(layer),
                "up": urls.rel(page, urls.model_page(m.model)),
                "layer": {"name": layer.layer, "module_type": layer.module_type, "shape": shape_text(layer.shape),
                          "kind": layer_kind(layer), "n_units": layer.n_units, **health_counts(units)}}

    def unit(self, m: ModelRecord, layer: LayerRecord, u: UnitRecord, n_units: int,
             predictions: dict[int, tuple[int, float]], vis: VisualRecord | None = None,
             near: list[tuple[UnitRecord, float, VisualRecord | None]] = (), unit_map: dict | None = None) -> dict:
        uid = UnitId(m.model, layer.layer, u.unit)
        page = urls.unit_page(uid)

        def examples(records):
            """The example cards, and their heat overlays as one sprite (None when there are no maps)."""
            out = []
            for t in records:
                pred = predictions.get(t.example)
                out.append({"example": t.example, "src": urls.rel(page, urls.example_image(t.example)),
                            "value": fmt(t.value), "value_raw": f"{float(t.value):.7g}",
                            "label": self.label(int(self.labels[t.example])),
                            "predicted": self.predicted(m, pred[0]) if pred else None,
                            "box": position_box(t.position - layer.prefix, layer.spatial), "heat": None,
                            "token": "the class token" if 0 <= t.position < layer.prefix else None,
                            "grid": layer.spatial if len(layer.shape) == 2 and layer.spatial[0] > 1 else None,
                            "attr": charts.signed_uri(t.attribution) if t.attribution is not None else None})
            mapped = [i for i, t in enumerate(records) if t.map is not None]
            if not mapped or len({records[i].map.shape for i in mapped}) > 1:
                return {"cards": out, "heat": None}
            uri, offsets = charts.heat_sprite([records[i].map for i in mapped])
            for i, y in zip(mapped, offsets):
                out[i]["heat"] = f"{y:.4g}"
            return {"cards": out, "heat": {"uri": uri, "rows": 100 * len(mapped)}}

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
        cls = self.unit_class(m, layer, u.unit)
        title = f"{layer.layer} {u.unit} · {cls}" if cls is not None else f"Unit {u.unit} of {layer.layer} in {m.title}"
        common = self.common(page, [(m.title, urls.model_page(m.model)),
                                    (layer.layer, urls.layer_page(m.model, layer.layer)), (str(u.unit), page)],
                             f"{u.label}; max {fmt(u.max)}, mean {fmt(u.mean)}, active on "
                             f"{charts.percent(u.frac_active)} of examples.", thumb_path(u, vis))
        common["og"]["title"] = title
        return {**common,
                "model_title": m.title, "cite": self.citation(uid, title, permalink),
                "json_href": urls.rel(page, urls.unit_json(uid)),
                "unit": {"id": str(uid), "unit": u.unit, "layer": layer.layer, "label": u.label, "flags": u.flags,
                         "label_score": label_score_text(u),
                         "kind": layer_kind(layer), "class": cls, "module_type": layer.module_type},
                "stats": stats, "partner": partner,
                "histogram": charts.histogram_svg(u.hist, u.hist_lo, u.hist_hi),
                "class_bars": charts.class_bars(u.class_means, self.class_names, u.top_class),
                "permalink": permalink, "permalink_href": permalink if self.base_url else urls.rel(page, page),
                "top": examples(u.top), "bottom": examples(u.bottom),
                "featurevis": visual_context(page, vis, u.top[0].value if u.top else None),
                "measure": self.measure_text(layer),
                "objective": (None if layer.spatial is None else  # flat: the objective is the value itself
                              "mean over positions" if self.objective == "channel" else "at the centre position"),
                "neighbours": [{"href": urls.rel(page, urls.unit_page(UnitId(m.model, layer.layer, o.unit))),
                                "text": f"unit {o.unit}", "label": o.label, "similarity": fmt(sim),
                                "thumb": self.thumb(page, o, ovis)} for o, sim, ovis in near],
                "position": position_map(unit_map, u.unit, page, urls.layer_dot_map(m.model, layer.layer)),
                "map_href": urls.rel(page, urls.layer_page(m.model, layer.layer)) + "#unit-map",
                "prev": sibling(u.unit - 1), "next": sibling(u.unit + 1),
                "up": urls.rel(page, urls.layer_page(m.model, layer.layer))}

    def measure_text(self, layer: LayerRecord) -> str:
        """What every activation of a unit's pages is: its max (or mean) over positions, or a flat unit's value."""
        if layer.spatial is None:
            return "the unit itself"
        over = "tokens" if len(layer.shape) == 2 else "positions"
        if self.measure == "cls" and len(layer.shape) == 2:
            return "its value on the class token"
        return f"its {'mean' if self.measure == 'mean' else 'maximum'} over {over}"

    def citation(self, uid: UnitId, title: str, permalink: str) -> dict:
        """BibTeX and plain-text citations of a unit, from the site's citation settings."""
        author = self.site.citation_author or self.site_title
        year = self.site.citation_year or source_date_year()
        key = re.sub(r"[^A-Za-z0-9]+", "-", f"atlas-{uid.model}-{uid.layer}-{uid.unit}").strip("-")
        safe = bibtex_safe
        version, built = self.site.version, source_date()
        built_text = built.strftime("%Y-%m-%d") if built else ""
        fields = [("title", safe(title)), ("author", safe(author)),
                  ("howpublished", f"{safe(self.site_title)}, \\url{{{safe(permalink)}}}")]
        if year:
            fields.append(("year", str(year)))
        if version:
            fields.append(("version", safe(version)))
        fields.append(("note", safe(f"Neuron Atlas unit {uid}" + (f", built {built_text}" if built_text else ""))))
        bibtex = "@misc{" + key + ",\n" + ",\n".join(f"  {k} = {{{v}}}" for k, v in fields) + "\n}"
        # the atlas named once: by its author(s) when there are some, else by its title alone
        atlas = self.site_title + (f", version {version}" if version else "") + (
            f", built {built_text}" if built_text else "")
        if self.site.citation_author:
            plain = f"{author}{f' ({year})' if year else ''}. {title}. {atlas}. {permalink}"
        else:
            plain = f"{title}. {atlas}{f' ({year})' if year else ''}. {permalink}"
        return {"bibtex": bibtex, "plain": plain, "relative": not self.base_url}

    def unit_export(self, m: ModelRecord, layer: LayerRecord, u: UnitRecord, vis: VisualRecord | None,
                    near: list[tuple[UnitRecord, float, VisualRecord | None]]) -> dict:
        """The unit's JSON export: every number its page shows; paths relative to the JSON file."""
        uid = UnitId(m.model, layer.layer, u.unit)
        path = urls.unit_json(uid)

        def ranked(records):
            return [{"rank": t.rank, "example": t.example, "value": finite(t.value),
                     "label": self.label(int(self.labels[t.example])), "position": t.position} for t in records]
        visual = visual_context(path, vis, u.top[0].value if u.top else None) or {}
        return {"id": str(uid), "model": m.model, "model_title": m.title, "layer": layer.layer,
                "example_images": urls.rel(path, urls.example_image(0)).replace("/0.webp", "/{example}.webp"),
                "module_type": layer.module_type, "unit": u.unit, "label": u.label, "flags": u.flags,
                "label_score": finite(u.label_score),
                "permalink": urls.permalink(self.base_url, uid), "page": urls.rel(path, urls.unit_page(uid)),
                "stats": {k: finite(getattr(u, k)) for k in ("count", "nonfinite", "mean", "std", "min", "max",
                                                             "frac_active", "position_activity", "selectivity")},
                "top_class": self.label(u.top_class) if u.top_class >= 0 else None,
                "dead": u.dead, "saturated": u.saturated,
                "redundant_with": u.redundant_with if u.redundant_with >= 0 else None,
                "redundant_corr": finite(u.redundant_corr),
                "histogram": {"lo": finite(u.hist_lo), "hi": finite(u.hist_hi), "counts": list(u.hist)},
                # the classes the page shows (all, or the 12 highest of ImageNet's 1,000: the whole
                # unit x class matrix would be 25 KB a unit; it stays in the store)
                "class_means": [{"index": i, "class": self.class_names[i] if i < len(self.class_names) else str(i),
                                 "mean": finite(u.class_means[i])} for i in charts.shown_classes(u.class_means)],
                "classes": len(u.class_means),
                "top": ranked(u.top), "bottom": ranked(u.bottom),
                "featurevis": {k: v for k, v in visual.items() if v}, "measure": self.measure_text(layer),
                "neighbours": [{"unit": o.unit, "similarity": finite(sim),
                                "page": urls.rel(path, urls.unit_page(UnitId(m.model, layer.layer, o.unit)))}
                               for o, sim, _ in near]}

    def input_page(self, example: int, models: list[ModelRecord], layers: dict[str, list[LayerRecord]],
                   per_model: dict[str, dict[str, list]], predictions: dict[str, dict[int, tuple[int, float]]],
                   neighbours: tuple[int | None, int | None],
                   explained: dict[str, tuple[dict, list[str]]] | None = None) -> dict:
        """One input: its image, label, each model's prediction and its attributions, each layer's most active
        units on it (with each one's attribution), and a ViT's attention. explained: model -> (this input's
        maps from `Store.input_maps`, the model's notes)."""
        page = urls.input_page(example)
        label = self.label(int(self.labels[example]))
        sections = []
        for m in models:
            pred = predictions.get(m.model, {}).get(example)
            maps, notes = (explained or {}).get(m.model, ({}, []))
            unit_attr = maps.get("unit", {})
            rows = []
            for layer in layers[m.model]:
                units = per_model.get(m.model, {}).get(layer.layer, [])
                if not units:
                    continue
                rows.append({"layer": layer.layer, "href": urls.rel(page, urls.layer_page(m.model, layer.layer)),
                             "units": [{"unit": unit, "value": fmt(value),
                                        "href": urls.rel(page, urls.unit_page(UnitId(m.model, layer.layer, unit))),
                                        "heat": charts.heat_uri(heat) if heat is not None else None,
                                        "attr": charts.signed_uri(unit_attr[(layer.layer, rank)])
                                        if (layer.layer, rank) in unit_attr else None}
                                       for rank, (unit, value, heat) in enumerate(units)]})
            predicted = self.predicted(m, pred[0]) if pred else None
            sections.append({"title": m.title, "href": urls.rel(page, urls.model_page(m.model)),
                             "predicted": predicted, "confidence": charts.percent(pred[1]) if pred else None,
                             "correct": bool(pred and predicted == label), "layers": rows,
                             "has_unit_attr": bool(unit_attr),
                             "why": [{"method": method, "uri": charts.signed_uri(a)}
                                     for method, a in maps.get("class", {}).items()],
                             "attention": [{"module": name, "heads": [charts.heat_uri(h) for h in heads]}
                                           for name, heads in maps.get("attention", {}).items()],
                             "rollout": charts.heat_uri(maps["rollout"]) if maps.get("rollout") is not None
                             else None,
                             "notes": notes})
        prev, nxt = ({"text": f"input {e}", "href": urls.rel(page, urls.input_page(e))} if e is not None else None
                     for e in neighbours)
        image = urls.example_image(example)
        return {**self.common(page, [("Inputs", urls.INPUTS), (f"Input {example}", page)],
                              f"Input {example} (label {label}): the most active units of every layer.", image),
                "example": example, "label": label, "src": urls.rel(page, image), "models": sections,
                "prev": prev, "next": nxt, "up": urls.rel(page, urls.INPUTS)}

    def inputs_index(self, examples: list[int], models: list[ModelRecord],
                     predictions: dict[str, dict[int, tuple[int, float]]]) -> dict:
        page = urls.INPUTS
        cells = []
        for e in examples:
            preds = [(m, predictions.get(m.model, {}).get(e)) for m in models]
            cells.append({"example": e, "href": urls.rel(page, urls.input_page(e)),
                          "src": urls.rel(page, urls.example_image(e)), "label": self.label(int(self.labels[e])),
                          "predictions": [f"{m.title}: {self.predicted(m, p[0])}" for m, p in preds if p]})
        return {**self.common(page, [("Inputs", page)], "Sampled inputs and the units that answer them."),
                "inputs": cells}

    def search(self) -> dict:
        page = urls.SEARCH
        return {**self.common(page, [("Search", page)], "Find a unit by model, layer, index, label or class."),
                "search_js": urls.rel(page, self.search_js[0]), "index_js": urls.rel(page, self.search_js[1])}

    def about(self, meta: dict[str, str], stages: dict[str, tuple[str, float]], counts: dict[str, int],
              open_data: dict[str, list[tuple[str, str]]] | None = None) -> dict:
        """How the atlas was built: config, versions, seeds, stage fingerprints (timings only when asked),
        and the open data's files with their columns (`Store.open_data_schema`)."""
        page = urls.ABOUT
        versions = json.loads(meta.get("versions", "{}"))
        built = source_date()
        return {**self.common(page, [("About", page)], "How this atlas was built."),
                "config": meta.get("config_toml", ""), "config_name": meta.get("config_name", ""),
                "versions": sorted(versions.items()), "seed": meta.get("seed", ""),
                "dataset": meta.get("dataset", ""), "counts": counts,
                "built": built.strftime("%Y-%m-%d %H:%M UTC") if built else None,
                "stages": [{"stage": name, "fingerprint": fp,
                            "seconds": f"{sec:.1f} s" if self.site.show_timings and sec is not None else None}
                           for name, (fp, sec) in stages.items()],
                "show_timings": self.site.show_timings,
                "open_data": [{"file": name, "href": urls.rel(page, urls.open_data(name)),
                               "columns": [{"name": c, "type": t} for c, t in columns]}
                              for name, columns in (open_data or {}).items()]}

    def not_found(self) -> dict:
        """The 404 page: GitHub Pages serves it at any depth, so its links are absolute when they can be.

        Its style is inlined (a relative stylesheet link breaks at depth); its
        links need `site.base_url` to work from a nested missing path.
        """
        page = urls.NOT_FOUND
        link = (lambda target: urls.page_url(self.base_url, target)) if self.base_url else \
            (lambda target: urls.rel(page, target))
        return {**self.common(page, [("Not found", page)]), "home": link(urls.HOME), "search": link(urls.SEARCH),
                "nav": [], "breadcrumbs": [], "css": link(self.css), "js": "",
                "inline_css": (TEMPLATES / "static" / "style.css").read_text(encoding="utf-8")}


def gone_page(pages: "Pages", path: str, uid: UnitId, layers: dict[str, list[LayerRecord]],
              models: list[ModelRecord]) -> dict:
    """The page left at a unit's old address when a rebuild no longer has it: pointing to its layer's page,
    else its model's, else home."""
    titles = {m.model: m.title for m in models}
    if any(l.layer == uid.layer for l in layers.get(uid.model, [])):
        target, what, text = urls.layer_page(uid.model, uid.layer), "its layer's page", f"{uid.layer} in {titles[uid.model]}"
    elif uid.model in titles:
        target, what, text = urls.model_page(uid.model), "its model's page", titles[uid.model]
    else:
        target, what, text = urls.HOME, "the home page", "home"
    return {**pages.common(path, [("No longer here", path)], f"{uid} is no longer in this atlas."),
            "unit_id": str(uid), "unit": uid.unit, "layer": uid.layer,
            "target": {"href": urls.rel(path, target), "what": what, "text": text}}


def thumb_path(u: UnitRecord, vis: VisualRecord | None) -> str | None:
    """A unit's picture (site-root path): its feature visualization, else its top example."""
    if vis and vis.positive:
        return urls.media(vis.positive.image)
    return urls.example_image(u.top[0].example) if u.top else None


def finite(value):
    """A number for JSON: None for NaN/Inf/None (JSON has no NaN); floats to 7 significant digits (the
    activations are float32: their 8th digit is noise), which keeps the export small."""
    if value is None:
        return None
    value = float(value) if not isinstance(value, (bool, int)) else value
    if isinstance(value, int):
        return value
    return float(f"{value:.7g}") if math.isfinite(value) else None


def bibtex_safe(text: str) -> str:
    """Text for a BibTeX field: braces and backslashes dropped, so a field cannot be closed early."""
    return re.sub(r"[{}\\]", "", text)


def source_date() -> datetime | None:
    """The build time pages may show: SOURCE_DATE_EPOCH only (so two builds give the same bytes)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    return datetime.fromtimestamp(int(epoch), tz=timezone.utc) if epoch.isdigit() else None


def source_date_year() -> int:
    built = source_date()
    return built.year if built else 0


def visual_context(page: str, vis: VisualRecord | None, best: float | None = None) -> dict | None:
    """Links of a unit's feature visualization, negative image and weight heatmap (None if it has none), with
    their activations and, given the top dataset example's value `best`, the positive one as a multiple of it."""
    if vis is None:
        return None
    ctx = {"weights": urls.rel(page, urls.media(vis.weights)) if vis.weights else None}
    for kind, record in (("positive", vis.positive), ("negative", vis.negative)):
        ctx[kind] = None if record is None else {
            "image": urls.rel(page, urls.media(record.image)),
            "animation": urls.rel(page, urls.media(record.animation)) if record.animation else None,
            "activation": fmt(record.activation),
            "objective": fmt(record.objective) if record.objective is not None else None, "ratio": None,
            "target": record.target}
    ctx["diverse"] = []
    for r in vis.diverse:
        ratio = activation_ratio(r, best)
        ctx["diverse"].append({"image": urls.rel(page, urls.media(r.image)), "activation": fmt(r.activation),
                               "ratio": f"{ratio:.2g}" if ratio is not None else None})
    ratio = featurevis_ratio(vis, best)
    if ctx["positive"] is not None and ratio is not None:
        ctx["positive"]["ratio"] = f"{ratio:.2g}"
    return ctx


def ratio_summary(ratios: list[float | None], bins: int = 20) -> dict | None:
    """The layer page's distribution of the units' feature-vis / top-example ratios (None where no unit has
    one): median, how many reach 1, and a histogram with a line at 1."""
    r = np.array([x for x in ratios if x is not None and math.isfinite(x)], dtype=np.float64)
    if not len(r):
        return None
    lo, hi = float(r.min()), float(r.max())
    counts = np.histogram(r, bins=bins, range=(lo, hi if hi > lo else lo + 1))[0]
    return {"median": f"{float(np.median(r)):.2g}", "n": len(r), "above": int((r >= 1).sum()),
            "chart": charts.histogram_svg(tuple(int(c) for c in counts), lo, hi if hi > lo else lo + 1,
                                          what="units' ratios", marker=1.0)}


def featurevis_ratio(vis: VisualRecord | None, best: float | None) -> float | None:
    """The feature visualization's activation over the top dataset example's (same measure); None where
    either is missing or the example's is not positive."""
    return activation_ratio(vis.positive if vis is not None else None, best)


def activation_ratio(record: FeatureVisRecord | None, best: float | None) -> float | None:
    """One optimized image's activation over the top dataset example's; None where either is missing or the
    example's is not positive."""
    if record is None or best is None or not best > 0 or not math.isfinite(best):
        return None
    return record.activation / best


def position_map(unit_map: dict | None, unit: int, page: str, layer_map: str) -> dict | None:
    """The unit's dot on the layer's small UMAP (`layer_map`, one SVG file per layer: see `dots_svg`), placed
    in percent of the map's box; None without a map."""
    if not unit_map or not unit_map["umap"]:
        return None
    points = unit_map["umap"]
    if "dots" not in unit_map:  # once per layer, not per unit page: unit -> its place
        places = charts.dot_places([(x, y) for _, _, x, y in points], DOT_MAP_SIZE)
        unit_map["dots"] = {p: place for (_, p, _, _), place in zip(points, places)}
    dot = unit_map["dots"].get(unit)
    return {"src": urls.rel(page, layer_map), "points": len(points),
            "dot": None if dot is None else (f"{100 * dot[0] / DOT_MAP_SIZE:.1f}", f"{100 * dot[1] / DOT_MAP_SIZE:.1f}")}


DOT_MAP_SIZE = 220  # px of the unit page's small map


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


def layer_kind(layer: LayerRecord) -> str:
    """What a layer is, for titles: "Conv2d+ReLU 64×112×112" (its module type and shape in older stores)."""
    return layer.title or f"{layer.module_type} {shape_text(layer.shape)}"


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


def featured_units(units: list[tuple[ModelRecord, UnitRecord]]) -> list[tuple[str, ModelRecord, UnitRecord]]:
    """The home page's picks: the most class-selective unit, the most active one (not saturated), a dead one."""
    picks = []
    selective = [(m, u) for m, u in units if u.label.startswith("class-selective") and u.selectivity is not None]
    if selective:
        picks.append(("Most class-selective", *max(selective, key=lambda mu: mu[1].selectivity)))
    lively = [(m, u) for m, u in units if not u.saturated and not u.dead and u.frac_active is not None]
    if lively:
        picks.append(("Most active", *max(lively, key=lambda mu: (mu[1].frac_active, mu[1].position_activity or 0))))
    dead = [(m, u) for m, u in units if u.dead]
    if dead:
        picks.append(("Dead", *dead[0]))
    return picks


def label_score_text(u: UnitRecord) -> dict | None:
    """The label's score as the unit page shows it: {"text", "title"}, or None when it has none."""
    if u.label_score is None:
        return None
    if u.label.startswith("class-selective"):
        return {"text": f"AUROC {u.label_score:.2f}",
                "title": "how well its activation tells this class from the others over the sampled examples "
                         "(area under the ROC curve: 0.5 chance, 1 perfect)"}
    return {"text": f"{100 * u.label_score:.0f}% of its top examples outside one class",
            "title": "the share of its top examples that are not of their most common class (0: one class)"}


def search_rows(units: list[tuple[ModelRecord, UnitRecord]], class_names: list[str]) -> list[list]:
    """The search index: one row per unit, [model, layer, unit, label, top class, flags, model title, url,
    label score (2 decimals) or None]."""
    rows = []
    for m, u in units:
        top = class_names[u.top_class] if 0 <= u.top_class < len(class_names) else ""
        rows.append([m.model, u.layer, u.unit, u.label, top, " ".join(u.flags), m.title,
                     urls.unit_dir(UnitId(m.model, u.layer, u.unit)) + "/index.html",
                     round(u.label_score, 2) if u.label_score is not None else None])
    return rows


def search_index(rows: list[list]) -> str:
    """The search index as the site ships it (search-index.js): the rows of `search_rows`, columnar.

    `window.ATLAS_SEARCH = {"models": [[model, title]...], "labels": [...], "classes": [...], "flags": [...],
    "layers": [[model code, layer, layer folder, units, label codes, class codes, flag codes, label scores]...]};`
    One entry of "layers" per run of consecutive rows of one layer; `units` is n when the run is units
    0..n-1 (the usual case), else their list; the codes index the string tables. A unit's page is
    `<layer folder>/<unit>/index.html` (static/search.js rebuilds the rows and their URLs), so ~30k units
    take a few hundred KB instead of ~3 MB. Tables are in order of first use: same rows, same bytes.
    """
    tables: dict[str, dict] = {"models": {}, "labels": {}, "classes": {}, "flags": {}}
    runs: list[list] = []
    for model, layer, unit, label, top, flags, title, url, score in rows:
        folder, unit_text, page = url.rsplit("/", 2)
        if (unit_text, page) != (str(unit), "index.html"):
            raise ValueError(f"search row of {model}/{layer}/{unit} has an unexpected url {url!r}")
        m = tables["models"].setdefault((model, title), len(tables["models"]))
        if not runs or runs[-1][:3] != [m, layer, folder]:
            runs.append([m, layer, folder, [], [], [], [], []])
        run = runs[-1]
        run[3].append(unit)
        run[7].append(score)
        for column, table, value in ((4, "labels", label), (5, "classes", top), (6, "flags", flags)):
            run[column].append(tables[table].setdefault(value, len(tables[table])))
    for run in runs:
        if run[3] == list(range(len(run[3]))):
            run[3] = len(run[3])
    index = {"models": [list(key) for key in tables["models"]],
             **{name: list(tables[name]) for name in ("labels", "classes", "flags")}, "layers": runs}
    text = json.dumps(index, separators=(",", ":"), ensure_ascii=True).replace("<", "\\u003c")  # never "</script>"
    return "window.ATLAS_SEARCH = " + text + ";\n"


# --- building the site ---------------------------------------------------------

MANIFEST = ".atlas-manifest.json"  # path -> key of every file of the last build (incremental rendering)
PERMALINKS = ".atlas-permalinks.json"  # path -> [model, layer, unit] of every unit page any build published


def previous_permalinks(previous: Path | None) -> dict[str, list]:
    """The unit addresses the previous site (and the builds before it) published; {} without one."""
    path = previous / PERMALINKS if previous is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, list) and len(v) == 3}


@lru_cache(maxsize=4)
def templates_key(folder: Path = TEMPLATES) -> str:
    """Hash of every template and static file: a change re-renders the pages."""
    h = hashlib.sha1()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


class Emitter:
    """Writes the new tree; a file whose key matches the previous build's is hard-linked from it instead.

    Keys: a page's key is the templates' hash plus its context (so rendering
    is skipped too); a data file's key is its bytes.
    """

    def __init__(self, out: Path, previous: Path | None):
        self.out, self.previous = out, previous
        self.old: dict[str, str] = {}
        if previous is not None and (previous / MANIFEST).is_file():
            try:
                self.old = json.loads((previous / MANIFEST).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self.old = {}
        self.keys: dict[str, str] = {}
        self.pages = self.rendered = 0
        self._folders: set[Path] = set()

    def target(self, path: str) -> Path:
        """Where `path` goes in the new tree, its folder made (once per folder)."""
        target = self.out / path
        if target.parent not in self._folders:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._folders.add(target.parent)
        return target

    def _write(self, path: str, data: bytes) -> None:
        """A plain write: the tree is new and swapped in whole, so each file needs no temp-and-rename of its own."""
        target = self.target(path)
        try:
            with open(target, "wb") as f:
                f.write(data)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(target)) from exc

    def _reuse(self, path: str, key: str) -> bool:
        self.keys[path] = key
        if self.old.get(path) != key or self.previous is None:
            return False
        src = self.previous / path
        if not src.is_file():
            return False
        _link_or_copy(src, self.target(path))
        return True

    def page(self, path: str, template: str, context: dict) -> None:
        self.pages += 1
        key = hashlib.sha1((templates_key() + template + json.dumps(context, sort_keys=True, default=str))
                           .encode()).hexdigest()
        if not self._reuse(path, key):
            self._write(path, render(template, context).encode("utf-8"))
            self.rendered += 1

    def data(self, path: str, data: bytes) -> None:
        if not self._reuse(path, hashlib.sha1(data).hexdigest()):
            self._write(path, data)

    def finish(self) -> None:
        data = json.dumps(self.keys, sort_keys=True, indent=0).encode()
        old = self.previous / MANIFEST if self.previous is not None else None
        if old is not None and old.is_file() and old.read_bytes() == data:
            _link_or_copy(old, self.out / MANIFEST)
        else:
            self._write(MANIFEST, data)


def build_site(store: Store, site_dir: Path, site: SiteSection | None = None, progress: bool = True) -> SiteSummary:
    """Render every page from the store into a fresh tree and swap it in for `site_dir`.

    Pages unchanged since the previous build are linked, not rendered. The
    budget is checked before the swap, so a site over budget leaves the old one.
    """
    site = site or SiteSection()
    site_dir = Path(site_dir)
    _check_replaceable(site_dir)
    site_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{site_dir.name}.", suffix=".tmp", dir=site_dir.parent))
    tmp.chmod(0o777 & ~atomic.UMASK)
    try:
        previous = site_dir if (site_dir / MARKER).is_file() else None
        summary = _write_tree(store, tmp, site, previous, progress)
        check_budget(tmp, site, summary.sizes)
        _swap_in(tmp, site_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary.path = site_dir
    return summary


def _write_tree(store: Store, out: Path, site: SiteSection, previous: Path | None, progress: bool) -> SiteSummary:
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
    index = search_index(search_rows(flat, class_names))
    for name, data in (("style.css", (TEMPLATES / "static" / "style.css").read_bytes()),
                       ("atlas.js", (TEMPLATES / "static" / "atlas.js").read_bytes()),
                       ("search.js", (TEMPLATES / "static" / "search.js").read_bytes()),
                       ("search-index.js", index.encode())):
        stem, ext = name.rsplit(".", 1)
        assets[name] = (urls.static(f"{stem}.{hashlib.sha1(data).hexdigest()[:10]}.{ext}"), data)
    pages = Pages(site, assets["style.css"][0], class_names, store.labels(), assets["atlas.js"][0],
                  (assets["search.js"][0], assets["search-index.js"][0]))
    meta = store.meta()
    pages.measure, pages.objective = meta.get("measure", "max"), meta.get("objective", "channel")
    predictions = {m.model: store.predictions(m.model) for m in models}
    inputs = store.input_examples()
    featured = [(why, m, u, visuals[m.model][u.layer].get(u.unit)) for why, m, u in featured_units(flat)]
    emit.page(urls.HOME, "home.html", pages.home(models, layers, len(pages.labels), meta.get("dataset", ""),
                                                 featured, len(inputs)))
    emit.page(urls.SEARCH, "search.html", pages.search())
    emit.page(urls.NOT_FOUND, "404.html", pages.not_found())
    unit_jobs = []  # (model, layer, units, layer visuals, neighbours, unit map, predictions) per layer
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
                              predictions[m.model]))
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
    for name, data in store.open_data().items():  # site/data/*.parquet (the about page documents them)
        emit.data(urls.open_data(name), data)
    emit.data(".nojekyll", b"")
    emit.data(MARKER, b"Built by Neuron Atlas; this folder is replaced on every build.\n")
    if site.base_url:
        emit.data(urls.SITEMAP, sitemap(site.base_url, sorted(emit.keys)).encode())
    for path in store.media_files():
        src = store.media_dir / path
        if not src.is_file():
            raise AtlasError(f"the store lacks the media file {path} ({src}); rebuild with `atlas build`")
        _link_or_copy(src, emit.target(urls.media(path)))
    # permalinks that last: every unit address any build published; one this build lacks gets a page there
    published = {urls.unit_page(UnitId(m.model, u.layer, u.unit)): [m.model, u.layer, u.unit] for m, u in flat}
    earlier = previous_permalinks(previous)
    for path, (model, layer, unit) in sorted(earlier.items()):
        if path not in published and path not in emit.keys:
            emit.page(path, "gone.html", gone_page(pages, path, UnitId(model, layer, unit), layers, models))
    emit.data(PERMALINKS, json.dumps({**earlier, **published}, sort_keys=True, indent=0).encode())
    emit.finish()
    sizes = _sizes(out)
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
    m, layer, units, layer_visuals, near, unit_map, predictions = jobs[job]
    for u in units[lo:hi]:
        close = [(units[o], sim, layer_visuals.get(o)) for o, sim in near.get(u.unit, [])]
        vis = layer_visuals.get(u.unit)
        uid = UnitId(m.model, layer.layer, u.unit)
        emit.page(urls.unit_page(uid), "unit.html", pages.unit(m, layer, u, len(units), predictions, vis, close,
                                                               unit_map))
        emit.data(urls.unit_json(uid), json.dumps(pages.unit_export(m, layer, u, vis, close), sort_keys=True,
                                                  separators=(",", ":"), allow_nan=False).encode())
    return hi - lo


def sitemap(base_url: str, paths: list[str]) -> str:
    """sitemap.xml of every HTML page, by its public folder URL (only with a base URL: it needs absolute URLs)."""
    from xml.sax.saxutils import escape as xml_escape

    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             '<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">']
    for path in paths:
        if path.endswith(".html") and path != urls.NOT_FOUND:
            lines.append(f"  <url><loc>{xml_escape(urls.page_url(base_url, path))}</loc></url>")
    return "\n".join(lines + ["</urlset>", ""])


def _sizes(out: Path) -> dict[str, int]:
    """Every file of a tree (site-root-relative POSIX path -> bytes), in one os.scandir walk."""
    sizes: dict[str, int] = {}
    stack = [("", str(out))]
    while stack:
        prefix, folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((prefix + entry.name + "/", entry.path))
                elif entry.is_file(follow_symlinks=False):
                    sizes[prefix + entry.name] = entry.stat(follow_symlinks=False).st_size
    return dict(sorted(sizes.items()))


def size_report(sizes: dict[str, int], models: list[str], unit_pages: int) -> list[str]:
    """Lines for the end of the build: total, per model (pages + feature-vis media), per unit page, the largest files."""
    total = sum(sizes.values())
    lines = [f"site size: {mb(total)} in {len(sizes):,} files"]
    for model in models:
        own = sum(v for k, v in sizes.items() if k.startswith(f"{model}/") or k.startswith(f"media/fv/{model}/"))
        lines.append(f"  {model}: {mb(own)} (pages, exports and feature-vis media)")
    shared = sum(v for k, v in sizes.items() if k.startswith("media/examples/"))
    lines.append(f"  dataset images (each stored once): {mb(shared)}")
    unit_html = [v for k, v in sizes.items() if k.count("/") >= 3 and k.endswith("/index.html")
                 and k.split("/")[0] in models]
    if unit_pages and unit_html:
        lines.append(f"  per unit page: {sum(unit_html) / len(unit_html) / 1024:.1f} KB on average "
                     f"(HTML), {total / unit_pages / 1024:.1f} KB of the whole site per unit")
    largest = sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    lines.append("  largest files: " + ", ".join(f"{k} ({mb(v)})" for k, v in largest))
    return lines


def mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def check_budget(out: Path, site: SiteSection, sizes: dict[str, int] | None = None) -> None:
    """Fail (before the swap) when the site or one of its files is over the configured budget."""
    sizes = _sizes(out) if sizes is None else sizes
    total = sum(sizes.values())
    if total > site.budget_total_mb * 1e6:
        raise AtlasError(f"the site is {mb(total)}, over site.budget_total_mb = {site.budget_total_mb} MB; "
                         f"probe fewer layers, lower featurevis.frames or scan.top_k, or raise the budget "
                         f"(the previous site is left as it was)")
    path, biggest = max(sizes.items(), key=lambda kv: kv[1], default=("", 0))
    if biggest > site.budget_file_mb * 1e6:
        raise AtlasError(f"{path} is {mb(biggest)}, over site.budget_file_mb = {site.budget_file_mb} MB "
                         f"(GitHub rejects files over 100 MB); raise the budget only if your host allows it "
                         f"(the previous site is left as it was)")


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
    """Replace site_dir by tmp: one exchange of the two names (Linux), else two renames; the old tree goes after."""
    if site_dir.exists() and atomic.exchange(tmp, site_dir):  # one atomic step where the OS can (Linux)
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old tree
        return
    old = site_dir.with_name(f".{site_dir.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if site_dir.exists():
        os.replace(site_dir, old)
    os.replace(tmp, site_dir)
    shutil.rmtree(old, ignore_errors=True)
