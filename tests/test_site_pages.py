"""The site beyond unit pages: input pages, search, about, 404, sitemap, citations, JSON exports,
Open Graph tags, incremental rendering, the size report and budget, basic accessibility."""

from __future__ import annotations

import json
import re
from html import unescape
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from atlas_builder import urls, website
from atlas_builder.build import build
from atlas_builder.config import SiteSection, load_config
from atlas_builder.errors import AtlasError
from atlas_builder.ids import UnitId
from atlas_builder.store import Store
from atlas_builder.website.parts import range_rows
from conftest import TINY_MODELS, atlas_section, write_config
from test_search_scale import decode
from sitecheck import broken_links, read_page

BASE = "https://example.org/atlas/"
SITE = f"""
[site]
title = "Tiny <atlas>"
base_url = "{BASE}"
citation_author = "Ada Lovelace and Alan Turing"
citation_year = 2026
version = "1.0"
input_pages = 6
[dataset]
source = "fixtures_models:tiny_dataset"
[scan]
top_k = 3
batch_size = 16
[featurevis]
steps = 8
frames = 4
[embed]
enabled = true
""" + TINY_MODELS


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pages")
    cfg = load_config(write_config(tmp, atlas_section(tmp, "pages") + SITE))
    report = build(cfg, progress=False)
    return cfg, report


def site_of(built) -> Path:
    return built[0].atlas.site_dir


def all_units(cfg):
    with Store(cfg.store_dir, read_only=True) as store:
        return [(m, l, u) for m in store.models() for l in store.layers(m.model) for u in store.units(m.model, l.layer)]


def test_every_link_resolves_and_pages_exist(built):
    site = site_of(built)
    assert broken_links(site) == []
    for page in (urls.HOME, urls.SEARCH, urls.ABOUT, urls.INPUTS, urls.NOT_FOUND, ".nojekyll", urls.SITEMAP):
        assert (site / page).is_file(), page


def test_input_pages_show_each_layers_most_active_units(built):
    cfg, _ = built
    site = site_of(built)
    with Store(cfg.store_dir, read_only=True) as store:
        examples = store.input_examples()
        per_model = {m.model: store.input_units(m.model) for m in store.models()}
        layers = {m.model: [l.layer for l in store.layers(m.model)] for m in store.models()}
    assert len(examples) == 6 and examples == sorted(examples)
    index = read_page(site / urls.INPUTS)
    assert [a["href"] for a in index.find("a") if a["href"].split("/")[0].isdigit()] == \
        [f"{e}/index.html" for e in examples]
    for e in examples:
        page = read_page(site / urls.input_page(e))
        for model, by_example in per_model.items():
            assert list(by_example[e]) == layers[model]  # every layer, in model order
            for layer, units in by_example[e].items():
                values = [v for _, v, _ in units]
                assert values == sorted(values, reverse=True)  # most active first
                for unit, _, heat in units:
                    href = urls.rel(urls.input_page(e), urls.unit_page(UnitId(model, layer, unit)))
                    assert href in page.links
                    assert (heat is not None) == (model == "tiny-cnn" and layer != "fc")
        assert len(page.find("img", cls="heat")) == 8 * 0 + sum(
            len(u) for layer, u in per_model["tiny-cnn"][e].items() if layer != "fc")


def test_input_activations_match_a_direct_forward(built):
    cfg, _ = built
    import torch

    from atlas_builder.sources import load_dataset, load_model

    dataset = load_dataset(cfg)
    model = load_model(cfg.models[0], cfg)
    with Store(cfg.store_dir, read_only=True) as store:
        stored = store.input_units("tiny-cnn")
    e = next(iter(stored))
    x = torch.as_tensor(dataset.data[e][0])[None]
    with torch.inference_mode():
        values = model.module.conv(x).flatten(2).amax(2)[0]  # the tiny CNN's first module: its spatial max
    order = torch.argsort(values, descending=True, stable=True)[:len(stored[e]["conv"])]
    assert [u for u, _, _ in stored[e]["conv"]] == order.tolist()
    assert [v for _, v, _ in stored[e]["conv"]] == pytest.approx(values[order].tolist(), rel=1e-5)


