"""Feature visualization: batched activation maximization from small callables.

In the spirit of lucid/lucent's `optvis`, built from three kinds of pieces
and one optimizer loop:

- parametrization: `FourierImage`, a batch of images held as Fourier
  coefficients scaled by 1/f (so low frequencies dominate), with decorrelated
  colour for 3-channel images, squashed to [0, 1] by a sigmoid;
- transforms: random each step (`pad`, `jitter`, `random_scale`,
  `random_rotate`, composed by `compose`); `standard_transforms(h, w)` is the
  lucid recipe scaled to the image size, fused into one random warp
  (`random_affine`). Pipelines return images of the parametrized size, so
  models with a fixed input size (MLPs, linear heads) work;
- objectives: `channel` (mean over positions), `neuron` (the centre
  position), `diversity`; they compose with +, -, * and unary minus
  (negative images are `-channel(...)`).

`render` optimizes a whole batch of images at once, image i for unit
units[i], and stops the forward pass at the target layer (`TruncatedModel`),
so a 64-channel layer costs about one run and early layers cost a fraction of
the network. Gradients flow to the image only (the model's parameters are
frozen during the run). On small images, where a step's fixed costs rival
the model's own forward and backward, the image is one matrix away from its
spectrum (`FourierImage.basis`), each step's warp is one matrix
(`RandomAffine.linear`), and their gradient is written out (`FusedSteps`):
the step then costs the model's forward and backward plus a handful of ops.
Seeds are explicit: the same call gives the same images. No file I/O here:
the feature-vis stage (visualize.py) encodes and stores what this returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import AtlasError
from .probe import unknown_layer

# lucid's colour decorrelation: square root of the ImageNet colour covariance's SVD
COLOR_CORRELATION_SVD_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])


# --- parametrization -------------------------------------------------------------

BASIS_MAX_ENTRIES = 2**22  # FourierImage uses a dense basis (16 MB at most) up to about 32x32 grey or 20x20 RGB

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
        # Everything before the sigmoid is linear in the spectrum: for small images, one matrix does it
        # (a matmul per step instead of scale, inverse FFT and colour mixing, forward and backward).
        n_in = channels * height * (width // 2 + 1) * 2
        basis = None
        if n_in * channels * height * width <= BASIS_MAX_ENTRIES:
            with torch.no_grad():
                eye = torch.eye(n_in).view(n_in, channels, height, width // 2 + 1, 2)
                basis = self._linear(eye, (n_in, channels, height, width)).reshape(n_in, -1)
        self.register_buffer("basis", basis)

    def _linear(self, spectrum: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
        """The image before the sigmoid: 1/f scale, inverse FFT, decorrelated colour (3 channels)."""
        b, c, h, w = shape
        image = torch.fft.irfft2(torch.view_as_complex((spectrum * self.scale).contiguous()), s=(h, w), norm="ortho")
        if c == 3:
            matrix = COLOR_CORRELATION_SVD_SQRT.to(image.device)
            matrix = matrix / matrix.norm(dim=0).max()
            image = torch.einsum("bchw,dc->bdhw", image, matrix)
        return image

    def forward(self) -> torch.Tensor:
        if self.basis is not None:
            return torch.sigmoid(torch.mm(self.spectrum.view(self.shape[0], -1), self.basis).view(self.shape))
        return torch.sigmoid(self._linear(self.spectrum, self.shape))


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


class RandomAffine:
    """pad, jitter, scale and rotate fused into one random warp (one grid_sample), output at the input size.

    The same as `compose([pad, jitter, random_scale, random_rotate, resize_to])` up to
    interpolation, in two tensor operations instead of six (it matters on small models, where
    the per-step overhead is a large part of the cost). The random choices of POOL_STEPS steps
    are drawn at once; for images of at most WARP_MATRIX_PIXELS pixels the warps of those
    steps are also turned into matrices at once (one grid_sample of the identity), so that each
    step's warp is one matrix product (bilinear sampling is linear in the image), which
    `linear` hands to `render` to fuse with the parametrization.
    """

    def __init__(self, pad_px: int, jitter_px: int, scales: Sequence[float], degrees: Sequence[float],
                 value: float = 0.5):
        self.pad_px, self.jitter_px, self.scales, self.degrees, self.value = pad_px, jitter_px, scales, degrees, value
        self._bases: dict = {}
        self._pool: dict = {"gen": None, "key": None, "step": POOL_STEPS, "theta": None, "matrices": None}

    def _thetas(self, draws: list[list[int]], h: int, w: int, dtype, device) -> torch.Tensor:
        """[N, 2, 3] affine matrices (output pixel -> input pixel, normalized coordinates) of N draws."""
        rows = []
        for draw in draws:
            s = self.scales[draw[0] % len(self.scales)]
            angle = math.radians(self.degrees[draw[1] % len(self.degrees)])
            # in normalized coordinates of the padded canvas, then of the image
            grow_x, grow_y = (w + 2 * self.pad_px) / w, (h + 2 * self.pad_px) / h
            dx = 2 * (draw[2] % (self.jitter_px + 1) - self.jitter_px / 2) / w
            dy = 2 * (draw[3] % (self.jitter_px + 1) - self.jitter_px / 2) / h
            cos, sin = math.cos(angle) / s, math.sin(angle) / s
            rows.append([[cos * grow_x, -sin * grow_x, dx], [sin * grow_y, cos * grow_y, dy]])
        return torch.tensor(rows, dtype=dtype, device=device)

    def _next(self, gen: torch.Generator, h: int, w: int, dtype, device) -> int:
        """The pool slot of this step's warp, drawing the next POOL_STEPS when the pool is used up."""
        pool, key = self._pool, (h, w, dtype, device)
        if pool["gen"] is not gen or pool["key"] != key or pool["step"] == POOL_STEPS:
            draws = torch.randint(0, 2**31 - 1, (POOL_STEPS, 4), generator=gen).tolist()
            theta = self._thetas(draws, h, w, dtype, device)
            pool.update(gen=gen, key=key, step=0, theta=theta, matrices=None)
            if h * w <= WARP_MATRIX_PIXELS:  # each step's warp as [HW_in, HW_out], and the grey it pads with
                grid = F.affine_grid(theta, [POOL_STEPS, 1, h, w], align_corners=False)
                eye = torch.eye(h * w, dtype=dtype, device=device).view(1, h * w, h, w).expand(POOL_STEPS, -1, -1, -1)
                warped = F.grid_sample(eye, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
                pool["matrices"] = warped.reshape(POOL_STEPS, h * w, h * w)  # [step, input pixel, output pixel]
                pool["offsets"] = self.value * (1 - pool["matrices"].sum(1))  # W(x - v) + v = Wx + v(1 - W1)
                pool["transposed"] = pool["matrices"].transpose(1, 2).contiguous()  # for the gradient
        pool["step"] += 1
        return pool["step"] - 1

    def linear(self, gen: torch.Generator, h: int, w: int, dtype, device) -> tuple[torch.Tensor, ...] | None:
        """This step's warp as (matrix [HW, HW], offset [HW], matrix.T): warped = image_flat @ matrix + offset; None
        for images too large for a matrix. Takes the step as a call would (the same images either way)."""
        if h * w > WARP_MATRIX_PIXELS:
            return None
        i = self._next(gen, h, w, dtype, device)
        return self._pool["matrices"][i], self._pool["offsets"][i], self._pool["transposed"][i]

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        h, w = x.shape[2], x.shape[3]
        i = self._next(gen, h, w, x.dtype, x.device)
        if self._pool["matrices"] is not None:
            flat = torch.addmm(self._pool["offsets"][i], x.reshape(-1, h * w), self._pool["matrices"][i])
            return flat.view(x.shape)
        theta = self._pool["theta"][i]
        key = (h, w, x.dtype, x.device)
        if key not in self._bases:  # affine_grid's base grid, once: then one small matmul per step
            self._bases[key] = F.affine_grid(torch.eye(2, 3, dtype=x.dtype, device=x.device)[None], [1, 1, h, w],
                                             align_corners=False).view(h * w, 2)
        grid = torch.addmm(theta[:, 2], self._bases[key], theta[:, :2].T).view(1, h, w, 2).expand(x.shape[0], h, w, 2)
        return F.grid_sample(x - self.value, grid, mode="bilinear", padding_mode="zeros", align_corners=False) \
            + self.value


random_affine = RandomAffine


POOL_STEPS = 64  # random_affine draws the random choices of this many steps at a time
WARP_MATRIX_PIXELS = 256  # and up to this image size (16x16) makes them matrices (POOL_STEPS x 256 x 256 floats)


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
    """Mean activation of unit units[b] over all positions, for image b.

    As one dot product per image with fixed weights (1/M on the unit's
    positions, 0 elsewhere): one op forward and one backward, where indexing
    and a mean cost four (it matters on small models, see FusedSteps).
    """
    units = torch.as_tensor(units, dtype=torch.long)
    weights: dict = {}  # for the last activation shape seen

    def fn(a):
        key = (tuple(a.shape), a.dtype, a.device)
        if key not in weights:
            if a.dim() not in (2, 3, 4):
                raise AtlasError(f"cannot visualize a layer output of shape {tuple(a.shape)}")
            w = torch.zeros(a.shape, dtype=a.dtype, device=a.device)
            rows, picked = torch.arange(a.shape[0], device=a.device), units.to(a.device)
            if a.dim() == 3:  # [B, T, D]: units index D, positions T
                w[rows, :, picked] = 1.0 / a.shape[1]
            else:  # [B, C, H, W] or [B, F]
                w[rows, picked] = 1.0 / (a.shape[2] * a.shape[3] if a.dim() == 4 else 1)
            weights.clear()
            weights[key] = w.view(a.shape[0], -1)
        return torch.linalg.vecdot(a.reshape(a.shape[0], -1), weights[key])
    return Objective(fn, "channel")


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


# --- truncated forward ----------------------------------------------------------------

class _Stop(Exception):
    pass


class TruncatedModel:
    """Context manager: calling it runs the model only up to `layer` and returns that layer's output.

    The forward is cut by raising from the layer's hook. A module called
    more than once per forward (a shared ReLU) is not cut: the whole model
    runs and the last call's output is returned, as the probe reports it.

    With `through_relu`, a ReLU target returns its *input* (the forward stops
    just before it), which has a gradient where the unit is off: `render`
    uses it for the first steps (as lucid redirects the ReLU's gradient early
    on), so a unit that is off on the grey start still gets going, and then
    optimizes the ReLU's real output.
    """

    def __init__(self, model: nn.Module, layer: str, example: torch.Tensor, through_relu: bool = False):
        modules = dict(model.named_modules())
        modules.pop("", None)
        if layer not in modules:
            raise unknown_layer(layer, modules)
        self.model, self.module, self.example, self.layer = model, modules[layer], example, layer
        self.output: torch.Tensor | None = None
        self.cut = True
        self.through_relu = through_relu and isinstance(self.module, (nn.ReLU, nn.ReLU6))
        self._handle = None

    def __enter__(self) -> "TruncatedModel":
        calls = []
        probe = self.module.register_forward_hook(lambda m, i, o: calls.append(1))
        try:
            with torch.no_grad():
                self.model(self.example)
        finally:
            probe.remove()
        if not calls:
            raise AtlasError(f"layer {self.layer!r} is never called in the model's forward pass; "
                             f"visualize a layer the forward uses")
        self.cut = len(calls) == 1
        if self.cut and self.through_relu:
            self._handle = self.module.register_forward_pre_hook(self._pre_hook)
        else:
            self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module, inputs, output):
        if not isinstance(output, torch.Tensor):
            raise AtlasError(f"layer {type(module).__name__} returns {type(output).__name__}, not a tensor")
        self.output = output
        if self.cut:
            raise _Stop

    def _pre_hook(self, module, inputs):
        self.output = inputs[0]
        raise _Stop

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.output = None
        try:
            self.model(x)
        except _Stop:
            pass
        return self.output


