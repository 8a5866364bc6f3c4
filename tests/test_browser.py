"""The demo atlas in a real browser (Debian's chromium driven by Playwright), served from a subpath.

The site is built once (like test_build.py's `demo`) and served by http.server from its parent folder,
so pages live at http://127.0.0.1:PORT/atlas/... as on a GitHub Pages project site. Navigation is done
by clicking links, as a reader would. Every test ends by asserting that nothing went wrong in the
browser while it ran: no console error, no uncaught exception, no failed request, no HTTP error.
Full-page screenshots go to test-artifacts/screenshots/.

Needs the `playwright` package (the [test] extra) and a chromium binary: /usr/bin/chromium
(`apt-get install chromium`) or the path in $CHROMIUM. Never `playwright install`: the system browser
is used. Without them the module is skipped, unless $ATLAS_REQUIRE_BROWSER is set (as .ci/run does),
in which case that is an error.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import re
import shutil
import threading
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest

from atlas_builder.store import Store
from conftest import REPO

CHROMIUM = shutil.which(os.environ.get("CHROMIUM") or "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[test]')"
    if CHROMIUM is None:
        return (f"no chromium at {os.environ.get('CHROMIUM') or '/usr/bin/chromium'} "
                "(apt-get install chromium, or point $CHROMIUM at a Chromium binary)")
    return None


_why = _missing()
if _why is None:
    from playwright.sync_api import expect, sync_playwright
elif os.environ.get("ATLAS_REQUIRE_BROWSER"):
    @pytest.fixture(scope="module", autouse=True)
    def _browser_required():  # every test here fails (before the build); the other test files still run
        pytest.fail(f"browser tests required ($ATLAS_REQUIRE_BROWSER) but {_why}", pytrace=False)
else:
    pytest.skip(f"browser tests skipped: {_why}", allow_module_level=True)


# ---------------------------------------------------------------- the site, its server, the browser

@pytest.fixture(scope="module")
def demo(demo_build):
    """The demo atlas, built once per session into <tmp>/pub/atlas (its store next to it)."""
    return demo_build[0]


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root):
        self.requests: list[tuple[str, int]] = []  # (path, status) of everything served
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))


class Handler(http.server.SimpleHTTPRequestHandler):
    def log_request(self, code="-", size="-"):
        with self.server.lock:
            self.server.requests.append((self.path, int(code) if str(code).isdigit() else 0))

    def log_message(self, format, *args):  # keep the test output quiet
        pass


@contextlib.contextmanager
def serving(site):
    """A Server over the site folder's parent, in a thread, while the block runs; the site itself is at its
    `base` = http://127.0.0.1:PORT/<site folder's name>/ (a subpath, as on a GitHub Pages project site)."""
    srv = Server(site.parent)
    thread = threading.Thread(target=srv.serve_forever, name="atlas-http", daemon=True)
    thread.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}/{site.name}/"
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def server(demo):
    """Serves the demo site at server.base (see `serving`)."""
    with serving(demo.atlas.site_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@dataclass
class Problems:
    """What went wrong in the browser: console errors, page errors, failed requests, HTTP errors."""
    found: list[str] = field(default_factory=list)
    expected_missing: set[str] = field(default_factory=set)  # URLs a test asks for on purpose

    def ignorable(self, url: str) -> bool:
        return url in self.expected_missing

    def console(self, msg):
        if msg.type == "error" and not self.ignorable(msg.location.get("url", "")):
            self.found.append(f"console error on {msg.page.url if msg.page else '?'}: {msg.text} "
                              f"({msg.location.get('url')}:{msg.location.get('lineNumber')})")

    def page_error(self, err):
        self.found.append(f"uncaught error on {err.page.url if err.page else '?'}: {err.error}")

    def request_failed(self, request):
        # net::ERR_ABORTED is the browser cancelling a request itself (a click navigated away while
        # lazy pictures were still loading), not a fault of the site: a missing file answers with
        # an HTTP error (`response`), and an undecodable one fails BROKEN_IMAGES
        if request.failure == "net::ERR_ABORTED":
            return
        if not self.ignorable(request.url):
            self.found.append(f"request failed: {request.url} ({request.failure})")

    def response(self, response):
        if response.status >= 400 and not self.ignorable(response.url):
            self.found.append(f"HTTP {response.status}: {response.url}")


@pytest.fixture(scope="module")
def context(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(15_000)
    problems = Problems()
    ctx.on("console", problems.console)
    ctx.on("weberror", problems.page_error)
    ctx.on("requestfailed", problems.request_failed)
    ctx.on("response", problems.response)
    ctx.problems = problems
    yield ctx
    ctx.close()


@pytest.fixture
def page(context):
    """A fresh tab; anything that went wrong in the browser while the test ran fails it (at teardown)."""
    problems = context.problems
    start = len(problems.found)
    tab = context.new_page()
    yield tab
    tab.close()
    during = problems.found[start:]
    assert not during, "problems in the browser:\n" + "\n".join(during)


@pytest.fixture(scope="module")
def units(demo):
    """Every unit of the demo store: {(model, layer, unit): label}; and the models' titles."""
    with Store(demo.store_dir, read_only=True) as store:
        out = {(m.model, u.layer, u.unit): u.label
               for m in store.models() for l in store.layers(m.model) for u in store.units(m.model, l.layer)}
        titles = {m.model: m.title for m in store.models()}
    return out, titles


# ---------------------------------------------------------------- helpers

def click_through(page, link, server):
    """Click `link` (an <a>, HTML or SVG) and wait until the page it points to has loaded."""
    expect(link).to_have_count(1)
    target = link.evaluate("a => new URL(a.getAttribute('href'), document.baseURI).href")
    assert target.startswith(server.base), f"link leaves the site's subpath: {target}"
    link.click()
    page.wait_for_url(target)
    page.wait_for_load_state("load")
    return target


def h1(page) -> str:
    return " ".join(page.locator("h1").inner_text().split())


# Scroll every <img> into view (so loading=lazy ones start), wait for each to load or fail, and
# return the ones that did not decode to a picture; data: URIs included.
BROKEN_IMAGES = """async () => {
  const settle = img => img.complete ? Promise.resolve() : new Promise(done => {
    img.addEventListener('load', done, {once: true});
    img.addEventListener('error', done, {once: true});
    setTimeout(done, 10000);
  });
  for (const img of Array.from(document.images)) {
    img.scrollIntoView({block: 'center'});
    await settle(img);
  }
  window.scrollTo(0, 0);
  return Array.from(document.images)
    .filter(img => !(img.complete && img.naturalWidth > 0))
    .map(img => (img.currentSrc || img.src).slice(0, 100) + ' [' + img.alt + ']');
}"""


def assert_images_load(page, at_least: int) -> int:
    count = page.locator("img").count()
    assert count >= at_least, f"{page.url}: {count} <img>, expected at least {at_least}"
    broken = page.evaluate(BROKEN_IMAGES)
    assert broken == [], f"{page.url}: images that did not load: {broken}"
    return count


def screenshot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


# ---------------------------------------------------------------- tests

def test_click_from_home_to_model_layer_unit_and_back(page, server, units):
    _, titles = units
    page.goto(server.base + "index.html")
    assert h1(page) == "Neuron Atlas: digits demo"
    screenshot(page, "home")

    click_through(page, page.locator("table.data tbody a", has_text=titles["digits-cnn"]), server)
    assert page.url == server.base + "digits-cnn/index.html"
    assert h1(page) == titles["digits-cnn"]
    screenshot(page, "model")

    click_through(page, page.locator("table.data tbody a").filter(has=page.locator("code", has_text=re.compile("^relu1$"))),
                  server)
    assert page.url == server.base + "digits-cnn/relu1/index.html"
    n_units = sum(1 for (m, l, _) in units[0] if (m, l) == ("digits-cnn", "relu1"))
    assert re.fullmatch(rf"relu1 Conv2d\+ReLU 16×8×8 · {n_units} units", h1(page)), h1(page)
    assert page.locator("ul.unit-grid a").count() == n_units

    click_through(page, page.locator("ul.unit-grid a").nth(3), server)
    assert page.url == server.base + "digits-cnn/relu1/3/index.html"
    assert h1(page) == f"Unit 3 of relu1 (Conv2d+ReLU 16×8×8) in {titles['digits-cnn']}"
    assert page.locator(".unit-label .label-text").inner_text() == units[0][("digits-cnn", "relu1", 3)]

    # and back out: the pager's "up" link, the breadcrumb to the model, the brand to home
    click_through(page, page.locator("nav.pager a[rel=up]"), server)
    assert h1(page).startswith("relu1 ")
    click_through(page, page.locator("nav.crumbs a").first, server)
    assert h1(page) == titles["digits-cnn"]
    click_through(page, page.locator("a.brand"), server)
    assert page.url == server.base + "index.html"
    click_through(page, page.locator("nav.site-nav a", has_text="About"), server)
    assert h1(page) == "About this atlas"


def test_images_load_on_home_layer_unit_and_input_pages(page, server):
    page.goto(server.base + "index.html")
    assert_images_load(page, at_least=1)  # featured units

    page.goto(server.base + "digits-cnn/relu2/index.html")
    assert page.locator("ul.unit-grid img[loading=lazy]").count() == 32
    assert_images_load(page, at_least=32)
    screenshot(page, "layer")

    page.goto(server.base + "digits-cnn/relu1/3/index.html")
    # the heat maps over the top examples: one sprite PNG, each example's block of rows its own
    assert page.locator("ol.examples.top span.heat").count() == 9
    sprite = page.evaluate("""async () => {
        const bg = getComputedStyle(document.querySelector('ol.examples.top span.heat')).backgroundImage;
        const img = new Image(); img.src = bg.slice(5, -2); await img.decode();
        return [bg.slice(0, 27), img.naturalWidth, img.naturalHeight]; }""")
    assert sprite[0] == 'url("data:image/png;base64,' and sprite[2] == 9 * sprite[1] > 0
    assert page.locator(".dot-map img").count() == 1 and page.locator(".dot-map i").count() == 1
    assert_images_load(page, at_least=18)  # top and bottom examples at least
    screenshot(page, "unit")

    page.goto(server.base + "digits-mlp/relu1/7/index.html")
    assert_images_load(page, at_least=18)

    page.goto(server.base + "index.html")
    click_through(page, page.locator("nav.site-nav a", has_text="Inputs"), server)
    assert h1(page) == "Inputs"
    n_inputs = page.locator("ul.unit-grid.inputs a").count()
    assert n_inputs > 0
    assert_images_load(page, at_least=n_inputs)

    click_through(page, page.locator("ul.unit-grid.inputs a").first, server)
    assert re.fullmatch(r"Input \d+ label \S+", h1(page)), h1(page)
    assert_images_load(page, at_least=2)
    screenshot(page, "input")


def test_search_from_home_by_label_and_by_unit_id(page, server, units):
    labels, _ = units
    # the rarest class-selective label of the demo, e.g. "class-selective: 3"
    counts = Counter(l for l in labels.values() if l.startswith("class-selective"))
    label = min(counts, key=lambda l: (counts[l], l))
    expected = {f"{m}/{l}/{u}/index.html" for (m, l, u), lab in labels.items() if lab == label}

    page.goto(server.base + "index.html")
    page.locator("#home-search").fill(label)
    page.locator("#home-search").press("Enter")
    page.wait_for_url(re.compile(re.escape(server.base + "search/index.html?q=") + ".+"))
    assert h1(page) == "Search units"
    assert page.locator("#search-input").input_value() == label
    results = page.locator("#search-results a")
    expect(results.first).to_be_visible()
    expect(page.locator("#search-status")).to_have_text(re.compile(r"^\d+ units?\."))
    hrefs = [a.evaluate("a => a.href") for a in results.all()]
    found = {h.removeprefix(server.base) for h in hrefs}
    assert expected <= found, f"search for {label!r} misses {sorted(expected - found)}"
    for note in page.locator("#search-results li span.muted").all_inner_texts():
        assert "class-selective" in note  # every word must match: only class-selective units
    ranked_first = {h.removeprefix(server.base) for h in hrefs[:len(expected)]}
    assert ranked_first == expected, f"the units labelled {label!r} are not ranked first: {hrefs}"
    screenshot(page, "search")

    # open a result labelled with exactly that label: its unit page shows the label
    hit = page.locator("#search-results li").filter(
        has=page.locator("span.muted", has_text=re.compile(rf"— {re.escape(label)} \(score [0-9.]+\)$"))).first
    target = click_through(page, hit.locator("a"), server)
    assert target.removeprefix(server.base) in expected
    assert re.match(r"Unit \d+ |\S+ \d+ · ", h1(page)), h1(page)  # output units are titled by their class
    assert page.locator(".unit-label .label-text").inner_text() == label
    assert re.fullmatch(r"AUROC [01]\.\d\d", page.locator(".unit-label .label-score").inner_text())

    # a unit id in the search page's own box (the form runs the search in place, no reload)
    click_through(page, page.locator("nav.site-nav a", has_text="Search"), server)
    page.locator("#search-input").fill("digits-cnn/relu1/3")
    page.locator("#search-input").press("Enter")
    first = page.locator("#search-results a").first
    expect(first).to_have_attribute("href", re.compile(r"(^|/)digits-cnn/relu1/3/index\.html$"))
    expect(first).to_have_text(re.compile(r"· relu1 · unit 3$"))
    click_through(page, first, server)
    assert page.url == server.base + "digits-cnn/relu1/3/index.html"
    assert h1(page).startswith("Unit 3 of relu1")


def test_search_by_label_score(page, server, demo):
    """score:>0.9 finds exactly the units whose label scores above 0.9 (to the index's 2 decimals)."""
    with Store(demo.store_dir, read_only=True) as store:
        scores = {f"{m.model}/{u.layer}/{u.unit}/index.html": u.label_score
                  for m in store.models() for l in store.layers(m.model) for u in store.units(m.model, l.layer)}
    expected = {url for url, score in scores.items() if score is not None and round(score, 2) > 0.9}
    assert expected and len(expected) < len(scores)
    page.goto(server.base + "search/index.html?q=" + "score%3A%3E0.9")
    expect(page.locator("#search-status")).to_have_text(f"{len(expected)} unit{'s' if len(expected) > 1 else ''}."
                                                        if len(expected) <= 200 else re.compile(r"^\d+ units"))
    hrefs = {a.evaluate("a => a.href").removeprefix(server.base) for a in page.locator("#search-results a").all()}
    assert hrefs == expected if len(expected) <= 200 else hrefs <= expected
    for note in page.locator("#search-results li span.muted").all_inner_texts():
        assert float(re.search(r"\(score ([0-9.]+)\)", note).group(1)) > 0.9


def _clickable_point(page, svg) -> int:
    """Index of a map point whose centre is not covered by another point (so a click lands on it)."""
    index = svg.evaluate("""svg => Array.from(svg.querySelectorAll('a')).findIndex(a => {
      const r = a.getBoundingClientRect();
      const hit = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);
      return hit && hit.closest('a') === a;
    })""")
    assert index >= 0, "every point of the map is covered by another"
    return index


def test_unit_map_points_open_their_units(page, server):
    page.goto(server.base + "digits-cnn/relu2/index.html")
    switch = page.locator("#unit-map ~ .map-switch").first
    umap, pca = switch.locator("svg[data-method=umap]"), switch.locator("svg[data-method=pca]")
    expect(umap).to_be_visible()  # UMAP is the default view
    expect(pca).to_be_hidden()
    points = umap.locator("a:has(circle)")
    assert points.count() == 32
    umap.scroll_into_view_if_needed()
    point = points.nth(_clickable_point(page, umap))

    # hovering shows the unit's picture (static/atlas.js), loaded
    point.hover()
    tip = page.locator(".map-tip")
    expect(tip).to_be_visible()
    expect(tip.locator("img")).to_have_js_property("complete", True)
    assert tip.locator("img").evaluate("img => img.naturalWidth") > 0
    title = point.locator("title").text_content()  # "unit 12: feature-selective (broad)"
    unit = int(re.match(r"unit (\d+):", title).group(1))

    target = click_through(page, point, server)
    assert target == server.base + f"digits-cnn/relu2/{unit}/index.html"
    assert h1(page).startswith(f"Unit {unit} ")

    # the PCA view: its radio button swaps the maps, and its points open units too
    page.go_back()
    page.wait_for_url(server.base + "digits-cnn/relu2/index.html")
    switch.locator("label", has_text="PCA").click()
    expect(pca).to_be_visible()
    expect(umap).to_be_hidden()
    pca.scroll_into_view_if_needed()
    point = pca.locator("a:has(circle)").nth(_clickable_point(page, pca))
    click_through(page, point, server)
    assert re.match(r"Unit \d+ of relu2 \(Conv2d\+ReLU 32×8×8\) in ", h1(page)), h1(page)


def test_embed_card_draws_its_histogram_and_top_examples_from_its_json(page, server, demo):
    """The embed card's page holds its title, label and feature vis; embed.js adds the histogram and the top 6
    examples from the unit's data.json: the examples', values' and histogram's numbers are the export's."""
    import json

    unit = "digits-cnn/relu2/3"
    data = json.loads((demo.atlas.site_dir / unit / "data.json").read_text(encoding="utf-8"))
    page.goto(server.base + unit + "/embed.html")
    items = page.locator("ol.top li")
    expect(items).to_have_count(min(6, len(data["top"]["example"])))
    srcs = [items.nth(i).locator("img").get_attribute("src") for i in range(items.count())]
    assert srcs == [data["example_images"].format(example=e) for e in data["top"]["example"][:6]]
    values = [float(items.nth(i).locator("span").inner_text()) for i in range(items.count())]
    assert values == pytest.approx(data["top"]["value"][:6], rel=5e-3)
    bars = page.locator("figure.histogram svg path.bar")
    expect(bars).to_have_count(1)
    counts = data["histogram"]["counts"]
    assert bars.get_attribute("d").count("Z") == sum(1 for c in counts if c)  # one bar per non-empty bin
    expect(page.locator("figure.histogram svg title")).to_have_text(
        f"{sum(counts)} sampled activations in {len(counts)} bins, at most {max(counts)} in one")
    assert_images_load(page, at_least=len(srcs) + 1)  # the examples and the feature vis


def test_404_page_renders_and_its_links_work(page, server):
    missing = server.base + "no-such-model/conv1/0/index.html"
    page.context.problems.expected_missing.add(missing)
    # http.server's own 404 page has no icon link, so Chromium may ask the server's root for one
    root = urlsplit(server.base)
    page.context.problems.expected_missing.add(f"{root.scheme}://{root.netloc}/favicon.ico")
    response = page.goto(missing)
    assert response.status == 404  # (python's http.server has no custom 404 pages; GitHub Pages does)

    page.goto(server.base + "404.html")
    assert h1(page) == "Page not found"
    assert page.evaluate("() => document.styleSheets.length && document.styleSheets[0].cssRules.length") > 0
    screenshot(page, "404")
    click_through(page, page.get_by_role("link", name="Go to the home page"), server)
    assert h1(page) == "Neuron Atlas: digits demo"
    page.go_back()
    page.wait_for_url(server.base + "404.html")
    click_through(page, page.get_by_role("link", name="search for a unit"), server)
    assert h1(page) == "Search units"


def test_requests_stay_under_the_subpath(browser, server):
    # a browser of its own: Chromium keeps favicons per browser, not per context
    fresh = browser.browser_type.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
        start = len(server.requests)
        tab = fresh.new_page()
        tab.goto(server.base + "index.html")
        tab.wait_for_load_state("networkidle")
        outside = [(path, code) for path, code in server.requests[start:]
                   if not path.startswith(urlsplit(server.base).path)]
        assert outside == []
    finally:
        fresh.close()
