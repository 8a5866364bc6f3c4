"""The unit list page (templates/lists.html, static/lists.js) and unit pages' "Add to list" (static/atlas.js) in Chromium.

A copy of the tiny atlas (conftest's `write_tiny_config`, built once here) served by http.server from a subpath
(http://127.0.0.1:PORT/atlas/), as on a GitHub Pages project site. What the build does not write (yet) is put in
by hand where it is missing: lists.html rendered from its template at the site's root with static/lists.js, a
"sample" in each unit's data.json (made-up activations on made-up example ids, the same for every unit), the
"Add to list" button on each unit page. In the copy one unit has no sample (null, as the builder writes it), to
show "no sample", and one listed unit a missing value in its sample. Nothing may go wrong in the browser
(test_browser's `page` fixture: no console error, no failed request, no HTTP error).

Skipped like test_browser.py (whose browser set-up it reuses) without playwright or chromium; with
$ATLAS_REQUIRE_BROWSER set, that is a failure instead.
"""

from __future__ import annotations

import json
import re
import shutil
import zlib
from types import SimpleNamespace
from urllib.parse import quote

import pytest

import test_browser  # skips (or, with $ATLAS_REQUIRE_BROWSER, fails) this module as it does itself
from atlas_builder.build import build
from atlas_builder.config import load_config
from atlas_builder.website import TEMPLATES, render
from conftest import write_tiny_config
from test_browser import (assert_images_load, browser, click_through, context, page, screenshot,  # noqa: F401
                          serving)

if hasattr(test_browser, "_browser_required"):  # no browser but one is required: fail here too
    _browser_required = test_browser._browser_required
else:
    from playwright.sync_api import expect

SAMPLE = [3, 17, 5, 29, 11, 0, 22, 8, 36, 14, 31, 2]  # the fake seeded sample's example ids (the dataset has 40)
NO_SAMPLE = "tiny-mlp/fc2/2"  # the unit whose data.json has no "sample"
FOUR = ["tiny-cnn/conv/1", "tiny-cnn/relu/2", "tiny-cnn/fc/0", "tiny-cnn/conv/3"]
BUTTON = ('<button type="button" class="add-to-list" data-unit="{id}" data-lists="../../../lists.html" hidden>'
          'Add to list</button>\n')


def fake_sample(unit_id: str) -> dict:
    """Activations of a unit on SAMPLE, made up: a rising curve of its own."""
    seed = zlib.crc32(unit_id.encode())
    return {"examples": SAMPLE,
            "values": [round(((seed >> (i % 16)) % 97) / 97 * (1 + seed % 3) + 0.3 * i, 4) for i in range(len(SAMPLE))]}


