"""Dictionaries: sparse autoencoders (and transcoders' encoders) read from SAELens's saved format and attached
to a model, so that each latent is a unit of the atlas.

A dictionary folder holds `cfg.json` (d_in, d_sae, the hook point, the activation: `architecture` "standard",
"jumprelu" or "topk", or `activation_fn_str` "relu"/"topk" with `activation_fn_kwargs.k`; and
`apply_b_dec_to_input`) and `sae_weights.safetensors` (W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in],
b_dec [d_in]; `threshold` [d_sae] for JumpReLU). `attach` makes it a child module of the module whose output it
encodes (`<hook>.<name>`, e.g. `blocks.0.mlp.sae`), run on that output by a forward hook: the model's own
outputs do not change, and the scan probes the latents as it probes any layer.

Latents: f = act((x - b_dec·[apply_b_dec_to_input]) @ W_enc + b_enc), act = ReLU; JumpReLU: pre where
pre > threshold, else 0; TopK: the k largest of ReLU(pre), the rest 0. Each latent writes W_dec[i] to the
residual stream (its top logits, `explain.token_logits`).

This module reads the dictionary files; it runs no scan and writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .errors import AtlasError
from .hooks import run_after

ARCHITECTURES = ("standard", "relu", "jumprelu", "topk")


class SparseDictionary(nn.Module):
    """[..., d_in] -> [..., d_sae] latents (see the module docstring)."""

    def __init__(self, weights: dict[str, torch.Tensor], architecture: str, k: int = 0,
                 subtract_b_dec: bool = True, where: str = "dictionary"):
        super().__init__()
        self.architecture, self.k, self.subtract_b_dec, self.where = architecture, k, subtract_b_dec, where
        for name in ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if architecture == "jumprelu" else ()):
            self.register_buffer(name, weights[name].float())
        self.d_in, self.d_sae = self.W_enc.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_in:
            raise AtlasError(f"{self.where} has d_in = {self.d_in} but its hook point's output is "
                             f"{tuple(x.shape[1:])} (width {x.shape[-1]}); attach it where the width is {self.d_in}")
        pre = ((x.float() - self.b_dec) if self.subtract_b_dec else x.float()) @ self.W_enc + self.b_enc
        if self.architecture == "jumprelu":
            return pre * (pre > self.threshold)
        if self.architecture == "topk":
            values, index = torch.topk(pre, min(self.k, self.d_sae), dim=-1)
            return torch.zeros_like(pre).scatter(-1, index, torch.relu(values))
        return torch.relu(pre)


def load(folder: Path, where: str) -> tuple[SparseDictionary, str]:
    """(the dictionary in `folder`, the hook point its cfg.json names or "")."""
    cfg_path, weights_path = folder / "cfg.json", folder / "sae_weights.safetensors"
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise AtlasError(f"{where}: {str(path)!r} does not exist; a dictionary folder holds cfg.json and "
                             f"sae_weights.safetensors (SAELens's saved format)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AtlasError(f"{where}: {str(cfg_path)!r} is not JSON ({exc}); save it with SAELens") from None
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise AtlasError(f"{where}: reading sae_weights.safetensors needs the safetensors package: "
                         f"pip install safetensors") from None
    try:
        weights = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types
        raise AtlasError(f"{where}: {str(weights_path)!r} cannot be read as safetensors ({exc})") from None
    metadata = cfg.get("metadata") or {}
    architecture = str(cfg.get("architecture") or cfg.get("activation_fn_str") or "standard").lower()
    if architecture not in ARCHITECTURES:
        raise AtlasError(f"{where}: architecture {architecture!r} is not supported; use one of "
                         f"{', '.join(ARCHITECTURES)} (ReLU, JumpReLU, TopK)")
    k = int(cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k") or 0)
    if architecture == "topk" and k < 1:
        raise AtlasError(f"{where}: a TopK dictionary needs k (cfg.json's activation_fn_kwargs.k)")
    if architecture == "jumprelu" and "threshold" not in weights and "log_threshold" in weights:
        weights["threshold"] = weights["log_threshold"].exp()
    need = ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if architecture == "jumprelu" else ())
    missing = [n for n in need if n not in weights]
    if missing:
        raise AtlasError(f"{where}: sae_weights.safetensors lacks {', '.join(missing)}")
    d_in, d_sae = weights["W_enc"].shape
    if tuple(weights["W_dec"].shape) != (d_sae, d_in) or cfg.get("d_in", d_in) != d_in:
        raise AtlasError(f"{where}: W_enc is {tuple(weights['W_enc'].shape)} but W_dec is "
                         f"{tuple(weights['W_dec'].shape)} and d_in {cfg.get('d_in')}; the files do not agree")
    hook = str(cfg.get("hook_name") or metadata.get("hook_name") or "")
    return SparseDictionary(weights, architecture, k, bool(cfg.get("apply_b_dec_to_input", True)), where), hook


def attach(model: nn.Module, folder: Path, name: str, hook: str, where: str) -> str:
    """Load the dictionary in `folder` and attach it at module path `hook` (or its cfg.json's hook_name) as
    child `name`; returns the latents' layer name, `<hook>.<name>`."""
    dictionary, cfg_hook = load(folder, where)
    hook = hook or cfg_hook
    modules = dict(model.named_modules())
    if hook not in modules or not hook:
        close = [n for n in modules if n][:12]
        raise AtlasError(f"{where}: hook point {hook!r} is not a module of the model; set hook = one of its "
                         f"module paths ({', '.join(close)}, ...; `atlas layers CONFIG` lists them all)")
    parent = modules[hook]
    if hasattr(parent, name):
        raise AtlasError(f"{where}: module {hook!r} already has a child {name!r}; give the dictionary another name")
    parent.add_module(name, dictionary)
    run_after(parent, lambda output: (dictionary(output), None)[1])
    return f"{hook}.{name}"
