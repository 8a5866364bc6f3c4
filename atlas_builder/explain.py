"""Explain: what the input pages show of why a model answered as it did.

Owns, for a few inputs (the input pages' examples):
- attributions to the input pixels (captum): integrated gradients and
  gradient × input of the predicted class's logit, and gradient × input of
  each unit an input page lists (its value in the scan's measure), computed
  in batches; each summed over the colour channels (signed: red pushes the
  output up, blue down) and pooled to at most ATTRIBUTION_SIDE pixels a side;
- attention of a ViT's class token over its patches, per layer and head, and
  attention rollout across layers (Abnar & Zuidema, 2020), from each
  `torch.nn.MultiheadAttention`'s input taken through `hooks.Capture`: the
  weights are recomputed from the module's own projections (torchvision's
  encoder asks for none, `need_weights=False`), so the model's outputs do
  not change. Self-attention is assumed (query = key, as in a ViT block);
  attention of any other module type is not read, and a note says so.

Baselines: integrated gradients start from the all-zero input, that is the
dataset's mean colour when the inputs are normalized. Writes nothing; the
scan hands the result to the store with the input pages' other maps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .accumulators import reduce_positions, unit_maps
from .hooks import Capture, token_grid

ATTRIBUTION_SIDE = 32  # attribution maps are pooled to at most this many pixels a side (the pages draw 96 px)


@dataclass
class Explanations:
    """The input pages' explanations of examples [E] (rows in the order of `InputActivations.examples`)."""
    classes: dict[str, np.ndarray] = field(default_factory=dict)  # method -> [E, h, w] of the predicted class
    targets: np.ndarray | None = None  # [E] the class explained (the prediction)
    units: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> [E, n, h, w] grad x input per listed unit
    attention: dict[str, np.ndarray] = field(default_factory=dict)  # attention module -> [E, heads, gh, gw]
    rollout: np.ndarray | None = None  # [E, gh, gw] attention rollout of the class token
    notes: list[str] = field(default_factory=list)  # what could not be shown, and why


# --- attributions ---------------------------------------------------------------------

def integrated_gradients(forward, x: torch.Tensor, steps: int, batch_size: int, target=None) -> torch.Tensor:
    """captum's integrated gradients of forward(x) ([B], or [B, classes] with `target` [B]) from the zero
    baseline, at `steps` steps (Gauss-Legendre), `batch_size` rows a forward; [B, ...] like x."""
    from captum.attr import IntegratedGradients

    x = x.detach().clone().requires_grad_(True)
    return IntegratedGradients(forward).attribute(x, baselines=torch.zeros_like(x), target=target, n_steps=steps,
                                                  internal_batch_size=max(batch_size, len(x))).detach()


def gradient_x_input(forward, x: torch.Tensor, target=None) -> torch.Tensor:
    """captum's gradient × input of forward(x) ([B], or [B, classes] with `target` [B]); [B, ...] like x."""
    from captum.attr import InputXGradient

    return InputXGradient(forward).attribute(x.detach().clone().requires_grad_(True), target=target).detach()


def pooled(attr: torch.Tensor, side: int = ATTRIBUTION_SIDE) -> np.ndarray:
    """[B, C, H, W] (or [B, F]: a row of F) attributions -> [B, h, w] float32: summed over channels, pooled by
    area to at most `side` pixels a side."""
    a = attr.detach().float()
    if a.dim() == 4:
        a = a.sum(1, keepdim=True)
        h, w = a.shape[2:]
        scale = max(h, w) / side
        if scale > 1:
            a = F.adaptive_avg_pool2d(a, (max(1, round(h / scale)), max(1, round(w / scale))))
        return a[:, 0].cpu().numpy()
    return a.flatten(1)[:, None, :].cpu().numpy()


