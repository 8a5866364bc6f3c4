"""Hooks: the one module that registers forward hooks on a model.

Owns `Capture`, the context manager through which every stage looks inside
a model (the scan, `atlas layers`, feature visualization's truncated
forward, the input pages), and what one look at a forward tells about its
modules: output shapes and how often each runs (`list_layers`), and which
of them to probe (`resolve_layers`). Layer names are module paths from
`named_modules()`; an unknown name fails with the list of valid ones.

While a Capture is open, each call of a hooked layer hands its live output
(or, `take="input"`, its input) to a sink, before any later in-place op of
the model can change it, or keeps it in `outputs`. `stop=True` ends the
forward once every hooked layer has reported; `grad=True` keeps the graph
(feature visualization). A probed layer must run exactly once per forward:
a module the forward calls several times (torchvision ResNet's shared
`relu`) has no one output, and the error names it and what to probe
instead. An exception of the model's own forward (a shape mismatch with the
dataset) becomes a ForwardError naming the model and the input shape;
exceptions of our sinks pass through unchanged. Hooks are removed in
`finally`. This module loops over no dataset and reduces nothing.
"""

from __future__ import annotations

import dataclasses
import math
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
    calls: int = 1  # times one forward runs it (0: never; more: a reused module, which cannot be probed)
    sequence: bool = False  # token outputs of a text: positions along one line (not a patch grid)

    @property
    def probeable(self) -> bool:
        return self.shape is not None and 1 <= len(self.shape) <= 3 and self.calls == 1

    @property
    def n_units(self) -> int:
        return unit_count(self.shape)

    @property
    def spatial(self) -> tuple[int, int] | None:
        """(H, W) of a conv output, the patch grid of a token output (`token_grid`), None for a flat output."""
        if self.shape is None or len(self.shape) == 1:
            return None
        if len(self.shape) == 3:
            return self.shape[1], self.shape[2]
        return (1, self.shape[0]) if self.sequence else token_grid(self.shape[0])[1:]

    @property
    def prefix(self) -> int:
        """Leading tokens outside the patch grid (a ViT's class token); 0 for other outputs."""
        if self.sequence or self.shape is None or len(self.shape) != 2:
            return 0
        return token_grid(self.shape[0])[0]


def token_grid(tokens: int) -> tuple[int, int, int]:
    """(prefix, H, W) of an image model's T tokens: a square grid of patches after one leading token (a ViT's
    class token) or none; (0, 1, T) when neither fits (a sequence, not laid on the image)."""
    for prefix in (1, 0):
        side = math.isqrt(max(tokens - prefix, 0))
        if side > 1 and side * side == tokens - prefix:
            return prefix, side, side
    return 0, 1, tokens


def unit_count(shape: tuple[int, ...] | None) -> int:
    if not shape:
        return 0
    return shape[0] if len(shape) == 3 else shape[-1]  # C of C x H x W; F, or D of T x D


class StopForward(Exception):
    """Raised by a Capture's hook to end a forward once every hooked layer has reported."""


