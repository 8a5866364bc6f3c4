"""A sharded build under torchrun (2 CPU processes, gloo) equals the single-process build."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from atlas_builder.build import build
from atlas_builder.config import load_config
from conftest import REPO, TINY_MODELS, atlas_section, write_config

BODY = """
[site]
title = "Sharded"
input_pages = 4
[dataset]
source = "fixtures_models:tiny_dataset"
[scan]
top_k = 3
batch_size = 8
sample_size = 30
[featurevis]
steps = 6
frames = 3
batch_size = 3
""" + TINY_MODELS

TABLES = ("layers", "units", "topk", "predictions", "samples", "sample_examples", "input_units", "featurevis",
          "weights", "examples", "classes", "map_points", "neighbours")


def rows(db: Path, table: str) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return sorted(con.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
    finally:
        con.close()


def close(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    return a == b


def test_two_process_build_equals_single_process(tmp_path):
    single_dir, sharded_dir = tmp_path / "single", tmp_path / "sharded"
    single_dir.mkdir()
    sharded_dir.mkdir()
    single = load_config(write_config(single_dir, atlas_section(single_dir, "atlas") + BODY))
    build(single, progress=False)
    config = write_config(sharded_dir, atlas_section(sharded_dir, "atlas") + BODY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "atlas_builder", "build", str(config)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("atlas: built") == 1  # only the writer (rank 0) reports
    for table in TABLES:
        a = rows(single_dir / "data/atlas/atlas.duckdb", table)
        b = rows(sharded_dir / "data/atlas/atlas.duckdb", table)
        assert len(a) == len(b), table
        bad = [(x, y) for x, y in zip(a, b) if not close(x, y)]
        assert not bad, (table, bad[:2])
    # the feature-vis images: the same bytes, whichever rank rendered them
    single_fv = sorted((single_dir / "data/atlas/media/fv").rglob("*.webp"))
    sharded_fv = sorted((sharded_dir / "data/atlas/media/fv").rglob("*.webp"))
    assert [p.relative_to(single_dir) for p in single_fv] == [p.relative_to(sharded_dir) for p in sharded_fv]
    assert single_fv and all(a.read_bytes() == b.read_bytes() for a, b in zip(single_fv, sharded_fv))
    assert (sharded_dir / "site/index.html").is_file()


@pytest.mark.parametrize("n,world", [(10, 3), (2, 4), (40, 2)])
def test_shard_ranges_cover_the_dataset_once(n, world):
    from atlas_builder.scan import shard_range

    ranges = [shard_range(n, r, world) for r in range(world)]
    assert [i for a, b in ranges for i in range(a, b)] == list(range(n))
    assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1