def unit_value(net: nn.Module, layer: str, units: torch.Tensor, reduce: str):
    """forward(x) -> [B]: unit units[b]'s value on x[b] at `layer`, in the scan's measure (`reduce`), by a
    forward that stops at the layer."""
    def forward(x):
        with Capture(net, [layer], stop=True, grad=True) as capture:
            capture(x)
        out = capture.outputs[layer]
        maps = unit_maps(out)
        rows = torch.arange(len(x), device=out.device)
        if maps is None:
            return out[rows, units.to(out.device)]
        return reduce_positions(maps[rows, units.to(out.device)], reduce, out.dim() == 3)
    return forward


TOP_ATTRIBUTION_SIDE = 24  # a unit page's top-example attributions: at most this many pixels a side (drawn 96 px)


def top_attributions(net: nn.Module, layer: str, ids: np.ndarray, valid: np.ndarray, load, reduce: str,
                     batch_size: int, device: torch.device) -> np.ndarray:
    """Gradient × input of each unit's value on each of its top examples: ids, valid [U, k] (the top-k's
    example ids and which are real), load(ids) -> their inputs [n, ...]; [U, k, h, w] float16, 0 where not
    valid, pooled to at most TOP_ATTRIBUTION_SIDE pixels a side."""
    units, ranks = np.nonzero(valid)
    out = None
    for i in range(0, len(units), batch_size):
        u, r = units[i:i + batch_size], ranks[i:i + batch_size]
        x = load(ids[u, r]).to(device)
        maps = pooled(gradient_x_input(unit_value(net, layer, torch.as_tensor(u, dtype=torch.long), reduce), x),
                      TOP_ATTRIBUTION_SIDE)
        if out is None:
            out = np.zeros((*ids.shape, *maps.shape[1:]), dtype=np.float16)
        out[u, r] = maps
    return out if out is not None else np.zeros((*ids.shape, 1, 1), dtype=np.float16)


# --- attention ----------------------------------------------------------------------------

