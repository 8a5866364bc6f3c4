"""Architecture: the model page's layer graph, as data (`describe`) and as static markup (`render`).

Owns how a model's structure is read and drawn:
- `describe(net, x)` traces the model with torch.fx and propagates the shapes
  of one input through the traced graph (torch.fx's ShapeProp); the nodes are
  the graph's tensor-valued operations (modules, functions, methods), each
  placed in the module that called it (`nn_module_stack`), with its output
  shape. Where fx cannot trace (data-dependent control flow, say), the module
  tree from `named_modules()` is described instead, without data flow, and a
  note says why. Pure data (JSON-able) for the store; no hooks, no files.
- `render(desc, links)` draws each module level as one layered SVG (boxes
  top to bottom in data-flow order, each edge labelled with the shape that
  flows along it); a submodule is one box at its parent's level, and its own
  graph sits in a `<details>` below, so repeated blocks (ResNet's
  bottlenecks, ViT's encoder blocks) stay collapsed until clicked, with no
  server. Every probed layer's box links to its page (`links`).

Does not own the layer pages or which layers are probed (hooks.representations).
"""

from __future__ import annotations

import html
from collections import defaultdict

import torch
from torch import nn

from markupsafe import Markup

MAX_NODES = 4000  # a traced graph larger than this is described as its module tree (the page stays small)


# --- describing ------------------------------------------------------------------------------

def _shape(meta) -> list[int] | None:
    shape = getattr(meta, "shape", None)
    if shape is None and isinstance(meta, (tuple, list)) and meta:  # a tuple output (MultiheadAttention): its first
        shape = getattr(meta[0], "shape", None)
    return [int(s) for s in shape][1:] if shape is not None else None  # without the batch dimension


def _op_label(node) -> str:
    if node.op == "call_module":
        return str(node.target).rsplit(".", 1)[-1]
    if node.op == "placeholder":
        return "input"
    if node.op == "get_attr":
        return str(node.target).rsplit(".", 1)[-1]
    target = node.target
    return getattr(target, "__name__", str(target))


def describe(net: nn.Module, x: torch.Tensor) -> dict:
    """The architecture of `net` on the input batch x ([1, ...]): {"method": "torch.fx" | "module tree",
    "note": why the module tree (or None), "nodes": [...], "edges": [[from, to]], "groups": {path: type}}.
    A node: {"id", "label", "kind" (its module's type, or the function), "group" (the module path that holds
    it, "" for the top), "module" (its module path when it is one), "shape"}."""
    import torch.fx
    from torch.fx.passes.shape_prop import ShapeProp

    modules = dict(net.named_modules())
    try:
        gm = torch.fx.symbolic_trace(net)
    except Exception as error:  # noqa: BLE001 - any tracing failure means: show the module tree
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        return module_tree(net, f"torch.fx could not trace this model ({type(error).__name__}: {reason}); "
                                f"the module tree is shown instead, without the data flow between modules")
    note = None
    try:
        was = net.training
        net.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(x)
        net.train(was)
    except Exception as error:  # noqa: BLE001 - shapes are optional: the graph is still right
        note = f"shapes could not be propagated through the traced graph ({type(error).__name__}); shown without"
    nodes, keep = [], {}
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        shape = _shape(meta)
        if node.op == "output" or (shape is None and node.op not in ("call_module", "placeholder")):
            continue  # sizes, asserts and other non-tensor values: not the data flow
        stack = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
        module = str(node.target) if node.op == "call_module" else None
        if module is not None and stack and stack[-1] == module:
            stack = stack[:-1]
        kind = (type(modules[module]).__name__ if module in modules else
                "input" if node.op == "placeholder" else
                "parameter" if node.op == "get_attr" else _op_label(node))
        keep[node.name] = len(nodes)
        nodes.append({"id": node.name, "label": _op_label(node), "kind": kind, "group": stack[-1] if stack else "",
                      "module": module, "shape": shape})
    if len(nodes) > MAX_NODES:
        return module_tree(net, f"the traced graph has {len(nodes)} operations; the module tree is shown instead")
    edges = []
    for node in gm.graph.nodes:
        if node.name not in keep:
            continue
        for source in node.all_input_nodes:
            if source.name in keep:
                edges.append([source.name, node.name])
    groups = {path: type(modules[path]).__name__ for path in module_paths(nodes) if path in modules}
    return {"method": "torch.fx", "note": note, "nodes": nodes, "edges": edges, "groups": groups}


def module_paths(nodes: list[dict]) -> list[str]:
    """Every module that holds a node, and the modules above it, in first-seen (forward) order; "" left out."""
    seen: dict[str, None] = {}
    for n in nodes:
        parts = n["group"].split(".") if n["group"] else []
        for i in range(1, len(parts) + 1):
            seen.setdefault(".".join(parts[:i]))
    return list(seen)