def test_search_index_lists_every_unit_and_the_page_loads_it(built):
    cfg, _ = built
    site = site_of(built)
    search = read_page(site / urls.SEARCH)
    scripts = [a["src"] for a in search.find("script") if a.get("src")]
    index_files = [s for s in scripts if "search-index." in s]
    assert len(index_files) == 1 and any("search." in s and "index" not in s for s in scripts)
    text = (site / "search" / index_files[0]).resolve().read_text()
    rows = decode(text)
    expected = {(m.model, l.layer, u.unit, u.label) for m, l, u in all_units(cfg)}
    assert {(r[0], r[1], r[2], r[3]) for r in rows} == expected
    for r in rows:  # each row's url is a unit page, relative to the site root
        assert r[7] == urls.unit_page(UnitId(r[0], r[1], r[2])) and (site / r[7]).is_file()
    home = read_page(site / urls.HOME)
    assert home.find("form", action="search/index.html") and home.find("input", name="q")


def test_unit_json_export_has_the_pages_numbers(built):
    cfg, _ = built
    site = site_of(built)
    for m, l, u in all_units(cfg):
        uid = UnitId(m.model, l.layer, u.unit)
        data = json.loads((site / urls.unit_json(uid)).read_text())
        assert data["id"] == str(uid) and data["label"] == u.label
        assert data["stats"]["max"] == pytest.approx(u.max) and data["stats"]["count"] == u.count
        assert data["top"]["example"] == [t.example for t in u.top]  # columns, in rank order
        assert data["top"]["value"] == [pytest.approx(t.value, rel=1e-6) for t in u.top]
        assert data["bottom"]["example"] == [t.example for t in u.bottom]
        assert data["bottom"]["position"] == [t.position for t in u.bottom]
        assert data["histogram"]["counts"] == list(u.hist)
        assert data["permalink"] == f"{BASE}{uid.model}/{l.layer}/{u.unit}/"
        folder = (site / urls.unit_json(uid)).parent
        images = [data["example_images"].format(example=e) for e in data["top"]["example"]]  # one pattern
        pages = [data["unit_pages"].format(unit=n) for n in data["neighbours"]["unit"] + [u.unit]]
        for path in images + [v for k, v in data["featurevis"].items() if isinstance(v, str)] + pages:
            assert (folder / path).resolve().is_file(), path
        page = read_page(site / urls.unit_page(uid))
        assert "data.json" in page.links


def test_unit_page_permalink_citation_and_open_graph(built):
    site = site_of(built)
    uid = UnitId("tiny-cnn", "conv", 2)
    html = (site / urls.unit_page(uid)).read_text()
    page = read_page(site / urls.unit_page(uid))
    permalink = f"{BASE}tiny-cnn/conv/2/"
    assert page.find("a", cls="permalink", href=permalink)
    meta = {a.get("property"): a.get("content") for a in page.find("meta") if a.get("property")}
    assert meta["og:url"] == permalink and meta["og:title"].startswith("Unit 2 of conv")
    assert meta["og:image"].startswith(BASE + "media/")  # absolute, so a pasted link previews
    assert page.find("link", rel="canonical", href=permalink)
    bibtex = re.search(r'<pre class="cite-bibtex">(.*?)</pre>', html, re.S).group(1)
    assert bibtex.startswith("@misc{atlas-tiny-cnn-conv-2,")
    assert "author = {Ada Lovelace and Alan Turing}" in bibtex and "year = {2026}" in bibtex
    assert f"\\url{{{permalink}}}" in bibtex
    assert "Tiny &lt;atlas&gt;" in html and "Tiny <atlas>" not in html  # the title is escaped everywhere
    assert bibtex.count("{") == bibtex.count("}")
    assert "version = {1.0}" in bibtex
    plain = re.search(r'<p class="cite-plain">(.*?)</p>', html, re.S).group(1)
    # the atlas named once, with its version; the absolute permalink (no note asking for site.base_url)
    assert plain == ("Ada Lovelace and Alan Turing (2026). Unit 2 of conv in tiny-cnn. Tiny &lt;atlas&gt;, "
                     f"version 1.0. {permalink}")
    assert "set <code>site.base_url</code>" not in html
    twitter = {a.get("name"): a.get("content") for a in page.find("meta") if (a.get("name") or "").startswith("twitter")}
    assert twitter["twitter:image"] == meta["og:image"] and twitter["twitter:title"] == meta["og:title"]


