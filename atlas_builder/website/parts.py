"""Small pure helpers of the page models: numbers and text as pages show them, pictures, maps, health.

Records in, plain values out; no store, no files.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from datetime import datetime, timezone

import numpy as np

from .. import charts, text, urls
from ..store import FeatureVisRecord, LayerRecord, ModelRecord, RangeRecord, TopKRecord, UnitRecord, VisualRecord


def fmt(value: float | None, digits: int = 3) -> str:
    """Numbers as pages show them: 3 significant digits, '—' when unknown."""
    if value is None:
        return "—"
    return f"{value:.{digits}g}"


def fmt_accuracy(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def thumb_path(u: UnitRecord, vis: VisualRecord | None, images: bool = True) -> str | None:
    """A unit's picture (site-root path): its feature visualization, else its top example (with `images`:
    a text dataset's examples have none)."""
    if vis and vis.positive:
        return urls.media(vis.positive.image)
    return urls.example_image(u.top[0].example) if u.top and images else None


def finite(value, digits: int = 7):
    """A number for JSON: None for NaN/Inf/None (JSON has no NaN); floats to 7 significant digits (the
    activations are float32: their 8th digit is noise; 4 for the sample's float16 values), which keeps the
    export small."""
    if value is None:
        return None
    value = float(value) if not isinstance(value, (bool, int)) else value
    if isinstance(value, int):
        return value
    return float(f"{value:.{digits}g}") if math.isfinite(value) else None


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
    if u.label.startswith("fires on"):
        return {"text": f"{100 * u.label_score:.0f}% of its top examples peak on it",
                "title": "the share of its top examples whose highest token is this one"}
    return {"text": f"{100 * u.label_score:.0f}% of its top examples outside one class",
            "title": "the share of its top examples that are not of their most common class (0: one class)"}


