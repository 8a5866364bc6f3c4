"""Reliability (issue 7): reproducible, atomic and resumable builds, through the real CLI.

- Reproducible: the demo built twice from scratch (fresh data and site folders,
  demo models retrained, different hash seeds, separate processes) gives
  byte-identical site trees and identical store contents.
- Atomic: a build SIGKILLed at several points (in the middle of a stage's store
  transaction, during feature vis, while pages are written, just before and in
  the middle of the swap) leaves the previous site exactly as it was.
- Resumable: the re-run after such a kill finishes, skips the stages finished
  before the kill, and gives the store and site an uninterrupted build gives;
  and going back to the previous config after a kill gives the previous site
  (no stage is left marked finished while its media files are gone).

Builds run as `python -m atlas_builder build CONFIG` subprocesses. A build is
paused at a chosen point by a `sitecustomize.py` written into the test's tmp
folder (on PYTHONPATH only for those runs; the package is not edited): it wraps
a function, writes a flag file when the point is reached and sleeps, and the
test kills the process group when the flag appears. Kill and resume tests use a
tiny atlas (the conftest `tiny_config` models and dataset, relative paths, the
embed stage off: UMAP's JIT costs ~15 s per process); only the reproducibility
test builds the demo.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest

from atlas_builder import atomic
from atlas_builder.store import Store
from conftest import HERE, REPO, write_config
from sitecheck import broken_links

# Columns that hold measured durations: they cannot be equal between two builds and are
# left out of store comparisons (the about page shows them only with site.show_timings).
TIMING_COLUMNS = {"stages": {"seconds"}}


# --- comparing trees and stores ---------------------------------------------------

def tree(root: Path) -> dict[str, bytes]:
    """Every file under root (dotfiles included) by relative POSIX path -> its bytes."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            out[path.relative_to(root).as_posix()] = b"symlink -> " + os.readlink(path).encode()
        elif path.is_file():
            out[path.relative_to(root).as_posix()] = path.read_bytes()
    return out


def _hint(x: bytes, y: bytes) -> str:
    """Where two versions of a file first differ: the line (text) or byte offset (binary)."""
    try:
        tx, ty = x.decode("utf-8"), y.decode("utf-8")
    except UnicodeDecodeError:
        at = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        return f"binary, {len(x)} vs {len(y)} bytes, first difference at byte {at}"
    lx, ly = tx.splitlines(), ty.splitlines()
    for n, (a, b) in enumerate(zip(lx + [""] * len(ly), ly + [""] * len(lx)), 1):
        if a != b:
            col = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))
            lo = max(0, col - 70)
            return f"line {n}, column {col + 1}: {a[lo:col + 70]!r} vs {b[lo:col + 70]!r}"
    return "same lines, different line endings"


def tree_diff(a: dict[str, bytes], b: dict[str, bytes], limit: int = 6) -> str:
    """A readable description of how two trees differ ('' when they are identical)."""
    lines = []
    for name, keys in (("only in the first", sorted(set(a) - set(b))), ("only in the second", sorted(set(b) - set(a)))):
        if keys:
            lines.append(f"{len(keys)} files {name}: {keys[:limit]}{' ...' if len(keys) > limit else ''}")
    differ = [k for k in sorted(set(a) & set(b)) if a[k] != b[k]]
    if differ:
        lines.append(f"{len(differ)} of {len(set(a) & set(b))} common files differ:")
        lines += [f"  {k}: {_hint(a[k], b[k])}" for k in differ[:limit]]
        if len(differ) > limit:
            lines.append(f"  ... and {len(differ) - limit} more: {differ[limit:limit + 20]}")
    return "\n".join(lines)


