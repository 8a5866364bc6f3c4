"""Page models: for one store snapshot, each page's context (plain dicts, every URL relative to the page).

Pure: records in, dicts out; rendering them is rendering.py's, reading the
store and writing files builder.py's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
from markupsafe import escape

from .. import architecture, charts, text, urls
from ..config import SiteSection
from ..ids import UnitId
from ..store import LayerRecord, ModelRecord, UnitRecord, VisualRecord
from .parts import (INPUT_MAP_POINTS, bibtex_safe, featurevis_ratio, finite, fmt, fmt_accuracy, frequent_tokens,
                    health_counts, label_score_text, layer_kind, map_views, position_box, position_map, range_rows,
                    ratio_summary, shape_text, source_date, source_date_year, thumb_path, token_context, unit_colour,
                    visual_context)
from .rendering import TEMPLATES


@dataclass(frozen=True)
class UnitPage:
    """A unit's page model: the contexts of its page and embed card, and its JSON export (one build of each)."""
    html: dict
    embed: dict
    export: dict


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
        self.embed_css = urls.static("embed.css")  # the embed cards' own stylesheet (the builder's hashed name)
        self.windows: dict[int, np.ndarray] = {}  # a text dataset's shown windows (store.windows), else empty
        self.vocab: dict[int, str] = {}  # and its tokens' texts
        self.peak_tokens: dict[tuple[str, str, int], list[int]] = {}  # its units' tokens at their top examples' peaks
        self.embed_js = urls.static("embed.js")  # and their one renderer (it draws each card from its data.json)

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
                        for text, target in (("Inputs", urls.INPUTS), ("Search", urls.SEARCH), ("List", urls.LISTS),
                                             ("SQL", urls.SQL), ("About", urls.ABOUT))],
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
        if self.windows:  # a language model: its outputs are the next token's logits
            return text.visible(self.vocab.get(index, ""))
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
             n_inputs: int = 0, nested: list[tuple[str, str]] = ()) -> dict:
        """nested: [(folder, title)] of the other atlases whose sites are inside this one (`emit.nested_sites`)."""
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
                "n_examples": n_examples, "examples": "text windows" if self.windows else "examples",
                "dataset": dataset, "n_inputs": n_inputs, "placeholder": self.search_placeholder(),
                "search": urls.rel(page, urls.SEARCH), "inputs": urls.rel(page, urls.INPUTS),
                "nested": [{"title": title, "href": urls.rel(page, urls.nested_home(folder))} for folder, title in nested]}

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
        path = thumb_path(u, vis, not self.windows)
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
             near: list[tuple[UnitRecord, float, VisualRecord | None]] = (), unit_map: dict | None = None,
             sample: tuple[np.ndarray, np.ndarray] | None = None) -> "UnitPage":
        """One unit's page model, built once: the context of its page, of its embeddable card and its JSON
        export (every number the page shows). The three files share the unit's folder, so every relative
        link is the same in each. sample: (the unit's values, their example ids) on the first examples of the
        model's seeded sample (the list page plots units over these same inputs)."""
        uid = UnitId(m.model, layer.layer, u.unit)
        page = urls.unit_page(uid)
        best = u.top[0].value if u.top else None

        def ranked(records):  # columns, in rank order (a list of records would repeat every key 9 times)
            return {"example": [t.example for t in records], "value": [finite(t.value) for t in records],
                    "position": [t.position for t in records],
                    "label": [self.label(int(self.labels[t.example])) for t in records]}

        def classes(pairs, key: str):  # [(class index, value)] -> columns
            return {"index": [c for c, _ in pairs], "class": [self.predicted(m, c) for c, _ in pairs],
                    key: [finite(v) for _, v in pairs]}

        def cards(records, boxes: bool = True):
            """The example cards, and their heat overlays as one sprite (None when there are no maps)."""
            out = []
            if self.windows:  # a text dataset: each example is its tokens around where the unit fired
                scale = max((abs(r.value) for r in u.top if np.isfinite(r.value)), default=0.0)
                for t in records:
                    window = self.windows.get(t.example)
                    out.append({"example": t.example, "value": fmt(t.value), "value_raw": f"{float(t.value):.7g}",
                                "src": None, "label": "", "predicted": None, "box": None, "heat": None,
                                "token": None, "grid": None, "attr": None,
                                "context": [] if window is None else token_context(
                                    window, self.vocab, None if t.map is None else t.map.reshape(-1),
                                    # a range row's peak token too (no map: unshaded); silent on the
                                    # whole window (0: every token ties), no token to point at
                                    t.position if t.value != 0 else -1, scale)})
                return {"cards": out, "heat": None, "text": True}
            for t in records:
                pred = predictions.get(t.example)
                out.append({"example": t.example, "src": urls.rel(page, urls.example_image(t.example)),
                            "value": fmt(t.value), "value_raw": f"{float(t.value):.7g}",
                            "label": self.label(int(self.labels[t.example])),
                            "predicted": self.predicted(m, pred[0]) if pred else None,
                            "box": position_box(t.position - layer.prefix, layer.spatial) if boxes else None,
                            "heat": None,
                            "token": "the class token" if boxes and 0 <= t.position < layer.prefix else None,
                            "grid": layer.spatial if boxes and len(layer.shape) == 2 and layer.spatial[0] > 1
                            else None,
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

        ranges = [{"share": share, "range": fmt(lo) if lo == hi else f"{fmt(lo)} – {fmt(hi)}",
                   **cards(examples, boxes=False)} for share, lo, hi, examples in range_rows(u.ranges)]
        marks = tuple(r.lo for r in u.ranges[1:])
        effects = u.effects
        cls = self.unit_class(m, layer, u.unit)
        partner = {**sibling(u.redundant_with), "corr": fmt(u.redundant_corr)} if u.redundant_with >= 0 else None
        example, position = ("window", "tokens") if self.windows else ("example", "positions")
        stats = [("Mean", fmt(u.mean)), ("Std", fmt(u.std)), ("Min", fmt(u.min)), ("Max", fmt(u.max)),
                 (f"Active on ({example}s)", charts.percent(u.frac_active)),
                 (f"Active on ({position})", charts.percent(u.position_activity)),
                 *(() if self.windows else  # text windows have no classes
                   (("Class-selectivity index", fmt(u.selectivity)),
                    ("Top class", self.label(u.top_class) if u.top_class >= 0 else "—"))),
                 (f"{example.title()}s seen", f"{u.count:,}"), ("NaN/Inf activations", f"{u.nonfinite:,}")]
        permalink = urls.permalink(self.base_url, uid)
        title = f"{layer.layer} {u.unit} · {cls}" if cls is not None else f"Unit {u.unit} of {layer.layer} in {m.title}"
        visual = visual_context(page, vis, best)
        histogram = charts.histogram_svg(u.hist, u.hist_lo, u.hist_hi, marks=marks, counts_attr=True)
        common = self.common(page, [(m.title, urls.model_page(m.model)),
                                    (layer.layer, urls.layer_page(m.model, layer.layer)), (str(u.unit), page)],
                             f"{u.label}; max {fmt(u.max)}, mean {fmt(u.mean)}, active on "
                             f"{charts.percent(u.frac_active)} of examples.", thumb_path(u, vis, not self.windows))
        common["og"]["title"] = title
        unit = {"id": str(uid), "unit": u.unit, "layer": layer.layer, "label": u.label, "flags": u.flags,
                "label_score": label_score_text(u), "kind": layer_kind(layer), "class": cls,
                "module_type": layer.module_type}
        top = cards(u.top)
        peaks = self.peak_tokens.get((m.model, layer.layer, u.unit), [])
        fires_on = {"n": len(peaks), "tokens": [{"text": t, "count": c}
                                                for t, c in frequent_tokens(peaks, self.vocab)]} if peaks else None
        embed_src = urls.absolute(self.base_url, urls.unit_embed(uid)) if self.base_url else \
            urls.rel(page, urls.unit_embed(uid))
        html = {**common,
                "model_title": m.title, "cite": self.citation(uid, title, permalink),
                "json_href": urls.rel(page, urls.unit_json(uid)), "embed_href": urls.rel(page, urls.unit_embed(uid)),
                "embed_snippet": f'<iframe src="{embed_src}" width="420" height="560" '
                                 f'title="{escape(title)}" style="border:0"></iframe>',
                "lists_href": urls.rel(page, urls.LISTS),
                "unit": unit, "stats": stats, "partner": partner, "histogram": histogram,
                "class_bars": charts.class_bars(u.class_means, self.class_names, u.top_class),
                "effects": None if effects is None else {
                    "bars": charts.effect_bars([(self.predicted(m, c), v) for c, v in effects.up],
                                               [(self.predicted(m, c), v) for c, v in effects.down],
                                               "next token" if self.windows else "class"),
                    "exact": effects.exact, "tokens": bool(self.windows)},
                "permalink": permalink, "permalink_href": permalink if self.base_url else urls.rel(page, page),
                "top": top, "bottom": cards(u.bottom), "ranges": ranges, "range_bins": len(u.ranges),
                "fires_on": fires_on,
                "featurevis": visual, "measure": self.measure_text(layer),
                "objective": (None if layer.spatial is None else  # flat: the objective is the value itself
                              "mean over positions" if self.objective == "channel" else "at the centre position"),
                "neighbours": [{"href": urls.rel(page, urls.unit_page(UnitId(m.model, layer.layer, o.unit))),
                                "text": f"unit {o.unit}", "label": o.label, "similarity": fmt(sim),
                                "thumb": self.thumb(page, o, ovis)} for o, sim, ovis in near],
                "position": position_map(unit_map, u.unit, page, urls.layer_dot_map(m.model, layer.layer)),
                "map_href": urls.rel(page, urls.layer_page(m.model, layer.layer)) + "#unit-map",
                "prev": sibling(u.unit - 1), "next": sibling(u.unit + 1),
                "up": urls.rel(page, urls.layer_page(m.model, layer.layer))}
        embed = {"site_title": self.site_title, "unit": unit, "model_title": m.title,
                 "css": urls.rel(page, self.embed_css), "js": urls.rel(page, self.embed_js),
                 "json": urls.rel(urls.unit_embed(uid), urls.unit_json(uid)),
                 "title": f"{layer.layer} {u.unit} · {cls}" if cls is not None else f"Unit {u.unit} of {layer.layer}",
                 "page": urls.page_url(self.base_url, page) if self.base_url else urls.rel(page, page),
                 "featurevis": visual, "measure": self.measure_text(layer), "max": fmt(u.max), "mean": fmt(u.mean),
                 # a text unit's card shows its top 3 contexts as the page does (there are no images to draw)
                 "contexts": top["cards"][:3] if self.windows else []}
        shown = charts.shown_classes(u.class_means)
        export = {"id": str(uid), "model": m.model, "model_title": m.title, "layer": layer.layer,
                  "example_images": None if self.windows else  # text: its examples are tokens, not images
                  urls.rel(page, urls.example_image(0)).replace("/0.webp", "/{example}.webp"),
                  "unit_pages": urls.rel(page, urls.unit_page_pattern(m.model, layer.layer)),
                  "module_type": layer.module_type, "unit": u.unit, "label": u.label, "flags": u.flags,
                  "label_score": finite(u.label_score),
                  "label_score_text": None if unit["label_score"] is None else unit["label_score"]["text"],
                  "permalink": permalink,
                  "stats": {k: finite(getattr(u, k)) for k in ("count", "nonfinite", "mean", "std", "min", "max",
                                                               "frac_active", "position_activity", "selectivity")},
                  "top_class": self.label(u.top_class) if u.top_class >= 0 else None,
                  "dead": u.dead, "saturated": u.saturated,
                  "redundant_with": u.redundant_with if u.redundant_with >= 0 else None,
                  "redundant_corr": finite(u.redundant_corr),
                  "histogram": {"lo": finite(u.hist_lo), "hi": finite(u.hist_hi), "counts": list(u.hist)},
                  # the classes the page shows (all, or the 12 highest of ImageNet's 1,000: the whole
                  # unit x class matrix would be 25 KB a unit; it stays in the store)
                  "class_means": {"index": shown, "class": [self.class_names[i] if i < len(self.class_names)
                                                            else str(i) for i in shown],
                                  "mean": [finite(u.class_means[i]) for i in shown]},
                  "classes": len(u.class_means),
                  "top": ranked(u.top), "bottom": ranked(u.bottom),
                  **({"fires_on": {"token": [t["text"] for t in fires_on["tokens"]],
                                   "count": [t["count"] for t in fires_on["tokens"]]}} if fires_on else {}),
                  "ranges": {"lo": [finite(r.lo, 4) for r in u.ranges], "hi": [finite(r.hi, 4) for r in u.ranges],
                             "examples": [[t.example for t in r.examples] for r in u.ranges],
                             "values": [[finite(t.value, 4) for t in r.examples] for r in u.ranges],
                             **({"positions": [[t.position for t in r.examples] for r in u.ranges]}
                                if self.windows else {})},  # the token each peaked on
                  "effects": None if effects is None else {"exact": effects.exact, "up": classes(effects.up, "effect"),
                                                           "down": classes(effects.down, "effect")},
                  # float16 in the store: 4 significant digits say all of it
                  "sample": None if sample is None else {"examples": [int(e) for e in sample[1]],
                                                         "values": [finite(v, 4) for v in sample[0].tolist()]},
                  "featurevis": {k: v for k, v in (visual or {}).items() if v}, "measure": self.measure_text(layer),
                  "neighbours": {"unit": [o.unit for o, _, _ in near],
                                 "similarity": [finite(sim) for _, sim, _ in near]}}
        return UnitPage(html, embed, export)

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

    def search_placeholder(self) -> str:
        """The search box's hint: what its words match here."""
        return ('model, layer, unit, label or token (e.g. token:"(")' if self.windows
                else "model, layer, unit, label or class (e.g. class-selective)")

    def search(self, example: UnitId | None = None, example_class: str = "") -> dict:
        """example: a unit of this atlas, and example_class a class name, the help text's examples use."""
        page = urls.SEARCH
        return {**self.common(page, [("Search", page)], "Find a unit by model, layer, index, label or class."),
                "search_js": urls.rel(page, self.search_js[0]), "index_js": urls.rel(page, self.search_js[1]),
                "text": bool(self.windows), "sql": urls.rel(page, urls.SQL), "placeholder": self.search_placeholder(),
                "example": example,  # a class of several words is quoted, as the search takes it
                "example_class": f'"{example_class}"' if " " in example_class else example_class}

    def lists(self, lists_js: str) -> dict:
        """The list page (lists.html#model/layer/unit,...): units side by side, drawn by static/lists.js from
        their JSON exports and the search index."""
        page = urls.LISTS
        return {**self.common(page, [("List", page)], "Units side by side: their histograms overlaid and their "
                                                      "activations on the same inputs."),
                "index_js": urls.rel(page, self.search_js[1]), "lists_js": urls.rel(page, lists_js)}

    def sql(self, sql_js: str, engine: list[str], tables: list[str], examples: list[tuple[str, str]]) -> dict:
        """The SQL page: DuckDB-WASM (engine: its files' names under static/duckdb/, [] when not bundled) over
        the open data's Parquet files (tables: their names)."""
        page = urls.SQL
        return {**self.common(page, [("SQL", page)], "Query the atlas's open data with SQL, in the browser."),
                "sql_js": urls.rel(page, sql_js),
                "engine": {name: urls.rel(page, urls.sql_engine(name)) for name in engine},
                "tables": [{"name": name, "href": urls.rel(page, urls.open_data(f"{name}.parquet"))}
                           for name in tables],
                "examples": [{"title": title, "sql": sql} for title, sql in examples]}

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
                              for name, columns in (open_data or {}).items()],
                "database": urls.rel(page, urls.open_data("atlas.duckdb")), "sql": urls.rel(page, urls.SQL)}

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