# --- the loop ---------------------------------------------------------------------------

@dataclass
class RenderResult:
    images: torch.Tensor  # [B, C, H, W] in [0, 1], the final images
    frames: torch.Tensor  # [T, B, C, H, W] the images after each of `frame_steps` (the last is the final image)
    frame_steps: list[int]
    activation: torch.Tensor  # [B] the objective on the final images, without transforms
    seconds: float


def frame_schedule(steps: int, n_frames: int) -> list[int]:
    """Log-spaced steps at which to capture frames, always including the last."""
    if n_frames <= 1:
        return [steps]
    marks = np.unique(np.round(np.geomspace(1, steps, n_frames)).astype(int))
    return sorted(set(marks.tolist()) | {steps})


class Adam:
    """Adam (Kingma & Ba, bias-corrected, as torch.optim.Adam's defaults) on one tensor.

    torch.optim.Adam's Python bookkeeping costs more per step than the whole
    update on small images, where it was a tenth of a render: the step calls
    torch's fused Adam kernel directly (the one behind `Adam(fused=True)`),
    or, where that is missing, five in-place ops.
    """

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.param, self.lr, self.betas, self.eps, self.t = param, lr, betas, eps, 0
        self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)
        self._steps = torch.zeros(0, device=param.device)  # the fused kernel reads the step count from a tensor

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        self.t += 1
        if FUSED_ADAM is not None and self.param.device.type in ("cpu", "cuda"):  # the same update in one kernel
            if self.t > len(self._steps):  # step counts as tensors, made ahead (a view per step, not a kernel)
                self._steps = torch.arange(1, 2 * self.t + 1, dtype=torch.float32, device=self.param.device)
            FUSED_ADAM([self.param], [self.param.grad], [self.m], [self.v], [], [self._steps[self.t - 1]],
                       amsgrad=False, lr=self.lr, beta1=b1, beta2=b2, weight_decay=0.0, eps=self.eps, maximize=False)
            return
        g = self.param.grad
        self.m.lerp_(g, 1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (self.v.sqrt() / math.sqrt(1 - b2 ** self.t)).add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-self.lr / (1 - b1 ** self.t))


