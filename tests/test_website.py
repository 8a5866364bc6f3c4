"""The built site of a tiny atlas: structure, content, links, escaping, atomic swap."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from atlas_builder import charts, urls, website
from atlas_builder.build import build
from atlas_builder.config import SiteSection, load_config
from atlas_builder.errors import AtlasError
from atlas_builder.ids import UnitId, layer_slug
from atlas_builder.store import Store
from atlas_builder.website import position_box, render
from atlas_builder.website.parts import range_rows
from conftest import atlas_section, write_config, write_tiny_config
from sitecheck import broken_links, read_page


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory):
    """The tiny atlas, built once for the tests that only read it."""
    cfg = load_config(write_tiny_config(tmp_path_factory.mktemp("tiny")))
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
    # home, models, layers, units and their embed cards, search, 404, list, SQL, about, inputs index, input pages
    assert report.pages == 1 + 2 + 6 + 2 * 24 + 6 + 40
    assert {str(p.relative_to(site)) for p in site.glob("*/*/*/embed.html")} == \
        {path.replace("index.html", "embed.html") for path in expected}
    assert broken_links(site) == []
    assert (site / ".nojekyll").is_file()


def test_unit_page_shows_top_examples_from_the_store(tiny_site):
    cfg, _ = tiny_site
    site = cfg.atlas.site_dir
    with Store(cfg.store_dir, read_only=True) as store:
        unit = store.units("tiny-cnn", "conv")[2]
    html = (site / "tiny-cnn/conv/2/index.html").read_text()
    page = read_page(site / "tiny-cnn/conv/2/index.html")
    items = page.find("li", cls="example")
    assert len(items) == 6  # top 3 and bottom 3
    assert [int(i["data-example"]) for i in items] == [t.example for t in unit.top + unit.bottom]
    assert [float(i["data-value"]) for i in items] == pytest.approx([t.value for t in unit.top + unit.bottom])
    assert [t.value for t in unit.top] == sorted((t.value for t in unit.top), reverse=True)
    assert [t.value for t in unit.bottom] == sorted(t.value for t in unit.bottom)
    assert unit.top[0].value >= unit.bottom[0].value
    imgs = [i for i in page.find("img") if i["src"].startswith("../../../media/examples/")]
    shown = unit.top + unit.bottom + tuple(t for *_, ex in range_rows(unit.ranges) for t in ex)
    assert [i["src"] for i in imgs] == [f"../../../media/examples/{t.example}.webp" for t in shown]
    assert all(i.get("alt") is not None for i in page.find("img"))
    heats = page.find("span", cls="heat")  # top-k maps: one sprite on the list, a position per example
    assert [h["style"] for h in heats] == [f"background-position-y:{y}%" for y in ("0", "50", "100")]
    sprite = re.search(r'<ol class="examples top" style="--heat:url\((data:image/png;base64,[^)]*)\);--rows:300%"',
                       html)
    assert sprite and sprite.group(1) == charts.heat_sprite([t.map for t in unit.top])[0]
    assert len(page.find("span", cls="where")) == 3  # conv: where it fired, on the top examples
    rels = {a.get("rel"): a["href"] for a in page.find("a") if a.get("rel")}
    assert rels == {"prev": "../1/index.html", "up": "../index.html", "next": "../3/index.html"}
    first = read_page(site / "tiny-cnn/conv/0/index.html")
    assert "prev" not in {a.get("rel") for a in first.find("a")}
    assert "Unit 2" in page.text and "tiny-cnn/conv/2" in page.text
    assert unit.label in page.text
    assert f"{unit.std:.3g}" in page.text and "Class-selectivity index" in page.text
    # histogram: one path, a bar per non-empty bin; class bars: one per class, top class highlighted
    bars = re.search(r'<path d="([^"]*)" class="bar">', html).group(1)
    assert bars.count("M") == sum(1 for c in unit.hist if c) and bars.count("Z") == bars.count("M")
    bars = re.findall(r'<li( class="top")?><span>([^<]*)</span>', html.split('<ol class="bars"')[1])
    assert [name for _, name in bars] == ["zero", "one", "two"]  # every class, in order: 3 of them
    assert [bool(top) for top, _ in bars] == [i == unit.top_class for i in range(3)]
    mlp = read_page(site / "tiny-mlp/fc1/0/index.html")
    assert mlp.find("span", cls="where") == [] and mlp.find("span", cls="heat") == []  # flat outputs


def test_model_and_layer_pages(tiny_site):
    cfg, _ = tiny_site
    site = cfg.atlas.site_dir
    home = read_page(site / "index.html")
    assert [a["href"] for a in home.find("a") if a["href"].endswith("/index.html") and a["href"].count("/") == 1
            and a["href"].split("/")[0] not in ("inputs", "search", "about", "sql")] == [
        "tiny-cnn/index.html", "tiny-mlp/index.html"]
    model = read_page(site / "tiny-cnn/index.html")
    assert "4×8×8" in model.text and "Conv2d" in model.text
    table_links = [a["href"] for a in model.find("a") if a["href"].count("/") == 1 and ".." not in a["href"]]
    assert table_links[:3] == ["conv/index.html", "relu/index.html", "fc/index.html"]
    # the all-layer health heatmap: a row link per layer and a cell link per unit
    every_unit = [f"{l}/{u}/index.html" for l, n in (("conv", 4), ("relu", 4), ("fc", 3)) for u in range(n)]
    unit_links = [a["href"] for a in model.find("a") if a["href"].count("/") == 2 and not a["href"].startswith("..")]
    assert unit_links[:11] == every_unit  # the heatmap first, then the all-layer unit map (UMAP and PCA)
    assert sorted(unit_links[11:]) == sorted(every_unit * 2)
    layer = read_page(site / "tiny-cnn/conv/index.html")
    unit_links = [a["href"] for a in layer.find("a") if a["href"].count("/") == 1 and a["href"][0].isdigit()]
    assert sorted(unit_links) == sorted([f"{i}/index.html" for i in range(4)] * 3)  # 2 maps and the grid
    with Store(cfg.store_dir, read_only=True) as store:
        units = store.units("tiny-cnn", "conv")
    html = (site / "tiny-cnn/conv/index.html").read_text()
    assert f'<span data-count="dead">{sum(u.dead for u in units)} dead</span>' in html
    assert f'<span data-count="saturated">{sum(u.saturated for u in units)} saturated</span>' in html
    for u in units:
        assert u.label in layer.text


def test_hostile_class_names_are_escaped(tmp_path):
    path = write_config(tmp_path, atlas_section(tmp_path, "hostile") + """
        [site]
        title = "<script>alert('title')</script>"
        [dataset]
        source = "fixtures_models:hostile_dataset"
        [featurevis]
        steps = 8
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
    # each class name, escaped, on the output unit's page (its title and the class bars)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in unit
    assert "&#34;quoted&#34; &amp; &#39;single&#39;" in unit
    assert "../../etc" in unit
    assert "&lt;script&gt;alert(&#39;title&#39;)&lt;/script&gt;" in (site / "index.html").read_text()


