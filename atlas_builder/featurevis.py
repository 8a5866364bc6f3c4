"""Feature visualization: batched activation maximization from small callables.

In the spirit of lucid/lucent's `optvis`, built from three kinds of pieces
and one optimizer loop:

- parametrization: an `nn.Module` whose forward returns a batch of images
  [B, C, H, W] in [0, 1] and whose parameters are optimized; `FourierImage`
  holds them as Fourier coefficients scaled by 1/f (so low frequencies
  dominate), with decorrelated colour for 3-channel images, squashed to
  [0, 1] by a sigmoid;
- transforms: random each step (`pad`, `jitter`, `random_scale`,
  `random_rotate`, composed by `compose`); `standard_transforms(h, w)` is the
  lucid recipe scaled to the image size, fused into one random warp
  (`random_affine`). Pipelines return images of the parametrized size, so
  models with a fixed input size (MLPs, linear heads) work;
- objectives: `channel` (mean over positions), `neuron` (the centre
  position), `diversity`; they compose with +, -, * and unary minus
  (negative images are `-channel(...)`).

`render` takes a parametrization and an objective, as lucent's `render_vis`
does, optimizes the whole batch at once (image i for unit units[i], so a
64-channel layer costs about one run) with the public `torch.optim.Adam`
(fused on CPU and CUDA), and stops the forward at the target layer through
`hooks.Capture`, so early layers cost a fraction of the network. Gradients
flow to the image only (the model's parameters are frozen during the run).
Seeds are explicit: the same call gives the same images. No file I/O here:
the feature-vis stage (visualize.py) encodes and stores what this returns.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import AtlasError
from .accumulators import reduce_positions
from .hooks import Capture, token_grid

# lucid's colour decorrelation: square root of the ImageNet colour covariance's SVD
COLOR_CORRELATION_SVD_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])


# --- parametrization -------------------------------------------------------------

class FourierImage(nn.Module):
    """A batch of images [B, C, H, W] in [0, 1], parametrized by a 1/f-scaled spectrum."""

    def __init__(self, batch: int, channels: int, height: int, width: int, seeds: Sequence[int],
                 decay_power: float = 1.0, sd: float = 0.01):
        """seeds: one per image, so an image starts the same whatever batch it is optimized in."""
        super().__init__()
        self.shape = (batch, channels, height, width)
        fy = torch.fft.fftfreq(height).view(-1, 1)
        fx = torch.fft.rfftfreq(width).view(1, -1)
        freqs = torch.sqrt(fx * fx + fy * fy)
        scale = 1.0 / torch.clamp(freqs, min=1.0 / max(height, width)) ** decay_power
        # with norm="ortho" no sqrt(h*w) as in lucid's TF; lucid's "magic" 1/4 folded in
        self.register_buffer("scale", scale.unsqueeze(-1) / 4.0)
        spectrum = torch.stack([torch.randn(channels, height, width // 2 + 1, 2,
                                            generator=torch.Generator().manual_seed(int(s))) for s in seeds]) * sd
        self.spectrum = nn.Parameter(spectrum)

    def forward(self) -> torch.Tensor:
        b, c, h, w = self.shape
        image = torch.fft.irfft2(torch.view_as_complex((self.spectrum * self.scale).contiguous()), s=(h, w),
                                 norm="ortho")
        if c == 3:
            matrix = COLOR_CORRELATION_SVD_SQRT.to(image.device)
            image = torch.einsum("bchw,dc->bdhw", image, matrix / matrix.norm(dim=0).max())
        return torch.sigmoid(image)


# --- transforms (image batch, generator) -> image batch -----------------------------

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _randint(low: int, high: int, gen: torch.Generator) -> int:
    return int(torch.randint(low, high + 1, (1,), generator=gen))


def _choice(options: Sequence[float], gen: torch.Generator) -> float:
    return float(options[int(torch.randint(len(options), (1,), generator=gen))])


def pad(width: int, value: float = 0.5) -> Transform:
    def t(x, gen):
        return F.pad(x, (width,) * 4, mode="constant", value=value) if width else x
    return t


def jitter(d: int) -> Transform:
    """Crop a random window d pixels smaller (a random shift)."""
    def t(x, gen):
        if d <= 0:
            return x
        h, w = x.shape[2] - d, x.shape[3] - d
        oy, ox = _randint(0, d, gen), _randint(0, d, gen)
        return x[:, :, oy:oy + h, ox:ox + w]
    return t


def random_scale(scales: Sequence[float]) -> Transform:
    def t(x, gen):
        s = _choice(scales, gen)
        if s == 1.0:
            return x
        size = (max(1, round(x.shape[2] * s)), max(1, round(x.shape[3] * s)))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return t


def random_rotate(degrees: Sequence[float]) -> Transform:
    def t(x, gen):
        angle = math.radians(_choice(degrees, gen))
        if angle == 0:
            return x
        cos, sin = math.cos(angle), math.sin(angle)
        theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype, device=x.device)
        grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return t


def resize_to(height: int, width: int) -> Transform:
    def t(x, gen):
        if x.shape[2:] == (height, width):
            return x
        return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    return t


def compose(transforms: Sequence[Transform]) -> Transform:
    def t(x, gen):
        for step in transforms:
            x = step(x, gen)
        return x
    return t


def random_affine(pad_px: int, jitter_px: int, scales: Sequence[float], degrees: Sequence[float],
                  value: float = 0.5) -> Transform:
    """pad, jitter, scale and rotate fused into one random warp (one grid_sample), output at the input size.

    The same as `compose([pad, jitter, random_scale, random_rotate, resize_to])` up to interpolation,
    in one resampling instead of four (each of which would blur the image again).
    """
    def t(x, gen):
        b, _, h, w = x.shape
        draw = torch.randint(0, 2**31 - 1, (4,), generator=gen).tolist()
        s = scales[draw[0] % len(scales)]
        angle = math.radians(degrees[draw[1] % len(degrees)])
        # output pixel -> input pixel in normalized coordinates: of the padded canvas, then of the image
        grow_x, grow_y = (w + 2 * pad_px) / w, (h + 2 * pad_px) / h
        dx = 2 * (draw[2] % (jitter_px + 1) - jitter_px / 2) / w
        dy = 2 * (draw[3] % (jitter_px + 1) - jitter_px / 2) / h
        cos, sin = math.cos(angle) / s, math.sin(angle) / s
        theta = torch.tensor([[cos * grow_x, -sin * grow_x, dx], [sin * grow_y, cos * grow_y, dy]], dtype=x.dtype,
                             device=x.device)
        grid = F.affine_grid(theta.expand(b, 2, 3), [b, 1, h, w], align_corners=False)
        return F.grid_sample(x - value, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + value
    return t


def standard_transforms(height: int, width: int) -> Transform:
    """lucid's standard transforms (pad 12, jitter 8, scale ±5 %, rotate ±10°, jitter 4 at 224 px),
    scaled to the image size, as one random warp at the image size."""
    size = min(height, width)
    unit = max(1, round(size / 28))
    return random_affine(max(1, round(size * 12 / 224)), (unit * 2 if size >= 56 else unit) + max(1, unit // 2),
                         [1 + (i - 5) / 50 for i in range(11)], list(range(-10, 11)) + 5 * [0])


def no_transforms(height: int, width: int) -> Transform:
    return resize_to(height, width)


# --- objectives: activations of the target layer -> score per image [B] ---------------

class Objective:
    """A score per image to maximize; composes with +, -, * (by a number) and unary minus."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str):
        self.fn, self.name = fn, name

    def __call__(self, acts: torch.Tensor) -> torch.Tensor:
        return self.fn(acts)

    def __add__(self, other: "Objective") -> "Objective":
        return Objective(lambda a: self(a) + other(a), f"{self.name} + {other.name}")

    def __sub__(self, other: "Objective") -> "Objective":
        return Objective(lambda a: self(a) - other(a), f"{self.name} - {other.name}")

    def __mul__(self, k: float) -> "Objective":
        return Objective(lambda a: self(a) * k, f"{k} * {self.name}")

    __rmul__ = __mul__

    def __neg__(self) -> "Objective":
        return Objective(lambda a: -self(a), f"-{self.name}")


