"""Feature visualization speed and quality against torch-lucent and against the gradient floor.

Measured side by side in one run, same model, layer, units, steps and image size:
- ours: ONE batched `featurevis.render` call over all the units (image i for
  unit i, `channel` objective, `standard_transforms`, Adam lr 0.05, the
  forward cut at the layer, gradients to the image only);
- lucent per unit: `render_vis` once per unit (bench/_lucent.lucent_per_unit:
  the way lucent is used; whole model forward, lucent's default transforms,
  gradients into the weights too, as lucent users do not freeze them);
- lucent batched: one `render_vis` over the same batch of units
  (bench/_lucent.lucent_batched);
- floor: steps x (forward of the model truncated at the layer + backward to
  the input only, params frozen) on a random image batch of our batch's shape:
  `x.grad = None; truncated(x).mean().backward()`, the least any
  gradient-ascent visualizer at that batch size must spend.
Each of ours / floor / lucent per-unit / lucent batched gets one warm-up call
first (2 steps) so first-call costs (allocator, kernels, lazy imports) do not
count. Ours and the floor are cheap, so they run 3 times interleaved and the
medians are reported (1 with --quick); lucent runs once (its per-unit run is
already many calls long). The load average is printed at the start and the
end: the figures assume nothing else is using the cores.

Figures: units/s = units rendered / wall seconds; speedup = ours units/s /
lucent per-unit units/s; over floor = ours seconds / floor seconds; activation
= mean over units of the channel objective (mean over positions of the unit's
channel) on the final images WITHOUT transforms, scored for every method by
the same function (bench/_lucent.activation_of; ours is cross-checked against
RenderResult.activation). Lucent optimizes through its own default
transforms, ours through `standard_transforms`; both are scored untransformed.
Lucent's transforms are sized for 224 px (pad 12, jitter 8), so on 8x8 images
they dwarf the image; with no transforms at all both reach about the same
activation on the demo CNN (2.06 each, measured outside this script), so
case A's activation ratio measures our size-scaled transforms against
lucent's defaults, not the optimizer.

Cases:
A. the demo CNN (trained into a temp dir), layer conv2: 32 units, 1-channel
   8x8 images, 256 steps (the model normalizes its input itself). Lucent per
   unit is timed unit by unit; if that passes ~60 s it stops (after at least
   8 units) and units/s is extrapolated from the units done, and the
   activation ratio is taken over those units (both said in the output). The
   FIGURE lines are this case, on CPU.
B. torchvision resnet18 (weights=None), layer layer2.1.conv2 (128 channels),
   3-channel 128-px images, 16 units, 32 steps for all methods (lucent per
   unit on 4 units, extrapolated), normalize=None for both, weights drawn
after torch.manual_seed(0). Info lines only.

C. quality, in the pages' measure (a unit's max over positions, as its dataset
   examples are scored; the optimizer still maximizes the channel mean):
   - FIGURE featurevis_vs_dataset_top_demo: median over the demo CNN's relu1
     and relu2 (16 units each, 256 steps) of feature-vis activation / the
     unit's best activation over the 540 demo digits (the median of the two
     layers' medians); lucent's render_vis on 4 units of each, side by side;
   - FIGURE featurevis_vs_dataset_top_resnet18: the same on resnet18
     (weights=None) layer4.1, 16 units, 256 steps (the build's default:
     the figure is what the pages show; at 32 steps it was 0.79), 128 px, against 256
     synthetic random images; lucent on 2 units;
   - info: on the demo's relu1 the exact most any image in the [0, 1] box can
     reach, over the top dataset example (digits already sit near the box's
     corners, so this bounds what the first figure can be there);
   - FIGURE featurevis_diversity: 4 images per unit of the demo's relu1 (16
     units) optimized with the diversity term as the build does it
     (visualize.diversity_objective), mean pairwise 1 - cosine of their Gram
     matrices at the layer (the same seeds without the term printed beside);
     FIGURE featurevis_diversity_activation: their mean activation / that of
     a single image per unit.

If CUDA is available, the CPU run (all cases) goes first in a child process with
CUDA_VISIBLE_DEVICES="" (lucent picks its device at import time), then both
cases run again on cuda (info lines); the FIGURE lines are always CPU.

Run: .venv/bin/python bench/featurevis.py [--quick]   (make bench runs it)
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

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from atlas_builder import featurevis as fv  # noqa: E402
from atlas_builder.demo_models import load_builtin  # noqa: E402
from atlas_builder.hooks import Capture  # noqa: E402

try:
    import _lucent  # noqa: E402
except ImportError as exc:  # lucent (or kornia / decorator / IPython) missing
    print(f"torch-lucent is not importable ({exc}). It is a bench-only extra; install it with the two "
          "commands in bench/_lucent.py's docstring:\n"
          "    .venv/bin/pip install --no-deps torch-lucent==0.1.8\n"
          "    .venv/bin/pip install kornia==0.9.0 decorator ipython", file=sys.stderr)
    sys.exit(1)

WARMUP_STEPS = 2
PER_UNIT_BUDGET_S = 60.0  # lucent per-unit in case A: stop after this (and >= MIN_PER_UNIT units)
MIN_PER_UNIT = 8


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ours(model, layer, units, steps, size, channels, device) -> dict:
    """One batched render over all the units, wall time around the call."""
    sync(device)
    start = time.perf_counter()
    param = fv.FourierImage(len(units), channels, size, size, list(units)).to(device)
    res = fv.render(model, layer, fv.channel(units), param, steps=steps,
                    transforms=fv.standard_transforms(size, size), normalize=None, seed=0)
    sync(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "units_per_s": len(units) / seconds, "images": res.images,
            "activation_own": res.activation}


def time_floor(model, layer, batch, steps, size, channels, device, warmup: bool = False) -> float:
    """steps x (truncated forward + backward to the input only), params frozen, on a random batch."""
    x = torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    x.requires_grad_(True)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    model.eval()
    try:
        with Capture(model, [layer], stop=True, grad=True) as truncated:
            def loop(n):
                sync(device)
                start = time.perf_counter()
                for _ in range(n):
                    x.grad = None
                    truncated(x)
                    truncated.outputs[layer].mean().backward()
                sync(device)
                return time.perf_counter() - start

            if warmup:
                loop(WARMUP_STEPS)
            return loop(steps)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def lucent_per_unit_budgeted(model, layer, units, steps, size, channels, budget_s: float | None,
                             min_units: int) -> dict:
    """lucent_per_unit unit by unit (timed the same: each unit's render_vis), stopping once the
    summed time passes budget_s with at least min_units done."""
    seconds, images, done = 0.0, [], []
    for unit in units:
        res = _lucent.lucent_per_unit(model, layer, [unit], steps, size, channels)
        seconds += res["seconds"]
        images.append(res["images"])
        done.append(unit)
        if budget_s is not None and seconds > budget_s and len(done) >= min_units and len(done) < len(units):
            break
    return {"seconds": seconds, "units_per_s": len(done) / seconds, "images": torch.cat(images), "units": done}


def row(label: str, seconds: float, units_per_s: float, rest: str) -> None:
    print(f"  {label:36s} {seconds:8.3f} s {units_per_s:9.2f} units/s  {rest}", flush=True)


def run_case(label, model, layer, units, steps, size, channels, device, per_unit_units, budget_s,
             repeats: int) -> dict:
    """One case side by side; prints its lines and returns its figures."""
    model = model.to(device).eval()
    n = len(units)
    print(f"{label} on {device}: layer {layer}, {n} units, {steps} steps, {size}x{size}, {channels} ch", flush=True)

    # ours and the floor: warm-up, then `repeats` interleaved runs (drift hits both alike), medians
    time_ours(model, layer, units, WARMUP_STEPS, size, channels, device)
    time_floor(model, layer, n, WARMUP_STEPS, size, channels, device, warmup=True)
    runs, floors = [], []
    for _ in range(repeats):
        runs.append(time_ours(model, layer, units, steps, size, channels, device))
        floors.append(time_floor(model, layer, n, steps, size, channels, device))
    ours = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    floor = statistics.median(floors)
    act_ours = _lucent.activation_of(model, layer, units, ours["images"])
    spread = (f", median of {repeats} interleaved runs: ours {min(r['seconds'] for r in runs):.3f}-"
              f"{max(r['seconds'] for r in runs):.3f} s, floor {min(floors):.3f}-{max(floors):.3f} s"
              if repeats > 1 else "")
    row(f"ours (1 batched render of {n})", ours["seconds"], ours["units_per_s"],
        f"activation {act_ours.mean():.4f} (RenderResult.activation {ours['activation_own'].mean():.4f})")
    print(f"  floor ({steps} x truncated fwd+bwd to input, batch {n}): {floor:.3f} s;  ours / floor "
          f"{ours['seconds'] / floor:.3f}{spread}", flush=True)

    # lucent: warm-up (1 unit, 2 steps, both modes), then the timed runs
    _lucent.lucent_per_unit(model, layer, units[:1], WARMUP_STEPS, size, channels)
    _lucent.lucent_batched(model, layer, units, WARMUP_STEPS, size, channels)
    per = lucent_per_unit_budgeted(model, layer, per_unit_units, steps, size, channels, budget_s, MIN_PER_UNIT)
    done = per["units"]
    act_per = _lucent.activation_of(model, layer, done, per["images"])
    partial = len(done) < n
    note = f" (timed {len(done)} of {n} units, units/s extrapolated)" if partial else ""
    row(f"lucent per unit ({len(done)} render_vis)", per["seconds"], per["units_per_s"],
        f"activation {act_per.mean():.4f}{note}")
    bat = _lucent.lucent_batched(model, layer, units, steps, size, channels)
    act_bat = _lucent.activation_of(model, layer, units, bat["images"])
    row(f"lucent batched (1 render_vis of {n})", bat["seconds"], bat["units_per_s"],
        f"activation {act_bat.mean():.4f}")

    # the activation ratio is over the units lucent per-unit rendered
    ours_on_done = act_ours[[units.index(u) for u in done]].mean()
    speedup = ours["units_per_s"] / per["units_per_s"]
    act_ratio = float(ours_on_done / act_per.mean()) if act_per.mean() > 0 else float("nan")
    print(f"  speedup vs lucent per unit {speedup:.2f}x, vs lucent batched "
          f"{ours['units_per_s'] / bat['units_per_s']:.2f}x; ours / floor {ours['seconds'] / floor:.3f}; "
          "activation ours / lucent per unit " + (f"{act_ratio:.3f}" if act_per.mean() > 0
                                                   else "n/a (lucent per-unit mean <= 0)")
          + (f" (over the {len(done)} units lucent per unit rendered: ours {ours_on_done:.4f})" if partial else "")
          + ", ours / lucent batched " + (f"{float(act_ours.mean() / act_bat.mean()):.3f}" if act_bat.mean() > 0
                                           else "n/a (lucent batched mean <= 0)"), flush=True)
    return {"speedup": speedup, "over_floor": ours["seconds"] / floor, "activation": act_ratio}


def top_of_dataset(model, layer: str, data: torch.Tensor, units: list[int], device) -> torch.Tensor:
    """Each unit's best dataset activation in the pages' measure (its max over positions), batch by batch."""
    from atlas_builder.accumulators import unit_values

    best = None
    with torch.no_grad(), Capture(model, [layer], stop=True) as capture:
        for chunk in data.split(128):
            capture(chunk.to(device))
            v = unit_values(capture.outputs[layer], "max")[:, units].amax(0).cpu()
            best = v if best is None else torch.maximum(best, v)
    return best


def measured_of(model, layer: str, units: list[int], images: torch.Tensor, device) -> torch.Tensor:
    """The pages' measure of unit units[i] on images[i]: its max over positions (no transforms)."""
    with torch.no_grad(), Capture(model, [layer], stop=True) as capture:
        capture(images.to(device))
    return fv.measured(units)(capture.outputs[layer]).cpu()


def gram_apart(model, layer: str, images: torch.Tensor, n: int, device) -> float:
    """Mean pairwise 1 - cosine of the images' Gram matrices at the layer, within each unit's n images."""
    import torch.nn.functional as F

    with torch.no_grad(), Capture(model, [layer], stop=True) as capture:
        capture(images.to(device))
    flat = capture.outputs[layer].float().flatten(2)
    gram = F.normalize(torch.einsum("bcm,bdm->bcd", flat, flat).flatten(1), dim=1)
    off = ~torch.eye(n, dtype=torch.bool, device=gram.device)
    return float(torch.stack([(1 - g @ g.T)[off].mean() for g in gram.split(n)]).mean())


def quality(label, model, layer, units, data, steps, size, channels, device, lucent_units) -> float:
    """Median over units of (feature-vis activation / top-1 dataset activation), the pages' measure, for
    ours and for lucent's render_vis once per unit (on `lucent_units`), side by side."""
    best = top_of_dataset(model, layer, data, units, device)
    ours = fv.render(model, layer, fv.channel(units), fv.FourierImage(len(units), channels, size, size,
                                                                        list(units)).to(device),
                     steps=steps, n_frames=1, measure=fv.measured(units))
    ratio = (ours.measured / best.clamp(min=1e-9))[best > 0]
    lucent = _lucent.lucent_per_unit(model, layer, lucent_units, steps, size, channels)["images"]
    pick = [units.index(u) for u in lucent_units]
    theirs = measured_of(model, layer, lucent_units, lucent, device) / best[pick].clamp(min=1e-9)
    print(f"{label}, {layer}, {steps} steps: feature vis / top dataset example (max over positions), median over "
          f"{len(ratio)} units: ours {float(ratio.median()):.3f}; on {len(lucent_units)} units ours "
          f"{float(ratio[pick].median()):.3f}, lucent render_vis {float(theirs.median()):.3f}", flush=True)
    return float(ratio.median())


def run_quality(device: torch.device, quick: bool) -> dict:
    """The quality figures: act-max against the best dataset example (demo CNN, resnet18) and diversity."""
    from atlas_builder import visualize
    from atlas_builder.demo_models import digits_split

    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        cnn, _ = load_builtin("digits-cnn", Path(tmp), seed=0)
    cnn = cnn.eval().to(device)
    x, _ = digits_split("test")
    digits = torch.as_tensor(x, dtype=torch.float32).view(-1, 1, 8, 8)
    steps = 32 if quick else 256
    ratios = [quality("demo CNN", cnn, layer, list(range(16)), digits, steps, 8, 1, device, [0, 1, 2, 3])
              for layer in ("relu1", "relu2")]
    figures["vs_top_demo"] = statistics.median(ratios)
    # the most any image can reach on relu1: conv1 is 3x3 on one channel behind a positive-scale
    # Normalize, so its max over the [0, 1] box is the vertex image holding (weight > 0) in a 3x3 patch
    units = list(range(16))
    vertex = torch.zeros(16, 1, 8, 8)
    vertex[:, 0, 3:6, 3:6] = (cnn.conv1.weight.detach()[units, 0] > 0).float().cpu()
    bound = measured_of(cnn, "relu1", units, vertex, device) / top_of_dataset(cnn, "relu1", digits, units, device)
    print(f"demo CNN, relu1: the most any image can reach / top dataset example (exact, the vertex image), median "
          f"over 16 units {float(bound.median()):.3f}, max {float(bound.max()):.3f}", flush=True)

    import torchvision

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None).eval().to(device)
    synthetic = torch.rand(64 if quick else 256, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    figures["vs_top_resnet18"] = quality("resnet18 (weights=None)", resnet, "layer4.1",
                                         list(range(8 if quick else 16)), synthetic, 8 if quick else 256, 128, 3,
                                         device, [0, 1])

    n, units, layer = 4, list(range(16)), "relu1"  # diversity: the demo CNN, 4 images per unit
    best = top_of_dataset(cnn, layer, digits, units, device)
    single = fv.render(cnn, layer, fv.channel(units), fv.FourierImage(16, 1, 8, 8, units).to(device),
                       steps=steps, n_frames=1, measure=fv.measured(units))
    rep = torch.tensor(units).repeat_interleave(n)
    diverse = fv.render(cnn, layer, visualize.diversity_objective(units, n, best.tolist(), device),
                        fv.FourierImage(16 * n, 1, 8, 8, list(range(100, 100 + 16 * n))).to(device),
                        steps=steps, n_frames=1, measure=fv.measured(rep))
    plain = fv.render(cnn, layer, fv.channel(rep),
                      fv.FourierImage(16 * n, 1, 8, 8, list(range(100, 100 + 16 * n))).to(device),
                      steps=steps, n_frames=1)  # the same seeds without the term
    figures["diversity"] = gram_apart(cnn, layer, diverse.images, n, device)
    figures["diversity_activation"] = float(diverse.measured.view(16, n).mean(1).mean() / single.measured.mean())
    print(f"diversity, demo CNN {layer}, {n} images a unit, {steps} steps: 1 - cosine of their Gram matrices "
          f"{figures['diversity']:.3f} (the same seeds without the term: "
          f"{gram_apart(cnn, layer, plain.images, n, device):.3f}); their activation / a single image's "
          f"{figures['diversity_activation']:.3f}", flush=True)
    return figures


def run_all(device: torch.device, quick: bool) -> dict:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cnn, _ = load_builtin("digits-cnn", Path(tmp), seed=0)
    units_a = list(range(8 if quick else 32))
    steps_a = 32 if quick else 256
    figures = run_case("A. demo CNN", cnn, "conv2", units_a, steps_a, 8, 1, device,
                       units_a, None if quick else PER_UNIT_BUDGET_S, 1 if quick else 3)

    import torchvision

    torch.manual_seed(0)  # random weights, the same whatever ran before (lucent reseeds the global RNG)
    resnet = torchvision.models.resnet18(weights=None).eval()
    units_b = list(range(4 if quick else 16))
    steps_b = 8 if quick else 32
    run_case("B. resnet18 (weights=None)", resnet, "layer2.1.conv2", units_b, steps_b, 128, 3, device,
             units_b[:2 if quick else 4], None, 1 if quick else 3)
    figures.update(run_quality(device, quick))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer units and steps (smoke run)")
    parser.add_argument("--cpu-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import kornia

    if args.cpu_child or not torch.cuda.is_available():
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, lucent 0.1.8 / kornia "
              f"{kornia.__version__}, device cpu" + (" (quick)" if args.quick else "")
              + f", load average {os.getloadavg()[0]:.2f}", flush=True)
        start = time.perf_counter()
        figures = run_all(torch.device("cpu"), args.quick)
        print(f"cpu run: {time.perf_counter() - start:.1f} s, load average {os.getloadavg()[0]:.2f}", flush=True)
        if args.cpu_child:
            print("FIGURES-JSON " + json.dumps(figures), flush=True)
            return
    else:
        # lucent picks cuda at import time whenever it is visible: run the CPU case in a child
        # process that cannot see the GPU, holding its figures back for the end
        cmd = [sys.executable, __file__, "--cpu-child"] + (["--quick"] if args.quick else [])
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
        figures = None
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) as child:
            for line in child.stdout:
                if line.startswith("FIGURES-JSON "):
                    figures = json.loads(line.split(" ", 1)[1])
                else:
                    print(line, end="", flush=True)
        if child.returncode != 0 or figures is None:
            sys.exit(child.returncode or 1)
        print(f"torch {torch.__version__}, device cuda ({torch.cuda.get_device_name()}), info only", flush=True)
        run_all(torch.device("cuda"), args.quick)
    print(f"FIGURE featurevis_speedup_vs_lucent {figures['speedup']:.3f}")
    print(f"FIGURE featurevis_over_floor {figures['over_floor']:.3f}")
    print(f"FIGURE featurevis_activation_vs_lucent {figures['activation']:.3f}")
    print(f"FIGURE featurevis_vs_dataset_top_demo {figures['vs_top_demo']:.3f}")
    print(f"FIGURE featurevis_vs_dataset_top_resnet18 {figures['vs_top_resnet18']:.3f}")
    print(f"FIGURE featurevis_diversity {figures['diversity']:.3f}")
    print(f"FIGURE featurevis_diversity_activation {figures['diversity_activation']:.3f}")


if __name__ == "__main__":
    main()
