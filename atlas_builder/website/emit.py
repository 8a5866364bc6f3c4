"""Writing a site tree: the Emitter (incremental: unchanged files linked from the previous build), the
permalink manifest, sizes and budget, and the swap of a finished tree into place.

Owns the files of the site folder; not what goes in them (pages.py, builder.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from .. import atomic
from ..config import SiteSection
from ..errors import AtlasError
from . import rendering

MARKER = ".atlas-site"  # marks a folder as ours, so we never replace a folder we did not write
MANIFEST = ".atlas-manifest.json"  # path -> key of every file of the last build (incremental rendering)
PERMALINKS = ".atlas-permalinks.json"  # path -> [model, layer, unit] of every unit page any build published


def previous_permalinks(previous: Path | None) -> dict[str, list]:
    """The unit addresses the previous site (and the builds before it) published; {} without one."""
    path = previous / PERMALINKS if previous is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, list) and len(v) == 3}



class Emitter:
    """Writes the new tree; a file whose key matches the previous build's is hard-linked from it instead.

    Keys: a page's key is the templates' hash plus its context (so rendering
    is skipped too); a data file's key is its bytes.
    """

    def __init__(self, out: Path, previous: Path | None):
        self.out, self.previous = out, previous
        self.old: dict[str, str] = {}
        if previous is not None and (previous / MANIFEST).is_file():
            try:
                self.old = json.loads((previous / MANIFEST).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self.old = {}
        self.keys: dict[str, str] = {}
        self.pages = self.rendered = 0
        self._folders: set[Path] = set()

    def target(self, path: str) -> Path:
        """Where `path` goes in the new tree, its folder made (once per folder)."""
        target = self.out / path
        if target.parent not in self._folders:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._folders.add(target.parent)
        return target

    def _write(self, path: str, data: bytes) -> None:
        """A plain write: the tree is new and swapped in whole, so each file needs no temp-and-rename of its own."""
        target = self.target(path)
        try:
            with open(target, "wb") as f:
                f.write(data)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(target)) from exc

    def _reuse(self, path: str, key: str) -> bool:
        self.keys[path] = key
        if self.old.get(path) != key or self.previous is None:
            return False
        src = self.previous / path
        if not src.is_file():
            return False
        link_or_copy(src, self.target(path))
        return True

    def page(self, path: str, template: str, context: dict) -> None:
        self.pages += 1
        key = hashlib.sha1((rendering.templates_key() + template + json.dumps(context, sort_keys=True, default=str))
                           .encode()).hexdigest()
        if not self._reuse(path, key):
            self._write(path, rendering.render(template, context).encode("utf-8"))
            self.rendered += 1

    def data(self, path: str, data: bytes) -> None:
        if not self._reuse(path, hashlib.sha1(data).hexdigest()):
            self._write(path, data)

    def file(self, path: str, src: Path) -> None:
        """A copy of a file outside the store (a vendored asset), hard-linked where it can be; keyed by its bytes."""
        with open(src, "rb") as f:
            key = hashlib.file_digest(f, "sha1").hexdigest()
        if not self._reuse(path, key):
            link_or_copy(src, self.target(path))

    def finish(self) -> None:
        data = json.dumps(self.keys, sort_keys=True, indent=0).encode()
        old = self.previous / MANIFEST if self.previous is not None else None
        if old is not None and old.is_file() and old.read_bytes() == data:
            link_or_copy(old, self.out / MANIFEST)
        else:
            self._write(MANIFEST, data)



def sizes_of(out: Path) -> dict[str, int]:
    """Every file of a tree (site-root-relative POSIX path -> bytes), in one os.scandir walk."""
    sizes: dict[str, int] = {}
    stack = [("", str(out))]
    while stack:
        prefix, folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((prefix + entry.name + "/", entry.path))
                elif entry.is_file(follow_symlinks=False):
                    sizes[prefix + entry.name] = entry.stat(follow_symlinks=False).st_size
    return dict(sorted(sizes.items()))


def size_report(sizes: dict[str, int], models: list[str], unit_pages: int) -> list[str]:
    """Lines for the end of the build: total, per model (pages + feature-vis media), per unit page, the largest files."""
    total = sum(sizes.values())
    lines = [f"site size: {mb(total)} in {len(sizes):,} files"]
    for model in models:
        own = sum(v for k, v in sizes.items() if k.startswith(f"{model}/") or k.startswith(f"media/fv/{model}/"))
        lines.append(f"  {model}: {mb(own)} (pages, exports and feature-vis media)")
    shared = sum(v for k, v in sizes.items() if k.startswith("media/examples/"))
    lines.append(f"  dataset images (each stored once): {mb(shared)}")
    unit_html = [v for k, v in sizes.items() if k.count("/") >= 3 and k.endswith("/index.html")
                 and k.split("/")[0] in models]
    if unit_pages and unit_html:
        lines.append(f"  per unit page: {sum(unit_html) / len(unit_html) / 1024:.1f} KB on average "
                     f"(HTML), {total / unit_pages / 1024:.1f} KB of the whole site per unit")
    largest = sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    lines.append("  largest files: " + ", ".join(f"{k} ({mb(v)})" for k, v in largest))
    return lines


def mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def check_budget(out: Path, site: SiteSection, sizes: dict[str, int] | None = None) -> None:
    """Fail (before the swap) when the site or one of its files is over the configured budget."""
    sizes = sizes_of(out) if sizes is None else sizes
    total = sum(sizes.values())
    if total > site.budget_total_mb * 1e6:
        raise AtlasError(f"the site is {mb(total)}, over site.budget_total_mb = {site.budget_total_mb} MB; "
                         f"probe fewer layers, lower featurevis.frames or scan.top_k, or raise the budget "
                         f"(the previous site is left as it was)")
    path, biggest = max(sizes.items(), key=lambda kv: kv[1], default=("", 0))
    if biggest > site.budget_file_mb * 1e6:
        raise AtlasError(f"{path} is {mb(biggest)}, over site.budget_file_mb = {site.budget_file_mb} MB "
                         f"(GitHub rejects files over 100 MB); raise the budget only if your host allows it "
                         f"(the previous site is left as it was)")


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def marker_text(title: str) -> bytes:
    """The marker file's bytes: what it is, and the atlas's title (a site that holds this one lists it by it)."""
    return f"Built by Neuron Atlas; this folder is replaced on every build.\ntitle: {title}\n".encode()


def nested_sites(site_dir: Path) -> list[tuple[str, str]]:
    """[(folder, title)] of the other atlases' sites inside site_dir (a sub-folder with its own marker, an atlas
    whose atlas.site_dir is there): a rebuild keeps them (`carry_nested`) and the home page lists them."""
    if not site_dir.is_dir():
        return []
    found = []
    for child in sorted(site_dir.iterdir()):
        marker = child / MARKER
        if child.is_dir() and not child.name.startswith(".") and marker.is_file():
            lines = marker.read_text(encoding="utf-8", errors="replace").splitlines()
            title = next((line[len("title: "):] for line in lines if line.startswith("title: ")), child.name)
            found.append((child.name, title))
    return found


def carry_nested(site_dir: Path, tmp: Path, nested: list[tuple[str, str]]) -> None:
    """Hard-link the nested atlases' sites of the old site_dir into the new tree (the same files, no copy)."""
    for name, _ in nested:
        if (tmp / name).exists():
            raise AtlasError(f"{str(site_dir / name)!r} holds another atlas's site, but this atlas writes {name}/ "
                             f"too; give that atlas another atlas.site_dir (the previous site is left as it was)")
        shutil.copytree(site_dir / name, tmp / name, copy_function=link_or_copy, symlinks=True)


def check_replaceable(site_dir: Path) -> None:
    """A folder we may replace: ours (its marker), empty, or holding only other atlases' sites (`nested_sites`)."""
    if not site_dir.exists():
        return
    ours = site_dir.is_dir() and ((site_dir / MARKER).exists() or all(
        p.is_dir() and (p / MARKER).is_file() for p in site_dir.iterdir() if not p.name.endswith(".tmp")))
    if not ours:
        raise AtlasError(f"site folder {str(site_dir)!r} exists and was not written by Neuron Atlas; "
                         f"refusing to replace it: choose another atlas.site_dir or remove it yourself")


def swap_in(tmp: Path, site_dir: Path) -> None:
    """Replace site_dir by tmp: one exchange of the two names (Linux), else two renames; the old tree goes after."""
    if site_dir.exists() and atomic.exchange(tmp, site_dir):  # one atomic step where the OS can (Linux)
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old tree
        return
    old = site_dir.with_name(f".{site_dir.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if site_dir.exists():
        os.replace(site_dir, old)
    os.replace(tmp, site_dir)
    shutil.rmtree(old, ignore_errors=True)
