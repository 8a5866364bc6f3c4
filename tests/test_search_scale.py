"""Search and layer pages at ImageNet scale (~30k units), without running any model.

The units are made in code, shaped like a ResNet-50 and a VGG16 probed at 34 layers (29,584 units; 1,000
ImageNet-like classes, the output layers' units labelled by them): the search index they ship
(`website.search_index`) must stay well under 1 MB, and decode to exactly `website.search_rows`; in
Chromium (skipped like tests/test_browser.py without playwright or chromium), a site of the search
page, its assets, a 2,048-unit layer page and a unit page, served from a subpath, must show the
first results within 1 s of navigation with under 1 MB loaded before them.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import time
from types import SimpleNamespace

import pytest

from atlas_builder import urls, website
from atlas_builder.config import SiteSection
from atlas_builder.ids import UnitId
from atlas_builder.store import FeatureVisRecord, LayerRecord, ModelRecord, TopKRecord, UnitRecord, VisualRecord

N_CLASSES = 1000
TIGER = 292  # the one class named "tiger" (as in ImageNet)
N_EXAMPLES = 12  # distinct example images the synthetic units' top examples point at
BIG = ("resnet50", "layer4.2")  # a 2,048-unit layer: its page is rendered and loaded too
SITE = "atlas"  # served at http://127.0.0.1:PORT/atlas/ (a project-site subpath)


NAMES = tuple("tiger" if i == TIGER else f"imagenet class {i:03d}" for i in range(N_CLASSES))


def class_names() -> list[str]:
    return list(NAMES)


def layer_sizes() -> dict[str, list[tuple[str, int, tuple]]]:
    """model -> [(layer, units, output shape)]: ResNet-50 block outputs, VGG16's convs and classifier."""
    resnet = [("conv1", 64, (64, 112, 112))]
    for stage, (blocks, width, side) in enumerate(((3, 256, 56), (4, 512, 28), (6, 1024, 14), (3, 2048, 7)), 1):
        resnet += [(f"layer{stage}.{b}", width, (width, side, side)) for b in range(blocks)]
    resnet.append(("fc", N_CLASSES, (N_CLASSES,)))
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    vgg = [(f"features.{i}", w, (w, 14, 14)) for i, w in zip(convs, widths)]
    vgg += [("classifier.0", 4096, (4096,)), ("classifier.3", 4096, (4096,)), ("classifier.6", N_CLASSES, (N_CLASSES,))]
    return {"resnet50": resnet, "vgg16": vgg}


TITLES = {"resnet50": "ResNet-50 (torchvision, ImageNet)", "vgg16": "VGG16 (torchvision, ImageNet)"}
HIST = tuple(range(30))
CLASS_MEANS = tuple(round(0.001 * i, 3) for i in range(N_CLASSES))


def unit_record(model: str, layer: str, unit: int, output: bool) -> UnitRecord:
    """A plausible unit; labels, classes and flags vary as a real scan's do (seeded by the unit's id)."""
    h = int(hashlib.sha1(f"{model}/{layer}/{unit}".encode()).hexdigest()[:8], 16)
    top_class = unit if output else h % N_CLASSES
    dead, saturated = not output and h % 37 == 0, not output and h % 53 == 1
    redundant, nonfinite = -1 if h % 41 else max(0, unit - 1), 3 if h % 211 == 5 else 0
    if dead:
        label = "dead"
    elif saturated:
        label = "saturated"
    elif output or h % 4 == 0:
        label = f"class-selective: {NAMES[top_class]}"
    else:
        label = "feature-selective (broad)"
    e = h % N_EXAMPLES
    return UnitRecord(model, layer, unit, 50_000, nonfinite, 0.5, 0.25, 0.0, 4.0, 0.4, 0.2, 0.3, top_class, dead,
                      saturated, redundant, 0.97 if redundant >= 0 else None, label, 0.0, 4.0, HIST, CLASS_MEANS,
                      (TopKRecord(0, e, 4.0, -1), TopKRecord(1, (e + 1) % N_EXAMPLES, 3.5, -1)),
                      (TopKRecord(0, (e + 2) % N_EXAMPLES, 0.0, -1),))


