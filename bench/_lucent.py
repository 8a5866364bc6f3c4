"""Baseline: feature visualization timed with torch-lucent, for comparison.

Another bench script imports this module to time lucent's `render_vis` on the
same model, layer and units as our own feature visualization, and to score
both sets of final images with the same measure (`activation_of`).

- `lucent_per_unit`: one `render_vis` call per unit, the way lucent is used
  (objective "layer:unit", a 1-image FFT parameterization, lucent's standard
  transforms, Adam lr 5e-2), torch and numpy seeded before each unit;
- `lucent_batched`: one `render_vis` call over a batch of len(units) images,
  image i optimizing `objectives.channel(layer, units[i], batch=i)`;
- `activation_of`: the mean over spatial positions of channel units[i] of the
  layer's output for image i (no transforms, eval mode, no grad).

torch-lucent is a bench-only extra. Its 0.1.8 metadata pins kornia<=0.4.1 and
test tools (pytest-mock, coverage, coveralls...), which pip would try to
resolve (and fail or downgrade), so it is installed without its
dependencies, followed by the few it needs at import and run time:

    .venv/bin/pip install --no-deps torch-lucent==0.1.8
    .venv/bin/pip install kornia==0.9.0 decorator ipython

(neither changes torch 2.14.1 / torchvision 0.29.1). `ipython` is needed only
because lucent/misc/io/showing.py imports IPython.display at import time.

Shim: lucent's `transform.random_rotate` (one of its standard transforms)
calls `kornia.get_rotation_matrix2d` and `kornia.warp_affine`, top-level
aliases that kornia dropped after 0.5; they still live in
`kornia.geometry.transform`, so they are put back on the `kornia` module at
import time here (when missing). Nothing of lucent is patched on disk.

Layer names: lucent names a module by joining its `named_modules()` path
with "_" instead of "." (lucent.modelzoo.util.get_model_layers and
render.hook_model), e.g. "layer2.1.conv2" -> "layer2_1_conv2".

Parameterization: lucent's `param.image` ignores `decorrelate` whenever
`channels` is given (it then never decorrelates), so for 3-channel images
`channels` is left out (lucent's default: 3 channels, FFT, decorrelated
color), and for other counts it is passed (FFT, no decorrelation).

Run: .venv/bin/python bench/_lucent.py   (smoke run: demo CNN,
conv2, 4 units, 64 steps, both modes)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import kornia
import kornia.geometry.transform as _kgt

for _name in ("get_rotation_matrix2d", "warp_affine"):
    if not hasattr(kornia, _name):
        setattr(kornia, _name, getattr(_kgt, _name))

from lucent.optvis import objectives, param, render, transform  # noqa: E402

LUCENT_DEVICE = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")  # as lucent picks it


def lucent_layer_name(layer: str) -> str:
    """Our dotted `named_modules()` path as lucent names it ("a.0.b" -> "a_0_b")."""
    return layer.replace(".", "_")


def _param_f(size: int, channels: int, batch: int | None = None):
    if channels == 3:
        return lambda: param.image(size, batch=batch, fft=True, decorrelate=True)
    return lambda: param.image(size, batch=batch, channels=channels, fft=True, decorrelate=False)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)  # lucent's transforms draw with np.random


def _sync() -> None:
    if LUCENT_DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _prepare(model: nn.Module, layer: str) -> tuple[str, list]:
    modules = dict(model.named_modules())
    if layer not in modules:
        raise KeyError(f"no module {layer!r} in the model")
    model.to(LUCENT_DEVICE).eval()
    # lucent backpropagates into the weights too (users do not freeze them); keep
    # that cost, but leave the grads as they were afterwards
    had_grad = [p for p in model.parameters() if p.grad is not None]
    return lucent_layer_name(layer), had_grad


def _restore(model: nn.Module, had_grad: list) -> None:
    keep = {id(p) for p in had_grad}
    for p in model.parameters():
        if id(p) not in keep:
            p.grad = None


def _render(model, objective, param_f, steps: int, size: int) -> torch.Tensor:
    images = render.render_vis(
        model,
        objective,
        param_f,
        optimizer=None,
        transforms=transform.standard_transforms,
        thresholds=(steps,),
        preprocess=False,
        progress=False,
        show_image=False,
        fixed_image_size=size,
    )
    # a list with one NHWC float array (in [0, 1], from a sigmoid) per threshold
    return torch.from_numpy(np.ascontiguousarray(images[-1])).permute(0, 3, 1, 2).contiguous()


def lucent_per_unit(model: nn.Module, layer: str, units: list[int], steps: int, size: int,
                    channels: int, seed: int = 0) -> dict:
    """One lucent render_vis per unit; total wall time and the final images [n, C, size, size]."""
    name, had_grad = _prepare(model, layer)
    out = []
    try:
        _sync()
        start = time.perf_counter()
        for unit in units:
            _seed(seed)
            out.append(_render(model, f"{name}:{int(unit)}", _param_f(size, channels), steps, size))
        _sync()
        seconds = time.perf_counter() - start
    finally:
        _restore(model, had_grad)
    images = torch.cat(out)
    return {"seconds": seconds, "units_per_s": len(units) / seconds, "images": images}


def lucent_batched(model: nn.Module, layer: str, units: list[int], steps: int, size: int,
                   channels: int, seed: int = 0) -> dict:
    """One lucent render_vis over a batch of len(units) images, image i for units[i]."""
    name, had_grad = _prepare(model, layer)
    objective = objectives.Objective.sum(
        [objectives.channel(name, int(u), batch=i) for i, u in enumerate(units)])
    try:
        _sync()
        start = time.perf_counter()
        _seed(seed)
        images = _render(model, objective, _param_f(size, channels, batch=len(units)), steps, size)
        _sync()
        seconds = time.perf_counter() - start
    finally:
        _restore(model, had_grad)
    return {"seconds": seconds, "units_per_s": len(units) / seconds, "images": images}


def activation_of(model: nn.Module, layer: str, units: list[int], images: torch.Tensor) -> torch.Tensor:
    """Activation of channel units[i] of `layer` on images[i], averaged over space (no transforms)."""
    if len(units) != len(images):
        raise ValueError(f"{len(units)} units for {len(images)} images")
    module = dict(model.named_modules())[layer]
    captured = {}

    def hook(_module, _inputs, output):
        captured["out"] = output

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(images.to(device=device, dtype=torch.float32))
    finally:
        handle.remove()
        model.train(was_training)
    out = captured["out"].detach().float()
    idx = torch.arange(len(units), device=out.device)
    picked = out[idx, torch.as_tensor(units, device=out.device)]  # [n, *spatial]
    return picked.reshape(len(units), -1).mean(dim=1).cpu()


def _smoke() -> None:
    repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(repo))
    import tempfile

    from atlas_builder.demo_models import load_builtin

    with tempfile.TemporaryDirectory() as tmp:
        model, _ = load_builtin("digits-cnn", Path(tmp), 0)
    layer, units, steps, size, channels = "conv2", [0, 1, 2, 3], 64, 8, 1
    print(f"lucent {getattr(__import__('lucent'), '__version__', '0.1.8')} / kornia {kornia.__version__} "
          f"on {LUCENT_DEVICE}: demo CNN {layer}, units {units}, {steps} steps, {size}px, {channels} ch")
    rand = torch.rand(len(units), channels, size, size, generator=torch.Generator().manual_seed(0))
    base = activation_of(model, layer, units, rand)
    for label, fn in (("per-unit", lucent_per_unit), ("batched", lucent_batched)):
        res = fn(model, layer, units, steps, size, channels)
        act = activation_of(model, layer, units, res["images"])
        print(f"  {label:8s} {res['seconds']:.3f} s  {res['units_per_s']:.2f} units/s  "
              f"images {tuple(res['images'].shape)} in [{res['images'].min():.3f}, {res['images'].max():.3f}]  "
              f"activation {[round(float(a), 3) for a in act]} (random images: {[round(float(a), 3) for a in base]})")


if __name__ == "__main__":
    _smoke()
