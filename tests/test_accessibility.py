"""Accessibility of the demo atlas's pages, checked by axe-core in Chromium.

The demo atlas (conftest's `demo_build`, built once per session) served by http.server from a subpath
(http://127.0.0.1:PORT/atlas/), as test_browser.py serves it. Each page below is opened, at a desktop's width
and at a phone's, and brought to the state a reader sees (the list page's cards rendered, the SQL page's first
example run); then axe-core (web/node_modules/axe-core/axe.min.js, from web/package.json) is injected and run
over the document for the WCAG 2.0/2.1 A and AA rules and axe's best practices: no violation may be "serious"
or "critical" (the moderate and minor ones are printed, not failed on). Nothing may go wrong in the browser
either (test_browser's `page` fixture: no console error, no failed request, no HTTP error).

Skipped like test_browser.py (whose browser set-up it reuses) without playwright or chromium, and without
axe-core (`npm ci --prefix web`, or `make test`); with $ATLAS_REQUIRE_BROWSER set, each of those is a
failure instead.
"""

from __future__ import annotations

import os
import re

import pytest

import test_browser  # skips (or, with $ATLAS_REQUIRE_BROWSER, fails) this module as it does itself
from atlas_builder.sql_engine import engine_files
from conftest import REPO
from test_browser import browser, context, demo, page, server  # noqa: F401  (fixtures)

if hasattr(test_browser, "_browser_required"):  # no browser but one is required: fail here too
    _browser_required = test_browser._browser_required
else:
    from playwright.sync_api import expect

AXE = REPO / "web" / "node_modules" / "axe-core" / "axe.min.js"
if not AXE.is_file():
    if os.environ.get("ATLAS_REQUIRE_BROWSER"):
        @pytest.fixture(scope="module", autouse=True)
        def _axe_required():
            pytest.fail(f"accessibility tests required ($ATLAS_REQUIRE_BROWSER) but axe-core is not installed at "
                        f"{AXE.relative_to(REPO)}: run `npm ci --prefix web` (or `make test`)", pytrace=False)
    else:
        pytest.skip(f"accessibility tests skipped: axe-core is not installed at {AXE.relative_to(REPO)} "
                    "(run `npm ci --prefix web`, or `make test` with npm available)", allow_module_level=True)

TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"]
FAIL_ON = {"serious", "critical"}
VIEWPORTS = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 375, "height": 812}}  # (a phone's
# narrow column is where preformatted text and wide charts overflow into scrolling regions)
LIST_UNITS = ["digits-cnn/relu2/3", "digits-cnn/relu2/5", "digits-mlp/relu1/4", "digits-cnn/fc/7"]

RUN_AXE = """async tags => {
  const r = await axe.run(document, {runOnly: {type: 'tag', values: tags}});
  return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help, count: v.nodes.length,
                                 targets: v.nodes.slice(0, 5).map(n => n.target.join(' '))}));
}"""


def _heading(page):
    expect(page.locator("h1")).to_have_count(1)


def _lists(page):
    cards = page.locator("#lists-cards > li.lists-card")
    expect(cards).to_have_count(len(LIST_UNITS))
    expect(page.locator("#lists-cards .lists-id")).to_have_text(LIST_UNITS)
    expect(page.locator("#lists-status")).to_have_text(re.compile(rf"^{len(LIST_UNITS)} units"))
    expect(page.locator("#lists-hist-figure svg.lists-hist")).to_have_count(1)
    expect(page.locator("#lists-sample-plots svg.lists-plot")).to_have_count(2)  # one per model


def _embed(page):  # the card drawn from its data.json
    expect(page.locator("figure.histogram svg")).to_have_count(1)
    expect(page.locator("ol.top li").first).to_be_visible()


def _sql(page):
    page.locator(".sql-examples button").first.click()
    expect(page.locator("#sql-status")).to_have_text(re.compile(r" rows? in "), timeout=60_000)
    expect(page.locator("#sql-table tbody tr").first).to_be_attached()


PAGES = {  # name: (path under the site, what to wait for before axe runs)
    "home": ("index.html", _heading),
    "model": ("digits-cnn/index.html", _heading),
    "layer": ("digits-cnn/relu2/index.html", _heading),
    "unit": ("digits-cnn/relu2/3/index.html", _heading),
    "unit-mlp": ("digits-mlp/relu1/4/index.html", _heading),
    "embed": ("digits-cnn/relu2/3/embed.html", _embed),
    "list": ("lists.html#" + ",".join(LIST_UNITS), _lists),
    "sql": ("sql/index.html", _sql),
}


def describe(violations) -> str:
    return "\n".join(f"  {v['id']} ({v['impact']}, {v['count']} node{'s' if v['count'] != 1 else ''}): {v['help']}"
                     + "".join(f"\n      {t}" for t in v["targets"]) for v in violations)


@pytest.mark.parametrize("viewport", list(VIEWPORTS))
@pytest.mark.parametrize("name", list(PAGES))
def test_no_serious_or_critical_axe_violations(page, server, name, viewport):
    path, ready = PAGES[name]
    if name == "sql" and not engine_files():
        why = "DuckDB-WASM is not installed (run `npm ci --prefix web`, or `make test`): the SQL page has no engine"
        if os.environ.get("ATLAS_REQUIRE_BROWSER"):
            pytest.fail(f"SQL page accessibility test required ($ATLAS_REQUIRE_BROWSER) but {why}", pytrace=False)
        pytest.skip(why)
    page.set_viewport_size(VIEWPORTS[viewport])
    page.goto(server.base + path)
    page.wait_for_load_state("load")
    if ready:
        ready(page)
    page.add_script_tag(path=str(AXE))
    violations = page.evaluate(RUN_AXE, TAGS)
    others = [v for v in violations if v["impact"] not in FAIL_ON]
    if others:  # reported (pytest -rP or -s shows them), not failed on
        print(f"{name} ({path}, {viewport}): moderate/minor axe violations:\n{describe(others)}")
    bad = [v for v in violations if v["impact"] in FAIL_ON]
    assert not bad, f"{name} ({path}, {viewport}): serious or critical axe violations:\n{describe(bad)}"
