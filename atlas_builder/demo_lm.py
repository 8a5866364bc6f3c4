"""The demo's language model (`builtin:byte-lm`), its text (`builtin:pydoc`) and its SAE (`builtin =
"byte-lm-sae"` in [[models.dictionaries]]), all made by the build, offline.

- ByteTransformer: a small byte-level transformer in plain torch. Tokens are UTF-8 bytes (text.ByteTokenizer:
  256 of them); each block is pre-norm causal self-attention and an MLP whose hidden activation is its own
  module (`blocks.N.mlp.act`, the layer the atlas probes by default: one unit per MLP neuron); the output is
  [B, T, 256] next-byte logits through `unembed`. `context` is the longest window it reads.
- The text: Python's own documentation topics (`pydoc_data.topics`, ~0.46 MB, shipped with Python), split by
  topic: every HOLDOUT-th topic (in sorted order) is held out, the atlas's dataset; the rest train the model.
- Training: AdamW on random windows of the train split, a seeded order, on one thread (the weights must not
  depend on the cores), TRAIN_STEPS steps (~1 min); the SAE: TopK (SAE_K of SAE_LATENTS), trained on the
  second block's MLP output over the train split (~10 s), saved in SAELens's format so that it is read back
  by `dictionaries` as any user's SAE is. Both are cached under `<data_dir>/models/` like the digits models.

This module reads no files but its caches; the atlas's stages never call it beyond loading.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import atomic, demo_models
from .errors import AtlasError

HOLDOUT = 10  # every 10th documentation topic (sorted by name) is the atlas's text, the others train the model
CONTEXT = 64  # bytes the model reads (its position embedding's size; the dataset's windows)
TRAIN_STEPS = 2000  # AdamW steps of 32 windows: ~1 min on one core, ~2 bits a byte on the held-out topics
TRAIN_BATCH = 32
SAE_HOOK = "blocks.1.mlp"  # the SAE reads the second block's MLP output (the residual stream's 64 dims it writes)
SAE_LATENTS = 256  # 4x its width
SAE_K = 8  # latents active per token
SAE_STEPS = 1500  # Adam steps of 1,024 tokens
TRAIN_VERSION = 1  # bump when the architecture, the text split or a recipe changes (invalidates caches)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.act = nn.GELU()  # its output: the MLP's neurons
        self.down = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(width), CausalSelfAttention(width, heads)
        self.ln2, self.mlp = nn.LayerNorm(width), MLP(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ByteTransformer(nn.Module):
    """[B, T] byte ids -> [B, T, 256] logits of the next byte."""

    def __init__(self, context: int = 64, width: int = 64, layers: int = 2, heads: int = 4, hidden: int = 256):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(256, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.ModuleList([Block(width, heads, hidden) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(width)
        self.unembed = nn.Linear(width, 256, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_f(x))


def pydoc_documents(split: str) -> list[tuple[str, str]]:
    """[(topic, text)] of Python's documentation topics, the held-out ("test") or training ("train") split."""
    from pydoc_data.topics import topics

    if split not in ("train", "test"):
        raise ValueError(split)
    names = sorted(topics)
    return [(name, topics[name]) for i, name in enumerate(names) if (i % HOLDOUT == 0) == (split == "test")]


def byte_lm() -> ByteTransformer:
    return ByteTransformer(context=CONTEXT, width=64, layers=2, heads=4, hidden=256)


def split_bytes(split: str) -> torch.Tensor:
    """A split's topics as one stream of bytes, each ending in a newline (as text.tokenize joins documents)."""
    joined = "".join(t if t.endswith("\n") else t + "\n" for _, t in pydoc_documents(split))
    return torch.tensor(list(joined.encode("utf-8")), dtype=torch.long)


def load_builtin(name: str, data_dir: Path, seed: int) -> tuple[nn.Module, dict]:
    """The trained `byte-lm` and its training record, trained (and cached) if not yet."""
    if name != "byte-lm":
        raise AtlasError(f"unknown builtin language model {name!r}; the builtin language model is 'byte-lm'")
    return demo_models.cached_training(byte_lm(), name, f"{name}|{seed}|{TRAIN_STEPS}|{TRAIN_VERSION}", data_dir,
                                       lambda model: train_lm(model, seed))


