"""Time of the embed stage (unit and input maps by PCA and UMAP, nearest units).

Measured: `embed_model` (atlas_builder/embed.py) wall time, split into the
time spent inside umap-learn (`ModelEmbedding.umap_seconds`) and ours
(standardizing, PCA in scikit-learn, nearest units: total minus umap).

umap-learn compiles its numba code on first use in a process (seconds), and
it has two neighbour paths, each compiled apart: under 4,096 points all
pairwise distances, from 4,096 on NN-descent. So a warm-up embed of a small
random matrix (16 units x 4,200 examples: its unit maps take the first path,
its input map the second; 50 x 200 with --quick, where no map reaches 4,096
points) runs first; its time is printed apart and the
figures below are steady-state. A build pays this warm-up once per process.

Cases:
1. the demo: examples/demo.toml built into a temporary folder (feature
   visualization and the embed stage off, so only the scan runs); then the
   sample matrices of both demo models are read from the store, as the
   build's embed stage reads them, and `embed_model` is timed on each with
   the config's n_neighbors and neighbours (figure: the sum of both); the
   demo weights are copied from data/models/ when a `make site` has cached
   them (hits are keyed by hash, so exact), else the build trains them;
2. one synthetic layer of 2,048 units x 10,000 examples (seeded numpy:
   rank-32 structure plus noise, ReLU'd, float16 like the store's sample
   matrices): `embed_model({"synthetic": matrix}, seed=0)` — its unit maps
   have 2,048 points of 10,000 dims, its input map 10,000 points of 2,048.

Run it on otherwise idle CPUs: OpenBLAS (2 threads here) slows by up to
~100x on an SVD when another process holds a core, and the load average is
printed first for that reason.

Run: .venv/bin/python bench/embed.py [--quick] [--profile]   (make bench runs it)
--quick: synthetic 256 x 2,000; --profile: cProfile the synthetic case and
print the functions that take the most time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from atlas_builder.build import build  # noqa: E402
from atlas_builder.config import parse_config  # noqa: E402
from atlas_builder.embed import embed_model  # noqa: E402
from atlas_builder.store import Store  # noqa: E402


def report(name: str, seconds: float, umap_seconds: float) -> None:
    print(f"{name}: {seconds:.2f} s, of which umap-learn {umap_seconds:.2f} s, ours {seconds - umap_seconds:.2f} s",
          flush=True)


def demo_samples(tmp: Path):
    """Build the demo (scan only) under tmp; return the config and {model: {layer: sample matrix [U, S]}}."""
    base = REPO / "examples"
    raw = tomllib.loads((base / "demo.toml").read_text())
    raw["atlas"].update(data_dir=str(tmp / "data"), site_dir=str(tmp / "site"))
    raw["featurevis"] = {**raw.get("featurevis", {}), "enabled": False}
    raw["embed"] = {**raw.get("embed", {}), "enabled": False}
    cfg = parse_config(raw, base=base, path=base / "demo.toml")
    cached = REPO / "data" / "models"  # demo weights a previous `make site` trained (keyed by hash: hits are exact)
    if cached.is_dir():
        shutil.copytree(cached, cfg.atlas.data_dir / "models")
    start = time.perf_counter()
    build(cfg, progress=False)
    how = "cached weights" if cached.is_dir() else "training"
    print(f"demo build ({how} + scan + site, no feature vis, no embed): {time.perf_counter() - start:.1f} s",
          flush=True)
    with Store(cfg.store_dir, read_only=True) as store:
        samples = {m.model: {l.layer: store.sample(m.model, l.layer)[0] for l in store.layers(m.model)}
                   for m in store.models()}
    return cfg, samples


def synthetic(units: int, examples: int, seed: int = 0) -> np.ndarray:
    """[units, examples] float16: rank-32 structure plus noise, ReLU'd (many zeros, as in real layers)."""
    rng = np.random.default_rng(seed)
    rank = 32
    loadings = rng.standard_normal((units, rank)).astype(np.float32)
    factors = rng.standard_normal((rank, examples)).astype(np.float32)
    x = loadings @ factors / np.sqrt(rank) + 0.5 * rng.standard_normal((units, examples), dtype=np.float32)
    return np.maximum(x, 0).astype(np.float16)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller synthetic layer (256 x 2,000)")
    parser.add_argument("--profile", action="store_true", help="cProfile the synthetic case")
    args = parser.parse_args()
    import sklearn
    import umap

    from threadpoolctl import threadpool_info

    blas = ", ".join(f"{i['internal_api']} {i['num_threads']} threads" for i in threadpool_info())
    print(f"numpy {np.__version__}, scikit-learn {sklearn.__version__}, umap-learn {umap.__version__}; {blas}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (other work on the CPUs slows BLAS a lot)")

    rng = np.random.default_rng(1)
    # --quick: no map reaches 4,096 points, so only the all-pairs path needs compiling
    warm_shape = (50, 200) if args.quick else (16, 4_200)
    start = time.perf_counter()
    warm = embed_model({"warmup": rng.random(warm_shape).astype(np.float16)}, seed=0)
    print(f"warm-up ({warm_shape[0]} x {warm_shape[1]:,}: numba JIT): {time.perf_counter() - start:.2f} s "
          f"(embed {warm.seconds:.2f} s, of which umap-learn {warm.umap_seconds:.2f} s)", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        cfg, samples = demo_samples(Path(tmp))
    demo_s = demo_umap = 0.0
    for model, layers in samples.items():
        shapes = ", ".join(f"{name} {m.shape[0]}x{m.shape[1]}" for name, m in layers.items())
        emb = embed_model(layers, cfg.atlas.seed, cfg.embed.n_neighbors, cfg.embed.neighbours)
        report(f"demo {model} ({shapes})", emb.seconds, emb.umap_seconds)
        demo_s += emb.seconds
        demo_umap += emb.umap_seconds
    report("demo, both models", demo_s, demo_umap)

    units, examples = (256, 2_000) if args.quick else (2_048, 10_000)
    matrix = synthetic(units, examples)
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    emb = embed_model({"synthetic": matrix}, seed=0)
    if profiler:
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(30)
        print(out.getvalue())
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(20)
        print(out.getvalue())
    report(f"synthetic {units}x{examples} (one layer)", emb.seconds, emb.umap_seconds)
    print(f"FIGURE embed_demo_s {demo_s:.3f}")
    print(f"FIGURE embed_{units}x{examples}_s {emb.seconds:.3f}")


if __name__ == "__main__":
    main()
