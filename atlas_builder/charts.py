"""Charts: small inline SVGs and heatmap overlays for the pages, as markup strings.

Pure functions: numbers (and already-relative links) in, markup out, same
input same bytes. Every piece of text that can come from a model or dataset
(class names, labels) is escaped here, since the result is inserted into
templates as safe markup. No files are written: overlays are tiny PNG data
URIs, so they travel inside the page that shows them.
"""

from __future__ import annotations

import base64
import math
import struct
import zlib

import numpy as np
from markupsafe import Markup, escape


def _num(x: float) -> str:
    return f"{x:.4g}"


def _px(x: float) -> str:
    """A coordinate to a tenth of a pixel, without trailing zeros ("12", "58.3")."""
    return f"{x:.1f}".rstrip("0").rstrip(".")


def histogram_svg(counts: tuple[int, ...], lo: float, hi: float, width: int = 360, height: int = 120,
                  what: str = "activations", marker: float | None = None, marks: tuple[float, ...] = (),
                  counts_attr: bool = False) -> Markup:
    """Bar chart of an activation histogram (or of other `what`) with the range on the axis: the bars are one
    path (the counts are in the unit's data.json); a dashed line at 0 (or at `marker`) when inside. marks:
    values ticked under the bars (the edges of the activation-range rows); counts_attr: the counts on the SVG
    (data-counts), from which atlas.js draws the log-scale view (a second SVG would cost a page 1.3 KB)."""
    if not counts or sum(counts) == 0:
        return Markup('<p class="muted">No finite activations to plot.</p>')
    top, n = max(counts), len(counts)
    plot_h = height - 18
    bar_w = width / n
    data = f' data-counts="{",".join(map(str, counts))}"' if counts_attr else ""
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="Histogram of {what} from {_num(lo)} to {_num(hi)}"{data}>']
    bars = "".join(f"M{_px(i * bar_w)} {plot_h}v{_px(-plot_h * c / top)}h{_px(max(bar_w - 1, 0.5))}"
                   f"V{plot_h}Z" for i, c in enumerate(counts) if c)
    parts.append(f'<path d="{bars}" class="bar"><title>{sum(counts)} {"sampled " * (what == "activations")}'
                 f'{what} in {n} bins, at most {top} in one</title></path>')
    ticks = "".join(f"M{_px(width * (v - lo) / (hi - lo))} {plot_h}v5" for v in marks
                    if hi > lo and lo <= v <= hi)
    if ticks:
        parts.append(f'<path d="{ticks}" class="mark"><title>edges of the activation-range rows</title></path>')
    parts.append(f'<text x="0" y="{height - 3}" class="axis">{_num(lo)}</text>')
    parts.append(f'<text x="{width}" y="{height - 3}" class="axis" text-anchor="end">{_num(hi)}</text>')
    line = 0.0 if marker is None else marker
    if lo < line < hi:
        x0 = width * (line - lo) / (hi - lo)
        parts.append(f'<line x1="{x0:.2f}" x2="{x0:.2f}" y1="0" y2="{plot_h}" class="zero"/>')
    parts.append("</svg>")
    return Markup("".join(parts))


MAX_CLASS_BARS = 12  # classes drawn; with more (ImageNet's 1,000), the highest means, in that order


def shown_classes(class_means: tuple[float | None, ...], limit: int = MAX_CLASS_BARS) -> list[int]:
    """The classes a unit page shows: all of them, in order, or with more than `limit` the `limit` highest
    means (highest first)."""
    shown = list(range(len(class_means)))
    if len(shown) > limit:
        shown = sorted((i for i in shown if class_means[i] is not None), key=lambda i: -class_means[i])[:limit]
    return shown


