"""Rendering: a page's context in, its HTML out (Jinja2, autoescape on), and the templates' hash.

Pure: no store, no files written. Text from models and datasets is always
escaped by the templates' autoescape; StrictUndefined makes a missing
context key an error, not a blank.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import jinja2

TEMPLATES = Path(__file__).resolve().parent.parent.parent / "templates"


@lru_cache(maxsize=4)
def environment(folder: Path = TEMPLATES) -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(folder)), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def render(template: str, context: dict) -> str:
    """Pure: the HTML of one page from its context."""
    return environment().get_template(template).render(**context)


@lru_cache(maxsize=4)
def templates_key(folder: Path = TEMPLATES) -> str:
    """Hash of every template and static file: a change re-renders the pages."""
    h = hashlib.sha1()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()

