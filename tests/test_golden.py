"""Golden test: the pages of a tiny synthetic site equal the copies checked in under tests/golden/.

The store is the render bench's synthetic one (`bench/render.py` `write_store`,
seed 0, 16 units in five layers), written through the Store API from a seeded
numpy generator, with no torch computation, so the pages come out the same on
every machine. A change to a template, a page context, a chart or a URL
changes some golden page: read the diff the failure prints, and when it is
what you meant, rewrite the copies with

    ATLAS_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py

and commit them with the change.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from pathlib import Path

import pytest

from atlas_builder import website
from atlas_builder.config import SiteSection
from atlas_builder.sql_engine import engine_files
from atlas_builder.store import Store

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
SITE = SiteSection(title="Golden atlas", base_url="https://example.org/atlas/", citation_author="A. Researcher",
                   citation_year=2026, input_pages=50)
PAGES = [  # one of each page type, and the files a host or a script reads
    "index.html", "synthetic-cnn/conv1/index.html", "synthetic-cnn/fc/index.html",
    "synthetic-cnn/conv1/0/index.html", "synthetic-cnn/conv1/0/data.json", "synthetic-cnn/fc/0/index.html",
    "synthetic-cnn/conv1/0/embed.html", "lists.html", "sql/index.html",
    "inputs/index.html", "404.html", "sitemap.xml",
]


def render_bench():
    spec = importlib.util.spec_from_file_location("render_bench", REPO / "bench" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def golden_site(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("golden")
    saved = os.environ.pop("SOURCE_DATE_EPOCH", None)
    try:
        render_bench().write_store(tmp / "store", 16, seed=0)
        with Store(tmp / "store", read_only=True) as store:
            website.build_site(store, tmp / "site", SITE, progress=False)
    finally:
        if saved is not None:
            os.environ["SOURCE_DATE_EPOCH"] = saved
    return tmp / "site"


def first_input_page(site: Path) -> str:
    pages = sorted(p.relative_to(site).as_posix() for p in (site / "inputs").glob("*/index.html"))
    assert len(pages) == 50
    return pages[0]


@pytest.mark.parametrize("page", PAGES + ["<first input page>"])
def test_page_equals_its_golden_copy(golden_site, page):
    if page == "<first input page>":
        page = first_input_page(golden_site)
    if page == "sql/index.html" and not engine_files():
        pytest.skip("the golden SQL page has the engine (DuckDB-WASM, `npm ci --prefix web`), this checkout not")
    built = golden_site / page
    assert built.is_file(), f"the site has no {page}"
    copy = GOLDEN / page.replace("/", "__")
    text = built.read_text(encoding="utf-8")
    if os.environ.get("ATLAS_UPDATE_GOLDEN"):
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(text, encoding="utf-8")
    assert copy.is_file(), f"no golden copy of {page}; run with ATLAS_UPDATE_GOLDEN=1 to write it"
    want = copy.read_text(encoding="utf-8")
    if text != want:
        diff = "".join(list(difflib.unified_diff(want.splitlines(True), text.splitlines(True), f"golden/{copy.name}",
                                                 f"built/{page}", n=1))[:80])
        pytest.fail(f"{page} differs from its golden copy (first lines of the diff below); if the change is "
                    f"meant, rewrite the copies with ATLAS_UPDATE_GOLDEN=1\n{diff}")


def test_golden_copies_are_all_used():
    """No stale copy of a page that is no longer compared."""
    names = {p.replace("/", "__") for p in PAGES}
    stale = [p.name for p in GOLDEN.iterdir() if p.name not in names and not p.name.startswith("inputs__")]
    assert not stale, f"golden copies no test compares: {stale}"