def test_sitemap_lists_every_page_by_its_public_url(built):
    site = site_of(built)
    root = ET.parse(site / urls.SITEMAP).getroot()
    locs = {e.text for e in root.iter("{http://www.sitemaps.org/schemas/sitemap/0.9}loc")}
    pages = {p.relative_to(site).as_posix() for p in site.rglob("*.html")} - {urls.NOT_FOUND}
    assert locs == {urls.page_url(BASE, p) for p in pages}
    assert f"{BASE}tiny-cnn/conv/0/" in locs and BASE in locs


def test_404_links_are_absolute_with_a_base_url(built):
    page = read_page(site_of(built) / urls.NOT_FOUND)
    assert page.find("a", href=BASE) and all(h.startswith(BASE) for h in page.links)


def test_about_page_shows_config_versions_seed_and_no_timings(built):
    cfg, _ = built
    html = (site_of(built) / urls.ABOUT).read_text()
    page = read_page(site_of(built) / urls.ABOUT)
    from importlib.metadata import version
    assert f"torch {version('torch')}" in page.text and "scan:tiny-cnn" in page.text
    assert "citation_author = &#34;Ada Lovelace and Alan Turing&#34;" in html  # the config, escaped
    assert not re.search(r"\d+\.\d s<", html)  # timings only with site.show_timings


def test_home_features_units(built):
    from atlas_builder.website import featured_units

    home = read_page(site_of(built) / urls.HOME)
    featured = [a["href"] for a in home.find("a") if a["href"].count("/") == 3]
    assert featured and all((site_of(built) / h).is_file() for h in featured)
    picks = featured_units([(m, u) for m, _, u in all_units(built[0])])
    assert [title for title, _, _ in picks] == ["Most active"]  # this site has no class-selective or dead unit
    for title, m, u in picks:  # each pick under its title, linked to its unit's page
        assert title in home.text
        assert urls.rel(urls.HOME, urls.unit_page(UnitId(m.model, u.layer, u.unit))) in featured
    assert "Most class-selective" not in home.text and "Dead" not in home.text


def test_every_image_has_alt_text_and_headings_are_in_order(built):
    site = site_of(built)
    for path in site.rglob("*.html"):
        page = read_page(path)
        for img in page.find("img"):
            assert "alt" in img, (path, img)
        levels = [int(t[1]) for t, _ in page.elements if re.fullmatch(r"h[1-6]", t)]
        assert levels.count(1) == 1 and levels[0] == 1, path
        assert all(b <= a + 1 for a, b in zip(levels, levels[1:])), (path, levels)
        for a in page.find("a"):  # keyboard-reachable: every link has a target
            assert a.get("href"), (path, a)