def fmt(v: float) -> str:
    """What lists.js shows for a value: 3 significant digits, as JavaScript writes the number."""
    text = f"{float(f'{v:.3g}'):.10g}"
    return text[:-2] if text.endswith(".0") else text


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The tiny atlas's site, copied to <tmp>/pub/atlas and completed with the list page (see the docstring)."""
    cfg = load_config(write_tiny_config(tmp_path_factory.mktemp("lists-atlas")))
    build(cfg, progress=False)
    root = tmp_path_factory.mktemp("lists") / "pub" / "atlas"
    shutil.copytree(cfg.atlas.site_dir, root)
    for path in sorted(root.glob("*/*/*/data.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if data["id"] == NO_SAMPLE:
            data["sample"] = None  # (as the builder writes it for a unit without one)
        elif not data.get("sample"):
            data["sample"] = fake_sample(data["id"])
        if data["id"] == FOUR[1]:
            data["sample"]["values"][4] = None  # a missing value (a non-finite activation)
        path.write_text(json.dumps(data), encoding="utf-8")
        page_path = path.with_name("index.html")
        html = page_path.read_text(encoding="utf-8")
        if 'class="add-to-list"' not in html:
            html = html.replace('<nav class="pager"', BUTTON.format(id=data["id"]) + '<nav class="pager"', 1)
            page_path.write_text(html, encoding="utf-8")
    if (root / "lists.html").exists():  # the builder writes it (with static/lists.<hash>.js)
        return root
    static = root / "static"
    shutil.copyfile(TEMPLATES / "static" / "lists.js", static / "lists.js")
    asset = {name: f"static/{next(static.glob(name + '.*.' + ext)).name}"
             for name, ext in (("style", "css"), ("atlas", "js"), ("search-index", "js"))}
    context = {"site_title": "Tiny atlas", "css": asset["style"], "js": asset["atlas"], "home": "index.html",
               "og": {"title": "Unit list", "site_name": "Tiny atlas", "description": "Units side by side.",
                      "url": "", "image": ""},
               "nav": [{"text": text, "href": href, "current": False}
                       for text, href in (("Inputs", "inputs/index.html"), ("Search", "search/index.html"),
                                          ("About", "about/index.html"))],
               "breadcrumbs": [{"text": "List", "href": "lists.html"}],
               "index_js": asset["search-index"], "lists_js": "static/lists.js"}
    (root / "lists.html").write_text(render("lists.html", context), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def base(site):
    """http://127.0.0.1:PORT/atlas/ (http.server over the site's parent folder)."""
    with serving(site) as srv:
        yield srv.base


def unit_data(site, unit_id: str) -> dict:
    return json.loads((site / unit_id / "data.json").read_text(encoding="utf-8"))


def list_url(base: str, ids: list[str]) -> str:
    return base + "lists.html#" + ",".join(quote(i, safe="/") for i in ids)


def stored(page) -> list[str] | None:
    return page.evaluate("() => JSON.parse(localStorage.getItem('atlas-list') || 'null')")


def clear_storage(page, base: str) -> None:
    page.goto(base + "lists.html")
    page.evaluate("() => localStorage.clear()")


def test_four_units_side_by_side_overlaid_and_on_the_sample(page, base, site):
    page.set_viewport_size({"width": 1200, "height": 900})
    page.goto(list_url(base, FOUR))
    data = [unit_data(site, i) for i in FOUR]
    cards = page.locator("#lists-cards > li.lists-card")
    expect(cards).to_have_count(4)
    expect(page.locator("#lists-cards .lists-id")).to_have_text(FOUR)
    expect(page.locator("#lists-cards .lists-label-text")).to_have_text([d["label"] for d in data])
    expect(page.locator("#lists-status")).to_have_text("4 units from this page's address.")
    # each id links to its unit page; the thumbnails are the feature visualizations, and they load
    hrefs = [a.evaluate("a => a.href") for a in page.locator("#lists-cards .lists-id").all()]
    assert hrefs == [f"{base}{i}/index.html" for i in FOUR]
    expect(page.locator("#lists-cards .lists-thumb img")).to_have_count(4)
    srcs = [i.evaluate("i => i.src") for i in page.locator("#lists-cards .lists-thumb img").all()]
    assert all("/media/" in s and s.startswith(base) for s in srcs), srcs
    assert_images_load(page, at_least=4)
    maxes = [fmt(d["stats"]["max"]) for d in data]
    means = [fmt(d["stats"]["mean"]) for d in data]
    dds = page.locator("#lists-cards .lists-stats dd").all_inner_texts()
    assert dds == [v for pair in zip(maxes, means) for v in pair]
    expect(page.locator("#lists-cards .lists-note")).to_have_text([""] * 4)  # all loaded, all with a sample

    # the histograms: one SVG, one path per unit, and a legend of the four
    hist = page.locator("#lists-hist-figure svg.lists-hist")
    expect(hist).to_have_count(1)
    expect(hist.locator("path")).to_have_count(4)
    assert [p.get_attribute("data-unit") for p in hist.locator("path").all()] == FOUR
    assert len({p.get_attribute("stroke") for p in hist.locator("path").all()}) == 4
    expect(page.locator("#lists-hist-figure .lists-legend code")).to_have_text(FOUR)
    page.get_by_label("Scale each histogram to its own peak").check()  # shapes: every path reaches the same top
    expect(hist.locator("text", has_text="density (share of its peak)")).to_have_count(1)
    expect(hist.locator("path")).to_have_count(4)
    tops = hist.evaluate("s => Array.from(s.querySelectorAll('path')).map(p => Math.round(p.getBBox().y))")
    assert len(set(tops)) == 1, tops
    page.get_by_label("Scale each histogram to its own peak").uncheck()
    expect(hist.locator("text", has_text="density (share of its peak)")).to_have_count(0)

    # the sample: one model, so one plot with four series; a point per input with a value
    examples = data[0]["sample"]["examples"]
    assert all(d["sample"]["examples"] == examples for d in data)
    plots = page.locator("#lists-sample-plots .lists-sample-model")
    expect(plots).to_have_count(1)
    expect(plots.locator("h3")).to_have_text(data[0]["model_title"])
    series = plots.locator("svg.lists-plot g.series")
    expect(series).to_have_count(4)
    for s, d in zip(series.all(), data):
        assert s.get_attribute("data-unit") == d["id"]
        assert s.locator(".lists-point").count() == sum(v is not None for v in d["sample"]["values"])
    first = series.first.locator(".lists-point").first
    expect(first.locator("title")).to_have_text(
        f"example {examples[0]} · {FOUR[0]}: {fmt(data[0]['sample']['values'][0])}")
    # hovering a point reads out its input and every unit's value there; the arrow keys move along
    series.nth(2).locator(".lists-point").nth(3).hover()
    readout = plots.locator(".lists-readout")
    expect(readout.locator("b")).to_have_text(f"Input 4 of {len(examples)}: example {examples[3]}")
    expect(readout.locator("li")).to_have_text([f"{i} {fmt(d['sample']['values'][3])}" for i, d in zip(FOUR, data)])
    expect(readout.locator("li.current code")).to_have_text(FOUR[2])
    assert readout.locator("img").evaluate("i => i.src").endswith(f"/media/examples/{examples[3]}.webp")
    plots.locator("svg.lists-plot").focus()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowDown")
    expect(readout.locator("b")).to_have_text(f"Input 5 of {len(examples)}: example {examples[4]}")
    expect(readout.locator("li.current")).to_have_text(f"{FOUR[3]} {fmt(data[3]['sample']['values'][4])}")
    expect(readout.locator("li").nth(1)).to_have_text(f"{FOUR[1]} –")  # its missing value
    # rescaled, every unit spans 0..1 on the same axis
    page.locator("#lists-rescale").check()
    expect(plots.locator("svg.lists-plot g.series")).to_have_count(4)
    expect(plots.locator("svg.lists-plot text", has_text="activation (rescaled)")).to_have_count(1)
    page.locator("#lists-rescale").uncheck()

    # the copyable link is this page's address
    assert page.locator("#lists-link").input_value() == page.url == list_url(base, FOUR)
    page.locator("#lists-sample-plots svg.lists-plot g.series").nth(1).locator(".lists-point").nth(6).hover()
    assert_images_load(page, at_least=5)  # (and the readout's example picture)
    screenshot(page, "lists")

    # removing a card rewrites the fragment; the next card's remove button takes the focus; Back undoes it
    page.get_by_role("button", name=f"Remove {FOUR[1]} from the list").click()
    rest = [FOUR[0]] + FOUR[2:]
    page.wait_for_url(list_url(base, rest))
    expect(page.locator("#lists-cards .lists-id")).to_have_text(rest)
    expect(page.locator("#lists-hist-figure svg.lists-hist path")).to_have_count(3)
    expect(page.locator("#lists-sample-plots svg.lists-plot g.series")).to_have_count(3)
    expect(page.get_by_role("button", name=f"Remove {FOUR[2]} from the list")).to_be_focused()
    assert page.locator("#lists-link").input_value() == list_url(base, rest)
    page.go_back()
    page.wait_for_url(list_url(base, FOUR))
    expect(page.locator("#lists-cards .lists-id")).to_have_text(FOUR)


def test_units_of_two_models_get_a_plot_each_and_no_sample_is_said(page, base, site):
    ids = ["tiny-mlp/act/1", "tiny-cnn/conv/0", NO_SAMPLE, "tiny-mlp/fc1/4"]
    page.goto(list_url(base, ids))
    expect(page.locator("#lists-cards .lists-id")).to_have_text(ids)
    plots = page.locator("#lists-sample-plots .lists-sample-model")
    expect(plots).to_have_count(2)
    titles = [unit_data(site, i)["model_title"] for i in ids[:2]]
    expect(plots.locator("h3")).to_have_text(titles)  # in the order of the list
    expect(plots.nth(0).locator("svg.lists-plot g.series")).to_have_count(2)
    assert [s.get_attribute("data-unit") for s in plots.nth(0).locator("svg.lists-plot g.series").all()] == [ids[0], ids[3]]
    expect(plots.nth(1).locator("svg.lists-plot g.series")).to_have_count(1)
    expect(plots.nth(0).locator(".lists-no-sample")).to_have_text(f"no sample: {NO_SAMPLE}")
    expect(page.locator("#lists-cards .lists-note")).to_have_text(["", "", "no sample", ""])
    expect(page.locator("#lists-hist-figure svg.lists-hist path")).to_have_count(4)  # its histogram is still there


def test_ids_not_in_this_atlas_are_listed_escaped(page, base):
    odd = '<img src=x onerror="document.title=1">/a/1'
    ids = ["tiny-cnn/conv/1", "nope/layer/3", "tiny-cnn/conv/99", odd, "tiny-cnn/conv"]
    page.goto(list_url(base, ids))
    expect(page.locator("#lists-cards .lists-id")).to_have_text(["tiny-cnn/conv/1"])
    missing = page.locator("#lists-missing li")
    expect(missing).to_have_count(4)
    expect(missing.locator("code")).to_have_text(ids[1:])
    for li in missing.all_inner_texts():
        assert "not in this atlas" in li
    assert page.locator("#lists-missing img").count() == 0 and page.title() != "1"
    page.get_by_role("button", name="Remove nope/layer/3 from the list").click()
    page.wait_for_url(list_url(base, [ids[0]] + ids[2:]))
    expect(missing).to_have_count(3)


def test_an_empty_fragment_shows_the_stored_list(page, base):
    clear_storage(page, base)
    page.reload()
    empty = page.locator("#lists-empty")
    expect(empty).to_be_visible()
    expect(empty).to_contain_text("Add to list")
    expect(page.locator("#lists-share")).to_be_hidden()
    example = page.locator("#lists-example")
    expect(example).to_have_text(re.compile(r"^lists\.html#[^,]+/[^,]+/\d+,[^,]+/[^,]+/\d+$"))
    example.click()  # the example link lists its units
    expect(page.locator("#lists-cards > li")).to_have_count(2)

    mine = ["tiny-mlp/act/1", "tiny-cnn/conv/0", "tiny-cnn/fc/2"]
    page.evaluate("ids => localStorage.setItem('atlas-list', JSON.stringify(ids))", mine)
    page.goto(base + "lists.html")
    expect(page.locator("#lists-cards .lists-id")).to_have_text(mine)
    expect(page.locator("#lists-status")).to_have_text("Your list, kept in this browser: 3 units.")
    expect(page.locator("#lists-empty")).to_be_hidden()
    assert page.locator("#lists-link").input_value() == list_url(base, mine)
    expect(page.locator("#lists-save")).to_be_hidden()
    # removing a card of the stored list changes the stored list (the address stays as it was)
    page.get_by_role("button", name="Remove tiny-cnn/conv/0 from the list").click()
    expect(page.locator("#lists-cards .lists-id")).to_have_text([mine[0], mine[2]])
    assert stored(page) == [mine[0], mine[2]] and page.url == base + "lists.html"

    # a shared list can be made one's own
    page.goto(list_url(base, FOUR[:2]))
    expect(page.locator("#lists-save")).to_be_visible()
    page.locator("#lists-save").click()
    assert stored(page) == FOUR[:2]
    expect(page.locator("#lists-copy-status")).to_have_text("Saved: this is your list now (2 units).")
    expect(page.locator("#lists-save")).to_be_hidden()


def test_copy_button_copies_the_link_or_selects_it(page, base):
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.goto(list_url(base, FOUR))
    expect(page.get_by_label("Link to this list")).to_have_value(list_url(base, FOUR))
    page.get_by_role("button", name="Copy", exact=True).click()
    expect(page.locator("#lists-copy-status")).to_have_text("Copied.")
    assert page.evaluate("() => navigator.clipboard.readText()") == list_url(base, FOUR)
    # without the Clipboard API (plain http:// on another host): the text is selected, and copied where allowed
    page.evaluate("() => Object.defineProperty(navigator, 'clipboard', {value: undefined})")
    page.get_by_role("button", name="Copy", exact=True).click()
    expect(page.locator("#lists-copy-status")).to_have_text(re.compile(r"^(Copied\.|Selected: press Ctrl\+C)"))
    assert page.evaluate("() => { const i = document.getElementById('lists-link');"
                         " return [i.selectionStart, i.selectionEnd, document.activeElement === i]; }") == [
        0, len(list_url(base, FOUR)), True]


def test_add_to_list_on_unit_pages(page, base):
    clear_storage(page, base)
    page.goto(base + "tiny-cnn/conv/1/index.html")
    button = page.locator("button.add-to-list")
    expect(button).to_be_visible()
    expect(button).to_have_text("Add to list")
    expect(button).to_have_attribute("aria-pressed", "false")
    expect(page.locator("a.list-link")).to_be_hidden()
    button.click()
    expect(button).to_have_text("In your list ✓ (remove)")
    expect(button).to_have_attribute("aria-pressed", "true")
    assert stored(page) == ["tiny-cnn/conv/1"]
    link = page.locator("a.list-link")
    expect(link).to_have_text("open list (1)")
    assert link.evaluate("a => a.href") == list_url(base, ["tiny-cnn/conv/1"])

    page.goto(base + "tiny-mlp/fc1/4/index.html")
    expect(page.locator("a.list-link")).to_have_text("open list (1)")
    page.locator("button.add-to-list").click()
    expect(page.locator("a.list-link")).to_have_text("open list (2)")
    assert stored(page) == ["tiny-cnn/conv/1", "tiny-mlp/fc1/4"]
    click_through(page, page.locator("a.list-link"), SimpleNamespace(base=base))
    assert page.url == list_url(base, ["tiny-cnn/conv/1", "tiny-mlp/fc1/4"])
    expect(page.locator("#lists-cards .lists-id")).to_have_text(["tiny-cnn/conv/1", "tiny-mlp/fc1/4"])
    expect(page.locator("#lists-save")).to_be_hidden()  # it is the stored list

    # and off again
    page.goto(base + "tiny-cnn/conv/1/index.html")
    expect(page.locator("button.add-to-list")).to_have_attribute("aria-pressed", "true")
    page.locator("button.add-to-list").click()
    expect(page.locator("button.add-to-list")).to_have_text("Add to list")
    assert stored(page) == ["tiny-mlp/fc1/4"]
    expect(page.locator("a.list-link")).to_have_text("open list (1)")


def test_from_a_file_the_page_says_to_serve_it(page, site):
    page.goto((site / "lists.html").as_uri() + "#" + ",".join(FOUR))
    note = page.locator("#lists-file")
    expect(note).to_be_visible()
    expect(note).to_contain_text("make serve")
    expect(page.locator("#lists-cards .lists-id")).to_have_text(FOUR)  # names and labels, from the index
    expect(page.locator("#lists-histograms")).to_be_hidden()


AXE = TEMPLATES.parent / "web" / "node_modules" / "axe-core" / "axe.min.js"  # (web/package.json; `npm ci --prefix web`)


@pytest.mark.skipif(not AXE.is_file(), reason="axe-core is not installed (npm ci --prefix web)")
def test_axe_finds_no_accessibility_violations(page, base):
    clear_storage(page, base)
    for url in (list_url(base, FOUR[:2] + ["nope/layer/1", "tiny-mlp/act/1"]), base + "lists.html",
                base + "tiny-cnn/conv/1/index.html"):
        page.goto(url)
        page.wait_for_load_state("networkidle")
        if url.endswith("index.html"):
            page.locator("button.add-to-list").click()  # the button pressed, and its "open list" link
        page.add_script_tag(path=str(AXE))
        violations = page.evaluate("async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
                                   ".map(v => v.id + ': ' + v.nodes.map(n => n.target.join(' ')).join(', '))")
        assert violations == [], f"{url}: {violations}"


@pytest.fixture(scope="module")
def text_site(tmp_path_factory):
    """A tiny language model's atlas (tests/test_text.py's corpus and model), served at .base."""
    from test_text import tiny_lm_atlas_config

    cfg = tiny_lm_atlas_config(tmp_path_factory.mktemp("lists-text"))
    build(cfg, progress=False)
    root = tmp_path_factory.mktemp("lists-text-pub") / "pub" / "atlas"
    shutil.copytree(cfg.atlas.site_dir, root)
    with serving(root) as srv:
        yield SimpleNamespace(base=srv.base, root=root)


def test_text_units_cards_show_the_tokens_they_fire_on(page, text_site):
    """A text unit has no picture: its card lists the tokens its top examples peak on, from its data.json."""
    ids = ["lm/blocks.1.mlp.act/0", "lm/blocks.0.mlp.act/3"]
    page.goto(list_url(text_site.base, ids))
    tokens = page.locator("#lists-cards .lists-tokens")
    expect(tokens).to_have_count(2)
    for shown, unit_id in zip(tokens.all(), ids):
        fires_on = unit_data(text_site.root, unit_id)["fires_on"]
        want = ", ".join(f"{t} ×{c}" for t, c in zip(fires_on["token"][:5], fires_on["count"][:5]))
        assert shown.text_content() == f"fires on {want}"
    expect(page.locator("#lists-cards .lists-thumb .muted")).to_have_count(0)  # no "no picture"