def test_rebuild_replaces_site_and_failed_build_keeps_old_one(tiny_site, monkeypatch):
    cfg, _ = tiny_site
    site = cfg.atlas.site_dir
    before = {p: p.read_bytes() for p in site.rglob("*") if p.is_file()}
    import atlas_builder.website as website

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(website.rendering, "render", boom)
    monkeypatch.setattr(website.rendering, "templates_key", lambda: "changed")  # or every page is unchanged: linked, not rendered
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
    ctx = {"site_title": "<T>", "css": "s.css", "home": "index.html", "breadcrumbs": [], "nav": [], "js": "",
           "og": {"title": "<T>", "site_name": "<T>", "description": "<d>", "url": "", "image": ""},
           "models": [], "n_models": 0, "n_layers": 0, "n_units": 0, "n_examples": 0, "dataset": "<d>",
           "featured": [], "n_inputs": 0, "search": "search/index.html", "inputs": "inputs/index.html",
           "examples": "examples", "placeholder": '"<p>"'}
    a, b = render("home.html", ctx), render("home.html", ctx)
    assert a == b
    assert "&lt;T&gt;" in a and "<T>" not in a and "&lt;d&gt;" in a
    assert 'placeholder="&#34;&lt;p&gt;&#34;"' in a  # an attribute value, escaped