class FusedSteps:
    """The steps of a FourierImage with a basis under a linear warp (RandomAffine.linear), gradient written out.

    The image and its warp are computed outside autograd and the model runs
    on a leaf, as in the forward+backward floor; the gradient of the image's
    three steps (warp, sigmoid, basis) is then three ops into a gradient
    buffer that stays the parameter's. On small models every op counts: each
    costs a few microseconds alone and several times that between the
    model's convolutions (cold caches), which is about the cost of the model.
    """

    def __init__(self, param: "FourierImage"):
        b, c, h, w = param.shape
        self.shape, self.pixels = param.shape, h * w
        self.spectrum = param.spectrum.detach().view(b, -1)  # the parameter's own memory (Adam updates in place)
        param.spectrum.grad = torch.zeros_like(param.spectrum)
        self.grad = param.spectrum.grad.view(b, -1)
        self.basis, self.basis_t = param.basis, param.basis.T.contiguous()

    def step(self, warp: tuple[torch.Tensor, torch.Tensor, torch.Tensor], score_of, minus_ones) -> None:
        """warp: (matrix, offset, matrix transposed); score_of: warped images -> [B] scores to ascend."""
        matrix, offset, matrix_t = warp  # none of these, nor self.spectrum (detached), records a graph
        images = torch.sigmoid(torch.mm(self.spectrum, self.basis))  # [B, C*HW]
        warped = torch.addmm(offset, images.view(-1, self.pixels), matrix).view(self.shape)
        warped.requires_grad_(True)
        score_of(warped).backward(gradient=minus_ones)
        g = torch.mm(warped.grad.view(-1, self.pixels), matrix_t).view_as(images)
        torch.mm(torch.ops.aten.sigmoid_backward(g, images), self.basis_t, out=self.grad)


