"""Scan throughput against a bare forward pass, and memory against dataset size.

Measured side by side in one run, same model, same DataLoader, same batches:
- bare: `for x, _ in loader: model(x)` under torch.inference_mode();
- scan: `scan_model` (hooks on every default layer, all accumulators,
  buffering, and the final summary: histograms, selectivity, redundancy).
ratio = examples/s of the scan / examples/s of the bare pass (1.0 = free).

Cases:
The process's first scan, which loads the compiled (numba) kernels once (or
compiles them, after an install), runs on 256 examples before the timed
runs and is printed apart: it is a one-time cost, not throughput.

1. the demo CNN (trained by the build) over a stream of 20,000 8x8 digits
   (the 1,797 scikit-learn digits tiled, with seeded noise of std 0.02 so
   that every example is distinct, as in a real dataset) in batches of 128 — the throughput
   figure; the 540-example demo scan itself is printed too (there the fixed
   cost of the final summary weighs more);
2. torchvision resnet18 (weights=None) over 2,000 synthetic 128-px images,
   batches of 64, every conv/linear/ReLU module probed (3 runs);
3. peak RSS (VmHWM) of a scan of N and 4N examples, each in a fresh process,
   over a dataset that makes its examples on the fly (so only the scan can
   grow), with how far it rose above the process's RSS before the scan.

Run: .venv/bin/python bench/scan.py [--quick]   (make bench runs it)
"""

from __future__ import annotations

import argparse
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
from torch.utils.data import DataLoader, Dataset, Subset

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from atlas_builder import demo_models  # noqa: E402
from atlas_builder.config import ModelSection, ScanSection  # noqa: E402
from atlas_builder.probe import resolve_layers  # noqa: E402
from atlas_builder.scan import scan_model  # noqa: E402
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


FIRST_SCAN: float | None = None  # seconds of the process's first scan (kernel loading), printed once


def wrap(data: Dataset, n_classes: int) -> AtlasDataset:
    return AtlasDataset(data, tuple(str(i) for i in range(n_classes)), (), (), "bench", "bench")


def demo_cnn(data_dir: Path) -> LoadedModel:
    module, record = demo_models.load_builtin("digits-cnn", data_dir, seed=0)
    return LoadedModel(ModelSection("digits-cnn", "builtin:digits-cnn"), module, "bench", record)


def bare_pass(model: LoadedModel, dataset: AtlasDataset, batch: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for x, _ in DataLoader(dataset.data, batch_size=batch, shuffle=False):
            model.module(x)
    return time.perf_counter() - start


def scan_pass(model: LoadedModel, dataset: AtlasDataset, cfg: ScanSection) -> float:
    layers = resolve_layers(model.module, (), model.name)
    start = time.perf_counter()
    scan_model(model, dataset, layers, cfg, torch.device("cpu"), seed=0, progress=False)
    return time.perf_counter() - start


def side_by_side(name: str, model: LoadedModel, dataset: AtlasDataset, cfg: ScanSection, repeats: int) -> float:
    bare_pass(model, dataset, cfg.batch_size)  # warm-up (allocator, kernels)
    global FIRST_SCAN
    if FIRST_SCAN is None:  # the first scan of a process also loads (or, after an install, compiles) the numba kernels
        FIRST_SCAN = scan_pass(model, wrap(Subset(dataset.data, range(min(len(dataset), 256))), 10), cfg)
        print(f"first scan in this process (256 examples; loads the compiled kernels once): {FIRST_SCAN:.2f} s "
              "(not in the figures)", flush=True)
    bare, scan = [], []
    for _ in range(repeats):  # interleaved, so drift hits both alike
        bare.append(bare_pass(model, dataset, cfg.batch_size))
        scan.append(scan_pass(model, dataset, cfg))
    b, s = statistics.median(bare), statistics.median(scan)
    n = len(dataset)
    print(f"{name}: {n} examples, batch {cfg.batch_size}, {repeats} runs (median): bare forward {b:.3f} s "
          f"({n / b:,.0f} ex/s), scan {s:.3f} s ({n / s:,.0f} ex/s), ratio {b / s:.3f}", flush=True)
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
    before = memory_kb()["VmRSS"]  # the libraries and the model (the compiled kernels load in the scan)
    scan_pass(model, wrap(OnTheFly(n), 10), ScanSection(batch_size=128))
    print(json.dumps({"n": n, "peak_kb": memory_kb()["VmHWM"], "before_kb": before}))


def peak_rss(n: int, data_dir: Path) -> dict[str, int]:
    """Peak RSS of a fresh process scanning n examples, and its RSS just before the scan (KiB)."""
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(n), "--data-dir", str(data_dir)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller inputs, one run each")
    parser.add_argument("--rss-child", type=int)
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.data_dir)
        return
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        model = demo_cnn(data_dir)
        cfg = ScanSection(batch_size=128)
        images, labels = demo_models.digits_split("train")
        test_images, test_labels = demo_models.digits_split("test")
        all_images = torch.from_numpy(np.concatenate([images, test_images]))
        all_labels = torch.from_numpy(np.concatenate([labels, test_labels]))
        n_stream = 4_000 if args.quick else 20_000
        reps = -(-n_stream // len(all_images))
        tiled = all_images.repeat(reps, 1, 1, 1)[:n_stream]
        noise = torch.randn(tiled.shape, generator=torch.Generator().manual_seed(1)) * 0.02
        stream = wrap(Tensors((tiled + noise).clamp(0, 1), all_labels.repeat(reps)[:n_stream]), 10)
        repeats = 1 if args.quick else 11  # this machine's speed swings by 10-20 % from one run to the next
        ratio_cnn = side_by_side("demo CNN, digit stream", model, stream, cfg, repeats)
        demo = wrap(Tensors(torch.from_numpy(test_images), torch.from_numpy(test_labels)), 10)
        side_by_side("demo CNN, the 540-example demo (fixed costs included)", model, demo, cfg, 5)

        import torchvision

        resnet = LoadedModel(ModelSection("resnet18", "torchvision:resnet18"),
                             torchvision.models.resnet18(weights=None).eval(), "bench", {})
        n_img = 256 if args.quick else 2_000
        g = torch.Generator().manual_seed(0)
        imgs = torch.rand(n_img, 3, 128, 128, generator=g)
        synthetic = wrap(Tensors(imgs, torch.arange(n_img) % 1000), 1000)
        ratio_resnet = side_by_side("resnet18 (weights=None), 128 px synthetic", resnet, synthetic,
                                    ScanSection(batch_size=64), 1 if args.quick else 3)

        n = 5_000 if args.quick else 20_000
        rss_n, rss_4n = peak_rss(n, data_dir), peak_rss(4 * n, data_dir)
        for count, rss in ((n, rss_n), (4 * n, rss_4n)):
            print(f"peak RSS of a demo-CNN scan of {count} examples (own process): {rss['peak_kb'] / 1024:.1f} MiB, "
                  f"{(rss['peak_kb'] - rss['before_kb']) / 1024:.1f} MiB above its RSS before the scan "
                  f"({rss['before_kb'] / 1024:.1f} MiB: libraries and model; the compiled kernels load in the scan)")
    print(f"FIGURE scan_vs_forward {ratio_cnn:.3f}")
    print(f"FIGURE scan_vs_forward_resnet18 {ratio_resnet:.3f}")
    print(f"FIGURE scan_rss_4n_over_n {rss_4n['peak_kb'] / rss_n['peak_kb']:.3f}")


if __name__ == "__main__":
    main()