class Capture:
    """Context manager: while open, `capture(x)` runs the model and each hooked layer reports its tensor.

    sink(layer, tensor): called with the live tensor on each call; without
    it, `outputs[layer]` keeps a detached copy (the tensor itself with
    grad=True). `shapes[layer]` is its shape for one example (first call).
    strict (default): every layer must give a tensor and run exactly once
    per forward; otherwise `calls` just counts (for `atlas layers`).
    call=k: a layer reports on its k-th call of each forward, not its first,
    and may run k times (a reused module: the last `relu` call of a ResNet
    block takes the block's sum, its pre-activation; see `final_activations`).
    """

    def __init__(self, model: nn.Module, layers, *, sink=None, stop: bool = False, grad: bool = False,
                 take: str = "output", strict: bool = True, model_name: str | None = None, call: int = 1):
        self.model, self.layers, self.sink, self.call = model, list(dict.fromkeys(layers)), sink, call
        self.stop, self.grad, self.take, self.strict = stop, grad, take, strict
        self.what = f"model {model_name!r}" if model_name else f"the model ({type(model).__name__})"
        self.outputs: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, tuple[int, ...] | None] = {}
        self.calls: dict[str, int] = {}
        self._handles: list = []
        self._pending = len(self.layers)  # layers still to report in this forward (with stop)
        self._error: BaseException | None = None  # raised by our own hook or sink: passed through as it is
        self._channels_last: set[str] = set()  # layers whose 4-D maps are [B, H, W, C]: reported as [B, C, H, W]

    def __enter__(self) -> "Capture":
        modules = dict(self.model.named_modules())
        modules.pop("", None)
        try:
            for name in self.layers:
                if name not in modules:
                    raise unknown_layer(name, modules)
                module = modules[name]
                if channels_last(module):
                    self._channels_last.add(name)
                if self.take == "input":
                    self._handles.append(module.register_forward_pre_hook(self._hook(name, pre=True)))
                else:
                    self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __call__(self, *args):
        """Run one forward; returns the model's output (None when stopped early)."""
        self.calls = dict.fromkeys(self.layers, 0)
        self._pending, self._error = len(self.layers), None
        try:
            out = self.model(*args)
        except StopForward:
            out = None
        except Exception as exc:
            if isinstance(exc, AtlasError) or exc is self._error:
                raise
            raise forward_error(self.what, exc, args) from exc
        if self.strict and out is not None:
            missing = next((name for name, n in self.calls.items() if n < self.call), None)
            if missing is not None:
                raise AtlasError(f"layer {missing!r} of {self.what} is never called in the model's forward pass; "
                                 f"probe layers that the forward uses (`atlas layers CONFIG`)")
        return out

    def _hook(self, name: str, pre: bool = False):
        def hook(module, args, output=None):
            try:
                tensor = args[0] if pre and args else output
                self.calls[name] += 1
                if not isinstance(tensor, torch.Tensor):
                    if self.strict:
                        raise not_a_tensor(name, module, tensor, self.what)
                    self.shapes.setdefault(name, None)
                    return
                if self.strict and self.calls[name] > self.call:
                    raise reused_layer(name, self.what)
                if self.calls[name] < self.call:
                    return
                if name in self._channels_last and tensor.dim() == 4:  # [B, H, W, C] -> a [B, C, H, W] view
                    tensor = tensor.permute(0, 3, 1, 2)
                self.shapes.setdefault(name, tuple(tensor.shape[1:]))
                if self.sink is not None:
                    self.sink(name, tensor)
                else:
                    self.outputs[name] = tensor if self.grad else tensor.detach().clone()
            except BaseException as exc:
                self._error = exc
                raise
            if self.stop:
                self._pending -= 1
                if self._pending == 0:
                    raise StopForward
        return hook


CHANNELS_LAST = ("SwinTransformerBlock", "SwinTransformerBlockV2", "PatchMerging", "PatchMergingV2")
# torchvision's Swin modules: their outputs are [B, H, W, C] maps


def channels_last(module: nn.Module) -> bool:
    """Whether a module's 4-D output is a channels-last map (a Swin block or patch merging, or a stack of
    them): `Capture` reports it as [B, C, H, W], so its units are channels like a conv's."""
    if isinstance(module, STACKS):
        children = list(module.children())
        return bool(children) and channels_last(children[-1])
    return type(module).__name__ in CHANNELS_LAST


def not_a_tensor(name: str, module: nn.Module, value, what: str) -> AtlasError:
    return AtlasError(f"layer {name!r} ({type(module).__name__}) of {what} returns {type(value).__name__}, not a "
                      f"tensor, so it has no units to probe; remove it from layers = [...], or probe one of its "
                      f"submodules (`atlas layers CONFIG` shows each module's output)")


def reused_layer(name: str, what: str) -> AtlasError:
    parent = name.rpartition(".")[0]
    instead = f"the block that calls it ({parent!r}) or the layers it follows" if parent else "the layers it follows"
    return AtlasError(f"layer {name!r} of {what} runs more than once in one forward pass (one module the forward "
                      f"reuses, like the ReLU of a torchvision ResNet block), so it has no one output to probe; "
                      f"probe {instead} instead (`atlas layers CONFIG` shows how often each module runs)")


NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d,
              nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm)
STACKS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)  # containers that only hold modules in order