def mha_weights(module: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """[B, heads, T, T] softmax attention weights of a self-attention call module(x, x, x), from its input x."""
    if not module.batch_first:
        x = x.transpose(0, 1)
    e, heads = module.embed_dim, module.num_heads
    if module._qkv_same_embed_dim:
        wq, wk = module.in_proj_weight[:e], module.in_proj_weight[e:2 * e]
    else:
        wq, wk = module.q_proj_weight, module.k_proj_weight
    bias = module.in_proj_bias
    q = F.linear(x, wq, None if bias is None else bias[:e])
    k = F.linear(x, wk, None if bias is None else bias[e:2 * e])
    b, t, _ = q.shape
    q = q.view(b, t, heads, e // heads).transpose(1, 2)
    k = k.view(b, t, heads, e // heads).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(e // heads), dim=-1)


def attention_modules(net: nn.Module) -> tuple[list[str], list[str]]:
    """(the MultiheadAttention modules whose weights can be read, the other attention modules by type)."""
    readable, other = [], []
    for name, module in net.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            ok = module.bias_k is None and not module.add_zero_attn
            (readable if ok else other).append(name if ok else "MultiheadAttention with bias_k/add_zero_attn")
        elif "attention" in type(module).__name__.lower() and not any(
                isinstance(m, nn.MultiheadAttention) for m in module.modules()):
            other.append(type(module).__name__)
    return readable, sorted(set(other))


def class_attention(weights: torch.Tensor) -> torch.Tensor:
    """[B, heads, gh, gw] from [B, heads, T, T]: the class token's attention over the patches (without a class
    token: the attention each patch receives, averaged over the queries)."""
    prefix, gh, gw = token_grid(weights.shape[-1])
    row = weights[:, :, 0, prefix:] if prefix else weights.mean(2)
    return row.reshape(*row.shape[:2], gh, gw)


def rollout(layers: list[torch.Tensor]) -> torch.Tensor:
    """[B, gh, gw] attention rollout: the product over layers (in forward order) of each layer's head-mean
    attention with the identity added for the residual, rows renormalized; the class token's row (or the
    mean row) over the patches."""
    out = None
    for weights in layers:
        a = weights.mean(1)
        a = a + torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(-1, keepdim=True)
        out = a if out is None else a @ out
    return class_attention(out[:, None])[:, 0]


def attention_maps(net: nn.Module, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """({attention module: [B, heads, T, T] weights}, rollout [B, gh, gw]) on the batch x, for every readable
    MultiheadAttention (empty, None when there is none)."""
    names, _ = attention_modules(net)
    if not names:
        return {}, None
    modules = dict(net.named_modules())
    weights: dict[str, torch.Tensor] = {}
    with Capture(net, names, take="input", sink=lambda name, q: weights.__setitem__(
            name, mha_weights(modules[name], q.float()))) as capture, torch.inference_mode():
        capture(x)
    return weights, rollout([weights[n] for n in names])


# --- the input pages' explanations ----------------------------------------------------------

def explain_inputs(net: nn.Module, x: torch.Tensor, layers: dict[str, np.ndarray], reduce: str, steps: int,
                   batch_size: int, token_layers: bool) -> Explanations:
    """The explanations of the examples x [E, ...]: attributions of the predicted class (integrated gradients
    at `steps` steps, and gradient × input), gradient × input of each unit of `layers` ({layer: [E, n] units
    the page lists}), and, for a model with token layers, attention. steps 0: no attributions."""
    ex = Explanations()
    net.eval()
    try:
        _attributions(ex, net, x, layers, reduce, steps, batch_size)
    except RuntimeError as error:  # a forward autograd cannot go back through (integer ops, inference mode inside)
        ex.classes, ex.units, ex.targets = {}, {}, None
        ex.notes.append(f"no attributions: the gradient of this model's output with respect to its input could "
                        f"not be taken ({str(error).strip().splitlines()[0][:160] if str(error).strip() else ''})")
    if token_layers:
        weights, rolled = attention_maps(net, x)
        _, other = attention_modules(net)
        if weights:
            ex.attention = {name: class_attention(w).cpu().numpy() for name, w in weights.items()}
            ex.rollout = rolled.cpu().numpy()
        elif other:
            ex.notes.append(f"no attention maps: this model's attention ({', '.join(other)}) is not a "
                            f"torch.nn.MultiheadAttention, whose weights the atlas can recompute from its input")
        else:
            ex.notes.append("no attention maps: the model has no torch.nn.MultiheadAttention module")
    return ex


def _attributions(ex: Explanations, net: nn.Module, x: torch.Tensor, layers: dict[str, np.ndarray], reduce: str,
                  steps: int, batch_size: int) -> None:
    """explain_inputs's attributions, into `ex`."""
    if steps:
        with torch.inference_mode():
            out = net(x)
        if isinstance(out, torch.Tensor) and out.dim() == 2:
            targets = out.float().argmax(1)
            ex.targets = targets.cpu().numpy()
            chunk = max(1, batch_size // steps)  # examples whose steps fill one batch
            ig = torch.cat([integrated_gradients(net, x[i:i + chunk], steps, batch_size, targets[i:i + chunk])
                            for i in range(0, len(x), chunk)])
            ex.classes = {"integrated gradients": pooled(ig),
                          "gradient × input": pooled(torch.cat([
                              gradient_x_input(net, x[i:i + batch_size], targets[i:i + batch_size])
                              for i in range(0, len(x), batch_size)]))}
        else:
            ex.notes.append("no class attributions: the model's output is not one logit per class")
        for layer, units in layers.items():
            if units.size == 0:
                continue
            e, n = units.shape
            rows = x.repeat_interleave(n, 0)
            flat = torch.as_tensor(units.reshape(-1), dtype=torch.long)
            parts = [gradient_x_input(unit_value(net, layer, flat[i:i + batch_size], reduce), rows[i:i + batch_size])
                     for i in range(0, len(rows), batch_size)]
            maps = pooled(torch.cat(parts))
            ex.units[layer] = maps.reshape(e, n, *maps.shape[1:])
