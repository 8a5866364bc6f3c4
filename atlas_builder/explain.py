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

Also owns each unit's effect on the output (`class_effects`, over the
seeded per-class sample of `effect_examples`; `top_effects` picks the
classes a unit pushes up and down most): per class c, the mean over the
class-c examples of the sum over the unit's positions of activation ×
∂logit_c/∂activation, the first-order estimate of what logit c loses when
the unit's whole map is zeroed. One forward and one backward pass per batch
serve every layer, each example's gradient taken of its own class's logit.
A unit is what the scan calls one (a conv channel, a token layer's feature,
a channels-last Swin map's channel, as `hooks.Capture` reads it). A layer
whose output is exactly the input of the final nn.Linear (flattened) gets
that Linear's weights instead: entry (u, c) is W[c, u], logit c's change
per unit of activation, exact, the same for every example and so given for
every class. Not activation × weight: for such a unit the estimate is
already exact, the class's mean activation times the weight, which mixes
what the unit does with how much class c's examples use it. The output
layer itself, whose units are the logits, gets none.

For a language model a unit's effect is on the next token's logits
(`token_logits`, Neuronpedia's "top logits"): its output direction in the
residual stream (for an MLP neuron the column of the nn.Linear that reads
its output, for a residual-stream feature the basis vector itself) times
the unembedding, the final nn.Linear whose outputs are the vocabulary; the
final layer norm is left out (a direction, not a value). The same weights
for every example, so exact, with the tokens where a classifier has classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from .accumulators import reduce_positions, unit_maps
from .dictionaries import SparseDictionary
from .hooks import Capture, channels_last, token_grid, unknown_layer

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


# --- effect on the output -------------------------------------------------------------------

def effect_examples(labels: np.ndarray, n_classes: int, per_class: int, seed: int) -> np.ndarray:
    """Example ids (ascending): a seeded sample of up to `per_class` examples of each class 0..n_classes-1
    (all of a class's examples when it has fewer), from every example's label by id (`labels` [N]; labels
    outside 0..n_classes-1, such as -1 for unknown, are skipped)."""
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(n_classes + 1))
    picked = []
    for c in range(n_classes):
        ids = order[bounds[c]:bounds[c + 1]]
        picked.append(ids if len(ids) <= per_class else rng.choice(ids, size=max(per_class, 0), replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64) if picked else np.zeros(0, np.int64)


def _linear_input(net: nn.Module, linear: str, x: torch.Tensor) -> torch.Tensor:
    """The input of module `linear` on the batch x, by a forward that stops there."""
    with Capture(net, [linear], take="input", stop=True) as capture, torch.no_grad():
        capture(x)
    return capture.outputs[linear]


def _fits(value: torch.Tensor, in_features: int) -> bool:
    """Whether a layer's output (as Capture reads it) has one position a unit and a unit per Linear input."""
    return (value.shape[-1] if value.dim() == 3 else value.shape[1]) == in_features == value[0].numel()


def _batch_effects(net: nn.Module, layers: list[str], last: dict[str, bool], x: torch.Tensor, y: torch.Tensor,
                   n_classes: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({layer: [B, U] each unit's effect on each example's own logit (classes y [B])}, {layer: its output as
    Capture reads it}) by one forward and one backward.

    The gradient is taken at each output's place in the graph when the hook saw it (its GradientEdge; of the
    map itself where Capture hands on a channels-last map's permuted view), and the activation is a copy
    taken then, so a later in-place op of the model (a ReLU(inplace=True)) changes neither."""
    values: dict[str, torch.Tensor] = {}
    edges: dict[str, GradientEdge] = {}

    def keep(name: str, tensor: torch.Tensor) -> None:
        values[name] = tensor.detach().clone()
        if tensor.requires_grad:
            permuted = last[name] and tensor.dim() == 4
            edges[name] = GradientEdge(*tensor.grad_fn.next_functions[0]) if permuted else get_gradient_edge(tensor)

    with Capture(net, layers, sink=keep) as capture:
        out = capture(x.clone().requires_grad_(True) if x.is_floating_point() else x)  # a graph to every layer
    if not (isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape == (len(x), n_classes)):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"effects on the output need the model to return logits [batch, {n_classes}]; it "
                         f"returned {got}")
    loss = out.gather(1, y[:, None]).sum()
    wants = list(edges) if loss.requires_grad else []
    grads = dict(zip(wants, torch.autograd.grad(loss, [edges[n] for n in wants], allow_unused=True))) if wants else {}
    effects = {}
    for name in layers:
        value, grad = values[name].float(), grads.get(name)
        if grad is None:  # the logits do not depend on it
            prod = torch.zeros_like(value)
        else:
            prod = value * (grad.permute(0, 3, 1, 2) if last[name] and grad.dim() == 4 else grad).float()
        maps = unit_maps(prod)
        effects[name] = prod if maps is None else maps.sum(-1)
    return effects, values


def class_effects(net: nn.Module, layers: list[str], load, examples: np.ndarray, labels: np.ndarray,
                  n_classes: int, batch_size: int, device, output_layer: str | None = None,
                  weight_rows: set | None = None) -> dict[str, np.ndarray]:
    """{layer: [U, n_classes] float32}: entry (u, c) the mean over the examples of class c among `examples`
    (ids; `labels` [N] is every example's label by id, those outside 0..n_classes-1 skipped) of unit u's
    summed activation × ∂logit_c/∂activation; NaN for a class with no example. load(ids) -> inputs [B, ...].

    One forward and one backward (torch.autograd.grad of the sum of each example's own logit, so no
    parameter's .grad is touched) per batch of `batch_size`, the net in eval mode (its mode restored after);
    sums and counts per class accumulate on `device` ([U, C] per layer). output_layer: the module path of the
    final nn.Linear; a layer whose output equals its input on the first batch (one forward more, stopped at
    the Linear, when a layer's shape fits) gets its weights (W.T, see the module docstring) and its name is
    added to `weight_rows` when given; the output layer is left out. The model must return logits
    [B, n_classes] (else ValueError). No examples: {}."""
    modules = dict(net.named_modules())
    modules.pop("", None)
    for name in list(layers) + ([output_layer] if output_layer is not None else []):
        if name not in modules:
            raise unknown_layer(name, modules)
    linear = modules[output_layer] if output_layer is not None else None
    if linear is not None and not (isinstance(linear, nn.Linear) and linear.out_features == n_classes):
        raise ValueError(f"output_layer {output_layer!r} is not an nn.Linear with {n_classes} outputs "
                         f"({type(linear).__name__}); name the model's final Linear, or None")
    probed = [name for name in dict.fromkeys(layers) if name != output_layer]
    last = {name: channels_last(modules[name]) for name in probed}
    examples = np.asarray(examples, dtype=np.int64).reshape(-1)
    classes = np.asarray(labels).reshape(-1)[examples]
    keep = (classes >= 0) & (classes < n_classes)
    examples, classes = examples[keep], classes[keep].astype(np.int64)
    sums: dict[str, torch.Tensor] = {}
    counts = torch.zeros(n_classes, dtype=torch.float64, device=device)
    exact: dict[str, np.ndarray] = {}
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for start in range(0, len(examples), batch_size):
                estimated = [name for name in probed if name not in exact]
                if not estimated:
                    break  # every layer feeds the classifier: its weights say it all
                y = torch.as_tensor(classes[start:start + batch_size], device=device)
                x = load(examples[start:start + batch_size]).to(device)
                effects, values = _batch_effects(net, estimated, last, x, y, n_classes)
                if start == 0 and linear is not None:
                    fits = [name for name in estimated if _fits(values[name], linear.in_features)]
                    fed = _linear_input(net, output_layer, x) if fits else None  # a forward more, once, if needed
                    for name in fits:
                        if torch.equal(values[name].flatten(1), fed):
                            exact[name] = linear.weight.detach().T.float().cpu().numpy().copy()
                del values
                for name, effect in effects.items():
                    if name in exact:
                        continue
                    if name not in sums:
                        sums[name] = torch.zeros(effect.shape[1], n_classes, dtype=torch.float64, device=device)
                    sums[name].index_add_(1, y, effect.T.double())
                counts.index_add_(0, y, torch.ones(len(y), dtype=torch.float64, device=device))
    finally:
        net.train(was_training)
    if weight_rows is not None:
        weight_rows.update(exact)
    return {name: exact[name] if name in exact else (sums[name] / counts).float().cpu().numpy()  # 0/0: NaN
            for name in probed if name in exact or name in sums}


def top_effects(effects: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(up_classes [U, k], up_values [U, k], down_classes [U, k], down_values [U, k]) of effects [U, C]: per
    unit the k classes of largest effect > 0 (largest first) and of smallest effect < 0 (most negative
    first), ties by class index; NaN is neither; -1 / NaN pad where fewer exist."""
    e = np.asarray(effects, dtype=np.float32)

    def largest(g: torch.Tensor) -> np.ndarray:
        """[U, k] column indices of each row's k largest entries > 0 by (value desc, index), -1 past the
        last: a full stable sort, or with many columns (a language model's 50,257 tokens) torch.topk's k + 1
        largest: where the (k+1)-th is below the k-th, no tie crosses the cut and its k, stably sorted by
        index then value, are the same pick (other rows, and any with NaN, sorted whole)."""
        out = np.full((len(g), k), -1, dtype=np.int64)
        rest = np.arange(len(g))
        if g.shape[1] > 8 * k and not torch.isnan(g).any():
            values, index = torch.topk(g, k + 1, dim=1)
            exact = (values[:, k] < values[:, k - 1]) & (values[:, k - 1] > 0)
            values, index = values[:, :k], index[:, :k]
            by_index = torch.argsort(index, dim=1)
            index, values = torch.gather(index, 1, by_index), torch.gather(values, 1, by_index)
            index = torch.gather(index, 1, torch.sort(-values, dim=1, stable=True).indices)
            out[exact.numpy()] = index[exact].numpy()
            rest = torch.nonzero(~exact)[:, 0].numpy()
        if len(rest):
            sub = g[torch.from_numpy(rest)].numpy()
            with np.errstate(invalid="ignore"):
                score = np.where(sub > 0, -sub, np.inf)
            order = np.argsort(score, axis=1, kind="stable")[:, :k]
            out[rest, :order.shape[1]] = np.where(np.isfinite(np.take_along_axis(score, order, 1)), order, -1)
        return out

    def pick(g: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        cls = largest(g)
        val = np.where(cls >= 0, np.take_along_axis(e, np.maximum(cls, 0), 1), np.nan).astype(np.float32)
        return cls, val

    t = torch.from_numpy(e)
    return (*pick(t), *pick(-t))


def dense_weight(module: nn.Module) -> torch.Tensor | None:
    """A dense layer's weight as [out, in]: an nn.Linear's own, a transformers Conv1D's (GPT-2's c_fc,
    c_proj: y = x @ W, W [in, out]) transposed; None for other modules."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return module.weight.T
    return None


def reading_linears(net: nn.Module, layers: list[str],
                    example: torch.Tensor) -> tuple[dict[str, str], dict[str, int]]:
    """({layer: the module path of the dense layer (`dense_weight`) whose input is that layer's output},
    {layer: its width, the last dim of a token output [B, T, D]}) on `example`: the layer's output and the
    dense layer's input equal (one forward for the outputs, one for the inputs); a layer that no dense layer
    reads, or not a token output, is left out."""
    dense = [name for name, m in net.named_modules() if name and dense_weight(m) is not None]
    seen: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        with Capture(net, layers, sink=lambda name, t: seen.setdefault(name, t.clone()), strict=False) as capture:
            capture(example)
        with Capture(net, dense, sink=lambda name, t: inputs.setdefault(name, t.clone()), strict=False,
                     take="input") as capture:
            capture(example)  # a second forward: the same values (eval mode), compared by value
    readers = {}
    for layer, out in seen.items():
        for name, x in inputs.items():
            if x.shape == out.shape and torch.equal(x, out):
                readers[layer] = name
                break
    return readers, {layer: int(out.shape[-1]) for layer, out in seen.items() if out.dim() == 3}


def logit_directions(net: nn.Module, layers: list[str], example: torch.Tensor, vocab: int):
    """Yields (layer, directions [D, U] float32, W_U [vocab, D] float32), one layer at a time: each unit's
    direction in the residual stream (see the module docstring), so that its logits are W_U @ directions:
    W_dec[u] for a dictionary's latent, W_read[:, u] for a unit read by a dense layer that writes the
    residual stream (an MLP neuron), the basis vector for a token layer as wide as the unembedding's input
    (the residual stream). Other layers, and a model without an nn.Linear of `vocab` outputs, yield
    nothing."""
    unembed = next((m for m in reversed(list(net.modules())) if isinstance(m, nn.Linear)
                    and m.out_features == vocab), None)
    if unembed is None:
        return
    w_u = unembed.weight.detach().float()  # [V, D]
    modules = dict(net.named_modules())
    readers, widths = reading_linears(net, layers, example)
    for layer in layers:
        reader = modules[readers[layer]] if layer in readers else None
        if reader is unembed:
            continue  # the output layer: its units are the logits
        if isinstance(modules.get(layer), SparseDictionary) and modules[layer].d_in == w_u.shape[1]:
            directions = modules[layer].W_dec.detach().T.float()  # a latent writes its decoder row
        elif reader is not None and dense_weight(reader).shape[0] == w_u.shape[1]:
            directions = dense_weight(reader).detach().float()  # [D, U]: the unit's write to the residual stream
        elif reader is None and widths.get(layer) == w_u.shape[1]:
            directions = torch.eye(w_u.shape[1], device=w_u.device)
        else:
            continue
        yield layer, directions, w_u


def top_token_logits(net: nn.Module, layers: list[str], example: torch.Tensor, vocab: int, k: int,
                     units: int | None = None):
    """Yields (layer, `top_effects` of its units' logits W_U @ directions [U, vocab]), one layer at a time
    (`logit_directions`; the first `units` units of each), by `top_products`: GPT-2's 3,072 neurons x
    50,257 tokens a layer are never held whole."""
    with torch.inference_mode():
        found = list(logit_directions(net, layers, example, vocab))
        if found:
            yield from zip([layer for layer, _, _ in found],
                           top_products((directions[:, :units].T for _, directions, _ in found), found[0][2], k))


SCREEN_CANDIDATES = 4  # top_products' candidates each way, as a multiple of k, taken from the bfloat16 screen
SCREEN_CHUNK = 256  # rows of `a` a time: [256, 50,257] float32 is 51 MB


def top_products(matrices, b: torch.Tensor, k: int):
    """Yields `top_effects(a @ b.T, k)` for each a [U, D] of `matrices` and b [V, D] (float32), without the
    [U, V] product held whole and at about a bfloat16 matmul's cost (on CPUs with AMX or AVX512-BF16, and
    GPUs, several times less than float32's), with the same picks as float32 (two values within float32's
    rounding of each other may come in either order: the rescoring sums in another order).

    Per chunk of rows: a screen s = bf16(a) @ bf16(b).T, whose error against a @ b.T is bounded per row by
    eps (the rounding residuals a - bf16(a), b - bf16(b) through Cauchy-Schwarz, the float32 accumulation,
    the bfloat16 output's rounding); the M = SCREEN_CANDIDATES * k largest and M smallest screen values are
    the candidates, rescored in float32 (`top_effects` over them, token order kept, so ties break alike).
    That pick is the float32 one wherever the k-th screen value clears the M-th by more than 2 eps each way
    (no token left out can then beat one kept); other rows, rows with a non-finite value, and a narrow b
    take the plain float32 product. b's screen is made once for all the matrices. On CUDA the screen's
    reductions are kept in float32 (cuBLAS may otherwise round partial sums to bfloat16, past the bound)."""
    cuda = torch.backends.cuda.matmul
    reduced, cuda.allow_bf16_reduced_precision_reduction = cuda.allow_bf16_reduced_precision_reduction, False
    try:
        yield from _top_products(matrices, b, k)
    finally:
        cuda.allow_bf16_reduced_precision_reduction = reduced


def _top_products(matrices, b: torch.Tensor, k: int):
    m = int(SCREEN_CANDIDATES * k)
    screen = b.shape[0] > 8 * m and bool(torch.isfinite(b).all())
    if screen:
        b_hi = b.bfloat16()
        b_hi_t = b_hi.T.contiguous()  # [D, V]: the screen's matmul reads it straight
        b_hi_norm = float(b_hi.float().norm(dim=1).max())
        b_lo_norm = float((b - b_hi.float()).norm(dim=1).max())
        accumulate = b.shape[1] * 2.0 ** -23  # float32 summation of D terms, with a factor 2 to spare
        # buffers made once: a fresh [256, 50,257] block a chunk costs as much in page faults as its matmul
        screen_out = torch.empty((SCREEN_CHUNK, b.shape[0]), dtype=torch.bfloat16, device=b.device)
        gathered = torch.empty((SCREEN_CHUNK * 2 * m, b.shape[1]), dtype=b.dtype, device=b.device)
    for a in matrices:
        parts, unsure = [], []  # unsure: rows the screen cannot call, for the plain product
        finite = screen and bool(torch.isfinite(a).all())
        for lo in range(0, a.shape[0], SCREEN_CHUNK):
            rows = a[lo:lo + SCREEN_CHUNK]
            if not finite:
                parts.append(top_effects((rows @ b.T).cpu().numpy(), k))
                continue
            a_hi = rows.bfloat16()
            a_hi_norm, a_lo_norm = a_hi.float().norm(dim=1), (rows - a_hi.float()).norm(dim=1)
            s = torch.matmul(a_hi, b_hi_t, out=screen_out[:len(rows)])
            up, up_i = s.topk(m, dim=1)
            down, down_i = s.topk(m, dim=1, largest=False)
            up, down = up.float(), down.float()
            eps = (a_hi_norm * b_lo_norm + a_lo_norm * b_hi_norm + a_lo_norm * b_lo_norm
                   + accumulate * (a_hi_norm + a_lo_norm) * (b_hi_norm + b_lo_norm)
                   + 2.0 ** -7 * torch.maximum(up[:, 0].abs(), down[:, 0].abs()))
            candidates = torch.sort(torch.cat([up_i, down_i], dim=1), dim=1).values
            sure = ((up[:, k - 1] - up[:, -1] > 2 * eps) & (down[:, -1] - down[:, k - 1] > 2 * eps)
                    & (candidates.diff(dim=1) > 0).all(dim=1))
            exact = torch.einsum("ud,umd->um", rows, torch.index_select(
                b, 0, candidates.reshape(-1), out=gathered[:candidates.numel()]).view(*candidates.shape, -1))
            picks = [np.empty((len(rows), k), dtype=dtype) for dtype in (np.int64, np.float32) * 2]
            got = top_effects(exact[sure].cpu().numpy(), k)
            ids, sure_rows = candidates[sure].cpu().numpy(), sure.cpu().numpy()
            for i, (pick, found) in enumerate(zip(picks, got)):
                pick[sure_rows] = (np.where(found >= 0, np.take_along_axis(ids, np.maximum(found, 0), 1), -1)
                                   if i % 2 == 0 else found)
            unsure.append(lo + np.flatnonzero(~sure_rows))
            parts.append(tuple(picks))
        out = (tuple(np.concatenate(column) for column in zip(*parts)) if parts else
               tuple(np.empty((0, k), dtype=dtype) for dtype in (np.int64, np.float32) * 2))
        unsure = np.concatenate(unsure) if unsure else np.zeros(0, np.int64)
        for at in range(0, len(unsure), SCREEN_CHUNK):  # together: a product of a few rows reads all of b
            rows = unsure[at:at + SCREEN_CHUNK]
            for column, found in zip(out, top_effects((a[torch.from_numpy(rows)] @ b.T).cpu().numpy(), k)):
                column[rows] = found
        yield out
