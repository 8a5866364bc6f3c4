"""The SQL page (templates/sql.html, static/sql.js) in Chromium, with the vendored DuckDB-WASM (sql_engine).

A harness site, not the demo build: a few tiny tables with fixed values as data/*.parquet (written by
Python's DuckDB), the engine's files in static/duckdb/, and sql/index.html rendered from the template,
served by http.server from a subpath (http://127.0.0.1:PORT/atlas/sql/), as on a GitHub Pages project
site. The prefilled query (Run), an example (its button) and a typed one (Ctrl+Enter) run in the browser;
each table shown must be the same query's result from Python's DuckDB over the same files, cell by cell,
and nothing may go wrong in the browser (test_browser's `page` fixture: no console error, no failed
request, no HTTP error).

Skipped like test_browser.py (whose browser set-up it reuses) without playwright or chromium, and without
the engine (`make site` or `npm ci --prefix web` installs it); with $ATLAS_REQUIRE_BROWSER set, each
of those is a failure instead.
"""

from __future__ import annotations

import math
import os
import re
import shutil

import duckdb
import numpy as np
import pytest

import test_browser  # skips (or, with $ATLAS_REQUIRE_BROWSER, fails) this module as it does itself
from atlas_builder.sql_engine import engine_files
from atlas_builder.website import TEMPLATES, render
from playwright.sync_api import expect  # (test_browser has skipped this module when it is missing)
from test_browser import browser, context, demo, page, serving  # noqa: F401  (fixtures)

if hasattr(test_browser, "_browser_required"):  # no browser but one is required: fail here too
    _browser_required = test_browser._browser_required

ENGINE = engine_files()
if not ENGINE:
    if os.environ.get("ATLAS_REQUIRE_BROWSER"):
        @pytest.fixture(scope="module", autouse=True)
        def _engine_required():
            pytest.fail("SQL page test required ($ATLAS_REQUIRE_BROWSER) but DuckDB-WASM is not installed: "
                        "run `npm ci --prefix web` (or `make test`)", pytrace=False)
    else:
        pytest.skip("SQL page test skipped: DuckDB-WASM is not installed (run `npm ci --prefix web`, "
                    "or `make test` with npm available)", allow_module_level=True)

TABLES = {  # name: a query that makes it (fixed values; floats exact in binary)
    "units": """SELECT * FROM (VALUES
        ('cnn', 'conv1', 0, 9::BIGINT, 0.25::DOUBLE, 'class 3 detector', true, [1, 2, 3]),
        ('cnn', 'conv1', 1, 9007199254740993::BIGINT, -1.5, '<b>bold</b> & "quoted"', false, []),
        ('cnn', 'fc', 0, 3::BIGINT, NULL, NULL, NULL, [4]),
        ('mlp', 'fc1', 2, 0::BIGINT, 2.0, 'dead', true, NULL))
        AS t(model, layer, unit, count, mean, label, active, hist)""",
    "classes": "SELECT * FROM (VALUES (0, 'zero'), (3, 'three')) AS t(label, name)",
    "labels": "SELECT 1 AS example, 3 AS label WHERE false",  # no rows (an atlas without examples' labels)
}
EXAMPLES = [
    {"title": "Units per layer", "sql": "SELECT model, layer, count(*) AS units FROM units GROUP BY ALL ORDER BY ALL"},
    {"title": "Every unit", "sql": "SELECT unit, count, mean, label, active, hist, count * 2 AS twice "
                                   "FROM units ORDER BY model, layer, unit"},
]


