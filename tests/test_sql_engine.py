"""sql_engine: where the SQL page's engine files come from, on a stand-in node_modules (no npm needed)."""

from __future__ import annotations

import json
import re

import pytest

from atlas_builder import sql_engine
from atlas_builder.errors import AtlasError
from atlas_builder.website import render


def fake_node_modules(root, nested_arrow: bool = False):
    """npm's layout of the three packages, each file holding its own name; returns DuckDB-WASM's dist."""
    duckdb = root / "node_modules" / "@duckdb" / "duckdb-wasm"
    arrow = (duckdb if nested_arrow else root) / "node_modules" / "apache-arrow"
    parquet = root / "node_modules" / "parquet-wasm"
    for folder, names in ((duckdb / "dist", sql_engine.BUNDLE), (arrow, [sql_engine.ARROW]),
                          (parquet / "esm", sql_engine.PARQUET)):
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            (folder / name).write_text(name)
    for folder, version in ((duckdb, "1.32.0"), (arrow, "17.0.0"), (parquet, "0.8.0")):
        (folder / "package.json").write_text(json.dumps({"version": version}))
    return duckdb / "dist"


@pytest.mark.parametrize("nested_arrow", [False, True])
def test_engine_files_name_one_bundle_and_its_helpers(tmp_path, monkeypatch, nested_arrow):
    monkeypatch.setenv(sql_engine.ENV, str(fake_node_modules(tmp_path, nested_arrow)))
    files = sql_engine.engine_files()
    assert set(files) == {*sql_engine.BUNDLE, sql_engine.ARROW, "arrow.mjs", *sql_engine.PARQUET}
    for name, path in files.items():
        assert path.is_file()
        if name != "arrow.mjs":  # ours: the shim the import map points at
            assert path.read_text() == name
    assert files["arrow.mjs"] == sql_engine.ARROW_SHIM
    assert sql_engine.engine_version() == "1.32.0"


def test_not_installed_is_no_engine(tmp_path, monkeypatch):
    monkeypatch.setenv(sql_engine.ENV, str(tmp_path / "nowhere" / "dist"))
    assert sql_engine.engine_files() == {}
    assert sql_engine.engine_version() is None


def test_an_incomplete_install_says_how_to_reinstall(tmp_path, monkeypatch):
    dist = fake_node_modules(tmp_path)
    monkeypatch.setenv(sql_engine.ENV, str(dist))
    (dist / "duckdb-eh.wasm").unlink()
    with pytest.raises(AtlasError, match="duckdb-eh.wasm.*npm ci --prefix web"):
        sql_engine.engine_files()
    (dist / "duckdb-eh.wasm").write_text("")
    (tmp_path / "node_modules" / "parquet-wasm" / "package.json").unlink()
    with pytest.raises(AtlasError, match="parquet-wasm.*npm ci --prefix web"):
        sql_engine.engine_files()


def test_the_shim_exports_what_the_bundle_imports():
    """arrow.mjs must export each apache-arrow name duckdb-browser.mjs uses (when npm has installed it)."""
    files = sql_engine.engine_files()
    if not files:
        pytest.skip("DuckDB-WASM is not installed (npm ci --prefix web)")
    module = files["duckdb-browser.mjs"].read_text(encoding="utf-8")
    spaces = re.findall(r'import\s*\*\s*as\s*(\w+)\s*from\s*"apache-arrow"', module)
    assert spaces, "duckdb-browser.mjs no longer imports apache-arrow as a namespace: revisit arrow.mjs"
    code = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`(?:[^`\\]|\\.)*`', '""', module)  # no strings
    used = {name for ns in spaces for name in re.findall(rf"(?<![\w.$]){re.escape(ns)}\.([A-Za-z_]\w*)", code)}
    shim = re.search(r"export const \{([^}]*)\}", sql_engine.ARROW_SHIM.read_text()).group(1)
    assert used and used <= {name.strip() for name in shim.split(",")}, used


def test_without_the_engine_the_page_says_so_and_links_the_tables():
    """What templates/sql.html shows when engine_files() is {}."""
    html = render("sql.html", {"site_title": "t", "css": "s.css", "js": "", "home": "../index.html",
                               "og": {"title": "SQL", "site_name": "t", "description": "d", "url": "", "image": ""},
                               "nav": [], "breadcrumbs": [], "engine": {}, "sql_js": "../static/sql.js",
                               "tables": [{"name": "units", "href": "../data/units.parquet"}],
                               "examples": [{"title": "All", "sql": "FROM units"}]})
    assert 'href="../data/units.parquet"' in html and "not bundled" in html
    assert "sql.js" not in html and "importmap" not in html and "<textarea" not in html