def test_health_flags_of_planted_units_reach_the_pages(tmp_path):
    path = write_config(tmp_path, atlas_section(tmp_path, "planted") + """
        [dataset]
        source = "fixtures_models:tiny_dataset"
        [featurevis]
        enabled = false
        [[models]]
        name = "p"
        source = "fixtures_models:planted_mlp"
        """)
    cfg = load_config(path)
    build(cfg, progress=False)
    with Store(cfg.store_dir, read_only=True) as store:
        units = {u.unit: u for u in store.units("p", "relu")}
    assert units[1].dead and units[1].label == "dead"
    assert units[3].saturated and units[3].label == "saturated"
    assert units[0].redundant_with == 2 and units[2].redundant_with == 0
    assert units[2].redundant_corr == pytest.approx(1.0, abs=1e-3)
    assert not units[0].dead and not units[0].saturated
    site = cfg.atlas.site_dir
    html = (site / "p/relu/index.html").read_text()
    assert '<span data-count="dead">1 dead</span>' in html
    assert '<span data-count="saturated">1 saturated</span>' in html
    assert '<span data-count="redundant">2 redundant</span>' in html
    unit2 = read_page(site / "p/relu/2/index.html")
    [partner] = unit2.find("a", cls="partner")
    assert partner["href"] == "../0/index.html"
    assert {f.get("class") for f in unit2.find("span") if "flag" in (f.get("class") or "")} == {"flag flag-redundant"}
    dead = read_page(site / "p/relu/1/index.html")
    assert "flag flag-dead" in {f.get("class") for f in dead.find("span")}
    model = (site / "p/index.html").read_text()
    assert 'fill="#111111"' in model and 'fill="#e0312b"' in model  # dead and saturated cells in the heatmap


def test_feature_visualizations_on_unit_and_layer_pages(tiny_site):
    cfg, _ = tiny_site
    site = cfg.atlas.site_dir
    page = read_page(site / "tiny-cnn/conv/2/index.html")
    srcs = [i["src"] for i in page.find("img")]
    base = "../../../media/fv/tiny-cnn/conv/2"
    assert f"{base}.positive.webp" in srcs and f"{base}.negative.webp" in srcs
    assert f"{base}.weights.webp" in srcs  # conv is the model's first layer
    [source] = page.find("source")
    assert source["srcset"] == f"{base}.animation.webp"
    assert source["media"] == "(prefers-reduced-motion: no-preference)"
    relu = read_page(site / "tiny-cnn/relu/1/index.html")
    assert not any(i["src"].endswith(".weights.webp") for i in relu.find("img"))  # not a first layer
    mlp = read_page(site / "tiny-mlp/fc1/0/index.html")
    assert "../../../media/fv/tiny-mlp/fc1/0.weights.webp" in [i["src"] for i in mlp.find("img")]
    layer = read_page(site / "tiny-cnn/conv/index.html")
    thumbs = [i["src"] for i in layer.find("img")]
    assert thumbs == [f"../../media/fv/tiny-cnn/conv/{u}.positive.webp" for u in range(4)]
    from PIL import Image
    anim = Image.open(site / "media/fv/tiny-cnn/conv/2.animation.webp")
    assert anim.is_animated and anim.n_frames >= 10 and anim.size == (8, 8)
    with Store(cfg.store_dir, read_only=True) as store:
        vis = store.visuals("tiny-cnn", "conv")
    assert sorted(vis) == [0, 1, 2, 3]
    assert all(v.positive.objective > v.negative.objective for v in vis.values())  # what the optimizer did
    with Store(cfg.store_dir, read_only=True) as store:
        unit = store.units("tiny-cnn", "conv")[2]
    html = (site / "tiny-cnn/conv/2/index.html").read_text()  # the activation beside the best example's
    ratio = vis[2].positive.activation / unit.top[0].value
    assert f'<b class="fv-ratio">{ratio:.2g} ×</b>' in html
    assert "is its maximum over positions." in html and "(optimized: mean over positions, " in html
    with Store(cfg.store_dir, read_only=True) as store:  # after a ReLU: the negative minimizes its input
        relu_vis = store.visuals("tiny-cnn", "relu")
    assert {v.negative.target for v in relu_vis.values()} == {"input"} and {v.negative.target for v in vis.values()} \
        == {"output"} and all(v.negative.objective < v.positive.objective for v in relu_vis.values())
    assert "(optimized: its input before the ReLU, the pre-activation, mean over positions, " in \
        (site / "tiny-cnn/relu/1/index.html").read_text()
    layer_html = (site / "tiny-cnn/conv/index.html").read_text()
    ratios = [vis[u.unit].positive.activation / u.top[0].value for u in store_units(cfg, "tiny-cnn", "conv")]
    assert f'median <b class="fv-ratio-median">{np.median(ratios):.2g} ×</b> over 4 units' in layer_html


