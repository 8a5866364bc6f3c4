"""The SQL page's query engine: which files of DuckDB-WASM the site vendors, and where they come from.

Owns finding the engine (npm's copy of `@duckdb/duckdb-wasm`, pinned in web/package.json and installed
by `make` into web/node_modules; or the `dist` folder named by $ATLAS_DUCKDB_WASM, with the packages
below in the node_modules folder that holds it) and choosing the files of one bundle, the "eh" one
(WebAssembly exceptions: every current browser), that the browser loads from the site's `static/duckdb/`:

- `duckdb-browser.mjs`, the ES module with the `AsyncDuckDB` client, which runs DuckDB in
- `duckdb-browser-eh.worker.js`, a self-contained classic Web Worker, from
- `duckdb-eh.wasm` (about 34 MB: the bulk of it);
- `Arrow.esnext.min.js`, apache-arrow's self-contained UMD build (a classic script that sets
  `window.Arrow`): duckdb-browser.mjs does `import * as … from "apache-arrow"`, a bare specifier that
  plain static files cannot resolve, and apache-arrow's own ES modules are some 140 files plus
  dependencies; so the SQL page maps "apache-arrow" with an import map to
- `arrow.mjs` (ours, templates/static/duckdb-arrow.mjs), which re-exports the `window.Arrow` names
  duckdb-browser.mjs uses;
- `parquet_wasm.js` and `parquet_wasm_bg.wasm` (parquet-wasm's ES module build, about 5 MB): DuckDB-WASM
  1.32.0 has no Parquet reader built in, it downloads its parquet extension from DuckDB's extension
  server, which a vendored, offline site must not do; parquet-wasm turns each Parquet file into an
  Arrow IPC stream, which DuckDB-WASM loads into a table without any extension.

Does not own the page (templates/sql.html and static/sql.js, given `engine_files()`'s names as URLs),
nor copying the files into the site (the website builder does that).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import AtlasError

REPO = Path(__file__).resolve().parent.parent  # like the website's TEMPLATES: templates/ and web/ beside the package
PACKAGE = "@duckdb/duckdb-wasm"
ENV = "ATLAS_DUCKDB_WASM"  # a DuckDB-WASM dist folder to use instead of web/node_modules' one
ARROW_SHIM = REPO / "templates" / "static" / "duckdb-arrow.mjs"
BUNDLE = ("duckdb-browser.mjs", "duckdb-browser-eh.worker.js", "duckdb-eh.wasm")  # from DuckDB-WASM's dist
ARROW = "Arrow.esnext.min.js"  # from apache-arrow, the version DuckDB-WASM's package.json asks for
PARQUET = ("parquet_wasm.js", "parquet_wasm_bg.wasm")  # from parquet-wasm's esm/
REINSTALL = "run `npm ci --prefix web` (or `make site`) to reinstall the SQL page's engine"


def dist_dir() -> Path:
    """DuckDB-WASM's dist folder: $ATLAS_DUCKDB_WASM when set, else web/node_modules' copy (may not exist)."""
    env = os.environ.get(ENV)
    return Path(env).expanduser().resolve() if env else REPO / "web" / "node_modules" / PACKAGE / "dist"


def engine_version() -> str | None:
    """The installed DuckDB-WASM's version (its package.json), None when it is not installed."""
    manifest = dist_dir().parent / "package.json"
    return json.loads(manifest.read_text(encoding="utf-8"))["version"] if manifest.is_file() else None


ENGINE_VERSION = engine_version()


def _package(dist: Path, name: str) -> Path:
    """Folder of an npm package DuckDB-WASM's dist sits beside: nested in its node_modules, or hoisted next to it."""
    package = dist.parent
    for folder in (package / "node_modules" / name, package.parent.parent / name):
        if (folder / "package.json").is_file():
            return folder
    raise AtlasError(f"DuckDB-WASM is at {dist} but npm's {name} is not beside it: {REINSTALL}")


def engine_files() -> dict[str, Path]:
    """{name under the site's static/duckdb/: source file} of the eh bundle; {} when DuckDB-WASM is not installed.

    An installed but incomplete engine (a file missing) is an AtlasError that says how to reinstall it.
    """
    dist = dist_dir()
    if not dist.is_dir():
        return {}
    files = {name: dist / name for name in BUNDLE}
    files[ARROW] = _package(dist, "apache-arrow") / ARROW
    files["arrow.mjs"] = ARROW_SHIM
    files.update({name: _package(dist, "parquet-wasm") / "esm" / name for name in PARQUET})
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise AtlasError(f"the SQL page's engine lacks {', '.join(missing)}: {REINSTALL}")
    return files
