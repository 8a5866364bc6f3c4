"""Scan throughput against a bare forward pass, and memory against dataset size.

Measured side by side in one run, same model, same DataLoader, same batches:
- bare: `for x, _ in loader: model(x)` under torch.inference_mode();
- scan: `scan_model` (hooks on every default layer, all accumulators,
  buffering, and the final summary: histograms, selectivity, redundancy).
ratio = examples/s of the scan / examples/s of the bare pass (1.0 = free).

Cases (each bare/scan pair interleaved, medians; a warm-up pass of each first):
1. torchvision resnet18 (weights=None) over 2,000 synthetic 128-px images,
   batches of 64, every conv, the stem ReLU and fc (22 layers, 5,864 units: what
   the default layers were when this figure's target was set; today's default
   rule probes 10 of them, which would flatter it; 3 runs);
2. torchvision resnet50 (weights=None) over 500 synthetic 224-px images,
   batches of 50, the stem (`relu`) and every bottleneck output (3 runs);
3. peak RSS (VmHWM) of a scan of N and 4N examples, each in a fresh process,
   over a dataset that makes its examples on the fly (so only the scan can
   grow), with how far it rose above the process's RSS before the scan;
4. for information only: the demo CNN (trained by the build) over a stream of
   20,000 8x8 digits (the scikit-learn digits tiled, with seeded noise) and the
   540-example demo itself, where fixed per-batch costs weigh more;
5. with CUDA: resnet50 over 5,000 synthetic 224-px images, batch 128, under
   bfloat16 autocast, both passes fed by the same DataLoader (4 workers,
   pinned memory): FIGURE scan_vs_forward_resnet50_cuda.

Both passes run under the allocator settings the `atlas` command gives itself
(GLIBC_TUNABLES, see atlas_builder/cli.py; ATLAS_MALLOC=default for glibc's own).

Run: .venv/bin/python bench/scan.py [--quick] [--only resnet18|resnet50|rss|demo|cuda]   (make bench runs it)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from atlas_builder import demo_models  # noqa: E402
from atlas_builder.cli import with_malloc_tunables  # noqa: E402
from atlas_builder.config import ModelSection, ScanSection  # noqa: E402
from atlas_builder.hooks import list_layers, resolve_layers  # noqa: E402
from atlas_builder.hooks import unit_count  # noqa: E402
from atlas_builder.scan import finish_scan, scan_part  # noqa: E402
from atlas_builder.sources import AtlasDataset, LoadedModel  # noqa: E402


class Tensors(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


class OnTheFly(Dataset):
    """Example i is made from seed i: memory does not grow with the dataset's length."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.rand(1, 8, 8, generator=g), i % 10


def wrap(data: Dataset, n_classes: int) -> AtlasDataset:
    return AtlasDataset(data, tuple(str(i) for i in range(n_classes)), (), (), "bench", "bench")


def demo_cnn(data_dir: Path) -> LoadedModel:
    module, record = demo_models.load_builtin("digits-cnn", data_dir, seed=0)
    return LoadedModel(ModelSection("digits-cnn", "builtin:digits-cnn"), module, "bench", record)


