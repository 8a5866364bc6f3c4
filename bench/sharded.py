"""Sharded scan under torchrun: 2 CPU processes (gloo) against one, on the same stream.

What a sharded build does in its scan stage, measured alone: each rank scans
its contiguous block of example ids (`scan.scan_part`), sends its
accumulators to rank 0 (`gather_object`), which merges them in order and
summarizes (`finish_scan`). Timed from a barrier after process-group set-up
to the end of the summary on rank 0, so torchrun's start-up (seconds) is
printed apart, not counted. The one-process baseline is the same script
without torchrun, using every core for torch's threads; under torchrun each
process gets OMP_NUM_THREADS=1 (torchrun's default), so both use the machine's
2 cores.

Cases: the demo CNN over a 20,000-digit stream (as bench/scan.py), and
resnet18 (weights=None) over 512 synthetic 128-px images.
speed-up = one-process time / two-process time (2.0 = perfect on 2 cores).

Run: .venv/bin/python bench/sharded.py [--quick]   (make bench runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from atlas_builder import distributed  # noqa: E402
from atlas_builder.cli import with_malloc_tunables  # noqa: E402
from atlas_builder.config import ModelSection, ScanSection  # noqa: E402
from atlas_builder.scan import finish_scan, scan_part, shard_range  # noqa: E402
from atlas_builder.sources import LoadedModel  # noqa: E402
from scan import Tensors, default_layers, demo_cnn, digit_stream, wrap  # noqa: E402


def stream(case: str, quick: bool):
    if case == "cnn":
        return digit_stream(4_000 if quick else 20_000), ScanSection(batch_size=128)
    n = 128 if quick else 512
    imgs = torch.rand(n, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    return wrap(Tensors(imgs, torch.arange(n) % 1000), 1000), ScanSection(batch_size=64)


def child(case: str, quick: bool, data_dir: str) -> None:
    """One rank (or the single process): scan its shard, gather, merge and summarize on rank 0."""
    cluster = distributed.from_environment(torch.device("cpu"))
    try:
        if case == "cnn":
            model = demo_cnn(Path(data_dir))
        else:
            import torchvision
            model = LoadedModel(ModelSection("resnet18", "torchvision:resnet18"),
                                torchvision.models.resnet18(weights=None).eval(), "bench", {})
        dataset, cfg = stream(case, quick)
        layers = default_layers(model, dataset)
        cluster.barrier()
        start = time.perf_counter()
        first, last = shard_range(len(dataset), cluster.rank, cluster.world)
        part = scan_part(model, dataset, layers, cfg, torch.device("cpu"), 0, first, last, progress=False)
        parts = cluster.gather(part)
        if cluster.writer:
            merged = parts[0]
            for other in parts[1:]:
                merged = merged.merge(other)
            finish_scan(model, dataset, layers, cfg, merged, torch.device("cpu"))
            print(json.dumps({"seconds": time.perf_counter() - start, "threads": torch.get_num_threads(),
                              "world": cluster.world, "examples": len(dataset)}), flush=True)
        cluster.barrier()
    finally:
        cluster.close()


def launch(case: str, world: int, quick: bool, data_dir: Path) -> tuple[dict, float]:
    args = [__file__, "--child", case, "--data-dir", str(data_dir)] + (["--quick"] if quick else [])
    cmd = [sys.executable] + args if world == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world)] + args
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ}).stdout
    wall = time.perf_counter() - start
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1]), wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child")
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.quick, args.data_dir)
        return
    with_malloc_tunables([__file__, *sys.argv[1:]])  # as the atlas command runs (its children inherit them)
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, gloo on the CPU")
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        demo_cnn(Path(tmp))  # train and cache the demo CNN once, outside the timings
        for case, name in (("cnn", "demo CNN, digit stream"), ("resnet", "resnet18 (weights=None), 128 px")):
            one, wall1 = launch(case, 1, args.quick, Path(tmp))
            two, wall2 = launch(case, 2, args.quick, Path(tmp))
            speedup = one["seconds"] / two["seconds"]
            print(f"{name}: {one['examples']} examples; 1 process ({one['threads']} threads): {one['seconds']:.2f} s; "
                  f"2 processes ({two['threads']} thread each): {two['seconds']:.2f} s; speed-up {speedup:.2f} "
                  f"(whole commands incl. start-up: {wall1:.1f} s vs {wall2:.1f} s)", flush=True)
            figures[case] = speedup
    print(f"FIGURE scan_2proc_speedup {figures['cnn']:.3f}")
    print(f"FIGURE scan_2proc_speedup_resnet18 {figures['resnet']:.3f}")


if __name__ == "__main__":
    main()
