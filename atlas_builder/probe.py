"""Probe: forward hooks that turn a layer's output into one number per unit.

Owns what a *unit* is and how a layer's output is reduced:
- conv outputs [B, C, H, W]: a unit is a channel; its activation on an example
  is the spatial max (or mean, `scan.reduce`), and the argmax position
  (flat index h * W + w) is kept so pages can show where it fired;
- linear outputs [B, F]: a unit is a feature;
- token outputs [B, T, D]: a unit is a feature, reduced over tokens (the
  argmax token is kept as the position).

Hooks are registered only inside the `Probe` context manager, which removes
them in `finally`. A module called several times in one forward (e.g. a
shared ReLU) reports its last call. Layer names are module paths from
`named_modules()`; an unknown name fails with the list of valid ones.
While a Probe is open, an exception from the model's own forward (say, a
shape mismatch with the dataset) becomes an AtlasError naming the model and
the input shape; exceptions of the hooks themselves pass through unchanged.
This module does not loop over datasets (scan does) or store anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import AtlasError, ForwardError

LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LazyLinear)
ACTIVATION_TYPES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh)


@dataclass(frozen=True)
class LayerInfo:
    name: str  # module path
    module_type: str  # class name, e.g. Conv2d
    shape: tuple[int, ...] | None  # output shape of one example (no batch dim); None if not a tensor
    default: bool  # probed when the config lists no layers

    @property
    def probeable(self) -> bool:
        return self.shape is not None and 1 <= len(self.shape) <= 3

    @property
    def n_units(self) -> int:
        return unit_count(self.shape)

    @property
    def spatial(self) -> tuple[int, int] | None:
        """(H, W) of a conv output, (1, T) of a token output, None for a flat output."""
        if self.shape is None or len(self.shape) == 1:
            return None
        return (self.shape[1], self.shape[2]) if len(self.shape) == 3 else (1, self.shape[0])


def unit_count(shape: tuple[int, ...] | None) -> int:
    if not shape:
        return 0
    if len(shape) == 3:  # C, H, W
        return shape[0]
    return shape[-1]  # F, or T x D


def is_default_layer(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES + ACTIVATION_TYPES)


def unit_maps(out: torch.Tensor) -> torch.Tensor | None:
    """[B, U, M] view of a layer output: each unit's values over its M positions (conv) or tokens; None if flat."""
    if out.dim() == 2:
        return None
    if out.dim() == 4:
        return out.flatten(2)  # B, C, H*W
    if out.dim() == 3:
        return out.transpose(1, 2)  # B, D, T
    raise AtlasError(f"layer output of shape {tuple(out.shape)} is not supported; "
                     f"probe layers whose outputs are [B, F], [B, T, D] or [B, C, H, W]")