def test_rebuild_with_nothing_changed_rewrites_nothing(built, monkeypatch):
    cfg, _ = built
    site = site_of(built)
    before = {p.relative_to(site): (p.stat().st_ino, p.stat().st_mtime_ns) for p in site.rglob("*") if p.is_file()}
    report = build(cfg, progress=False)
    after = {p.relative_to(site): (p.stat().st_ino, p.stat().st_mtime_ns) for p in site.rglob("*") if p.is_file()}
    assert report.rendered == 0 and after == before
    assert {f"scan:{m}" for m in ("tiny-cnn", "tiny-mlp")} <= set(report.skipped)
    # a changed template re-renders every page but recomputes nothing
    monkeypatch.setattr(website.rendering, "templates_key", lambda: "a changed template")
    report = build(cfg, progress=False)
    assert report.rendered == report.pages
    assert {f"{s}:{m}" for s in ("scan", "featurevis", "embed") for m in ("tiny-cnn", "tiny-mlp")} \
        <= set(report.skipped)
    assert "scan" not in report.seconds and "featurevis" not in report.seconds


def test_size_report_and_budget(built, monkeypatch):
    cfg, report = built
    assert report.size_report[0].startswith("site size: ")
    assert any("tiny-cnn:" in line for line in report.size_report)
    assert any("per unit page:" in line for line in report.size_report)
    assert any("largest files:" in line for line in report.size_report)
    site = site_of(built)
    before = {p: p.read_bytes() for p in site.rglob("*") if p.is_file()}
    real = website.builder.sizes_of
    monkeypatch.setattr(website.builder, "sizes_of", lambda out: {**real(out), "huge.bin": 101 * 10**6})
    monkeypatch.setattr(website.rendering, "templates_key", lambda: "force a render")
    with pytest.raises(AtlasError, match="over site.budget_file_mb = 100 MB"):
        build(cfg, progress=False)
    assert {p: p.read_bytes() for p in site.rglob("*") if p.is_file()} == before  # the old site stays


def test_check_budget(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 1_500_000)
    website.check_budget(tmp_path, SiteSection(budget_file_mb=2, budget_total_mb=2))
    with pytest.raises(AtlasError, match="a.bin is 1.50 MB, over site.budget_file_mb = 1 MB"):
        website.check_budget(tmp_path, SiteSection(budget_file_mb=1, budget_total_mb=2))
    (tmp_path / "b.bin").write_bytes(b"x" * 1_000_000)
    with pytest.raises(AtlasError, match="the site is 2.50 MB, over site.budget_total_mb = 2 MB"):
        website.check_budget(tmp_path, SiteSection(budget_file_mb=2, budget_total_mb=2))


def test_no_base_url_means_relative_permalinks_and_no_sitemap(tmp_path):
    cfg = load_config(write_config(tmp_path, atlas_section(tmp_path, "rel") + SITE.replace(
        f'base_url = "{BASE}"', 'base_url = ""').replace("input_pages = 6", "input_pages = 0")))
    build(cfg, progress=False)
    site = cfg.atlas.site_dir
    assert not (site / urls.SITEMAP).exists() and broken_links(site) == []
    page = read_page(site / urls.unit_page(UnitId("tiny-mlp", "fc1", 0)))
    assert page.find("a", cls="permalink", href="index.html")
    assert not [m for m in page.find("meta") if (m.get("property") or "").startswith("og:")]  # no base URL, no OG
    assert "No input pages" in read_page(site / urls.INPUTS).text


def test_parallel_render_writes_the_same_site(built, tmp_path, monkeypatch):
    """Unit pages rendered by forked workers: the same files, bytes and manifest as one process."""
    cfg, _ = built
    sequential = {p.relative_to(site_of(built)): p.read_bytes() for p in site_of(built).rglob("*") if p.is_file()}
    monkeypatch.setattr(website.builder, "PARALLEL_FROM", 1)
    monkeypatch.setattr(website.builder, "CHUNKS_PER_WORKER", 1)
    monkeypatch.setattr(website.builder.os, "cpu_count", lambda: 2)
    with Store(cfg.store_dir, read_only=True) as store:
        summary = website.build_site(store, tmp_path / "site", cfg.site, progress=False)
    parallel = {p.relative_to(summary.path): p.read_bytes() for p in summary.path.rglob("*") if p.is_file()}
    assert parallel.keys() == sequential.keys()
    manifest = Path(website.MANIFEST)  # keys depend on the templates' hash, which earlier tests patch
    assert [k for k in parallel if parallel[k] != sequential[k] and k != manifest] == []
    assert json.loads(parallel[manifest]).keys() == json.loads(sequential[manifest]).keys()
    assert summary.rendered == summary.pages


