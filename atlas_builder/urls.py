"""Every path and URL of the site, relative, from one place.

The site is a tree of folders with an index.html each, so a unit's stable
address is `<model>/<layer>/<unit>/` (citable) while links inside the site
name `index.html` explicitly, so the site also works opened from disk.
All links are relative to the page that holds them: the same `site/` works
from file://, from a GitHub Pages project subpath and from any static host.

Paths here are site-root-relative POSIX strings ("digits-cnn/conv1/3/index.html");
`rel(from_page, to_path)` turns one into a link usable on another page.
This module does not render or write anything.
"""

from __future__ import annotations

from .ids import UnitId, layer_slug

HOME = "index.html"
SEARCH = "search/index.html"
ABOUT = "about/index.html"
INPUTS = "inputs/index.html"
NOT_FOUND = "404.html"  # GitHub Pages serves it for any missing path, at any depth
SQL = "sql/index.html"  # SQL in the browser over the open data (DuckDB-WASM)
LISTS = "lists.html"  # units side by side, taken from the URL fragment (lists.html#model/layer/unit,...)
SITEMAP = "sitemap.xml"
DATA = "data"  # the open data: <DATA>/<table>.parquet


def open_data(file: str) -> str:
    return f"{DATA}/{file}"


def nested_home(folder: str) -> str:
    """The home page of another atlas whose site is in sub-folder `folder` of this one."""
    return f"{folder}/{HOME}"


def model_dir(model: str) -> str:
    return f"{model}"


def layer_dir(model: str, layer: str) -> str:
    return f"{model}/{layer_slug(layer)}"


def unit_dir(uid: UnitId) -> str:
    return f"{layer_dir(uid.model, uid.layer)}/{uid.unit}"


def model_page(model: str) -> str:
    return f"{model_dir(model)}/index.html"


def layer_page(model: str, layer: str) -> str:
    return f"{layer_dir(model, layer)}/index.html"


def layer_dot_map(model: str, layer: str) -> str:
    """The layer's small unit map (every unit a dot), one file that each unit page shows with its own dot."""
    return f"{layer_dir(model, layer)}/units.svg"


def unit_page(uid: UnitId) -> str:
    return f"{unit_dir(uid)}/index.html"


def unit_page_pattern(model: str, layer: str) -> str:
    """A layer's unit pages as one pattern, `{unit}` for the unit (the JSON exports' `unit_pages`)."""
    return f"{layer_dir(model, layer)}/{{unit}}/index.html"


def unit_json(uid: UnitId) -> str:
    """The unit's JSON export: every number its page shows, and its media paths."""
    return f"{unit_dir(uid)}/data.json"


def unit_embed(uid: UnitId) -> str:
    """The unit's embeddable card (for an iframe): beside its page, so the two share every relative link."""
    return f"{unit_dir(uid)}/embed.html"


def sql_engine(name: str) -> str:
    """A file of the vendored DuckDB-WASM that the SQL page loads."""
    return f"static/duckdb/{name}"


def input_page(example: int) -> str:
    return f"inputs/{example}/index.html"


def media(path: str) -> str:
    """A file of the store's media folder (a path the store gives), as published in the site."""
    return f"media/{path}"


def example_image(example: int) -> str:
    """Each dataset example's image is stored once and referenced by every page."""
    return media(f"examples/{example}.webp")


def featurevis_media(model: str, layer: str, unit: int, kind: str) -> str:
    """Store media path of a unit's feature-vis file; kind: positive, animation, negative, weights."""
    return f"fv/{model}/{layer_slug(layer)}/{unit}.{kind}.webp"


def static(name: str) -> str:
    return f"static/{name}"


def permalink(base_url: str, uid: UnitId) -> str:
    """Absolute, citable URL of a unit page (its folder), or the relative folder without a base URL."""
    return absolute(base_url, unit_dir(uid) + "/")


def absolute(base_url: str, path: str) -> str:
    """`path` (site-root-relative) under the public base URL; unchanged when the base URL is unknown."""
    return f"{base_url.rstrip('/')}/{path}" if base_url else path


def page_url(base_url: str, page: str) -> str:
    """The public URL of a page: its folder for index.html pages (the citable form)."""
    folder = page[: -len("index.html")] if page.endswith("index.html") else page
    return absolute(base_url, folder)


def rel(from_page: str, to_path: str) -> str:
    """Link from the page at `from_page` to the file at `to_path` (both site-root-relative, normalized).

    posixpath.relpath's result, by string operations (it is called ~90 times
    per unit page, and relpath's abspath/getcwd calls were a fifth of the render).
    """
    start = from_page.split("/")[:-1]
    target = to_path.rstrip("/").split("/")
    common = 0
    for a, b in zip(start, target):
        if a != b:
            break
        common += 1
    return "/".join([".."] * (len(start) - common) + target[common:]) or "."


# the site's own top-level folders (a model's folder, <model>/, sits beside them, so no model may take one's name)
SITE_FOLDERS = frozenset(path.split("/")[0] for path in (
    SEARCH, ABOUT, INPUTS, SQL, open_data(""), media(""), static(""), input_page(0)))
