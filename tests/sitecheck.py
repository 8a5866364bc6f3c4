"""Test helpers that read a built site: parse pages, collect and resolve links."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit


class Page(HTMLParser):
    """Collects links, images, elements by class and the text of one HTML page."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []  # every href, src, srcset and data-thumb
        self.elements: list[tuple[str, dict]] = []  # (tag, attrs) in document order
        self.text_parts: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs))
        for key in ("href", "src", "srcset", "data-thumb"):
            if attrs.get(key) and not attrs[key].startswith("data:"):
                self.links.append(attrs[key])

    def handle_data(self, data):
        self.text_parts.append(data)

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.text_parts).split())

    def find(self, tag: str | None = None, cls: str | None = None, **attrs) -> list[dict]:
        out = []
        for t, a in self.elements:
            if tag and t != tag:
                continue
            if cls and cls not in (a.get("class") or "").split():
                continue
            if all(a.get(k.replace("_", "-")) == v for k, v in attrs.items()):
                out.append(a)
        return out


def read_page(path: Path) -> Page:
    return Page(path.read_text(encoding="utf-8"))


def broken_links(site: Path) -> list[str]:
    """Every relative href/src in every page that does not resolve to a file inside the site."""
    site = site.resolve()
    broken = []
    for page in sorted(site.rglob("*.html")):
        for link in read_page(page).links:
            if page.name == "404.html" and link.startswith("/"):
                continue  # 404.html may use root links (GitHub Pages serves it at any depth)
            parts = urlsplit(link)
            if parts.scheme or parts.netloc or link.startswith("#"):
                continue
            target = (page.parent / unquote(parts.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file() or site not in target.parents:
                broken.append(f"{page.relative_to(site)} -> {link}")
    return broken