def sql_quote(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


TEXT_QUERY_PHRASE = " the "  # the phrase of a text atlas's example query (units whose top contexts hold it)


def sql_examples(units: list[tuple[ModelRecord, UnitRecord]], class_names: list[str],
                 is_text: bool = False) -> list[tuple[str, str]]:
    """The SQL page's example queries, (title, SQL), naming a layer and a class this atlas has: those of its
    class-selective unit whose label scores best (AUROC; a near-dead unit can have selectivity 1); a text
    atlas's: search by text (the units whose top contexts hold a phrase) and by token."""
    examples = []
    if is_text:
        examples.append((f"The units whose top contexts most often hold {TEXT_QUERY_PHRASE!r} (search by text)",
                         "WITH context AS (\n"
                         "  SELECT w.example, string_agg(v.text, '' ORDER BY w.i) AS text\n"
                         "  FROM (SELECT example, unnest(tokens) AS token, generate_subscripts(tokens, 1) AS i "
                         "FROM windows) w\n"
                         "  JOIN vocab v USING (token) GROUP BY w.example)\n"
                         "SELECT x.model, x.layer, x.unit, count(*) AS contexts\n"
                         "FROM examples x JOIN context c USING (example)\n"
                         f"WHERE x.kind = 'top' AND c.text LIKE {sql_quote('%' + TEXT_QUERY_PHRASE + '%')}\n"
                         "GROUP BY ALL ORDER BY contexts DESC, x.model, x.layer, x.unit\nLIMIT 20"))
        examples.append(("The units labelled by the token they fire on, most often first",
                         "SELECT label, count(*) AS units, round(avg(label_score), 2) AS mean_score\n"
                         "FROM units WHERE label LIKE 'fires on %'\nGROUP BY label ORDER BY units DESC\nLIMIT 20"))
    selective = [(m, u) for m, u in units if u.label.startswith("class-selective") and u.selectivity is not None
                 and 0 <= u.top_class < len(class_names)]
    if selective:
        m, u = max(selective, key=lambda mu: (mu[1].label_score or 0, mu[1].selectivity))
        name = class_names[u.top_class]
        examples.append((f"The 20 most class-selective units of {u.layer} for class {name}",
                         "SELECT u.model, u.layer, u.unit, u.label, round(u.selectivity, 3) AS selectivity,\n"
                         "       round(u.label_score, 3) AS label_score\nFROM units u JOIN classes c ON c.label = u.top_class\n"
                         f"WHERE u.model = {sql_quote(m.model)} AND u.layer = {sql_quote(u.layer)} "
                         f"AND c.name = {sql_quote(name)}\nORDER BY u.selectivity DESC\nLIMIT 20"))
        examples.append((f"The units that push class {name} up most",
                         "SELECT e.model, e.layer, e.unit, round(e.effect, 4) AS effect, e.exact\n"
                         "FROM effects e JOIN classes c ON c.label = e.class\n"
                         f"WHERE e.direction = 'up' AND c.name = {sql_quote(name)}\nORDER BY e.effect DESC\nLIMIT 20"))
    examples.append(("Dead, saturated and redundant units per layer",
                     "SELECT model, layer, count(*) AS units, count(*) FILTER (WHERE dead) AS dead,\n"
                     "       count(*) FILTER (WHERE saturated) AS saturated, count(*) FILTER (WHERE redundant_with >= 0) AS redundant\n"
                     "FROM units GROUP BY model, layer ORDER BY model, layer"))
    examples.append(("The examples in the most units' top examples",
                     "SELECT x.example, c.name AS class, count(*) AS units\n"
                     "FROM examples x JOIN labels l USING (example) LEFT JOIN classes c ON c.label = l.label\n"
                     "WHERE x.kind = 'top'\nGROUP BY x.example, c.name\nORDER BY units DESC, x.example\nLIMIT 10"))
    return examples


def range_rows(ranges: tuple[RangeRecord, ...]) -> list[tuple[str, float, float, tuple[TopKRecord, ...]]]:
    """A unit page's rows across the activation range, highest first: (share of the sample, lo, hi, examples).
    Neighbouring bins of one and the same value (a ReLU's zeros fill several tenths) make one row, showing the
    examples of its highest bin; the share is in percent of the sample ("0–60 %")."""
    n = ranges[-1].bin + 1 if ranges else 0
    rows: list[list] = []
    for r in ranges:
        if rows and r.lo == r.hi == rows[-1][2] == rows[-1][3]:
            rows[-1][1], rows[-1][4] = r.bin, r.examples  # one more bin of the same value
        else:
            rows.append([r.bin, r.bin, r.lo, r.hi, r.examples])
    return [(f"{100 * first // n}–{100 * (last + 1) // n} %", lo, hi, examples)
            for first, last, lo, hi, examples in reversed(rows)]


CONTEXT_BEFORE, CONTEXT_AFTER = 24, 8  # tokens shown before and after the one a text example's value is at
SHADE_FROM = 0.05  # tokens below this share of the unit's top activation are left unshaded


def frequent_tokens(peaks: list[int], vocab: dict[int, str], n: int = 8) -> list[tuple[str, int]]:
    """[(token text, whitespace visible; count)] of the tokens at a unit's peaks (`Store.peak_tokens`), most
    often first (ties: the one of the higher-ranked example), at most n."""
    counts = Counter(peaks)  # insertion order = rank order, kept by most_common among equals
    return [(text.visible(vocab.get(t, "")), c) for t, c in counts.most_common(n)]


def token_context(tokens: np.ndarray, vocab: dict[int, str], values: np.ndarray | None, position: int,
                  scale: float) -> list[dict]:
    """A text example as the tokens around `position` (all of a short window from its start when there is
    none): each {"text", "level" (its activation / scale, 0-1, 1 decimal; None unshaded), "value", "max"}.
    Newlines and tabs show as ↵ and →; spaces stay spaces (a context reads as text)."""
    at = position if 0 <= position < len(tokens) else -1
    lo = max(0, at - CONTEXT_BEFORE) if at >= 0 else 0
    hi = min(len(tokens), (at if at >= 0 else CONTEXT_BEFORE) + CONTEXT_AFTER + 1)
    out = []
    for i in range(lo, hi):
        shown = text.visible(vocab.get(int(tokens[i]), ""), spaces=False)
        v = float(values[i]) if values is not None and i < len(values) else None
        level = None if v is None or not scale > 0 or v / scale < SHADE_FROM else round(min(v / scale, 1.0), 1)
        out.append({"text": shown, "level": level, "value": None if v is None else fmt(v), "max": i == at})
    return out