@pytest.fixture(scope="module")
def atlas():
    """(models, layers, units, flat [(model, unit)], class names) of the synthetic ImageNet atlas."""
    models, layers, units = [], {}, {}
    for position, (model, sizes) in enumerate(layer_sizes().items()):
        m = ModelRecord(model, position, TITLES[model], f"torchvision:{model}", "fp", 25_000_000, 0.76, {})
        models.append(m)
        layers[model] = [LayerRecord(model, name, i, "Conv2d" if len(shape) == 3 else "Linear", shape, n,
                                     shape[1:] if len(shape) == 3 else None)
                         for i, (name, n, shape) in enumerate(sizes)]
        for i, (name, n, _) in enumerate(sizes):
            units[(model, name)] = [unit_record(model, name, u, i == len(sizes) - 1) for u in range(n)]
    flat = [(m, u) for m in models for layer in layers[m.model] for u in units[(m.model, layer.layer)]]
    return models, layers, units, flat, class_names()


def decode(index_js: str) -> list[list]:
    """The rows a search-index.js holds, as static/search.js rebuilds them (URLs from the layer folders)."""
    index = json.loads(re.fullmatch(r"window\.ATLAS_SEARCH = (.*);\n", index_js, re.S).group(1))
    rows = []
    for m, layer, folder, units, labels, classes, flags, scores, tokens in index["layers"]:
        model, title = index["models"][m]
        for k, unit in enumerate(range(units) if isinstance(units, int) else units):
            rows.append([model, layer, unit, index["labels"][labels[k]], index["classes"][classes[k]],
                         index["flags"][flags[k]], title, f"{folder}/{unit}/index.html", scores[k],
                         index["tokens"][tokens[k]]])
    return rows


# ---------------------------------------------------------------- the index

def test_index_of_30k_units_is_well_under_1_mb_and_holds_every_row(atlas):
    _, _, _, flat, names = atlas
    assert 29_000 <= len(flat) <= 31_000
    rows = website.search_rows(flat, names)
    index = website.search_index(rows)
    size = len(index.encode())
    row_format = len(json.dumps({"rows": rows}, separators=(",", ":")).encode())
    print(f"search index of {len(rows):,} units: {size:,} bytes (one row per unit: {row_format:,} bytes)")
    assert size < 600_000 and size < row_format / 4  # the bound is 1 MB
    assert decode(index) == rows
    assert index.isascii()
    assert website.search_index([list(r) for r in rows]) == index  # same rows, same bytes


def test_index_keeps_odd_layers_unit_lists_and_hostile_text():
    m = SimpleNamespace(model="m", title="<script>alert('t')</script>")
    other = SimpleNamespace(model="n", title="N \u2028 \"quoted\"")

    def unit(layer, i, label="feature-selective (broad)", top=0, score=None, **flags):
        return SimpleNamespace(layer=layer, unit=i, label=label, top_class=top, label_score=score,
                               flags=[name for name in ("dead", "saturated") if flags.get(name)])
    flat = [(m, unit("conv", 0)), (m, unit("conv", 1, "dead", dead=True)), (m, unit("a/b", 0, "</script>", 5)),
            (m, unit("fc", 3)), (m, unit("fc", 1, "class-selective: b", 1, 0.9371)), (m, unit("conv", 2, saturated=True)),
            (other, unit("conv", 0, "dead", -1, dead=True, saturated=True))]
    rows = website.search_rows(flat, ["a", "b"])
    index = website.search_index(rows)
    assert decode(index) == rows
    assert rows[2][7] == urls.unit_page(UnitId("m", "a/b", 0)) and "/a/b/" not in index  # the layer's slug
    assert "</script>" not in index and index.isascii()  # JSON escapes only: no markup in the script
    data = json.loads(index.split(" = ", 1)[1].rstrip(";\n"))
    assert [run[:4] for run in data["layers"]] == [
        [0, "conv", "m/conv", 2], [0, "a/b", rows[2][7].rsplit("/", 2)[0], 1], [0, "fc", "m/fc", [3, 1]],
        [0, "conv", "m/conv", [2]], [1, "conv", "n/conv", 1]]
    assert data["classes"] == ["a", "", "b"] and data["flags"] == ["", "dead", "saturated", "dead saturated"]
    assert data["layers"][2][7] == [None, 0.94]  # label scores, to 2 decimals
    with pytest.raises(ValueError, match="unexpected url"):
        website.search_index([["m", "l", 1, "x", "", "", "M", "m/l/2/index.html", None, ""]])


