"""Website: store in, static site out (a package: page models, rendering, search index, writing, building).

Two halves, kept apart:
- pure rendering: `render(name, context)` turns a page context (plain
  dicts, every URL already relative) into an HTML string with Jinja2
  (autoescape on, so text from models and datasets is always escaped);
- `build_site` reads the store, builds each page's context, renders it, and
  writes the whole tree into a temporary folder beside the site, which is
  swapped in only when complete, so a failed build leaves the old site.

Pages: home, model, layer, one per unit (`<model>/<layer>/<unit>/`, with
its JSON export `data.json` beside it), input pages (`inputs/<example>/`),
search, about and 404; plus `.nojekyll`, and `sitemap.xml` when a base URL
is configured. Dataset images are linked once from the store's media folder
and referenced by every page. Static assets get a content hash in their
names. Reads only the store (never the model or the dataset), so the site
can be rebuilt without either. Every URL comes from urls.py.

Incremental: each file's key (the templates' hash and the page's context,
or the file's bytes) is kept in `.atlas-manifest.json`; a file whose key is
unchanged is hard-linked from the previous site instead of being rendered
and written again, so a re-run with nothing changed rewrites nothing (same
inodes, same mtimes), and a changed template re-renders only the pages.
The size report and budget (`site.budget_*`) are checked before the swap:
a site over budget fails the build and leaves the previous site in place.
"""


from .builder import SiteSummary, build_site
from .emit import MANIFEST, MARKER, check_budget
from .pages import Pages
from .parts import INPUT_MAP_POINTS, MAX_MAP_POINTS, featured_units, position_box
from .rendering import TEMPLATES, render
from .search import search_index, search_rows

__all__ = ["INPUT_MAP_POINTS", "MANIFEST", "MARKER", "MAX_MAP_POINTS", "TEMPLATES", "Pages", "SiteSummary",
           "build_site", "check_budget", "featured_units", "position_box", "render", "search_index", "search_rows"]
