"""Command line: `atlas build CONFIG`, `atlas layers CONFIG`, `atlas plan CONFIG`, `atlas publish CONFIG`.

Owns argument parsing and how errors reach the user: an AtlasError is one
line on stderr (`atlas: error: ...`) and exit status 2, with the traceback
only under --debug; so is an OS error the user must fix while building (disk
full, permission denied, read-only file system), named with the folder and
the config key to change. An AtlasWarning is one line `atlas: warning: ...`
and the build goes on. Ctrl-C exits 130. Everything else is delegated to
build.py.

The `atlas` command (`entry`) first re-runs itself once, on Linux with glibc,
with glibc's allocator told to keep freed memory (`MALLOC_TUNABLES`, through
the documented GLIBC_TUNABLES variable): by default every block above 32 MB,
such as a large model's activations, is mapped afresh and its pages faulted
in on every forward pass. Measured here on resnet50 (224 px, batches of 50,
2 cores): a bare forward of 200 images spent 10-16 of its 11-19 s in system
time and took 10 s with the tunables, its variation gone. The cost: the
process keeps its peak heap until it ends (a build is one process).
`ATLAS_MALLOC=default` (or any GLIBC_TUNABLES malloc setting of your own)
leaves the allocator as it is.
"""

from __future__ import annotations

import argparse
import errno
import os
import platform
import re
import sys
import time
import warnings
from pathlib import Path

from .errors import AtlasError, AtlasWarning

DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824"  # no mmap per block, no trim < 1 GiB