def cell(value) -> str:
    """What sql.js shows for a value that Python's DuckDB returns."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):  # JavaScript's Number#toString for the values here (|v| >= 1e-7: positional)
        assert math.isfinite(value) and (value == 0 or 1e-7 <= abs(value) < 1e21), value
        return str(int(value)) if value.is_integer() else np.format_float_positional(value, trim="-")
    if isinstance(value, list):
        return "[" + ", ".join(cell(v) for v in value) + "]"
    return str(value)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The harness site at <tmp>/pub/atlas: data/, static/ (style, sql.js, duckdb/) and sql/index.html."""
    root = tmp_path_factory.mktemp("sql") / "pub" / "atlas"
    for folder in ("data", "static/duckdb", "sql"):
        (root / folder).mkdir(parents=True)
    con = duckdb.connect()
    for name, query in TABLES.items():
        con.execute(f"COPY ({query}) TO '{root / 'data' / name}.parquet' (FORMAT parquet, COMPRESSION zstd)")
    for name, source in ENGINE.items():
        shutil.copyfile(source, root / "static" / "duckdb" / name)
    for name in ("style.css", "sql.js"):
        shutil.copyfile(TEMPLATES / "static" / name, root / "static" / name)
    context = {"site_title": "SQL harness", "css": "../static/style.css", "js": "", "home": "../index.html",
               "og": {"title": "SQL", "site_name": "SQL harness", "description": "SQL page test",
                      "url": "", "image": ""},
               "nav": [{"text": "SQL", "href": "index.html", "current": True}],
               "breadcrumbs": [{"text": "SQL", "href": "index.html"}],
               "engine": {name: f"../static/duckdb/{name}" for name in ENGINE},
               "tables": [{"name": name, "href": f"../data/{name}.parquet"} for name in TABLES],
               "examples": EXAMPLES, "sql_js": "../static/sql.js"}
    (root / "sql" / "index.html").write_text(render("sql.html", context), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def base(site):
    """http://127.0.0.1:PORT/atlas/: http.server over the site's parent (like `make serve`: no range requests)."""
    with serving(site) as srv:
        yield srv.base


def expected(site, sql: str) -> tuple[list[str], list[list[str]]]:
    con = duckdb.connect()
    for name in TABLES:
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{site / 'data' / name}.parquet')")
    cursor = con.execute(sql)
    return [d[0] for d in cursor.description], [[cell(v) for v in row] for row in cursor.fetchall()]


def result_shown(page) -> tuple[list[str], list[list[str]]]:
    """Wait for the query to end; then the result table's header and cells, as text."""
    expect(page.locator("#sql-status")).to_have_text(re.compile(r" rows? in |^Error|could not"), timeout=30_000)
    return tuple(page.locator("#sql-table").evaluate(
        "t => [Array.from(t.tHead.rows[0].cells, c => c.textContent),"
        "      Array.from(t.tBodies[0].rows, r => Array.from(r.cells, c => c.textContent))]"))


def test_queries_run_in_duckdb_wasm_as_in_duckdb(page, base, site):
    page.goto(base + "sql/index.html")
    query, status = page.get_by_label("Query", exact=True), page.locator("#sql-status")
    assert query.input_value() == EXAMPLES[0]["sql"]
    page.get_by_role("button", name="Run", exact=True).click()
    assert result_shown(page) == expected(site, EXAMPLES[0]["sql"]), status.inner_text()

    page.get_by_role("button", name=EXAMPLES[1]["title"]).click()  # an example's button fills the box and runs it
    assert query.input_value() == EXAMPLES[1]["sql"]
    columns, rows = expected(site, EXAMPLES[1]["sql"])
    assert result_shown(page) == (columns, rows), status.inner_text()
    assert status.inner_text().startswith(f"{len(rows)} rows in ")
    assert "9007199254740993" in rows[1]  # a BIGINT beyond 2^53, in full
    assert page.locator("#sql-table tbody b").count() == 0  # a value's markup is text, never HTML

    sql = "SELECT count(*) AS n, count(DISTINCT c.name) AS named FROM labels l JOIN classes c USING (label)"
    query.fill(sql)
    query.press("Control+Enter")
    assert result_shown(page) == expected(site, sql) == (["n", "named"], [["0", "0"]]), status.inner_text()


def test_demo_sql_page_answers_its_example_as_duckdb_does(page, demo):
    """The demo atlas's own SQL page (built with the engine, served from a subpath): its first example (the
    most class-selective units of a layer for a class) and an example on effects, run in the browser, give
    the rows Python's DuckDB gives over the site's Parquet files."""
    from atlas_builder.store import Store

    site = demo.atlas.site_dir
    data = site / "data"
    con = duckdb.connect()
    for name in Store.OPEN_DATA:
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{data / name}.parquet')")
    with serving(site) as srv:
        page.goto(srv.base + "sql/index.html")
        buttons = page.locator(".sql-examples button")
        titles = buttons.all_inner_texts()
        assert titles[0].startswith("The 20 most class-selective units of ")
        for i in (0, 1):
            buttons.nth(i).click()
            sql = page.get_by_label("Query", exact=True).input_value()
            cursor = con.execute(sql)
            want = ([d[0] for d in cursor.description], [[cell(v) for v in row] for row in cursor.fetchall()])
            assert want[1], f"the demo's example {titles[i]!r} finds no rows"
            assert result_shown(page) == want, page.locator("#sql-status").inner_text()