def train_lm(model: ByteTransformer, seed: int) -> dict:
    """AdamW with a cosine schedule on seeded random windows of the train split; the record holds the held-out
    loss in bits per byte (no timing: two builds must give the same bytes)."""
    stream = split_bytes("train")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=TRAIN_STEPS, pct_start=0.05)
    model.train()
    for _ in range(TRAIN_STEPS):
        starts = torch.randint(0, len(stream) - CONTEXT - 1, (TRAIN_BATCH,), generator=gen)
        x = torch.stack([stream[s:s + CONTEXT + 1] for s in starts.tolist()])
        loss = nn.functional.cross_entropy(model(x[:, :-1]).reshape(-1, 256), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    model.eval()
    held_out = split_bytes("test")
    ids = held_out[:(len(held_out) - 1) // CONTEXT * CONTEXT + 1]
    with torch.inference_mode():
        x, y = ids[:-1].view(-1, CONTEXT), ids[1:].view(-1, CONTEXT)
        bits = nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1)).item() / np.log(2)
    return {"held_out_bits_per_byte": round(bits, 4), "steps": TRAIN_STEPS, "seed": seed,
            "train_bytes": len(stream), "text": "pydoc_data.topics"}


def builtin_dictionary(name: str, model: nn.Module, data_dir: Path, seed: int) -> Path:
    """The folder (SAELens's format) of the demo's SAE `name` on `model` (the trained byte-lm), trained and
    written there if not yet. Keyed by the model's weights, so a retrained model gets a new SAE."""
    if name != "byte-lm-sae":
        raise AtlasError(f"unknown builtin dictionary {name!r}; the builtin dictionary is 'byte-lm-sae' (on "
                         f"model source builtin:byte-lm)")
    if not isinstance(model, ByteTransformer):
        raise AtlasError(f"builtin dictionary {name!r} is trained on builtin:byte-lm's MLP output; give it that "
                         f"model, or path = \"FOLDER\" of an SAE of your own")
    h = hashlib.sha1(f"{name}|{seed}|{SAE_LATENTS}|{SAE_K}|{SAE_STEPS}|{TRAIN_VERSION}".encode())
    for tensor in model.state_dict().values():
        h.update(tensor.numpy().tobytes())
    folder = Path(data_dir) / "models" / f"{name}-{h.hexdigest()[:12]}"
    if (folder / "cfg.json").is_file() and (folder / "sae_weights.safetensors").is_file():
        return folder
    weights, record = demo_models.one_thread(train_sae, model, seed)
    from safetensors.torch import save

    cfg = {"architecture": "topk", "d_in": weights["W_enc"].shape[0], "d_sae": SAE_LATENTS, "hook_name": SAE_HOOK,
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": SAE_K}, "apply_b_dec_to_input": True,
           "training": record}
    blob = save({k: v.contiguous() for k, v in weights.items()})
    atomic.write_with(folder / "sae_weights.safetensors", lambda f: f.write(blob))
    atomic.write_text(folder / "cfg.json", json.dumps(cfg, indent=1, sort_keys=True))  # last: marks it complete
    return folder


def train_sae(model: ByteTransformer, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """A TopK SAE on SAE_HOOK's output over the train split: Adam on MSE, decoder rows kept at unit norm,
    b_dec started at the activations' mean. Returns its weights (SAELens's names) and a record (the fraction of
    variance it explains on the held-out topics)."""
    from .dictionaries import SparseDictionary
    from .hooks import Capture

    def activations(stream: torch.Tensor) -> torch.Tensor:
        ids = stream[:len(stream) // CONTEXT * CONTEXT].view(-1, CONTEXT)
        outs = []
        with Capture(model, [SAE_HOOK], stop=True) as capture, torch.inference_mode():
            for i in range(0, len(ids), 256):
                capture(ids[i:i + 256])
                outs.append(capture.outputs[SAE_HOOK].flatten(0, 1))
        return torch.cat(outs)

    x = activations(split_bytes("train"))
    gen = torch.Generator().manual_seed(seed)
    d_in = x.shape[1]
    W_dec = torch.randn(SAE_LATENTS, d_in, generator=gen)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    params = {"W_enc": W_dec.T.clone(), "b_enc": torch.zeros(SAE_LATENTS), "W_dec": W_dec, "b_dec": x.mean(0)}
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=2e-3)
    for _ in range(SAE_STEPS):
        batch = x[torch.randint(0, len(x), (1024,), generator=gen)]
        pre = (batch - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
        values, index = torch.topk(pre, SAE_K, dim=-1)
        latents = torch.zeros_like(pre).scatter(-1, index, torch.relu(values))
        loss = ((latents @ params["W_dec"] + params["b_dec"] - batch) ** 2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            params["W_dec"] /= params["W_dec"].norm(dim=1, keepdim=True)
    weights = {k: v.detach().clone() for k, v in params.items()}
    sae = SparseDictionary(weights, "topk", SAE_K)
    y = activations(split_bytes("test"))
    with torch.no_grad():
        recon = sae(y) @ weights["W_dec"] + weights["b_dec"]
        explained = 1 - ((recon - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    return weights, {"explained_variance_held_out": round(float(explained), 4), "steps": SAE_STEPS, "seed": seed}