def digit_stream(n: int) -> AtlasDataset:
    """n digits: scikit-learn's 1,797 tiled, with seeded noise of std 0.02 so that every example is distinct."""
    images, labels = (np.concatenate(parts) for parts in zip(demo_models.digits_split("train"),
                                                             demo_models.digits_split("test")))
    reps = -(-n // len(images))
    tiled = torch.from_numpy(images).repeat(reps, 1, 1, 1)[:n]
    noise = torch.randn(tiled.shape, generator=torch.Generator().manual_seed(1)) * 0.02
    return wrap(Tensors((tiled + noise).clamp(0, 1), torch.from_numpy(labels).repeat(reps)[:n]), 10)


def default_layers(model: LoadedModel, dataset: AtlasDataset) -> list[str]:
    """What a build probes when the config lists no layers."""
    return resolve_layers(model.module, (), model.name, list_layers(model.module, dataset.data[0][0][None]))


def loader(dataset: AtlasDataset, batch: int, device: torch.device, workers: int = 0) -> DataLoader:
    return DataLoader(dataset.data, batch_size=batch, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_pass(model: LoadedModel, dataset: AtlasDataset, cfg: ScanSection, device: torch.device) -> float:
    net = model.module.to(device)
    autocast = torch.autocast(device.type, dtype=getattr(torch, cfg.precision)) if cfg.precision != "float32" \
        else contextlib.nullcontext()
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode(), autocast:
        for x, _ in loader(dataset, cfg.batch_size, device, cfg.workers):
            net(x.to(device, non_blocking=True))
    sync(device)
    return time.perf_counter() - start


def scan_pass(model: LoadedModel, dataset: AtlasDataset, cfg: ScanSection, layers: list[str],
              device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    part = scan_part(model, dataset, layers, cfg, device, seed=0, progress=False, workers=cfg.workers)
    finish_scan(model, dataset, layers, cfg, part, device)
    sync(device)
    return time.perf_counter() - start


def side_by_side(name: str, model: LoadedModel, dataset: AtlasDataset, cfg: ScanSection, repeats: int,
                 layers: list[str] | None = None, device: torch.device = torch.device("cpu"),
                 seconds: list | None = None) -> float:
    """bare seconds / scan seconds (medians); with `seconds`, the two medians are appended to it."""
    layers = layers or default_layers(model, dataset)
    bare_pass(model, dataset, cfg, device)  # warm-up (allocator, kernels, workers)
    scan_pass(model, dataset, cfg, layers, device)
    bare, scan = [], []
    for _ in range(repeats):  # interleaved, so drift hits both alike
        bare.append(bare_pass(model, dataset, cfg, device))
        scan.append(scan_pass(model, dataset, cfg, layers, device))
    b, s = statistics.median(bare), statistics.median(scan)
    n = len(dataset)
    units = sum(unit_count(info.shape) for info in list_layers(model.module.cpu(), dataset.data[0][0][None])
                if info.name in layers)
    print(f"{name}: {n} examples, batch {cfg.batch_size}, {len(layers)} layers ({units:,} units), {repeats} runs "
          f"(median): bare forward {b:.3f} s ({n / b:,.1f} ex/s), scan {s:.3f} s ({n / s:,.1f} ex/s), "
          f"ratio {b / s:.3f}; all runs: bare {', '.join(f'{t:.2f}' for t in bare)}, "
          f"scan {', '.join(f'{t:.2f}' for t in scan)}", flush=True)
    if seconds is not None:
        seconds += [b, s]
    return b / s


def memory_kb() -> dict[str, int]:
    """This process's resident set now (VmRSS) and its peak (VmHWM), in KiB, from /proc/self/status.

    Not `getrusage(...).ru_maxrss`: Linux carries that over from the parent
    through fork and exec, so a child started by this (by then large) bench
    process would report the parent's peak, whatever its own scan used.
    """
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}


def rss_child(n: int, data_dir: str) -> None:
    torch.set_num_threads(1)
    model = demo_cnn(Path(data_dir))
    before = memory_kb()["VmRSS"]  # the libraries and the model
    data = wrap(OnTheFly(n), 10)
    scan_pass(model, data, ScanSection(batch_size=128), default_layers(model, data), torch.device("cpu"))
    print(json.dumps({"n": n, "peak_kb": memory_kb()["VmHWM"], "before_kb": before}))


def peak_rss(n: int, data_dir: Path) -> dict[str, int]:
    """Peak RSS of a fresh process scanning n examples, and its RSS just before the scan (KiB)."""
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(n), "--data-dir", str(data_dir)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def synthetic(n: int, size: int, seed: int = 0) -> AtlasDataset:
    imgs = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return wrap(Tensors(imgs, torch.arange(n) % 1000), 1000)


def resnet(name: str) -> LoadedModel:
    import torchvision

    torch.manual_seed(0)
    return LoadedModel(ModelSection(name, f"torchvision:{name}"), getattr(torchvision.models, name)(weights=None).eval(),
                       "bench", {})


RESNET18_LAYERS = (["conv1", "relu"] + [f"layer{i}.{j}.conv{k}" for i in range(1, 5) for j in range(2) for k in (1, 2)]
                   + [f"layer{i}.0.downsample.0" for i in range(2, 5)] + ["fc"])
RESNET50_LAYERS = ["relu"] + [f"layer{i}.{j}" for i, blocks in enumerate((3, 4, 6, 3), 1) for j in range(blocks)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller inputs, one run each")
    parser.add_argument("--only", choices=["resnet18", "resnet50", "rss", "demo", "cuda"])
    parser.add_argument("--rss-child", type=int)
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.data_dir)
        return
    with_malloc_tunables([__file__, *sys.argv[1:]])  # the allocator settings `atlas` runs with (see cli.py)
    torch.manual_seed(0)
    print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} (as the atlas command sets them)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu"
          + (f"; CUDA: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""), flush=True)
    figures = {}
    run = lambda case: args.only in (None, case)  # noqa: E731
    quick = args.quick
    if run("resnet18"):
        figures["scan_vs_forward_resnet18"] = side_by_side(
            "resnet18 (weights=None), 128 px synthetic", resnet("resnet18"), synthetic(256 if quick else 2_000, 128),
            ScanSection(batch_size=64), 1 if quick else 3, RESNET18_LAYERS)
    if run("resnet50"):
        figures["scan_vs_forward_resnet50"] = side_by_side(
            "resnet50 (weights=None), 224 px synthetic, stem + 16 bottleneck outputs", resnet("resnet50"),
            synthetic(100 if quick else 500, 224), ScanSection(batch_size=50), 1 if quick else 3, RESNET50_LAYERS)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        if run("rss"):
            n = 5_000 if quick else 20_000
            rss_n, rss_4n = peak_rss(n, data_dir), peak_rss(4 * n, data_dir)
            for count, rss in ((n, rss_n), (4 * n, rss_4n)):
                print(f"peak RSS of a demo-CNN scan of {count} examples (own process): {rss['peak_kb'] / 1024:.1f} "
                      f"MiB, {(rss['peak_kb'] - rss['before_kb']) / 1024:.1f} MiB above its RSS before the scan "
                      f"({rss['before_kb'] / 1024:.1f} MiB: libraries and model)", flush=True)
            figures["scan_rss_4n_over_n"] = rss_4n["peak_kb"] / rss_n["peak_kb"]
        if run("demo"):
            model = demo_cnn(data_dir)
            cfg = ScanSection(batch_size=128)
            side_by_side("demo CNN, digit stream (information only)", model, digit_stream(4_000 if quick else 20_000),
                         cfg, 1 if quick else 7)
            test_images, test_labels = demo_models.digits_split("test")
            demo = wrap(Tensors(torch.from_numpy(test_images), torch.from_numpy(test_labels)), 10)
            side_by_side("demo CNN, the 540-example demo (information only)", model, demo, cfg, 1 if quick else 5)
    if run("cuda") and torch.cuda.is_available():
        cuda = torch.device("cuda")
        figures["scan_vs_forward_resnet50_cuda"] = side_by_side(
            "resnet50 (weights=None), 224 px synthetic, CUDA, bfloat16 autocast", resnet("resnet50"),
            synthetic(1_000 if quick else 5_000, 224), ScanSection(batch_size=128, precision="bfloat16", workers=4),
            1 if quick else 3, RESNET50_LAYERS, cuda)
    for name, value in figures.items():
        print(f"FIGURE {name} {value:.3f}")


if __name__ == "__main__":
    main()
