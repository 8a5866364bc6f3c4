"""The search index the site ships (search-index.js): one row per unit, packed columnar.

Owns the index's format (static/search.js reads it); not the search page itself.
"""

from __future__ import annotations

import json

from .. import urls
from ..ids import UnitId
from ..store import ModelRecord, UnitRecord
from .parts import frequent_tokens

SEARCH_TOKENS = 3  # a text unit's tokens in the index: the ones it fires on most often


def search_rows(units: list[tuple[ModelRecord, UnitRecord]], class_names: list[str],
                peak_tokens: dict[tuple[str, str, int], list[int]] | None = None,
                vocab: dict[int, str] | None = None) -> list[list]:
    """The search index: one row per unit, [model, layer, unit, label, top class, flags, model title, url,
    label score (2 decimals) or None, tokens]; tokens: for a text atlas, the SEARCH_TOKENS it fires on most
    often (whitespace visible: a space is ·), space-separated, else ""."""
    rows = []
    for m, u in units:
        top = class_names[u.top_class] if 0 <= u.top_class < len(class_names) else ""
        peaks = (peak_tokens or {}).get((m.model, u.layer, u.unit), [])
        tokens = " ".join(t for t, _ in frequent_tokens(peaks, vocab or {}, SEARCH_TOKENS))
        rows.append([m.model, u.layer, u.unit, u.label, top, " ".join(u.flags), m.title,
                     urls.unit_dir(UnitId(m.model, u.layer, u.unit)) + "/index.html",
                     round(u.label_score, 2) if u.label_score is not None else None, tokens])
    return rows


def search_index(rows: list[list]) -> str:
    """The search index as the site ships it (search-index.js): the rows of `search_rows`, columnar.

    `window.ATLAS_SEARCH = {"models": [[model, title]...], "labels": [...], "classes": [...], "flags": [...],
    "tokens": [...], "layers": [[model code, layer, layer folder, units, label codes, class codes, flag codes,
    label scores, token codes]...]};`
    One entry of "layers" per run of consecutive rows of one layer; `units` is n when the run is units
    0..n-1 (the usual case), else their list; the codes index the string tables. A unit's page is
    `<layer folder>/<unit>/index.html` (static/search.js rebuilds the rows and their URLs), so ~30k units
    take a few hundred KB instead of ~3 MB. Tables are in order of first use: same rows, same bytes.
    """
    tables: dict[str, dict] = {"models": {}, "labels": {}, "classes": {}, "flags": {}, "tokens": {}}
    runs: list[list] = []
    for model, layer, unit, label, top, flags, title, url, score, tokens in rows:
        folder, unit_text, page = url.rsplit("/", 2)
        if (unit_text, page) != (str(unit), "index.html"):
            raise ValueError(f"search row of {model}/{layer}/{unit} has an unexpected url {url!r}")
        m = tables["models"].setdefault((model, title), len(tables["models"]))
        if not runs or runs[-1][:3] != [m, layer, folder]:
            runs.append([m, layer, folder, [], [], [], [], [], []])
        run = runs[-1]
        run[3].append(unit)
        run[7].append(score)
        for column, table, value in ((4, "labels", label), (5, "classes", top), (6, "flags", flags),
                                     (8, "tokens", tokens)):
            run[column].append(tables[table].setdefault(value, len(tables[table])))
    for run in runs:
        if run[3] == list(range(len(run[3]))):
            run[3] = len(run[3])
    index = {"models": [list(key) for key in tables["models"]],
             **{name: list(tables[name]) for name in ("labels", "classes", "flags", "tokens")}, "layers": runs}
    text = json.dumps(index, separators=(",", ":"), ensure_ascii=True).replace("<", "\\u003c")  # never "</script>"
    return "window.ATLAS_SEARCH = " + text + ";\n"