def representations(model: nn.Module) -> list[tuple[str, str | None]]:
    """The default probe points of a model, in definition order: (layer, the conv/linear it follows or None).

    The rule, one point per distinct representation:
    - a conv or linear module followed directly by an activation (with or
      without one norm between, as siblings in the same parent) is one layer,
      probed after the activation; without an activation, at the module
      itself (so the output layer, a last linear, is always one);
    - a block, that is a module with modules of its own, repeated in a
      Sequential/ModuleList/ModuleDict (a ResNet Bottleneck in `layer3`, a
      ViT encoder block in `encoder.layers`), is probed at its output and
      not looked into (a lone module in one, such as a whole backbone in a
      Sequential, is looked into);
    - other containers (Sequential stems and heads, custom wrappers) are looked into;
    - a conv or linear without an activation that comes before the first
      block is the blocks' input embedding (a ViT's `conv_proj`, whose
      output the encoder adds a class token and positions to), not probed.
    """
    points: list[tuple[str, str | None]] = []
    blocks: list[str] = []  # the points that are blocks of a stack

    def visit(module: nn.Module, prefix: str) -> None:
        children = list(module.named_children())
        i = 0
        while i < len(children):
            name, child = children[i]
            path = f"{prefix}{name}"
            if isinstance(module, STACKS) and not isinstance(child, STACKS) and any(True for _ in child.children()) \
                    and sum(type(c) is type(child) for _, c in children) > 1:
                points.append((path, None))  # a block of a stack: its output
                blocks.append(path)
            elif any(True for _ in child.children()):
                visit(child, path + ".")
            elif isinstance(child, LINEAR_TYPES):
                j = i + 1
                if j < len(children) and isinstance(children[j][1], NORM_TYPES):
                    j += 1
                if j < len(children) and isinstance(children[j][1], ACTIVATION_TYPES):
                    points.append((f"{prefix}{children[j][0]}", path))
                    i = j
                else:
                    points.append((path, None))
            i += 1

    visit(model, "")
    if blocks:
        first = next(i for i, (name, _) in enumerate(points) if name == blocks[0])
        points = [(name, source) for i, (name, source) in enumerate(points)
                  if i >= first or source is not None or not isinstance(model.get_submodule(name), LINEAR_TYPES)]
    return points


def layer_sources(model: nn.Module) -> dict[str, str]:
    """Activation layer -> the conv/linear module it follows (by the default rule's pairing)."""
    return {layer: source for layer, source in representations(model) if source is not None}


def describe_layer(model: nn.Module, layer: str, shape: tuple[int, ...] | None) -> str:
    """What a layer is, for its title: "Linear+ReLU 4096→4096", "Bottleneck 1024×14×14", "Conv2d 64×56×56"."""
    modules = dict(model.named_modules())
    module = modules.get(layer)
    kind = type(module).__name__ if module is not None else "?"
    sources = layer_sources(model)
    source = modules.get(sources[layer]) if layer in sources else None
    if source is not None:
        kind = f"{type(source).__name__}+{kind}"
    linear = source if source is not None else module
    if isinstance(linear, nn.Linear) and shape is not None and len(shape) == 1:
        return f"{kind} {linear.in_features}→{linear.out_features}"
    return f"{kind} {'×'.join(map(str, shape))}" if shape else kind


def list_layers(model: nn.Module, example: torch.Tensor, model_name: str | None = None,
                flat: dict | None = None) -> list[LayerInfo]:
    """Every named module with its output shape on `example` (a batch) and how often one forward runs it.

    flat: when given, gets each module's last [B, F] output and, under "", the model's output (so a caller
    can tell which module gives the output, with no second forward)."""
    modules = [(name, m) for name, m in model.named_modules() if name]
    keep = (lambda name, out: flat.__setitem__(name, out) if out.dim() == 2 else None) if flat is not None \
        else (lambda name, out: None)
    with Capture(model, [name for name, _ in modules], sink=keep, strict=False,
                 model_name=model_name) as capture, torch.inference_mode():
        out = capture(example)
    if flat is not None:
        flat[""] = out
    infos = {name: LayerInfo(name, type(m).__name__, capture.shapes.get(name), False, capture.calls[name])
             for name, m in modules}
    defaults = set()
    for name, source in representations(model):  # an activation the forward reuses: the module before it
        pick = name if infos[name].probeable else source
        if pick is not None and infos[pick].probeable:
            defaults.add(pick)
    return [dataclasses.replace(info, default=info.name in defaults) for info in infos.values()]