def test_rel_equals_posixpath_relpath():
    import posixpath

    pages = ["index.html", "m/index.html", "m/l/index.html", "m/l/3/index.html", "inputs/7/index.html",
             "search/index.html", "404.html", "m/l/3/data.json"]
    targets = pages + ["media/examples/3.webp", "static/style.abc.css", "m/l/3/", "m/l2/4/index.html",
                       "m2/l/3/index.html", "media/fv/m/l/3.positive.webp", "m/", "m"]
    for page in pages:
        for target in targets:
            expected = posixpath.relpath(target, posixpath.dirname(page) or ".")
            assert urls.rel(page, target) == expected, (page, target)


def test_png_overlay_decodes_to_the_same_pixels():
    import io

    import numpy as np
    from PIL import Image

    from atlas_builder.charts import png_rgba

    rgba = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    image = Image.open(io.BytesIO(png_rgba(rgba)))
    assert image.mode == "RGBA" and image.size == (7, 5)
    np.testing.assert_array_equal(np.asarray(image), rgba)


def test_search_index_decodes_to_every_unit_and_its_page(tiny_site):
    from test_search_scale import decode

    cfg, _ = tiny_site
    site = cfg.atlas.site_dir
    scripts = [s["src"] for s in read_page(site / urls.SEARCH).find("script") if s.get("src")]
    [index] = [s for s in scripts if "search-index." in s]
    text = (site / "search" / index).resolve().read_text()
    rows = decode(text)
    with Store(cfg.store_dir, read_only=True) as store:
        expected = [(m.model, l.layer, u.unit, u.label)
                    for m in store.models() for l in store.layers(m.model) for u in store.units(m.model, l.layer)]
    assert [tuple(r[:4]) for r in rows] == expected
    for r in rows:  # each row's page, relative to the site root, is there
        assert r[7] == urls.unit_page(UnitId(r[0], r[1], r[2])) and (site / r[7]).is_file()
    assert '"layers":[[0,' in text and '"rows"' not in text  # columnar: one run per layer, not a row per unit


def test_output_units_are_titled_by_their_class_and_layers_by_what_they_are(tiny_site):
    """tiny-cnn's fc has one output per class of the dataset (zero, one, two): its units are those classes."""
    cfg, _ = tiny_site
    site = cfg.atlas.site_dir
    page = read_page(site / "tiny-cnn/fc/1/index.html")
    assert "fc 1 · one the output unit of class one (Linear 16→3) in tiny-cnn" in page.text
    layer = read_page(site / "tiny-cnn/fc/index.html")
    assert "Unit 1 · one" in layer.text and "Linear 16→3" in layer.text
    relu = read_page(site / "tiny-cnn/relu/index.html")
    assert "Conv2d+ReLU 4×8×8" in relu.text
    conv_unit = read_page(site / "tiny-cnn/relu/0/index.html")
    assert "Unit 0 of relu (Conv2d+ReLU 4×8×8) in tiny-cnn" in conv_unit.text