def reduce_output(out: torch.Tensor, reduce: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit activation [B, U] (float32) and position [B, U] (int64, -1 when flat) of one layer output."""
    maps = unit_maps(out)
    if maps is None:
        return out.float(), torch.full(out.shape, -1, dtype=torch.long, device=out.device)
    values, positions = maps.max(dim=2)
    if reduce == "mean":
        values = maps.mean(dim=2)
    return values.float(), positions


def active_fraction(out: torch.Tensor, threshold: float) -> torch.Tensor:
    """[B, U] fraction of a unit's positions (conv) or tokens above `threshold`; 0/1 for flat outputs.

    NaN counts as inactive. (relu, sign, mean is several times faster on the
    CPU than comparing and counting; the exact count runs only if NaN shows up.)
    """
    maps = unit_maps(out)
    if maps is None:
        return (out > threshold).float()
    fraction = (maps.float() - threshold).clamp_(min=0).sign_().mean(2)
    if torch.isnan(fraction).any():
        fraction = (maps > threshold).sum(2, dtype=torch.float32) / maps.shape[2]
    return fraction


def resolve_layers(model: nn.Module, requested: tuple[str, ...] | list[str], model_name: str = "model") -> list[str]:
    """The layers to probe: those requested (checked), or every conv/linear/activation module."""
    modules = dict(model.named_modules())
    modules.pop("", None)
    if not requested:
        layers = [name for name, m in modules.items() if is_default_layer(m)]
        if not layers:
            raise AtlasError(f"model {model_name!r} has no conv, linear or activation modules to probe by default; "
                             f"list layers = [...] in its [[models]] section (see `atlas layers CONFIG`)")
        return layers
    unknown = [name for name in requested if name not in modules]
    if unknown:
        raise unknown_layer(unknown[0], modules, model_name)
    return list(dict.fromkeys(requested))


def check_called(layers: list[str], seen, model_name: str) -> None:
    """Fail when a probed layer did not run in the forward pass (`seen`: the layers whose hooks fired)."""
    missing = [name for name in layers if name not in seen]
    if missing:
        raise AtlasError(f"layer {missing[0]!r} of model {model_name!r} is never called in the model's forward "
                         f"pass; probe layers that the forward uses (`atlas layers CONFIG`)")


def unknown_layer(name: str, modules: dict, model_name: str = "model") -> AtlasError:
    return AtlasError(f"model {model_name!r} has no layer {name!r}; valid layer names are: "
                      f"{', '.join(modules)} (run `atlas layers CONFIG` to see their shapes)")


class Probe:
    """Context manager: while open, every forward reports each probed layer's output.

    By default each output is reduced at once: after a forward, `values[layer]`
    is [B, U] and `positions[layer]` [B, U]. With `sink`, the hook instead
    calls `sink(layer, output)` with the live output tensor (before any later
    in-place op can change it) and keeps nothing. Either way `shapes[layer]`
    is the output shape of one example (as its first call gave it).
    """

    def __init__(self, model: nn.Module, layers: list[str], reduce: str = "max", sink=None,
                 model_name: str | None = None):
        self.model, self.layers, self.reduce, self.sink = model, list(layers), reduce, sink
        self.model_name = model_name
        self._hook_error: BaseException | None = None  # raised by our own hook/sink: a bug or AtlasError, kept as is
        self._forward_saved: tuple[bool, object] | None = None
        self.values: dict[str, torch.Tensor] = {}
        self.positions: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._handles: list = []

    def __enter__(self) -> "Probe":
        modules = dict(self.model.named_modules())
        modules.pop("", None)
        try:
            for name in self.layers:
                if name not in modules:
                    raise unknown_layer(name, modules)
                self._handles.append(modules[name].register_forward_hook(self._hook(name)))
            self._wrap_forward()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        try:
            for handle in self._handles:
                handle.remove()
        finally:
            self._handles.clear()
            self._unwrap_forward()

    def _wrap_forward(self) -> None:
        """While open, an exception the model's own forward raises becomes an AtlasError naming the model.

        (A model that cannot run on the dataset's inputs, e.g. a shape mismatch, is the config's
        problem, not a bug of the atlas.) Errors of our hooks pass through unchanged.
        """
        model, probe = self.model, self
        original = model.forward
        what = f"model {self.model_name!r}" if self.model_name else f"the model ({type(model).__name__})"

        def forward(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            except Exception as exc:
                if isinstance(exc, AtlasError) or exc is probe._hook_error:
                    raise
                raise forward_error(what, exc, args) from exc

        try:
            had_own = "forward" in vars(model)
            model.forward = forward
        except (AttributeError, TypeError, RuntimeError):  # e.g. a scripted module: leave it as it is
            return
        self._forward_saved = (had_own, original)

    def _unwrap_forward(self) -> None:
        if self._forward_saved is None:
            return
        had_own, original = self._forward_saved
        self._forward_saved = None
        if had_own:
            self.model.forward = original
        else:
            del self.model.forward

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                of = f" of model {self.model_name!r}" if self.model_name else ""
                raise AtlasError(f"layer {name!r} ({type(module).__name__}){of} returns {type(output).__name__}, "
                                 f"not a tensor, so it has no units to probe; remove it from layers = [...], or probe "
                                 f"one of its submodules (`atlas layers CONFIG` shows each module's output)")
            if output.requires_grad:
                output = output.detach()
            if name not in self.shapes:
                self.shapes[name] = tuple(output.shape[1:])
            try:
                if self.sink is not None:
                    self.sink(name, output)
                else:
                    self.values[name], self.positions[name] = reduce_output(output, self.reduce)
            except BaseException as exc:
                self._hook_error = exc  # ours, not the model's: the forward wrapper lets it through as it is
                raise
        return hook


def list_layers(model: nn.Module, example: torch.Tensor) -> list[LayerInfo]:
    """Every named module with the output shape it gives on `example` (a batch of one or more)."""
    shapes: dict[str, tuple[int, ...] | None] = {}
    modules = [(name, m) for name, m in model.named_modules() if name]

    def record(name):
        def hook(module, inputs, output):
            shapes[name] = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else None
        return hook

    handles = []
    try:
        for name, m in modules:
            handles.append(m.register_forward_hook(record(name)))
        with torch.inference_mode():
            model(example)
    except AtlasError:
        raise
    except Exception as exc:
        raise forward_error(f"the model ({type(model).__name__})", exc, (example,)) from exc
    finally:
        for h in handles:
            h.remove()
    return [LayerInfo(name, type(m).__name__, shapes.get(name), is_default_layer(m)) for name, m in modules]


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)


def forward_error(what: str, exc: Exception, args: tuple) -> ForwardError:
    """The error for a model whose own forward raised `exc` on inputs `args`."""
    shapes = ", ".join("x".join(map(str, a.shape)) for a in args if isinstance(a, torch.Tensor)) or "?"
    return ForwardError(f"{what} raised {type(exc).__name__} in its forward pass on a batch of inputs of shape "
                      f"{shapes}: {_first_line(exc)}; check that the model fits the dataset's inputs "
                      f"(dataset.source, resize, crop) and that it runs on its own")