def module_tree(net: nn.Module, note: str) -> dict:
    """The fallback description: every module by path and type, no edges."""
    nodes = []
    for path, module in net.named_modules():
        if not path:
            continue
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        nodes.append({"id": path, "label": path.rsplit(".", 1)[-1], "kind": type(module).__name__,
                      "group": parent, "module": path, "shape": None, "leaf": not any(True for _ in module.children())})
    return {"method": "module tree", "note": note, "nodes": nodes, "edges": [], "groups": {}}


# --- drawing ----------------------------------------------------------------------------------

BOX_W, BOX_H, GAP_X, GAP_Y = 190, 28, 18, 30  # a box, and the space beside and below it (the shape label)


INPUT = "(input)"  # the item of a submodule's level that stands for what flows in from outside it


def _anchor(path: str) -> str:
    return "arch-" + (path.replace(".", "-") or "top")


def _child(group: str, path: str) -> str | None:
    """The child of `group` on the way down to `path` (None when path is not under group)."""
    if group and not path.startswith(group + "."):
        return None
    rest = path[len(group) + 1:] if group else path
    return (group + "." if group else "") + rest.split(".", 1)[0] if rest else None


class _Level:
    """One module's graph: its own operations and its submodules (one box each), edges between them."""

    def __init__(self, group: str, desc: dict):
        self.group = group
        self.items: list[str] = []  # node ids and submodule paths, in first-seen (forward) order
        self.kind: dict[str, str] = {}  # item -> "node" | "group"
        self.node_of: dict[str, dict] = {}
        where: dict[str, str] = {}  # node id -> the item at this level that holds it
        for n in desc["nodes"]:
            if n["group"] == group:
                item = n["id"]
                self.kind[item] = "node"
                self.node_of[item] = n
            else:
                item = _child(group, n["group"])
                if item is None:
                    continue
                self.kind[item] = "group"
            where[n["id"]] = item
            if item not in self.items:
                self.items.append(item)
        self.out_shape: dict[str, list | None] = {}  # item -> the shape of its last node
        for n in desc["nodes"]:
            if n["id"] in where:
                self.out_shape[where[n["id"]]] = n["shape"]
        self.edges: list[tuple[str, str]] = []  # between items of this level (edges from outside are not drawn)
        shape_of = {n["id"]: n["shape"] for n in desc["nodes"]}
        for a, b in desc["edges"]:
            ia, ib = where.get(a), where.get(b)
            if ib is not None and ia is None and group:  # fed from outside: from the module's input
                ia = INPUT
                if INPUT not in self.kind:
                    self.items.insert(0, INPUT)
                    self.kind[INPUT] = "input"
                    self.out_shape[INPUT] = shape_of.get(a)
            if ia is not None and ib is not None and ia != ib and (ia, ib) not in self.edges:
                self.edges.append((ia, ib))


def _layout(level: _Level) -> dict[str, tuple[int, int]]:
    """item -> (rank, column): rank = the longest path from the level's sources, columns by forward order."""
    rank = {item: 0 for item in level.items}
    order = {item: i for i, item in enumerate(level.items)}
    for a, b in sorted(level.edges, key=lambda e: order[e[1]]):  # forward order is topological
        rank[b] = max(rank[b], rank[a] + 1)
    for _ in range(len(level.items)):  # settle chains whose edges came out of order
        changed = False
        for a, b in level.edges:
            if rank[b] < rank[a] + 1:
                rank[b], changed = rank[a] + 1, True
        if not changed:
            break
    columns: dict[int, int] = defaultdict(int)
    place = {}
    for item in level.items:
        place[item] = (rank[item], columns[rank[item]])
        columns[rank[item]] += 1
    return place


def _fmt_shape(shape) -> str:
    return "×".join(str(s) for s in shape) if shape else ""