def run_after(module: nn.Module, fn) -> None:
    """A forward hook that becomes part of a loaded model, for as long as the model lives (not a probe, so
    no context manager): fn(output) returns what the module returns instead, or None to leave it (a
    dictionary run on its hook point's output, a transformers model made to return its logits)."""
    module.register_forward_hook(lambda m, args, output: fn(output))


MLP_NAMES = ("mlp", "ffn", "feed_forward", "feedforward")  # what transformer blocks call their MLP
ACTIVATION_NAMES = ("act", "act_fn", "activation", "activation_fn")  # and its activation, when a custom module


def mlp_activations(model: nn.Module) -> list[str]:
    """A language model's default layers: the activation inside each block's MLP (one unit per neuron), e.g.
    `blocks.0.mlp.act` or GPT-2's `transformer.h.0.mlp.act`; [] when it has none."""
    return [name for name, m in model.named_modules()
            if any(part in MLP_NAMES for part in name.split(".")[:-1])
            and (isinstance(m, ACTIVATION_TYPES) or name.rsplit(".", 1)[-1] in ACTIVATION_NAMES)]


def final_activations(model: nn.Module, layers, example: torch.Tensor) -> dict[str, tuple[str, int]]:
    """{block: (activation, k)} for each of `layers` (module paths) that is a block whose output is what the
    k-th call of an activation module inside it returns, that is a block ending in that activation (a
    torchvision BasicBlock or Bottleneck ends in the last call of its shared `relu`, on the residual sum).
    One forward of `example`; tensors are told apart by identity, so an in-place activation counts too."""
    modules = dict(model.named_modules())
    inner = {layer: [name for name, m in modules.items() if name.startswith(layer + ".")
                     and isinstance(m, ACTIVATION_TYPES)] for layer in layers if layer in modules}
    inner = {layer: names for layer, names in inner.items() if names}
    if not inner:
        return {}
    last: dict[str, tuple[torch.Tensor, int]] = {}
    counts: dict[str, int] = {}

    def keep(name, tensor):
        counts[name] = counts.get(name, 0) + 1
        last[name] = (tensor, counts[name])

    hooked = list(inner) + [name for names in inner.values() for name in names]
    with Capture(model, hooked, sink=keep, strict=False) as capture, torch.inference_mode():
        capture(example)
    found = {}
    for layer, names in inner.items():
        out = last.get(layer, (None, 0))[0]
        for name in names:
            if out is not None and name in last and last[name][0] is out:
                found[layer] = (name, last[name][1])
    return found


def resolve_layers(model: nn.Module, requested, model_name: str = "model",
                   infos: list[LayerInfo] | None = None) -> list[str]:
    """The layers to probe: those requested (checked), or by default one point per representation
    (`representations`) that gives a tensor once per forward (`infos` from `list_layers`; without them, all
    the rule's points)."""
    modules = dict(model.named_modules())
    modules.pop("", None)
    if not requested:
        layers = ([info.name for info in infos if info.default] if infos is not None
                  else [name for name, _ in representations(model)])
        if not layers:
            raise AtlasError(f"model {model_name!r} has no conv, linear or block modules to probe by default; "
                             f"list layers = [...] in its [[models]] section (see `atlas layers CONFIG`)")
        return layers
    unknown = [name for name in requested if name not in modules]
    if unknown:
        raise unknown_layer(unknown[0], modules, model_name)
    return list(dict.fromkeys(requested))


def unknown_layer(name: str, modules: dict, model_name: str = "model") -> AtlasError:
    return AtlasError(f"model {model_name!r} has no layer {name!r}; valid layer names are: "
                      f"{', '.join(modules)} (run `atlas layers CONFIG` to see their shapes)")


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def forward_error(what: str, exc: Exception, args: tuple) -> ForwardError:
    """The error for a model whose own forward raised `exc` on inputs `args`."""
    shapes = ", ".join("x".join(map(str, a.shape)) for a in args if isinstance(a, torch.Tensor)) or "?"
    return ForwardError(f"{what} raised {type(exc).__name__} in its forward pass on a batch of inputs of shape "
                        f"{shapes}: {_first_line(exc)}; check that the model fits the dataset's inputs "
                        f"(dataset.source, resize, crop) and that it runs on its own")