def _unit_values(acts: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """[B, M] values of unit units[b] of image b over its M positions (M = 1 for flat outputs)."""
    rows = torch.arange(acts.shape[0], device=acts.device)
    if acts.dim() == 4:
        return acts[rows, units].flatten(1)
    if acts.dim() == 3:
        return acts[rows, :, units]
    if acts.dim() == 2:
        return acts[rows, units].unsqueeze(1)
    raise AtlasError(f"cannot visualize a layer output of shape {tuple(acts.shape)}")


def channel(units: Sequence[int] | torch.Tensor) -> Objective:
    """Mean activation of unit units[b] over all positions, for image b; of a token output ([B, T, D]), over
    its patch tokens (a ViT's class token left out: `hooks.token_grid`)."""
    units = torch.as_tensor(units, dtype=torch.long)

    def fn(a):
        values = _unit_values(a, units.to(a.device))
        return values[:, token_grid(a.shape[1])[0]:].mean(1) if a.dim() == 3 else values.mean(1)
    return Objective(fn, "channel")


def measured(units: Sequence[int] | torch.Tensor, reduce: str = "max") -> Objective:
    """Unit units[b]'s value on image b as the scan measures it on dataset examples (its max or mean over
    positions; a flat unit's value itself), so a feature visualization and the top examples compare."""
    units = torch.as_tensor(units, dtype=torch.long)

    def fn(a):
        return reduce_positions(_unit_values(a, units.to(a.device)), reduce, a.dim() == 3)
    return Objective(fn, f"{reduce} over positions")


def neuron(units: Sequence[int] | torch.Tensor) -> Objective:
    """Activation of unit units[b] at the centre position (centre token), for image b."""
    units = torch.as_tensor(units, dtype=torch.long)

    def fn(a):
        values = _unit_values(a, units.to(a.device))
        if a.dim() == 4:
            h, w = a.shape[2], a.shape[3]
            return values[:, (h // 2) * w + w // 2]
        return values[:, values.shape[1] // 2]
    return Objective(fn, "neuron")


def diversity(group: int) -> Objective:
    """lucid's diversity term: images in each run of `group` consecutive images (one unit's
    variants) are pushed apart: minus the mean cosine similarity of their activations' Gram
    matrices (conv) or activation vectors (flat) with the others of the group."""
    def fn(a):
        b = a.shape[0]
        if a.dim() == 4:
            flat = a.flatten(2)
            feats = torch.einsum("bcm,bdm->bcd", flat, flat).flatten(1) / flat.shape[2]
        else:
            feats = a.flatten(1)
        feats = F.normalize(feats, dim=1)
        sims = feats @ feats.T
        same = (torch.arange(b, device=a.device) // group).view(-1, 1)
        mask = (same == same.T) & ~torch.eye(b, dtype=torch.bool, device=a.device)
        return -(sims * mask).sum(1) / max(group - 1, 1)
    return Objective(fn, f"diversity({group})")


# --- the loop ---------------------------------------------------------------------------

@dataclass
class RenderResult:
    images: torch.Tensor  # [B, C, H, W] in [0, 1], the final images
    frames: torch.Tensor  # [T, B, C, H, W] the images after each of `frame_steps` (the last is the final image)
    frame_steps: list[int]
    activation: torch.Tensor  # [B] the objective on the final images, without transforms
    seconds: float
    measured: torch.Tensor | None = None  # [B] `measure` on the final images, without transforms (if given)


def frame_schedule(steps: int, n_frames: int) -> list[int]:
    """Log-spaced steps at which to capture frames, always including the last."""
    if n_frames <= 1:
        return [steps]
    marks = np.unique(np.round(np.geomspace(1, steps, n_frames)).astype(int))
    return sorted(set(marks.tolist()) | {steps})


def adam(lr: float) -> Callable[[list[torch.Tensor]], torch.optim.Optimizer]:
    """torch.optim.Adam at `lr`, fused into one kernel per step where torch has one (CPU and CUDA)."""
    def make(params):
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in params)
        return torch.optim.Adam(params, lr=lr, fused=fused, foreach=None if fused else True)
    return make


RELU_WARMUP_FRACTION = 8  # the first 1/8 of the steps optimize a ReLU target's input (lucid's redirected ReLU)


def render(model: nn.Module, layer: str, objective: Objective, param: nn.Module, steps: int = 256,
           lr: float = 0.05, transforms: Transform | None = None,
           normalize: Callable[[torch.Tensor], torch.Tensor] | None = None, seed: int = 0, n_frames: int = 16,
           optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None = None,
           measure: Objective | None = None, take: str = "output", call: int = 1) -> RenderResult:
    """Optimize the images of `param` (a parametrization: forward() -> [B, C, H, W] in [0, 1]) to maximize
    `objective` at `layer`, whose b-th entry scores image b.

    `seed` drives the random transforms (shared by the batch at each step;
    default `standard_transforms` at the image size);
    optimizer: params -> torch.optim.Optimizer (default `adam(lr)`); measure:
    a second objective read on the final images (the pages' measure, see
    `measured`), not optimized, on the layer's output; take="input": the
    objective scores the layer's input (an activation module's input: the
    pre-activation, which a negative image can push below zero where the
    output stops at it), and the measure the layer applied to it; call=k:
    the layer's k-th call of the forward (a module the model reuses, such as
    the shared `relu` of a ResNet block, whose last call ends the block). For a
    ReLU target the first 1/RELU_WARMUP_FRACTION of the steps optimize the
    ReLU's input, which has a gradient where the unit is off (as lucid
    redirects the ReLU's gradient early on), so a unit off on the grey start
    still gets going. A unit's image does not depend on which other units
    share its batch, up to float rounding.
    """
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    if transforms is None:  # lucid's standard transforms at the parametrization's image size
        with torch.no_grad():
            transforms = standard_transforms(*param().shape[2:])
    normalize = normalize or (lambda x: x)
    opt = (optimizer or adam(lr))(list(param.parameters()))
    schedule = set(frame_schedule(steps, n_frames))
    frames: list[torch.Tensor] = []
    module = dict(model.named_modules()).get(layer)
    warm = min(steps, max(1, steps // RELU_WARMUP_FRACTION)) \
        if isinstance(module, (nn.ReLU, nn.ReLU6)) and take == "output" else 0
    was_training = model.training
    frozen = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for p in frozen:
        p.requires_grad_(False)
    try:
        for where, span in (("input", range(1, warm + 1)), (take, range(warm + 1, steps + 1))):
            with Capture(model, [layer], stop=True, grad=True, take=where, call=call) as capture:
                for step in span:
                    opt.zero_grad(set_to_none=True)
                    capture(normalize(transforms(param(), gen)))
                    (-objective(capture.outputs[layer]).sum()).backward()  # ascend the sum of the scores
                    opt.step()
                    if step in schedule:  # the image after `step` updates
                        with torch.no_grad():
                            frames.append(param().cpu())
        with torch.no_grad():
            with Capture(model, [layer], stop=True, take=take, call=call) as capture:
                final = param()
                capture(normalize(final))
            acts = capture.outputs[layer]
            activation = objective(acts).cpu()
            value = None if measure is None else measure(module(acts) if take == "input" else acts).cpu()
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    return RenderResult(final.detach().cpu(), torch.stack(frames), sorted(schedule), activation,
                        time.perf_counter() - start, value)