def store_dump(folder: Path, model: str | None = None) -> dict[str, list[str]]:
    """Every table of the store in `folder` as sorted row reprs (exact floats, NaN == NaN), timing columns
    left out; with `model`, only that model's rows of the tables that have a model column (and its stages)."""
    out = {}
    with Store(folder, read_only=True) as store:
        con = store.con
        tables = [t for (t,) in con.execute("SELECT table_name FROM information_schema.tables "
                                            "WHERE table_schema = 'main' ORDER BY table_name").fetchall()]
        for table in tables:
            columns = [c for (c,) in con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = 'main' AND table_name = ? "
                "ORDER BY ordinal_position", [table]).fetchall()]
            kept = [c for c in columns if c not in TIMING_COLUMNS.get(table, ())]
            query, params = f'SELECT {", ".join(f"{chr(34)}{c}{chr(34)}" for c in kept)} FROM "{table}"', []
            if model is not None:
                if "model" in columns:
                    query, params = query + " WHERE model = ?", [model]
                elif table == "stages":
                    query, params = query + " WHERE stage LIKE ?", [f"%:{model}"]
                else:
                    continue
            out[table] = sorted(repr(row) for row in con.execute(query, params).fetchall())
    return out


def store_diff(a: dict[str, list[str]], b: dict[str, list[str]], limit: int = 3) -> str:
    lines = []
    for table in sorted(set(a) | set(b)):
        ra, rb = a.get(table), b.get(table)
        if ra == rb:
            continue
        if ra is None or rb is None:
            lines.append(f"table {table} only in the {'second' if ra is None else 'first'} store")
            continue
        only_a, only_b = sorted(set(ra) - set(rb)), sorted(set(rb) - set(ra))
        lines.append(f"table {table}: {len(ra)} vs {len(rb)} rows; {len(only_a)} rows only in the first, "
                     f"{len(only_b)} only in the second")
        lines += [f"  first:  {r[:400]}" for r in only_a[:limit]] + [f"  second: {r[:400]}" for r in only_b[:limit]]
    return "\n".join(lines)


# --- running the CLI ----------------------------------------------------------------