def _level_svg(level: _Level, desc: dict, links: dict[str, str], expandable: set[str]) -> str:
    place = _layout(level)
    ranks = max((r for r, _ in place.values()), default=0) + 1
    width_cols = max((sum(1 for r, _ in place.values() if r == k) for k in range(ranks)), default=1)
    width = width_cols * (BOX_W + GAP_X) + 60
    height = ranks * (BOX_H + GAP_Y) + 10
    per_rank = defaultdict(int)
    for r, _ in place.values():
        per_rank[r] += 1

    def box_xy(item):
        r, c = place[item]
        offset = (width - 60 - per_rank[r] * (BOX_W + GAP_X)) / 2
        return offset + c * (BOX_W + GAP_X) + GAP_X / 2, 5 + r * (BOX_H + GAP_Y)

    parts = [f'<svg class="arch" viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" height="{height:.0f}" '
             f'role="group" aria-label="Graph of {html.escape(level.group or "the model")}">']  # its boxes link
    for a, b in level.edges:
        (xa, ya), (xb, yb) = box_xy(a), box_xy(b)
        x1, y1, x2, y2 = xa + BOX_W / 2, ya + BOX_H, xb + BOX_W / 2, yb
        if place[b][0] - place[a][0] > 1 and abs(x1 - x2) < 1:  # a skip edge past boxes in between: around them
            bend = xa + BOX_W + 24
            parts.append(f'<path class="edge" d="M{x1:.0f},{y1:.0f} C{bend:.0f},{y1 + 20:.0f} {bend:.0f},'
                         f'{y2 - 20:.0f} {x2:.0f},{y2:.0f}"/>')
        else:
            parts.append(f'<path class="edge" d="M{x1:.0f},{y1:.0f} C{x1:.0f},{y1 + 16:.0f} {x2:.0f},'
                         f'{y2 - 16:.0f} {x2:.0f},{y2:.0f}"/>')
    for item in level.items:
        x, y = box_xy(item)
        shape = _fmt_shape(level.out_shape.get(item))
        if level.kind[item] == "input":
            name, kind, path = "input", "", None
        elif level.kind[item] == "node":
            n = level.node_of[item]
            name = n["label"]
            kind = n["kind"] if n["kind"] != name else ""
            path = n["module"]
        else:
            name = item.rsplit(".", 1)[-1] if level.group else item
            kind = desc["groups"].get(item, "")
            path = item
        cls = "box probed" if path in links else ("box group" if level.kind[item] == "group" else "box")
        title = html.escape(f"{path or name}{' · ' + kind if kind else ''}{' → ' + shape if shape else ''}")
        text = html.escape(name) + (f' <tspan class="kind">{html.escape(kind)}</tspan>' if kind else "")
        inner = (f'<rect class="{cls}" x="{x:.0f}" y="{y:.0f}" width="{BOX_W}" height="{BOX_H}" rx="4"/>'
                 f'<text x="{x + 8:.0f}" y="{y + 18:.0f}">{text}</text>')
        if path in links:
            inner = f'<a href="{html.escape(links[path])}"><title>{title}: its page</title>{inner}</a>'
        else:
            inner = f'<g><title>{title}</title>{inner}</g>'
        parts.append(inner)
        if level.kind[item] == "group" and item in expandable:
            parts.append(f'<a class="expand" href="#{_anchor(item)}"><title>open the graph of {html.escape(item)}'
                         f'</title><text x="{x + BOX_W - 16:.0f}" y="{y + 18:.0f}">▸</text></a>')
        if shape:
            parts.append(f'<text class="shape" x="{x + BOX_W / 2 + 6:.0f}" y="{y + BOX_H + 14:.0f}">{shape}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render(desc: dict | None, links: dict[str, str]) -> Markup:
    """The model page's architecture view: the top level's SVG, then each submodule's in nested `<details>`
    (collapsed). links: {probed layer path: its page's relative URL}. Empty when there is no description."""
    if not desc:
        return Markup("")
    note = f'<p class="note muted">{html.escape(desc["note"])}</p>' if desc.get("note") else ""
    method = html.escape(desc["method"])
    if desc["method"] != "torch.fx":
        return Markup(f'<div class="architecture" data-method="{method}">{note}{_tree_html(desc, links)}</div>')
    paths = module_paths(desc["nodes"])  # the modules that have a graph of their own
    children = defaultdict(list)  # module -> its submodules among them, in forward order
    for path in paths:
        children[path.rpartition(".")[0]].append(path)
    expandable = set(paths)

    def section(group: str) -> str:
        level = _Level(group, desc)
        svg = _level_svg(level, desc, links, expandable)
        inner = "".join(section(child) for child in children.get(group, []))
        if not group:
            return f'<div class="arch-level" id="{_anchor("")}">{svg}</div>{inner}'
        kind = html.escape(desc["groups"].get(group, ""))
        link = f' · <a href="{html.escape(links[group])}">its page</a>' if group in links else ""
        return (f'<details class="arch-group" id="{_anchor(group)}"><summary><code>{html.escape(group)}</code> '
                f'<small class="muted">{kind}{link}</small></summary>{svg}{inner}</details>')

    return Markup(f'<div class="architecture" data-method="{method}">{note}{section("")}</div>')


def _tree_html(desc: dict, links: dict[str, str]) -> str:
    """The module tree as nested lists (`<details>` for the modules that hold others)."""
    kids = defaultdict(list)
    for n in desc["nodes"]:
        kids[n["group"]].append(n)

    def items(group: str) -> str:
        out = []
        for n in kids.get(group, []):
            name = html.escape(n["label"])
            if n["module"] in links:
                name = f'<a href="{html.escape(links[n["module"]])}">{name}</a>'
            label = f'<code>{name}</code> <small class="muted">{html.escape(n["kind"])}</small>'
            if kids.get(n["id"]):
                out.append(f'<li><details><summary>{label}</summary><ul>{items(n["id"])}</ul></details></li>')
            else:
                out.append(f"<li>{label}</li>")
        return "".join(out)
    return f'<ul class="module-tree">{items("")}</ul>'