def class_bars(class_means: tuple[float | None, ...], class_names: list[str], top_class: int,
               limit: int = MAX_CLASS_BARS) -> Markup:
    """Horizontal bars of the mean activation per class (`shown_classes`), the top class highlighted, as an
    HTML list sized by CSS (a third of an SVG's bytes); the note under it says of how many classes."""
    values = [v for v in class_means if v is not None]
    if not values:
        return Markup('<p class="muted">No labelled examples.</p>')
    shown = shown_classes(class_means, limit)
    lo, hi = min(0.0, min(values)), max(0.0, max(values))
    span = (hi - lo) or 1.0
    zero = (0 - lo) / span * 100
    rows = []
    for i in shown:
        v = class_means[i]
        name = escape(class_names[i] if i < len(class_names) else str(i))
        bar = ""
        if v is not None:
            a, b = sorted((zero, (v - lo) / span * 100))
            bar = f'<i style="left:{a:.1f}%;width:{b - a:.1f}%"></i>'
        top = ' class="top"' if i == top_class else ""
        full = f' title="{name}"' if len(name) > 18 else ""  # past the label's width: whole on hover
        rows.append(f'<li{top}><span{full}>{name}</span><b>{bar}</b>{_num(v) if v is not None else "—"}</li>')
    note = (f'<p class="muted">The {len(shown)} highest of {len(class_means)} classes.</p>'
            if len(shown) < len(class_means) else "")
    return Markup(f'<ol class="bars" style="--zero:{zero:.1f}%" aria-label="Mean activation per class">'
                  + "".join(rows) + "</ol>" + note)


def effect_bars(up: list[tuple[str, float]], down: list[tuple[str, float]], what: str = "class") -> Markup:
    """± bars of the classes a unit pushes up (red, right of the middle) and down (blue, left), on one scale:
    an HTML list like `class_bars`."""
    rows = [*up, *down]
    if not rows:
        return Markup('<p class="muted">No effect on any class.</p>')
    span = max(abs(v) for _, v in rows) or 1.0
    out = []
    for name, v in rows:
        text = escape(name)
        a, b = sorted((50.0, 50 + 50 * v / span))
        full = f' title="{text}"' if len(name) > 18 else ""
        out.append(f'<li class="{"up" if v > 0 else "down"}"><span{full}>{text}</span>'
                   f'<b><i style="left:{a:.1f}%;width:{b - a:.1f}%"></i></b>{_num(v)}</li>')
    return Markup(f'<ol class="bars effects" style="--zero:50%" aria-label="Effect on each {what}\'s logit">'
                  + "".join(out) + "</ol>")


HEAT_MAX_SIDE = 12  # a larger map is max-pooled to at most this many cells a side: where, not every pixel


