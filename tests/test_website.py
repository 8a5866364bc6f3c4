"""The built site of a tiny atlas: structure, content, links, escaping, atomic swap."""

from __future__ import annotations

import shutil

import pytest

from atlas_builder import urls
from atlas_builder.build import build
from atlas_builder.config import load_config
from atlas_builder.errors import AtlasError
from atlas_builder.ids import UnitId, layer_slug
from atlas_builder.store import Store
from atlas_builder.website import position_box, render
from conftest import write_config
from sitecheck import broken_links, read_page


@pytest.fixture
def tiny_site(tiny_config):
    cfg = load_config(tiny_config)
    report = build(cfg, progress=False)
    return cfg, report


def test_one_page_per_unit_and_links_resolve(tiny_site):
    cfg, report = tiny_site
    site = cfg.atlas.site_dir
    with Store(cfg.store_dir, read_only=True) as store:
        expected = {urls.unit_page(UnitId(m.model, l.layer, u))
                    for m in store.models() for l in store.layers(m.model) for u in range(l.n_units)}
    found = {str(p.relative_to(site)) for p in site.glob("*/*/*/index.html")}
    assert found == expected
    # tiny-cnn: conv(4) relu(4) fc(3); tiny-mlp: fc1(5) act(5) fc2(3)
    assert len(expected) == report.units == 24
    assert report.pages == 1 + 2 + 6 + 24
    assert broken_links(site) == []
    assert (site / ".nojekyll").is_file()


def test_unit_page_shows_top_examples_from_the_store(tiny_site):
    cfg, _ = tiny_site
    site = cfg.atlas.site_dir
    with Store(cfg.store_dir, read_only=True) as store:
        unit = store.units("tiny-cnn", "conv")[2]
    page = read_page(site / "tiny-cnn/conv/2/index.html")
    items = page.find("li", cls="example")
    assert len(items) == 3
    assert [int(i["data-example"]) for i in items] == [t.example for t in unit.top]
    assert [float(i["data-value"]) for i in items] == pytest.approx([t.value for t in unit.top])
    imgs = page.find("img")
    assert [i["src"] for i in imgs] == [f"../../../media/examples/{t.example}.webp" for t in unit.top]
    assert all(i.get("alt") for i in imgs)
    assert len(page.find("span", cls="where")) == 3  # conv: where it fired
    rels = {a.get("rel"): a["href"] for a in page.find("a") if a.get("rel")}
    assert rels == {"prev": "../1/index.html", "up": "../index.html", "next": "../3/index.html"}
    first = read_page(site / "tiny-cnn/conv/0/index.html")
    assert "prev" not in {a.get("rel") for a in first.find("a")}
    assert "Unit 2" in page.text and "tiny-cnn/conv/2" in page.text
    mlp = read_page(site / "tiny-mlp/fc1/0/index.html")
    assert mlp.find("span", cls="where") == []  # flat outputs have no position


def test_model_and_layer_pages(tiny_site):
    cfg, _ = tiny_site
    site = cfg.atlas.site_dir
    home = read_page(site / "index.html")
    assert [a["href"] for a in home.find("a") if a["href"].endswith("/index.html")] == [
        "tiny-cnn/index.html", "tiny-mlp/index.html"]
    model = read_page(site / "tiny-cnn/index.html")
    assert "4×8×8" in model.text and "Conv2d" in model.text
    layer_links = [a["href"] for a in model.find("a") if a["href"].count("/") == 1 and ".." not in a["href"]]
    assert layer_links == ["conv/index.html", "relu/index.html", "fc/index.html"]
    layer = read_page(site / "tiny-cnn/conv/index.html")
    unit_links = [a["href"] for a in layer.find("a") if a["href"].count("/") == 1 and a["href"][0].isdigit()]
    assert unit_links == [f"{i}/index.html" for i in range(4)]


def test_hostile_class_names_are_escaped(tmp_path):
    path = write_config(tmp_path, f"""
        [atlas]
        name = "hostile"
        data_dir = "{tmp_path / 'data'}"
        site_dir = "{tmp_path / 'site'}"
        [site]
        title = "<script>alert('title')</script>"
        [dataset]
        source = "fixtures_models:hostile_dataset"
        [[models]]
        name = "m"
        title = "<img src=x onerror=alert(1)>"
        source = "fixtures_models:tiny_mlp"
        """)
    build(load_config(path), progress=False)
    site = tmp_path / "site"
    for page in site.rglob("*.html"):
        html = page.read_text()
        assert "<script>" not in html and "<img src=x" not in html
    unit = (site / "m/fc2/0/index.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in unit or "&#34;quoted&#34;" in unit or "../../etc" in unit
    assert "&lt;script&gt;alert(&#39;title&#39;)&lt;/script&gt;" in (site / "index.html").read_text()


def test_rebuild_replaces_site_and_failed_build_keeps_old_one(tiny_site, monkeypatch):
    cfg, _ = tiny_site
    site = cfg.atlas.site_dir
    before = {p: p.read_bytes() for p in site.rglob("*") if p.is_file()}
    import atlas_builder.website as website

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(website, "render", boom)
    with pytest.raises(RuntimeError):
        build(cfg, progress=False)
    after = {p: p.read_bytes() for p in site.rglob("*") if p.is_file()}
    assert after == before
    assert not list(site.parent.glob(".site.*"))  # temp trees cleaned up


def test_refuses_to_replace_a_folder_it_did_not_write(tiny_config, tmp_path):
    cfg = load_config(tiny_config)
    shutil.rmtree(cfg.atlas.site_dir, ignore_errors=True)
    cfg.atlas.site_dir.mkdir(parents=True)
    (cfg.atlas.site_dir / "thesis.tex").write_text("precious")
    with pytest.raises(AtlasError, match="not written by Neuron Atlas"):
        build(cfg, progress=False)
    assert (cfg.atlas.site_dir / "thesis.tex").read_text() == "precious"


def test_urls_are_relative_and_layer_slugs_safe():
    uid = UnitId("m", "layer1.0.conv1", 7)
    assert urls.unit_page(uid) == "m/layer1.0.conv1/7/index.html"
    assert urls.rel(urls.unit_page(uid), urls.HOME) == "../../../index.html"
    assert urls.rel(urls.layer_page("m", "fc"), urls.example_image(3)) == "../../media/examples/3.webp"
    assert urls.permalink("https://x.org/atlas/", uid) == "https://x.org/atlas/m/layer1.0.conv1/7/"
    for hostile in ("../etc", "a/b", "..", "x y", "<s>"):
        slug = layer_slug(hostile)
        assert "/" not in slug and ".." not in slug and slug.replace("-", "").replace("_", "").isalnum()
    assert layer_slug("a/b") != layer_slug("a_b")
    assert UnitId.parse("m/layer1.0.conv1/7") == uid
    with pytest.raises(AtlasError):
        UnitId.parse("m/7")


def test_position_box():
    assert position_box(-1, (4, 4)) is None
    assert position_box(3, None) is None
    assert position_box(6, (4, 4)) == (50.0, 25.0, 25.0, 25.0)  # row 1, col 2


def test_render_is_pure_and_escapes():
    ctx = {"site_title": "<T>", "css": "s.css", "home": "index.html", "breadcrumbs": [], "generator": "",
           "models": [], "n_models": 0, "n_layers": 0, "n_units": 0, "n_examples": 0, "dataset": "<d>"}
    a, b = render("home.html", ctx), render("home.html", ctx)
    assert a == b
    assert "&lt;T&gt;" in a and "<T>" not in a and "&lt;d&gt;" in a