def test_open_data_parquet_files_hold_the_store_and_the_about_page_documents_them(built):
    import duckdb

    cfg, _ = built
    data = site_of(built) / urls.DATA
    assert sorted(p.name for p in data.iterdir()) == sorted([f"{n}.parquet" for n in Store.OPEN_DATA]
                                                            + [Store.OPEN_DATABASE])
    con = duckdb.connect()
    units = con.execute(f"SELECT model, layer, unit, label, label_score, mean FROM '{data}/units.parquet' "
                        "ORDER BY model, layer, unit").fetchall()
    with Store(cfg.store_dir, read_only=True) as store:
        expected = sorted((m.model, u.layer, u.unit, u.label, u.label_score, u.mean) for m, _, u in all_units(cfg))
        top = [(m.model, u.layer, u.unit, t.rank, t.example) for m, _, u in all_units(cfg) for t in u.top]
    assert sorted(units, key=lambda r: r[:3]) == sorted(expected, key=lambda r: r[:3])
    got = con.execute(f"SELECT model, layer, unit, rank, example FROM '{data}/examples.parquet' WHERE kind = 'top'"
                      ).fetchall()
    assert sorted(got) == sorted(top)
    about = read_page(site_of(built) / urls.ABOUT)
    hrefs = {a["href"] for a in about.find("a")}
    assert {f"../data/{n}.parquet" for n in Store.OPEN_DATA} | {"../data/atlas.duckdb", "../sql/index.html"} <= hrefs
    assert "label_score" in about.text and "Open data" in about.text
    # the DuckDB file holds the same tables, row for row
    database = duckdb.connect(str(data / Store.OPEN_DATABASE), read_only=True)
    assert sorted(t for (t,) in database.execute("SHOW TABLES").fetchall()) == sorted(Store.OPEN_DATA)
    for name in Store.OPEN_DATA:
        assert repr(database.execute(f"SELECT * FROM {name}").fetchall()) == \
            repr(con.execute(f"SELECT * FROM '{data}/{name}.parquet'").fetchall()), name
    assert database.execute("SELECT count(*) FROM ranges").fetchone()[0] > 0