def pooled(m: np.ndarray, side: int = HEAT_MAX_SIDE) -> np.ndarray:
    """An [H, W] map max-pooled to at most `side` cells a side (blocks of ceil(H / side) x ceil(W / side))."""
    h, w = m.shape
    bh, bw = -(-h // side), -(-w // side)
    if bh == 1 and bw == 1:
        return m
    padded = np.full((-(-h // bh) * bh, -(-w // bw) * bw), -np.inf, dtype=m.dtype)
    padded[:h, :w] = m
    return padded.reshape(padded.shape[0] // bh, bh, padded.shape[1] // bw, bw).max(axis=(1, 3))


def heat_levels(heat: np.ndarray) -> np.ndarray:
    """A unit's spatial map on one example as HEAT_LEVELS opacity levels (pooled, min..max scaled, squared:
    the peak stands out)."""
    m = pooled(np.nan_to_num(heat.astype(np.float32)))
    lo, hi = float(m.min()), float(m.max())
    scaled = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    return np.round(scaled ** 2 * (HEAT_LEVELS - 1)).astype(np.uint8)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def heat_uri(heat: np.ndarray) -> str:
    """A unit's spatial map on one example as a translucent red PNG data URI."""
    return _data_uri(png_palette(heat_levels(heat), HEAT_PALETTE))


def heat_sprite(maps: list[np.ndarray]) -> tuple[str, list[float]]:
    """The heat overlays of several examples (maps of one shape) as one PNG data URI, stacked top to bottom,
    and each one's CSS background-position-y in percent: one PNG header and palette for a unit's whole
    top-k instead of one each (about half the bytes)."""
    n = len(maps)
    uri = _data_uri(png_palette(np.concatenate([heat_levels(m) for m in maps]), HEAT_PALETTE))
    return uri, [100 * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


HEAT_LEVELS = 16  # opacity steps of the heat overlay: one palette entry each, one byte a pixel
HEAT_PALETTE = [(255, 40, 0, round(200 * i / (HEAT_LEVELS - 1))) for i in range(HEAT_LEVELS)]  # red, 0..200


SIGNED_LEVELS = 14  # opacity steps each side of zero of a signed overlay (attributions)
SIGNED_PALETTE = ([(30, 90, 255, round(220 * (SIGNED_LEVELS - i) / SIGNED_LEVELS)) for i in range(SIGNED_LEVELS)]
                  + [(255, 255, 255, 0)]
                  + [(255, 40, 0, round(220 * i / SIGNED_LEVELS)) for i in range(1, SIGNED_LEVELS + 1)])
# blue (pushes down) .. transparent (0) .. red (pushes up)


def signed_uri(m: np.ndarray) -> str:
    """A signed map (an attribution: + pushes the output up, - down) as a translucent PNG data URI, red for
    positive and blue for negative, opacity by |value| over the map's max |value|."""
    m = np.nan_to_num(np.asarray(m, np.float32))
    top = float(np.abs(m).max()) if m.size else 0.0
    scaled = m / top if top > 0 else np.zeros_like(m)
    return _data_uri(png_palette(np.round(scaled * SIGNED_LEVELS + SIGNED_LEVELS).astype(np.uint8),
                                 SIGNED_PALETTE))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(header: bytes, rows: np.ndarray, extra: bytes = b"") -> bytes:
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + extra
            + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + _chunk(b"IEND", b""))


def png_palette(index: np.ndarray, palette: list[tuple[int, int, int, int]]) -> bytes:
    """A minimal PNG (8-bit palette with per-entry opacity, no filtering) of an [H, W] array of palette
    indices: a quarter of RGBA's bytes for the heat overlays, and Pillow's encoder costs ~6x more per call."""
    h, w = index.shape
    rows = np.zeros((h, 1 + w), dtype=np.uint8)  # filter byte 0 (none) before each row
    rows[:, 1:] = index
    plte = _chunk(b"PLTE", bytes(v for r, g, b, _ in palette for v in (r, g, b)))
    trns = _chunk(b"tRNS", bytes(a for *_, a in palette))
    return _png(struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0), rows, plte + trns)  # 8 bits, colour type 3


def png_rgba(rgba: np.ndarray) -> bytes:
    """A minimal PNG (8-bit RGBA, no filtering) of an [H, W, 4] uint8 array."""
    h, w = rgba.shape[:2]
    rows = np.zeros((h, 1 + 4 * w), dtype=np.uint8)  # filter byte 0 (none) before each row
    rows[:, 1:] = rgba.reshape(h, 4 * w)
    return _png(struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0), rows)  # 8 bits, colour type 6 (RGBA)


ACTIVITY_STOPS = [(0.0, (68, 1, 84)), (0.25, (59, 82, 139)), (0.5, (33, 145, 140)), (0.75, (94, 201, 98)),
                  (1.0, (253, 231, 37))]  # viridis


def activity_colour(fraction: float, dead: bool, saturated: bool) -> str:
    if dead:
        return "#111111"
    if saturated:
        return "#e0312b"
    f = min(max(fraction, 0.0), 1.0)
    for (a, ca), (b, cb) in zip(ACTIVITY_STOPS, ACTIVITY_STOPS[1:]):
        if f <= b:
            t = (f - a) / (b - a)
            return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(ca, cb))
    return "#fde725"


HEATMAP_CELLS = 256  # cells per layer strip; a wider layer's units are grouped, consecutive, into that many


def health_heatmap_svg(rows: list[dict], width: int = 900, max_cells: int = HEATMAP_CELLS) -> Markup:
    """Units × layers: one strip per layer, one cell per unit coloured by activity, linked to its page.

    A layer of more than `max_cells` units gets one cell per group of
    consecutive units: coloured by their mean activity, dead (saturated) only
    when all of them are, linked to the group's first unit, its tooltip
    counting the dead and saturated ones. So the model page of a ResNet-50
    stays small.

    rows: [{"layer": str, "href": str, "units": [{"href", "activity", "dead", "saturated", "label"}]}]
    """
    label_w, row_h = 140, 18
    plot_w = width - label_w
    height = row_h * len(rows) + 4
    parts = [f'<svg class="chart heatmap" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
             f'role="group" aria-label="Activity of every unit of every layer">']  # a group: its cells are links
    for i, r in enumerate(rows):
        y = 2 + i * row_h
        parts.append(f'<a href="{escape(r["href"])}"><text x="{label_w - 6}" y="{y + 13}" class="axis" '
                     f'text-anchor="end">{escape(r["layer"])}</text></a>')
        units = r["units"]
        size = max(1, -(-len(units) // max_cells))  # units per cell
        groups = [units[a:a + size] for a in range(0, len(units), size)]
        cell = plot_w / max(len(groups), 1)
        for j, group in enumerate(groups):
            u, first = group[0], j * size
            activity = sum(g["activity"] or 0 for g in group) / len(group)
            dead, saturated = sum(g["dead"] for g in group), sum(g["saturated"] for g in group)
            colour = activity_colour(activity, dead == len(group), saturated == len(group))
            if size == 1:
                title = f'{escape(r["layer"])} unit {first}: {escape(u["label"])}, active on {100 * activity:.0f}% of positions'
            else:
                title = (f'{escape(r["layer"])} units {first}–{first + len(group) - 1}: {dead} dead, {saturated} '
                         f'saturated, active on {100 * activity:.0f}% of positions on average')
            parts.append(f'<a href="{escape(u["href"])}"><rect x="{label_w + j * cell:.2f}" y="{y}" '
                         f'width="{max(cell - (0.5 if cell > 3 else 0), 0.5):.2f}" height="{row_h - 3}" '
                         f'fill="{colour}"><title>{title}</title></rect></a>')
    parts.append("</svg>")
    return Markup("".join(parts))


def percent(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]  # category10


def class_colour(label: int) -> str:
    return "#999999" if label < 0 else PALETTE[label % len(PALETTE)]


def dot_places(points: list[tuple[float, float]], size: int = 220) -> list[tuple[float, float]]:
    """Where `dots_svg` draws each point, in pixels of its size x size box."""
    if not points:
        return []
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    lo_x, lo_y = min(xs), min(ys)
    span_x, span_y = (max(xs) - lo_x) or 1.0, (max(ys) - lo_y) or 1.0
    pad, inner = 10, size - 20
    return [(pad + inner * (x - lo_x) / span_x, pad + inner * (1 - (y - lo_y) / span_y)) for x, y in points]


def dots_svg(points: list[tuple[float, float]], size: int = 220, radius: float = 3.0) -> str:
    """A small static map as a standalone SVG file: every point a grey dot (one path of zero-length
    round-capped strokes, a dozen bytes a point). A unit page shows it as an image with its own dot on top,
    so one file serves the whole layer."""
    path = "".join(f"M{_px(x)} {_px(y)}h0" for x, y in dot_places(points, size))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {size} {size}" width="{size}" height="{size}">'
            f'<path d="{path}" stroke="#b8c2cc" stroke-width="{2 * radius:g}" stroke-linecap="round"/></svg>')


def scatter_svg(points: list[dict], method: str, size: int = 420, radius: float = 4.0) -> Markup:
    """A 2-D map: points {x, y, colour, title, href?, thumb?, highlight?}, scaled to fit, links optional.

    Points with `thumb` carry it in data-thumb for the hover preview (static/atlas.js);
    without JavaScript the <title> tooltip and the links still work.
    """
    if not points:
        return Markup('<p class="muted">No map.</p>')
    xs = [p["x"] for p in points]
    ys = [p["y"] for p in points]
    lo_x, hi_x, lo_y, hi_y = min(xs), max(xs), min(ys), max(ys)
    span_x, span_y = (hi_x - lo_x) or 1.0, (hi_y - lo_y) or 1.0
    pad = 10
    inner = size - 2 * pad
    parts = [f'<svg class="chart scatter" data-method="{method}" viewBox="0 0 {size} {size}" width="{size}" '
             f'height="{size}" role="{"group" if any(p.get("href") for p in points) else "img"}" '  # links: a group
             f'aria-label="{escape(method.upper())} map of {len(points)} points">']
    ordered = sorted(points, key=lambda p: bool(p.get("highlight")))  # highlighted point drawn last, on top
    for p in ordered:
        cx = pad + inner * (p["x"] - lo_x) / span_x
        cy = pad + inner * (1 - (p["y"] - lo_y) / span_y)
        r = radius * 2 if p.get("highlight") else radius
        cls = ' class="highlight"' if p.get("highlight") else ""
        thumb = f' data-thumb="{escape(p["thumb"])}"' if p.get("thumb") else ""
        circle = (f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{r}" fill="{p["colour"]}"{cls}{thumb}>'
                  f'<title>{escape(p["title"])}</title></circle>')
        parts.append(f'<a href="{escape(p["href"])}">{circle}</a>' if p.get("href") else circle)
    parts.append("</svg>")
    return Markup("".join(parts))