def test_class_names_come_from_the_weights_else_fitting_dataset_classes_else_indices():
    from atlas_builder.store import LayerRecord, ModelRecord

    pages = website.Pages(SiteSection(), "s.css", ["cat", "dog"], np.zeros(3, np.int64))
    fc = LayerRecord("m", "fc", 0, "Linear", (2,), 2, None)
    fits = ModelRecord("m", 0, "M", "x", "", 0, None, {"outputs": 2, "output_layer": "fc"})
    assert pages.predicted(fits, 1) == "dog" and pages.unit_class(fits, fc, 0) == "cat"
    imagenet = ModelRecord("m", 0, "M", "x", "", 0, None, {"outputs": 1000, "output_layer": "fc",
                                                           "classes": [f"c{i}" for i in range(1000)]})
    assert pages.predicted(imagenet, 292) == "c292" and pages.unit_class(imagenet, fc, 1) == "c1"
    random_init = ModelRecord("m", 0, "M", "x", "", 0, None, {"outputs": 1000, "output_layer": "fc"})
    assert pages.predicted(random_init, 417) == "class 417" and pages.unit_class(random_init, fc, 0) is None
    assert pages.label(5) == "class 5" and pages.label(-1) == "unlabelled"
    other = LayerRecord("m", "layer4", 0, "Bottleneck", (2, 1, 1), 2, (1, 1))
    assert pages.unit_class(fits, other, 0) is None  # only the output layer's units are classes


def test_weights_classes_are_read_without_a_download():
    from atlas_builder.config import ModelSection
    from atlas_builder.sources import weights_classes

    names = weights_classes(ModelSection("r", "torchvision:resnet50", weights="DEFAULT"))
    assert len(names) == 1000 and names[292] == "tiger"
    assert weights_classes(ModelSection("r", "torchvision:resnet50")) == []


def test_heat_overlay_palette_png_decodes_to_its_opacity_levels():
    import base64
    import io

    from PIL import Image

    from atlas_builder.charts import HEAT_LEVELS, heat_uri

    heat = np.zeros((40, 40), np.float32)
    heat[30:, 5:10] = 1.0  # a peak, pooled to at most 12 x 12 cells (blocks of 4 x 4)
    image = Image.open(io.BytesIO(base64.b64decode(heat_uri(heat).split(",", 1)[1]))).convert("RGBA")
    alpha = np.asarray(image)[..., 3]
    assert image.size == (10, 10) and alpha.max() == 200 and alpha.min() == 0
    assert alpha[8, 1] == 200 and alpha[8, 2] == 200 and alpha[0, 0] == 0 and HEAT_LEVELS == 16


def test_heat_sprite_stacks_each_examples_overlay():
    import base64
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    maps = [rng.random((7, 7), dtype=np.float32) for _ in range(4)]
    uri, offsets = charts.heat_sprite(maps)
    sprite = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGBA"))
    assert sprite.shape[:2] == (28, 7) and offsets == pytest.approx([0, 100 / 3, 200 / 3, 100])
    for i, m in enumerate(maps):  # each block of rows is that example's own overlay
        own = np.asarray(Image.open(io.BytesIO(base64.b64decode(charts.heat_uri(m).split(",", 1)[1]))).convert("RGBA"))
        np.testing.assert_array_equal(sprite[7 * i:7 * i + 7], own)
    assert len(uri) < sum(len(charts.heat_uri(m)) for m in maps) * 0.6


def test_class_bars_show_at_most_twelve_classes_highest_first_with_a_note():
    means = tuple(float(v) for v in np.linspace(-1, 2, 30)) + (None,)
    names = [f"<c{i}>" for i in range(31)]
    html = str(charts.class_bars(means, names, top_class=29))
    rows = re.findall(r'<li( class="top")?><span>([^<]*)</span><b>(.*?)</b>', html)
    assert [name for _, name, _ in rows] == [f"&lt;c{i}&gt;" for i in range(29, 17, -1)]  # escaped, highest first
    assert [bool(top) for top, _, _ in rows] == [True] + [False] * 11
    assert "The 12 highest of 31 classes." in html
    widths = [float(re.search(r"width:([0-9.]+)%", bar).group(1)) for _, _, bar in rows]
    assert widths == sorted(widths, reverse=True) and widths[0] == pytest.approx(100 * 2 / 3, abs=0.1)
    small = str(charts.class_bars((-1.0, 0.0, 1.0), ["a", "b", "c"], top_class=2))
    assert "highest" not in small and 'style="--zero:50.0%"' in small
    assert 'style="left:0.0%;width:50.0%"' in small and 'style="left:50.0%;width:50.0%"' in small