# ---------------------------------------------------------------- a 2,048-unit layer page

def visuals() -> dict[int, VisualRecord]:
    """Feature visualizations of the 2,048-unit layer (its pictures, as a real build has them)."""
    return {u: VisualRecord(FeatureVisRecord(urls.featurevis_media(*BIG, u, "positive"), None, 1.0))
            for u in range(2048)}


def layer_page(atlas, pages: website.Pages) -> tuple[str, str]:
    """(path, HTML) of the 2,048-unit layer's page, with a unit map of all its units."""
    models, layers, units, _, _ = atlas
    m = next(m for m in models if m.model == BIG[0])
    order = [l.layer for l in layers[m.model]]
    i = order.index(BIG[1])
    layer, mine = layers[m.model][i], units[BIG]
    points = {"umap": [(BIG[1], u.unit, (u.unit * 7919) % 1000 / 10, (u.unit * 104729) % 1000 / 10) for u in mine],
              "pca": [(BIG[1], u.unit, u.unit % 64, u.unit // 64) for u in mine],
              "umap_ran": True, "note": "UMAP (n_neighbors=15, cosine)"}
    context = pages.layer(m, layer, mine, (layers[m.model][i - 1], layers[m.model][i + 1]), visuals(), points)
    return urls.layer_page(*BIG), website.render("layer.html", context)


def make_pages(names, asset_paths=("static/style.css", "static/atlas.js", "static/search.js", "static/i.js")):
    css, js, search_js, index_js = asset_paths
    return website.Pages(SiteSection(title="ImageNet atlas"), css, names, [i % N_CLASSES for i in range(N_EXAMPLES)],
                         js, (search_js, index_js))


def test_layer_page_of_2048_units_caps_its_maps(atlas):
    path, html = layer_page(atlas, make_pages(atlas[4]))
    size = len(html.encode())
    print(f"layer page of 2,048 units: {size:,} bytes")
    grid = re.findall(r'<li><a href="(\d+)/index\.html">', html)
    assert grid == [str(u) for u in range(2048)]
    shown = len(range(0, 2048, -(-2048 // website.MAX_MAP_POINTS)))  # 683: every 3rd unit
    assert html.count('<svg class="chart scatter"') == 2 and html.count("<circle") == 2 * shown
    assert f"showing {shown} of its 2048 points" in html
    assert size < 2_000_000


# ---------------------------------------------------------------- in Chromium

def write_site(root, atlas) -> dict:
    """The search page (index of every unit), its assets, the 2,048-unit layer page and one unit page."""
    models, layers, units, flat, names = atlas
    data = {"style.css": (website.TEMPLATES / "static" / "style.css").read_bytes(),
            "atlas.js": (website.TEMPLATES / "static" / "atlas.js").read_bytes(),
            "search.js": (website.TEMPLATES / "static" / "search.js").read_bytes(),
            "search-index.js": website.search_index(website.search_rows(flat, names)).encode()}
    assets = {}
    for name, content in data.items():  # content-hashed names, as _write_tree gives them
        stem, ext = name.rsplit(".", 1)
        assets[name] = urls.static(f"{stem}.{hashlib.sha1(content).hexdigest()[:10]}.{ext}")
        (root / assets[name]).parent.mkdir(parents=True, exist_ok=True)
        (root / assets[name]).write_bytes(content)
    pages = make_pages(names, tuple(assets[n] for n in ("style.css", "atlas.js", "search.js", "search-index.js")))
    files = {urls.SEARCH: website.render("search.html", pages.search()), **dict([layer_page(atlas, pages)])}
    m = next(m for m in models if m.model == BIG[0])
    layer = next(l for l in layers[m.model] if l.layer == BIG[1])
    uid = UnitId(*BIG, 5)
    files[urls.unit_page(uid)] = website.render("unit.html", pages.unit(m, layer, units[BIG][5], 2048, {}).html)
    for path, html in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(html, encoding="utf-8")
    from PIL import Image
    media = [urls.example_image(e) for e in range(N_EXAMPLES)] + [urls.media(v.positive.image)
                                                                   for v in visuals().values()]
    for i, path in enumerate(media):
        buf = io.BytesIO()
        Image.new("L", (8, 8), 20 * i % 256).save(buf, "WEBP")
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(buf.getvalue())
    return {"index_bytes": len(data["search-index.js"]), "unit": urls.unit_page(uid)}


@pytest.fixture(scope="module")
def chromium(tmp_path_factory, atlas):
    """(browser, server, site facts): the synthetic site served from /atlas/ and a Chromium."""
    import test_browser as tb  # skips (like that module) without playwright or chromium

    if tb._why is not None:
        pytest.fail(f"browser tests required ($ATLAS_REQUIRE_BROWSER) but {tb._why}", pytrace=False)
    top = tmp_path_factory.mktemp("scale")
    facts = write_site(top / SITE, atlas)
    srv = tb.Server(top)
    thread = threading.Thread(target=srv.serve_forever, name="atlas-scale-http", daemon=True)
    thread.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}/{SITE}/"
    try:
        with tb.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=tb.CHROMIUM, args=tb.CHROMIUM_ARGS)
            try:
                yield browser, srv, facts, tb
            finally:
                browser.close()
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


# Times (performance.now(), from navigation start) at which #search-results got its results.
RESULTS_CLOCK = """() => {
  window.__results = [];
  new MutationObserver(() => {
    const list = document.getElementById('search-results');
    if (list && list.children.length) window.__results.push(performance.now());
  }).observe(document, {childList: true, subtree: true});
}"""


def fresh_tab(browser, tb):
    """A tab in a context of its own (empty cache), its problems and the responses it got."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(15_000)
    problems, responses = tb.Problems(), []
    ctx.on("console", problems.console)
    ctx.on("weberror", problems.page_error)
    ctx.on("requestfailed", problems.request_failed)
    ctx.on("response", problems.response)
    ctx.on("response", lambda response: responses.append(response))
    ctx.add_init_script(f"({RESULTS_CLOCK})()")
    return ctx, ctx.new_page(), problems, responses


def test_search_of_30k_units_shows_results_within_1_s_under_1_mb(chromium, atlas):
    browser, server, facts, tb = chromium
    rows = website.search_rows(atlas[3], atlas[4])
    tigers = [r for r in rows if "tiger" in f"{r[3]} {r[4]}".lower()]  # no title, model or layer says tiger
    ctx, page, problems, responses = fresh_tab(browser, tb)
    try:
        start = time.perf_counter()
        page.goto(server.base + urls.SEARCH + "?q=tiger")
        first = page.locator("#search-results a").first
        tb.expect(first).to_be_visible()
        wall = time.perf_counter() - start
        at = page.evaluate("() => window.__results[0]")
        loaded = sum(len(r.body()) for r in responses)  # everything so far: the page, its style, scripts, index
        print(f"{len(rows):,} units: first results {at:.0f} ms after navigation ({wall * 1000:.0f} ms wall "
              f"here), {loaded:,} bytes loaded in {len(responses)} responses (index {facts['index_bytes']:,})")
        assert at < 1000 and loaded < 1_000_000
        names = {r.url.rsplit("/", 1)[1] for r in responses}
        assert any(n.startswith("search-index.") for n in names) and any(n.startswith("search.") for n in names)
        status = page.locator("#search-status")
        tb.expect(status).to_have_text(f"{len(tigers)} units.")
        hrefs = [a.evaluate("a => a.href") for a in page.locator("#search-results a").all()]
        assert all(h.startswith(server.base) for h in hrefs)
        # every hit has "tiger" as its top class (score 3), so they come in the index's order
        assert [h.removeprefix(server.base) for h in hrefs] == [r[7] for r in tigers]
        notes = [" ".join(n.split()) for n in page.locator("#search-results li span.muted").all_inner_texts()]
        assert notes == [f"— {r[3]}" + (f" [{r[5]}]" if r[5] else "") for r in tigers]

        # typing in the box: a word matching a quarter of the units (200 shown), then a field query
        for query, expected in (("class-selective", [r for r in rows if "class-selective" in r[3]]),
                                ("model:vgg16 class:tiger", [r for r in rows if r[0] == "vgg16" and r[4] == "tiger"])):
            typed = time.perf_counter()
            page.locator("#search-input").fill(query)
            tb.expect(status).to_have_text(f"{len(expected)} units" +
                                           (", showing the first 200." if len(expected) > 200 else "."))
            typed = time.perf_counter() - typed
            print(f"typed {query!r}: {len(expected):,} results in {typed * 1000:.0f} ms wall "
                  f"(80 ms of it the input's debounce)")
            assert typed < 1.0
            assert [a.evaluate("a => a.href").removeprefix(server.base)
                    for a in page.locator("#search-results a").all()] == [r[7] for r in expected[:200]]

        # a unit id opens (ranks first) that unit; its page is there and is the unit's
        page.locator("#search-input").fill(f"{BIG[0]}/{BIG[1]}/5")
        page.locator("#search-input").press("Enter")
        first = page.locator("#search-results a").first
        tb.expect(first).to_have_attribute("href", "../" + facts["unit"])
        tb.expect(first).to_have_text(f"{TITLES[BIG[0]]} · {BIG[1]} · unit 5")
        first.click()
        page.wait_for_url(server.base + facts["unit"])
        assert BIG[1] in page.locator("h1").inner_text()
        assert page.locator(".unit-label .label-text").inner_text() == atlas[2][BIG][5].label
    finally:
        ctx.close()
    assert problems.found == []


def test_layer_page_of_2048_units_loads_and_its_map_works(chromium):
    browser, server, _, tb = chromium
    ctx, page, problems, responses = fresh_tab(browser, tb)
    try:
        start = time.perf_counter()
        page.goto(server.base + urls.layer_page(*BIG))
        page.wait_for_load_state("load")
        seconds = time.perf_counter() - start
        html = next(len(r.body()) for r in responses if r.url.endswith(urls.layer_page(*BIG)))
        print(f"layer page of 2,048 units: {html:,} bytes of HTML, loaded in {seconds * 1000:.0f} ms")
        assert seconds < 5
        assert page.locator("ul.unit-grid a").count() == 2048
        switch = page.locator("#unit-map ~ .map-switch").first
        umap, pca = switch.locator("svg[data-method=umap]"), switch.locator("svg[data-method=pca]")
        tb.expect(umap).to_be_visible()
        assert umap.locator("a:has(circle)").count() == 683
        umap.scroll_into_view_if_needed()
        point = umap.locator("a:has(circle)").nth(tb._clickable_point(page, umap))
        point.hover()
        tip = page.locator(".map-tip")
        tb.expect(tip).to_be_visible()
        tb.expect(tip.locator("img")).to_have_js_property("complete", True)
        unit = int(re.match(r"unit (\d+):", point.locator("title").text_content()).group(1))
        assert point.evaluate("a => new URL(a.getAttribute('href'), document.baseURI).href") == server.base + f"{BIG[0]}/{BIG[1]}/{unit}/index.html"
        switch.locator("label", has_text="PCA").click()
        tb.expect(pca).to_be_visible()
        tb.expect(umap).to_be_hidden()
    finally:
        ctx.close()
    assert problems.found == []