FUSED_ADAM = getattr(torch, "_fused_adam_", None)  # torch's own fused Adam kernel (torch.optim.Adam(fused=True))
RELU_WARMUP_FRACTION = 8  # the first 1/8 of the steps optimize a ReLU target's input (lucid's redirected ReLU)


def render(model: nn.Module, layer: str, objective: Objective, image_seeds: Sequence[int], channels: int,
           height: int, width: int, steps: int = 256, lr: float = 0.05, transforms: Transform | None = None,
           normalize: Callable[[torch.Tensor], torch.Tensor] | None = None, seed: int = 0,
           n_frames: int = 16, device: torch.device | str = "cpu") -> RenderResult:
    """Optimize one image per entry of `image_seeds` to maximize `objective` at `layer`.

    Image b starts from image_seeds[b] and is scored by the objective's b-th
    entry; `seed` drives the random transforms (shared by the batch at each
    step). So a unit's image does not depend on which other units share its
    batch, up to float rounding.
    """
    import time

    start = time.perf_counter()
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    param = FourierImage(len(image_seeds), channels, height, width, image_seeds).to(device)
    transforms = transforms or standard_transforms(height, width)
    normalize = normalize or (lambda x: x)
    opt = Adam(param.spectrum, lr)
    schedule = set(frame_schedule(steps, n_frames))
    frames: list[torch.Tensor] = []
    was_training = model.training
    frozen = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for p in frozen:
        p.requires_grad_(False)
    try:
        example = normalize(param().detach())
        minus_ones = torch.full((len(image_seeds),), -1.0, device=device)
        dtype = param.spectrum.dtype
        fused = FusedSteps(param) if param.basis is not None and hasattr(transforms, "linear") else None
        warm = min(steps, max(1, steps // RELU_WARMUP_FRACTION))
        for through_relu, span in ((True, range(1, warm + 1)), (False, range(warm + 1, steps + 1))):
            with TruncatedModel(model, layer, example, through_relu=through_relu) as truncated:
                for step in span:
                    warp = transforms.linear(gen, height, width, dtype, device) if fused else None
                    if warp is None:
                        param.spectrum.grad = None
                        score = objective(truncated(normalize(transforms(param(), gen))))
                        score.backward(gradient=minus_ones)  # ascend the sum of the scores
                    else:
                        fused.step(warp, lambda x: objective(truncated(normalize(x))), minus_ones)
                    opt.step()
                    if step in schedule:  # the image after `step` updates
                        with torch.no_grad():
                            frames.append(param().cpu())
        with torch.no_grad(), TruncatedModel(model, layer, example) as exact:
            final = param()
            activation = objective(exact(normalize(final))).cpu()
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    return RenderResult(final.detach().cpu(), torch.stack(frames), sorted(schedule), activation,
                        time.perf_counter() - start)
