"""Command line: `atlas build CONFIG`, `atlas layers CONFIG`.

Owns argument parsing and how errors reach the user: an AtlasError is one
line on stderr (`atlas: error: ...`) and exit status 2, with the traceback
only under --debug; Ctrl-C exits 130. Everything else is delegated to
build.py.
"""

from __future__ import annotations

import argparse
import sys
import time

from .errors import AtlasError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atlas", description="Build a static neuron atlas of a PyTorch model.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="scan the models and write the site")
    p_build.add_argument("config", help="atlas TOML file (see examples/demo.toml)")
    p_layers = sub.add_parser("layers", help="list each model's layers with output shapes")
    p_layers.add_argument("config", help="atlas TOML file")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except AtlasError as exc:
        if args.debug:
            raise
        print(f"atlas: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("atlas: interrupted; the previous site and store are unchanged", file=sys.stderr)
        return 130


def _run(args) -> int:
    from .build import build, layer_table
    from .config import load_config

    cfg = load_config(args.config)
    if args.command == "layers":
        for model, layers in layer_table(cfg):
            print(f"{model}:")
            print(f"  {'layer':<32} {'type':<16} {'output shape':<18} {'units':>6}  default")
            for layer in layers:
                shape = "×".join(map(str, layer.shape)) if layer.shape is not None else "(not a tensor)"
                units = layer.n_units if layer.probeable else "-"
                print(f"  {layer.name:<32} {layer.module_type:<16} {shape:<18} {units:>6}  "
                      f"{'yes' if layer.default else ''}")
        return 0
    start = time.perf_counter()
    report = build(cfg, progress=not args.quiet and sys.stderr.isatty())
    print(f"atlas: {report.summary()}")
    accuracy = ", ".join(f"{name} {100 * acc:.1f}%" for name, acc in report.accuracy.items() if acc is not None)
    if accuracy:
        print(f"atlas: accuracy on the atlas dataset: {accuracy}")
    print(f"atlas: open {report.site_path}/index.html in a browser, or run `make serve` "
          f"for http://127.0.0.1:8000 ({time.perf_counter() - start:.1f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