def test_unit_pages_place_their_dot_on_the_layers_one_dot_map(tiny_site):
    cfg, _ = tiny_site
    site = cfg.atlas.site_dir
    with Store(cfg.store_dir, read_only=True) as store:
        points = store.map_points("tiny-cnn", "conv", "units")["umap"]
    assert len(points) == 4
    svg = (site / "tiny-cnn/conv/units.svg").read_text()  # one file for the layer, every unit a dot
    assert svg.startswith('<svg xmlns="http://www.w3.org/2000/svg"') and svg.count("h0") == len(points)
    places = charts.dot_places([(x, y) for _, _, x, y in points])
    for (_, unit, _, _), (x, y) in zip(points, places):
        html = (site / f"tiny-cnn/conv/{unit}/index.html").read_text()
        assert '<a class="dot-map" href="../index.html#unit-map"><img src="../units.svg"' in html
        assert f'<i style="left:{100 * x / 220:.1f}%;top:{100 * y / 220:.1f}%"></i>' in html


def store_units(cfg, model: str, layer: str):
    with Store(cfg.store_dir, read_only=True) as store:
        return store.units(model, layer)


def test_a_rebuild_that_drops_units_leaves_a_page_at_each_old_address(tmp_path):
    """Permalinks that last: units no longer probed (a layer dropped, `units` lowered) keep a page at their
    address pointing to their layer's page (or model's); a later build keeps them."""
    body = atlas_section(tmp_path, "links") + """
        [dataset]
        source = "fixtures_models:tiny_dataset"
        [featurevis]
        enabled = false
        [[models]]
        name = "tiny-cnn"
        source = "fixtures_models:tiny_cnn"
        """
    build(load_config(write_config(tmp_path, body + 'layers = ["conv", "relu", "fc"]\n')), progress=False)
    site = tmp_path / "site"
    assert (site / "tiny-cnn/relu/2/index.html").is_file()
    cfg = load_config(write_config(tmp_path, body + 'layers = ["conv", "fc"]\nunits = 2\n'))
    build(cfg, progress=False)
    for unit in range(4):  # relu: its layer is gone -> the model page; its embed card's address too
        for name in ("index.html", "embed.html"):
            page = read_page(site / f"tiny-cnn/relu/{unit}/{name}")
            assert "is no longer in this atlas" in page.text and "../../index.html" in page.links
    for unit in (2, 3):  # conv units beyond units = 2 -> the layer page
        page = read_page(site / f"tiny-cnn/conv/{unit}/index.html")
        assert "../index.html" in page.links and "tiny-cnn/conv/" + str(unit) in page.text
    assert "Unit 0 of" in read_page(site / "tiny-cnn/conv/0/index.html").text  # kept units keep their pages
    assert broken_links(site) == []
    build(cfg, progress=False)  # a third build: the old addresses are still answered
    assert "is no longer in this atlas" in read_page(site / "tiny-cnn/relu/1/index.html").text


def test_citation_without_author_or_base_url_names_the_atlas_once(tiny_site):
    cfg, _ = tiny_site
    html = (cfg.atlas.site_dir / "tiny-cnn/conv/2/index.html").read_text()
    plain = re.search(r'<p class="cite-plain">(.*?)</p>', html, re.S).group(1)
    assert plain == "Unit 2 of conv in tiny-cnn. Tiny atlas. tiny-cnn/conv/2/"
    assert plain.count("Tiny atlas") == 1
    assert "set <code>site.base_url</code>" in html  # the page says how to get an absolute permalink


def test_range_rows_merge_bins_of_one_value_and_come_highest_first():
    from atlas_builder.store import RangeRecord, TopKRecord
    from atlas_builder.website.parts import range_rows

    def bin_(b, lo, hi):
        return RangeRecord(b, lo, hi, (TopKRecord(0, 100 + b, hi, -1),))
    ranges = tuple(bin_(b, 0.0, 0.0) for b in range(6)) + (bin_(6, 0.0, 0.5), bin_(7, 0.5, 0.5), bin_(8, 0.5, 0.5),
                                                             bin_(9, 0.5, 2.0))
    rows = range_rows(ranges)
    assert [(share, lo, hi) for share, lo, hi, _ in rows] == [
        ("90–100 %", 0.5, 2.0), ("70–90 %", 0.5, 0.5), ("60–70 %", 0.0, 0.5), ("0–60 %", 0.0, 0.0)]
    assert [ex[0].example for *_, ex in rows] == [109, 108, 106, 105]  # a merged row shows its highest bin's
    assert range_rows(()) == []