def test_unit_page_examples_across_the_range_embed_card_and_list_button(built):
    """Range rows highest first, each row's values inside its range, the examples from the store; the embed
    card beside the page (the feature vis, up to 6 top examples, the histogram, the label, a link to the page),
    the iframe snippet that names it, and the "add to list" button; the JSON export's ranges and sample."""
    cfg, _ = built
    site = site_of(built)
    checked = with_effects = 0
    for m, l, u in all_units(cfg):
        uid = UnitId(m.model, l.layer, u.unit)
        html = (site / urls.unit_page(uid)).read_text()
        page = read_page(site / urls.unit_page(uid))
        rows = re.findall(r'<div class="range-row"><h3>(.*?)</h3>\s*<ol class="examples range">(.*?)</ol>', html, re.S)
        assert len(u.ranges) == 10 and len(rows) == len(range_rows(u.ranges)), uid  # scan.range_bins
        los, shares = [], []
        for (head, body), (share, *_, examples) in zip(rows, range_rows(u.ranges)):
            text = unescape(head).split(": ")[-1].split(" – ")
            lo, hi = float(text[0]), float(text[-1])
            los.append(lo)
            shares.append(unescape(head).split(": ")[0])
            values = [float(v) for v in re.findall(r">([^<>]+)</li>", body)]
            assert re.findall(r'src="[^"]*/(\d+)\.webp"', body) == [str(t.example) for t in examples]
            assert values == sorted(values, reverse=True) and all(lo - 1e-2 <= v <= hi + 1e-2 for v in values)
        assert los == sorted(los, reverse=True), uid
        assert shares[0].endswith("–100 %") and shares[-1].startswith("0–"), shares  # the whole sample, once
        button = page.find("button", cls="add-to-list")
        assert len(button) == 1 and button[0]["data-unit"] == str(uid) and button[0]["data-lists"].endswith("lists.html")
        embed = read_page(site / urls.unit_embed(uid))
        assert embed.find("a", href=f"{BASE}{uid.model}/{l.layer}/{u.unit}/")  # the page, absolute with a base URL
        # on its own: its own small stylesheet and script, not the site's; the script draws the histogram and
        # the top examples from the unit's data.json beside it (test_browser checks the drawing)
        [sheet] = [a["href"] for a in embed.find("link", rel="stylesheet")]
        [script] = [a["src"] for a in embed.find("script")]
        assert "/static/embed." in sheet and "style." not in sheet and "/static/embed." in script
        for path in (sheet, script):
            assert (site / urls.unit_embed(uid)).parent.joinpath(path).resolve().is_file(), path
        [card] = embed.find("article", cls="card")
        assert card["data-json"] == "data.json" and not embed.find("li") and not embed.find("svg")
        assert u.label in embed.text
        snippet = unescape(re.search(r'<pre class="cite-embed">(.*?)</pre>', html, re.S).group(1))
        assert f'src="{BASE}{uid.model}/{l.layer}/{u.unit}/embed.html"' in snippet and snippet.startswith("<iframe")
        data = json.loads((site / urls.unit_json(uid)).read_text())
        assert data["ranges"]["examples"] == [[t.example for t in r.examples] for r in u.ranges]
        assert data["ranges"]["lo"] == [pytest.approx(r.lo, rel=1e-3) for r in u.ranges]
        assert len(data["sample"]["values"]) == len(data["sample"]["examples"]) > 0
        if u.effects is not None:  # the store's effects: in the export, and one bar each on the page
            for direction in ("up", "down"):
                column = data["effects"][direction]
                assert list(zip(column["index"], column["effect"])) == \
                    [(c, pytest.approx(v, rel=1e-6)) for c, v in getattr(u.effects, direction)]
            bars = html.split('<ol class="bars effects"')[1].split("</ol>")[0]
            assert bars.count('<li class="up">') == len(u.effects.up) and \
                bars.count('<li class="down">') == len(u.effects.down)
            with_effects += 1
        else:
            assert data["effects"] is None and 'class="bars effects"' not in html
        checked += 1
    assert checked > 20 and with_effects > 10
    assert broken_links(site) == []


def test_list_and_sql_pages_are_linked_from_every_page(built):
    site = site_of(built)
    for path in (urls.HOME, urls.unit_page(UnitId("tiny-cnn", "conv", 2)), urls.ABOUT):
        nav = {text: href for href, text in re.findall(r'<a href="([^"]+)"[^>]*>(List|SQL)</a>', (site / path).read_text())}
        assert (site / path).parent.joinpath(nav["List"]).resolve() == (site / urls.LISTS).resolve()
        assert (site / path).parent.joinpath(nav["SQL"]).resolve() == (site / urls.SQL).resolve()
    lists = read_page(site / urls.LISTS)
    scripts = [s["src"] for s in lists.find("script") if s.get("src")]
    assert any("search-index." in s for s in scripts) and any("lists." in s for s in scripts)
    sql = read_page(site / urls.SQL)
    assert {a["href"] for a in sql.find("a") if "download" in a} == \
        {f"../data/{n}.parquet" for n in Store.OPEN_DATA}
    examples = [b["data-sql"] for b in sql.find("button") if b.get("data-sql")]
    assert len(examples) >= 2
    import duckdb

    con = duckdb.connect()  # every example runs on the open data as DuckDB reads it
    for name in Store.OPEN_DATA:
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM '{site / urls.DATA / name}.parquet'")
    for query in examples:
        assert con.execute(query).fetchall() is not None