def atlas_env(hooks: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATLAS_TEST_") and k != "SOURCE_DATE_EPOCH"}
    paths = ([str(hooks)] if hooks else []) + [str(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)  # HERE: the fixtures_models:... sources
    env.update(extra)
    return env


def run_atlas(config: Path, **env: str) -> subprocess.CompletedProcess:
    """`atlas build CONFIG` in a fresh process (cwd: the config's folder); fails the test unless it exits 0."""
    proc = subprocess.run([sys.executable, "-m", "atlas_builder", "--quiet", "build", str(config)],
                          cwd=config.parent, env=atlas_env(**env), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"atlas build {config} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def skipped_stages(stdout: str) -> list[str]:
    """The stages the build report says it skipped as unchanged."""
    match = re.search(r"unchanged, skipped: ([^;\n]*)", stdout)
    return sorted(match.group(1).split(", ")) if match else []


# --- the demo, twice from scratch ---------------------------------------------------

def test_demo_builds_from_scratch_are_byte_identical(tmp_path):
    """Two builds of examples/demo.toml, each in its own folder with fresh data (models retrained) and site,
    in separate processes with different hash seeds: same site bytes, same store rows."""
    folders = []
    for name, hash_seed in (("a", "1"), ("b", "2")):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copyfile(REPO / "examples/demo.toml", folder / "demo.toml")  # relative data_dir and site_dir
        run_atlas(folder / "demo.toml", PYTHONHASHSEED=hash_seed)
        folders.append(folder)
    a, b = folders
    site_a, site_b = tree(a / "site"), tree(b / "site")
    assert len(site_a) > 1000, sorted(site_a)[:20]  # the whole demo site, pages and media
    assert not (diff := tree_diff(site_a, site_b)), f"two builds of the demo give different sites:\n{diff}"
    store_a, store_b = store_dump(a / "data/demo"), store_dump(b / "data/demo")
    assert store_a["units"] and store_a["topk"] and store_a["featurevis"] and store_a["map_points"]
    assert not (diff := store_diff(store_a, store_b)), f"two builds of the demo give different stores:\n{diff}"
    # no build time or machine path in the pages: SOURCE_DATE_EPOCH is unset and the config names no date
    now = datetime.now(timezone.utc)
    stamps = {now.strftime("%Y-%m-%d"), now.astimezone().strftime("%Y-%m-%d"), str(a), str(tmp_path)}
    leaks = sorted(f"{path}: {stamp}" for path, data in site_a.items() if path.endswith((".html", ".json", ".js"))
                   for stamp in stamps if stamp.encode() in data)
    assert not leaks, f"pages show the build date or a build folder: {leaks[:10]}"


# --- the tiny atlas: killed builds and their re-runs ----------------------------------

TINY = """
    [atlas]
    name = "tiny"
    data_dir = "data"
    site_dir = "site"
    [site]
    title = "{title}"
    [dataset]
    source = "fixtures_models:tiny_dataset"
    [scan]
    top_k = {top_k}
    batch_size = 16
    [featurevis]
    steps = {steps}
    frames = 4
    [embed]
    enabled = false
    [[models]]
    name = "tiny-cnn"
    source = "fixtures_models:tiny_cnn"
    [[models]]
    name = "tiny-mlp"
    source = "fixtures_models:tiny_mlp"
    """
BEFORE = TINY.format(title="Tiny atlas", top_k=3, steps=12)  # the build whose site must survive
AFTER = TINY.format(title="Tiny atlas, second edition", top_k=4, steps=10)  # every stage and page changes

# Pauses the build at ATLAS_TEST_PAUSE_AT: writes ATLAS_TEST_FLAG, then sleeps until the test kills it.
SITECUSTOMIZE = '''
"""Test hook of tests/test_reliability.py: pause `atlas build` at one point so the test can SIGKILL it."""
import os

POINT = os.environ.get("ATLAS_TEST_PAUSE_AT")


def _install():
    import time
    from pathlib import Path

    from atlas_builder import atomic, store

    flag = Path(os.environ["ATLAS_TEST_FLAG"])
    site = Path(os.environ["ATLAS_TEST_SITE"]).resolve()

    def pause(where):
        flag.write_text(where)
        time.sleep(600)
        os._exit(99)

    if POINT == "scan":  # inside the transaction that replaces the second model's scan rows
        write_scan, insert = store.Store.write_scan, store.Store._insert
        state = {"scans": 0, "inside": False, "inserts": 0}

        def hooked_write_scan(self, *args, **kwargs):
            state["scans"] += 1
            state["inside"] = state["scans"] == 2
            try:
                return write_scan(self, *args, **kwargs)
            finally:
                state["inside"] = False

        def hooked_insert(self, *args, **kwargs):
            result = insert(self, *args, **kwargs)
            if state["inside"]:
                state["inserts"] += 1
                if state["inserts"] == 2:
                    pause("scan")
            return result

        store.Store.write_scan, store.Store._insert = hooked_write_scan, hooked_insert
    elif POINT == "featurevis":  # after the 3rd feature-vis image of the build is written
        write_with = atomic.write_with
        count = [0]

        def hooked_write_with(path, write):
            result = write_with(path, write)
            parts = Path(path).parts
            if "media" in parts and "fv" in parts[:-1]:
                count[0] += 1
                if count[0] == 3:
                    pause("featurevis")
            return result

        atomic.write_with = hooked_write_with
    elif POINT == "render":  # 5 pages of the new tree rendered, the 6th about to be
        from atlas_builder import website

        render = website.rendering.render
        count = [0]

        def hooked_render(*args, **kwargs):
            count[0] += 1
            if count[0] == 6:
                pause("render")
            return render(*args, **kwargs)

        website.rendering.render = hooked_render
    elif POINT in ("swap", "mid-swap"):  # before the first rename that touches the site / after one moved it away
        def hooked(real):
            def rename(src, dst, *args, **kwargs):
                touches = site in (Path(os.fspath(src)).resolve(), Path(os.fspath(dst)).resolve())
                if POINT == "swap" and touches:
                    pause("swap")
                result = real(src, dst, *args, **kwargs)
                if POINT == "mid-swap" and Path(os.fspath(src)).resolve() == site and not Path(site).exists():
                    pause("mid-swap")
                return result
            return rename

        os.replace, os.rename = hooked(os.replace), hooked(os.rename)
        if POINT == "swap" and hasattr(atomic, "exchange"):  # a one-step swap has no middle, only a before
            atomic.exchange = hooked(atomic.exchange)
    elif POINT == "dataset":  # the store's media cleared for a new dataset, nothing of it scanned yet
        from atlas_builder import media

        clear = media.clear

        def hooked_clear(*args, **kwargs):
            clear(*args, **kwargs)
            pause("dataset")

        media.clear = hooked_clear
    else:
        raise SystemExit(f"unknown ATLAS_TEST_PAUSE_AT {POINT!r}")


if POINT:
    _install()
'''


@dataclass
class Killed:
    reached: str | None  # the pause point the build reached (None: it ran to the end)
    returncode: int
    output: str


def kill_build_at(config: Path, point: str, work: Path, timeout: float = 600) -> Killed:
    """Run `atlas build CONFIG` with the pause hook, SIGKILL its process group once it reaches `point`."""
    hooks = work / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    flag, log = work / f"reached-{point}", work / f"build-{point}.log"
    flag.unlink(missing_ok=True)
    env = atlas_env(hooks, ATLAS_TEST_PAUSE_AT=point, ATLAS_TEST_FLAG=str(flag),
                    ATLAS_TEST_SITE=str(config.parent / "site"))
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "atlas_builder", "--quiet", "build", str(config)],
                                cwd=config.parent, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while not flag.exists() and proc.poll() is None:
                assert time.monotonic() < deadline, f"the build never reached {point!r} in {timeout} s"
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the build and anything it started
            proc.wait()
    return Killed(flag.read_text() if flag.exists() else None, proc.returncode, log.read_text())


def copy_tree_with_links(src: Path, dst: Path) -> None:
    """Copy a folder keeping hard links between its files (the site links the store's media files)."""
    seen: dict[tuple[int, int], Path] = {}
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        st = path.stat()
        key = (st.st_dev, st.st_ino)
        if key in seen:
            os.link(seen[key], target)
        else:
            shutil.copy2(path, target)
            seen[key] = target


@dataclass
class Tiny:
    before: Path  # the BEFORE atlas, built: copied as the starting point of every kill
    before_site: dict[str, bytes]
    before_store: Path
    after_site: dict[str, bytes]  # AFTER built from scratch, uninterrupted
    after_store: dict[str, list[str]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    before = tmp_path_factory.mktemp("tiny-before")
    run_atlas(write_config(before, BEFORE))
    assert broken_links(before / "site") == []
    after = tmp_path_factory.mktemp("tiny-after")
    run_atlas(write_config(after, AFTER))
    return Tiny(before, tree(before / "site"), before / "data/tiny", tree(after / "site"),
                store_dump(after / "data/tiny"))


ARCHITECTURES = ["architecture:tiny-cnn", "architecture:tiny-mlp"]  # the models do not change: never re-run
ALL_STAGES = sorted(ARCHITECTURES + ["featurevis:tiny-cnn", "featurevis:tiny-mlp", "scan:tiny-cnn", "scan:tiny-mlp"])
KILL_POINTS = {  # where the AFTER build is killed -> the stages its re-run must skip
    "scan": sorted(ARCHITECTURES + ["featurevis:tiny-cnn", "scan:tiny-cnn"]),  # mid-transaction of tiny-mlp's scan
    "featurevis": sorted(ARCHITECTURES + ["scan:tiny-cnn"]),  # tiny-cnn's feature vis, some images written
    "render": ALL_STAGES,  # the new tree beside the site, 5 pages written
    "swap": ALL_STAGES,  # the new tree complete, not yet swapped in
    "mid-swap": ALL_STAGES,  # the old site renamed away, the new one not yet in place
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_build_keeps_previous_site_and_rerun_resumes(tiny, tmp_path, point):
    folder = tmp_path / "atlas"
    copy_tree_with_links(tiny.before, folder)
    config = write_config(folder, AFTER)
    killed = kill_build_at(config, point, tmp_path)
    if point == "mid-swap" and killed.reached is None and killed.returncode == 0:
        # the site was swapped in one step (no rename moved it away first): there is no middle to kill in
        assert not (diff := tree_diff(tiny.after_site, tree(folder / "site"))), diff
    else:
        assert killed.reached == point, (f"the build did not reach {point!r} (exit {killed.returncode}); "
                                         f"has the hooked function moved?\n{killed.output}")
        assert killed.returncode == -signal.SIGKILL
        # atomic: the previous site is there, complete, every file with its old bytes
        site = folder / "site"
        diff = tree_diff(tiny.before_site, tree(site)) if site.is_dir() else f"{site} is missing"
        assert not diff, (f"killed at {point!r}, the previous site is not as it was:\n{diff}\n"
                          f"beside it: {sorted(p.name for p in folder.iterdir())}")
    if point == "scan":  # the interrupted transaction left tiny-mlp's rows and fingerprints as they were
        assert not (diff := store_diff(store_dump(tiny.before_store, "tiny-mlp"),
                                       store_dump(folder / "data/tiny", "tiny-mlp"))), diff

    # resumable: the re-run (stray temp files and folders still there) skips what was finished and
    # ends where an uninterrupted build ends
    rerun = run_atlas(config)
    assert skipped_stages(rerun.stdout) == KILL_POINTS[point], rerun.stdout
    assert not (diff := tree_diff(tiny.after_site, tree(folder / "site"))), \
        f"after a kill at {point!r}, the re-run's site differs from an uninterrupted build's:\n{diff}"
    assert not (diff := store_diff(tiny.after_store, store_dump(folder / "data/tiny"))), \
        f"after a kill at {point!r}, the re-run's store differs from an uninterrupted build's:\n{diff}"


OTHER_DATASET = BEFORE.replace("fixtures_models:tiny_dataset", "fixtures_models:hostile_dataset")


@pytest.mark.parametrize("point, config", [("featurevis", AFTER), ("dataset", OTHER_DATASET)])
def test_killed_build_then_the_old_config_gives_the_old_site(tiny, tmp_path, point, config):
    """Going back to the previous config after a killed build: every stage the store still marks as finished
    must still have its files. Killed while the feature-vis stage re-renders a model (it first deletes the
    model's images), or just after a new dataset cleared the store's media (before anything is re-scanned)."""
    folder = tmp_path / "atlas"
    copy_tree_with_links(tiny.before, folder)
    killed = kill_build_at(write_config(folder, config), point, tmp_path)
    assert killed.reached == point, killed.output
    assert not (diff := tree_diff(tiny.before_site, tree(folder / "site"))), diff
    proc = subprocess.run([sys.executable, "-m", "atlas_builder", "--quiet", "build",
                           str(write_config(folder, BEFORE))], cwd=folder, env=atlas_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"the build with the previous config failed:\n{proc.stdout}\n{proc.stderr}"
    assert not (diff := tree_diff(tiny.before_site, tree(folder / "site"))), diff
    assert not (diff := store_diff(store_dump(tiny.before_store), store_dump(folder / "data/tiny"))), diff


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2(RENAME_EXCHANGE) is Linux only")
def test_exchange_swaps_two_folders_in_one_step(tmp_path):
    new, site = tmp_path / ".site.new.tmp", tmp_path / "site"
    (new / "a").mkdir(parents=True)
    (new / "a" / "index.html").write_text("new")
    site.mkdir()
    (site / "index.html").write_text("old")
    assert atomic.exchange(new, site)  # False would mean this file system cannot (then the site swap falls back)
    assert (site / "a" / "index.html").read_text() == "new" and (new / "index.html").read_text() == "old"
    with pytest.raises(FileNotFoundError):
        atomic.exchange(tmp_path / "missing", site)
    assert (site / "a" / "index.html").read_text() == "new"
