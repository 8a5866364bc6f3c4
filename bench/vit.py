"""ViT-B/16: scan throughput against a bare forward pass, and the input pages' attribution cost.

Measured side by side in one run (torchvision vit_b_16, weights=None, CPU unless --cuda):
1. scan vs bare forward: 500 synthetic 224-px images, batches of 50, the 12 encoder block outputs
   (12 x 768 token units: max over the 197 tokens); interleaved runs, medians, after a warm-up
   over the first batches of each. ratio = examples/s of the scan / examples/s of the bare pass;
2. attribution cost per input page: `explain.explain_inputs` on 4 inputs with integrated gradients at
   32 steps (batches of 64 rows) and gradient x input of the predicted class, plus the attention maps
   and rollout; seconds per input. Beside it, the floor: 32 forward+backward passes of one image in
   batches of 64 rows, timed the same way, and the ratio of the two (1.0 = no overhead over the
   autograd work IG has to do);
3. for information: gradient x input of the 8 units an input page lists for each of the 12 blocks
   (96 truncated forward+backward passes per input), seconds per input.

Both passes run under the allocator settings the `atlas` command gives itself (GLIBC_TUNABLES, see
atlas_builder/cli.py), as in bench/scan.py.

Run: .venv/bin/python bench/vit.py [--quick] [--cuda]   (make bench runs it)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from scan import LoadedModel, ModelSection, ScanSection, bare_pass, scan_pass, sync, synthetic  # noqa: E402

from atlas_builder import explain  # noqa: E402
from atlas_builder.cli import with_malloc_tunables  # noqa: E402
from atlas_builder.scan import INPUT_UNITS  # noqa: E402


def vit() -> LoadedModel:
    import torchvision

    torch.manual_seed(0)
    return LoadedModel(ModelSection("vit_b_16", "torchvision:vit_b_16"),
                       torchvision.models.vit_b_16(weights=None).eval(), "bench", {})


BLOCKS = [f"encoder.layers.encoder_layer_{i}" for i in range(12)]  # the default layers, less the head


def scan_ratio(n: int, repeats: int, device: torch.device) -> float:
    model, data = vit(), synthetic(n, 224)
    cfg = ScanSection(batch_size=50)
    warm = synthetic(100, 224, seed=1)
    bare_pass(model, warm, cfg, device)
    scan_pass(model, warm, cfg, BLOCKS, device)
    bare, scan = [], []
    for _ in range(repeats):
        bare.append(bare_pass(model, data, cfg, device))
        scan.append(scan_pass(model, data, cfg, BLOCKS, device))
    b, s = statistics.median(bare), statistics.median(scan)
    print(f"vit_b_16 scan: {n} examples, batch 50, 12 layers (9,216 units), {repeats} runs (median): bare forward "
          f"{b:.2f} s ({n / b:.1f} ex/s), scan {s:.2f} s ({n / s:.1f} ex/s), ratio {b / s:.3f}; all runs: bare "
          f"{', '.join(f'{t:.1f}' for t in bare)}, scan {', '.join(f'{t:.1f}' for t in scan)}", flush=True)
    return b / s


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def attribution_cost(inputs: int, device: torch.device, units: bool) -> dict[str, float]:
    net = vit().module.to(device)
    x = torch.rand(inputs, 3, 224, 224, generator=torch.Generator().manual_seed(2)).to(device)
    steps, batch = 32, 64
    explain.explain_inputs(net, x[:1], {}, "max", 2, batch, True)  # warm-up
    sync(device)
    t = timed(lambda: (explain.explain_inputs(net, x, {}, "max", steps, batch, True), sync(device)))
    per_input = t / inputs

    def floor():  # the autograd work of IG: steps forward+backward rows of each input, in batches of `batch`
        rows = x[:1].repeat(steps, 1, 1, 1)
        for i in range(inputs):
            for j in range(0, steps, batch):
                r = rows[j:j + batch].detach().requires_grad_(True)
                net(r)[:, 0].sum().backward()
        sync(device)
    f = timed(floor) / inputs
    print(f"vit_b_16 attributions: {inputs} inputs, IG {steps} steps + gradient x input + attention: "
          f"{per_input:.2f} s per input; floor ({steps} forward+backward rows): {f:.2f} s per input; "
          f"ratio {per_input / f:.3f}", flush=True)
    out = {"attribution_s_per_input": per_input, "attribution_vs_floor": per_input / f}
    if units:
        listed = {layer: np.tile(np.arange(INPUT_UNITS), (1, 1)) for layer in BLOCKS}
        u = timed(lambda: (explain.explain_inputs(net, x[:1], listed, "max", 1, batch, False), sync(device)))
        print(f"vit_b_16 unit attributions: gradient x input of {INPUT_UNITS} units x 12 blocks on 1 input "
              f"(and IG at 1 step): {u:.2f} s", flush=True)
        out["unit_attribution_s_per_input"] = u
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="100 images, 1 run, 2 inputs")
    parser.add_argument("--cuda", action="store_true")
    args = parser.parse_args()
    with_malloc_tunables([__file__, *sys.argv[1:]])  # the allocator settings `atlas` runs with (see cli.py)
    print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} (as the atlas command sets them); torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    device = torch.device("cuda" if args.cuda else "cpu")
    figures = {}
    n, repeats = (100, 1) if args.quick else (500, 3)
    figures["scan_vs_forward_vit_b_16" + ("_cuda" if args.cuda else "")] = scan_ratio(n, repeats, device)
    figures.update(attribution_cost(2 if args.quick else 4, device, units=True))
    for name, value in figures.items():
        print(f"FIGURE {name} {value:.3f}")


if __name__ == "__main__":
    main()
