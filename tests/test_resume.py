"""Resume and incremental builds: a build killed with SIGKILL during feature visualization resumes at the
batch it was in and ends with the same site, byte for byte, as one never interrupted; adding a layer
renders only that layer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from atlas_builder.build import build
from atlas_builder.config import load_config
from atlas_builder.store import Store
from conftest import REPO

HERE = Path(__file__).resolve().parent

CONFIG = """
[atlas]
name = "resume"
data_dir = "data"
site_dir = "site"
[site]
input_pages = 4
[dataset]
source = "fixtures_models:tiny_dataset"
[featurevis]
steps = {steps}
batch_size = 1
frames = 4
[[models]]
name = "tiny-cnn"
source = "fixtures_models:tiny_cnn"
layers = {layers}
"""


def write(folder: Path, steps: int = 400, layers=("relu", "fc")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "atlas.toml"
    path.write_text(CONFIG.format(steps=steps, layers=list(layers)).replace("'", '"'))
    return path


def files(site: Path) -> dict[str, bytes]:
    return {str(p.relative_to(site)): p.read_bytes() for p in sorted(site.rglob("*")) if p.is_file()}


def atlas(config: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}
    return subprocess.Popen([sys.executable, "-m", "atlas_builder", "--quiet", "build", str(config)], env=env,
                            cwd=config.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_killed_during_featurevis_resumes_to_the_same_site(tmp_path):
    whole = write(tmp_path / "whole")
    build(load_config(whole), progress=False)  # the uninterrupted build, in this process

    killed = write(tmp_path / "killed")
    fv = killed.parent / "data" / "resume" / "media" / "fv"
    process = atlas(killed)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if len(list(fv.rglob("*.negative.webp"))) >= 3:  # three batches drawn: some committed, one in flight
            break
        time.sleep(0.005)
    assert process.poll() is None, f"the build ended before it could be killed: {process.stderr.read()}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    with Store(killed.parent / "data" / "resume", read_only=True) as store:
        kept = sum(len(store.featurevis_kinds("tiny-cnn", layer)) for layer in ("relu", "fc"))
    assert 0 < kept < 4 + 3  # some batches were kept, not all

    resumed = atlas(killed)
    assert resumed.wait(300) == 0, resumed.stderr.read()
    assert files(killed.parent / "site") == files(whole.parent / "site")


def test_adding_a_layer_renders_only_that_layer(tmp_path):
    path = write(tmp_path, steps=8, layers=("relu",))
    build(load_config(path), progress=False)
    media = tmp_path / "data" / "resume" / "media" / "fv" / "tiny-cnn"
    before = {p: p.stat().st_mtime_ns for p in (media / "relu").glob("*.webp")}
    assert len(before) == 4 * 4  # positive, negative, animation and (first layer) weights of each unit
    time.sleep(0.01)
    path = write(tmp_path, steps=8, layers=("relu", "fc"))
    report = build(load_config(path), progress=False)
    assert {p: p.stat().st_mtime_ns for p in (media / "relu").glob("*.webp")} == before  # not redrawn
    assert len(list((media / "fc").glob("*.webp"))) == 3 * 3
    with Store(tmp_path / "data" / "resume", read_only=True) as store:
        assert sorted(store.featurevis_kinds("tiny-cnn", "fc")) == [0, 1, 2]
    assert report.units == 4 + 3


def summary(units):
    return [(u.unit, u.mean, u.std, u.max, u.label, u.hist, [(t.example, t.value) for t in u.top + u.bottom])
            for u in units]


def test_adding_a_layer_scans_only_that_layer(tmp_path, monkeypatch):
    from atlas_builder import build as build_module

    scanned = []
    real = build_module.scan_part
    monkeypatch.setattr(build_module, "scan_part", lambda model, dataset, layers, *a, **k:
                        scanned.append(list(layers)) or real(model, dataset, layers, *a, **k))
    path = write(tmp_path, steps=4, layers=("relu",))
    build(load_config(path), progress=False)
    with Store(tmp_path / "data" / "resume", read_only=True) as store:
        relu = summary(store.units("tiny-cnn", "relu"))
    write(tmp_path, steps=4, layers=("fc", "relu"))
    build(load_config(path), progress=False)
    write(tmp_path, steps=4, layers=("fc",))
    build(load_config(path), progress=False)
    assert scanned == [["relu"], ["fc"]]  # the third build only dropped a layer
    write(tmp_path, steps=4, layers=("fc", "relu"))
    build(load_config(path), progress=False)
    assert scanned[-1] == ["relu"]
    with Store(tmp_path / "data" / "resume", read_only=True) as store:
        assert [l.layer for l in store.layers("tiny-cnn")] == ["fc", "relu"]
        assert summary(store.units("tiny-cnn", "relu")) == relu  # the same statistics as scanned alone