def with_malloc_tunables(command: list[str]) -> None:
    """Re-run this process (`python COMMAND...`) with MALLOC_TUNABLES, where glibc reads them; returns without
    doing anything elsewhere, when they are set already, or under ATLAS_MALLOC=default."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or "glibc.malloc." in tunables
            or os.environ.get("ATLAS_MALLOC") == "default"):
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, MALLOC_TUNABLES])))
    os.execve(sys.executable, [sys.executable, *command], env)


def entry() -> int:
    """The `atlas` console command (and `python -m atlas_builder`)."""
    with_malloc_tunables(["-m", "atlas_builder", *sys.argv[1:]])
    return main()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atlas", description="Build a static neuron atlas of a PyTorch model.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="scan the models and write the site")
    p_build.add_argument("config", help="atlas TOML file (see examples/demo.toml)")
    p_layers = sub.add_parser("layers", help="list each model's layers with output shapes")
    p_layers.add_argument("config", help="atlas TOML file")
    p_plan = sub.add_parser("plan", help="estimate a build's time and site size before running it")
    p_plan.add_argument("config", help="atlas TOML file")
    p_plan.add_argument("--strict", action="store_true", help="exit non-zero when the site would exceed 1 GB")
    p_publish = sub.add_parser("publish", help="commit the built site onto a gh-pages branch, ready to push")
    p_publish.add_argument("config", help="atlas TOML file")
    p_publish.add_argument("--branch", default="gh-pages", help="branch to commit the site to (default gh-pages)")
    p_publish.add_argument("--cname", help="custom domain to write to CNAME, e.g. atlas.example.org")
    p_publish.add_argument("--message", help="commit message (default: 'Publish Neuron Atlas site: <site.title>')")
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", AtlasWarning)
            warnings.showwarning = _show_warning(warnings.showwarning)
            return _run(args)
    except AtlasError as exc:
        if args.debug:
            raise
        print(f"atlas: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("atlas: interrupted; the previous site is unchanged, finished stages are kept in the store "
              "(a re-run resumes from them)", file=sys.stderr)
        return 130


def _run(args) -> int:
    from .config import load_config

    cfg = load_config(args.config)
    if args.command == "publish":
        from .publish import publish

        print(f"atlas: {publish(cfg, branch=args.branch, cname=args.cname, message=args.message)}")
        return 0
    from .build import build, layer_table

    if args.command == "layers":
        for model, layers in layer_table(cfg):
            print(f"{model}:")
            print(f"  {'layer':<32} {'type':<16} {'output shape':<18} {'units':>6} {'runs':>4}  default")
            for layer in layers:
                shape = "×".join(map(str, layer.shape)) if layer.shape is not None else "(not a tensor)"
                units = layer.n_units if layer.probeable else "-"
                print(f"  {layer.name:<32} {layer.module_type:<16} {shape:<18} {units:>6} {layer.calls:>4}  "
                      f"{'yes' if layer.default else ''}")
            print("  (runs: calls per forward pass; a module that runs more than once cannot be probed)")
        return 0
    if args.command == "plan":
        from .plan import make_plan

        plan = make_plan(cfg)
        print("\n".join(plan.table()))
        if args.strict and plan.over:
            print(f"atlas: error: the site would be about {plan.bytes / 1e9:.2f} GB, over GitHub Pages' 1 GB; "
                  f"probe fewer layers or units (layers = [...], units = N), or lower featurevis.frames",
                  file=sys.stderr)
            return 1
        return 0
    start = time.perf_counter()
    plan = None
    if not args.quiet:
        from .plan import make_plan

        plan = make_plan(cfg)
        print(f"atlas: {plan.total_line()}", file=sys.stderr, flush=True)
    try:
        report = build(cfg, progress=not args.quiet, plan=plan)  # bars on a terminal, lines in a log (atlas_builder.progress)
    except OSError as exc:
        message = os_error_message(exc, cfg)
        if message is None:  # not one the user can fix by freeing space or permissions: keep the traceback
            raise
        raise AtlasError(message) from exc
    if not report.writer:  # another rank of a sharded build: rank 0 reports
        return 0
    print(f"atlas: {report.summary()}")
    accuracy = ", ".join(f"{name} {100 * acc:.1f}%" for name, acc in report.accuracy.items() if acc is not None)
    if accuracy:
        print(f"atlas: accuracy on the atlas dataset: {accuracy}")
    print(f"atlas: open {report.site_path}/index.html in a browser, or run `make serve` "
          f"for http://127.0.0.1:8000 ({time.perf_counter() - start:.1f} s in all)")
    return 0


def _show_warning(previous):
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, AtlasWarning):
            print(f"atlas: warning: {message}", file=sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)
    return show


def os_error_message(exc: OSError, cfg) -> str | None:
    """One line for an OS error while building that the user can fix, naming the config key; else None."""
    if exc.errno not in DISK_FULL | NOT_WRITABLE:
        return None
    reason = f"{exc.strerror or os.strerror(exc.errno)} ({errno.errorcode.get(exc.errno, exc.errno)})"
    site_dir, data_dir = Path(cfg.atlas.site_dir), Path(cfg.atlas.data_dir)
    path = Path(os.fsdecode(exc.filename)) if exc.filename else None
    shown, folder = path, path.parent if path is not None else None
    if path is not None:
        for i, part in enumerate(path.parts):
            if re.fullmatch(r"\..+\.tmp", part):  # inside (or the name of) one of our temp files or folders
                shown = folder = Path(*path.parts[:i])
                if part.startswith(f".{site_dir.name}.") and folder.resolve() == site_dir.parent.resolve():
                    shown = site_dir  # the new site, built beside the old one
                break
    key = "atlas.site_dir or atlas.data_dir"
    if shown is not None:
        if shown.resolve().is_relative_to(data_dir.resolve()):
            key = "atlas.data_dir"
        elif shown.resolve().is_relative_to(site_dir.resolve().parent):
            key = "atlas.site_dir"
    what = f"cannot write {shown}" if shown is not None else "cannot write the atlas"
    if exc.errno in DISK_FULL:
        return (f"{what}: {reason}; free disk space there, or set {key} to a folder on a disk with room, "
                f"then build again")
    where = f" in {folder}" if folder is not None and folder != shown else ""
    return (f"{what}: {reason}{where}; make that folder writable, or set {key} to a folder you can write to, "
            f"then build again")


if __name__ == "__main__":
    sys.exit(main())
