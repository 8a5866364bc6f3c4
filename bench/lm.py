"""Language-model scan against a bare forward pass, and its memory against the token count (issue 31).

Measured side by side in one run (bench/scan.py's `side_by_side`: a warm-up of each, then interleaved runs,
medians), same model, same batches:
- GPT-2 small's architecture (transformers `GPT2Config()`, random weights, 124M parameters) over 64 windows
  of 128 random tokens, batch 16, probing all 12 MLP activations (36,864 neurons): the scan is the build's
  scan stage, `scan_part` + `finish_scan` (hooks, every accumulator, the summary, the token labels);
  FIGURE lm_scan_vs_forward = bare seconds / scan seconds (1.0 = free);
- an SAE of 16,384 latents (TopK, k = 32, seeded random weights) on block 6's output (the residual stream),
  the scan probing its latents alone, against a bare forward plus the encoder's matmul on that output:
  FIGURE sae_scan_vs_forward_encode;
- peak RSS of a scan of N and 4N windows (a small GPT-2, 4 layers of 256, in fresh processes):
  FIGURE lm_rss_4n_over_n = (peak above the RSS before the scan at 4N) / (the same at N).
The top logits (W_U @ W_out for 3,072 neurons a layer, a 50,257-token vocabulary, screened in bfloat16 and
rescored in float32: explain.top_products) are a stage of their own (`logits:<model>`, from the weights alone:
the same for any number of windows, and not redone when the dataset changes); their seconds are printed apart,
with one layer's plain float32 product for comparison, and the ratio of both stages together (scan + top logits,
what a first build of these 64 windows spends) for information.

Needs transformers (`pip install -e '.[hf]'`). Run: .venv/bin/python bench/lm.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from scan import memory_kb, side_by_side  # noqa: E402  (bench/scan.py)

from atlas_builder import dictionaries  # noqa: E402
from atlas_builder.config import ModelSection, ScanSection  # noqa: E402
from atlas_builder.explain import logit_directions, top_effects, top_token_logits  # noqa: E402
from atlas_builder.hooks import mlp_activations  # noqa: E402
from atlas_builder.scan import TOP_LOGITS, finish_scan, scan_part  # noqa: E402
from atlas_builder.sources import AtlasDataset, LoadedModel, logits_only  # noqa: E402
from atlas_builder.text import TextWindows  # noqa: E402


class IdTokenizer:
    """Token ids shown as themselves (the bench's tokens are random ids: there is no text)."""

    def __init__(self, vocab: int):
        self.vocab_size = vocab

    def encode(self, text):
        return []

    def decode(self, ids):
        return "".join(f"<{int(i)}>" for i in ids)


def gpt2(**config) -> LoadedModel:
    import transformers

    torch.manual_seed(0)
    module = logits_only(transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval())
    return LoadedModel(ModelSection("gpt2", "hf:bench"), module, "bench", {})


def windows(n: int, context: int, vocab: int) -> AtlasDataset:
    tokens = torch.randint(0, vocab, (n, context), generator=torch.Generator().manual_seed(1)).numpy()
    return AtlasDataset(TextWindows(tokens.astype(np.int64)), (), (), (), "bench", "bench", IdTokenizer(vocab))


def sae_at(model: LoadedModel, hook: str, d_in: int, d_sae: int, k: int, folder: Path) -> str:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(2)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"W_enc": torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5, "b_enc": torch.zeros(d_sae),
               "W_dec": torch.randn(d_sae, d_in, generator=g) / d_sae ** 0.5, "b_dec": torch.zeros(d_in)},
              str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": d_in, "d_sae": d_sae, "architecture": "topk",
                                                 "activation_fn_kwargs": {"k": k}, "hook_name": hook}))
    return dictionaries.attach(model.module, folder, "sae", "", "bench")


def rss_child(n: int) -> None:
    torch.set_num_threads(1)
    model = gpt2(n_layer=4, n_embd=256, n_head=4, n_positions=128)
    data = windows(n, 128, 50257)
    layers = mlp_activations(model.module)
    before = memory_kb()["VmRSS"]
    cfg = ScanSection(batch_size=8, sample_size=64)
    finish_scan(model, data, layers, cfg, scan_part(model, data, layers, cfg, torch.device("cpu"), progress=False),
                torch.device("cpu"))
    print(json.dumps({"n": n, "peak_kb": memory_kb()["VmHWM"], "before_kb": before}))


def peak_rss(n: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(n)], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="1 run each (default 3)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--rss-child", type=int)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return
    device, repeats = torch.device(args.device), 1 if args.quick else 3
    cfg = ScanSection(batch_size=16)

    model = gpt2()
    data = windows(args.windows, 128, 50257)
    layers = mlp_activations(model.module)
    example = data.inputs([0]).to(device)
    start = time.perf_counter()
    for _ in top_token_logits(model.module.to(device), layers, example, 50257, TOP_LOGITS):
        pass
    screened = time.perf_counter() - start  # as the logits stage runs them (scan.token_logits)
    layer, directions, w_u = next(logit_directions(model.module, layers[:1], example, 50257))
    start = time.perf_counter()
    top_effects((directions.T @ w_u.T).cpu().numpy(), TOP_LOGITS)  # the plain float32 product, one layer
    plain = time.perf_counter() - start
    model.module.cpu()
    print(f"top logits of {len(layers)} layers' neurons (their own stage; the same for any number of "
          f"windows): {screened:.1f} s (bfloat16 screen, float32 rescoring); one layer's plain float32 product "
          f"and pick {plain:.1f} s, x {len(layers)} = {plain * len(layers):.1f} s", flush=True)
    seconds: list[float] = []
    lm = side_by_side(f"GPT-2 small (random weights), {args.windows} windows of 128 tokens", model, data, cfg,
                      repeats, layers, device, seconds)
    bare, scan = seconds
    print(f"with the top logits' stage (information: a fixed cost, the same at any token count): bare forward "
          f"{bare:.3f} s, scan + top logits {scan + screened:.3f} s, ratio {bare / (scan + screened):.3f}")

    with __import__("tempfile").TemporaryDirectory() as tmp:
        latents = sae_at(model, "transformer.h.6", 768, 16384, 32, Path(tmp) / "sae")
        # the baseline: a bare forward with the encoder's matmul on block 6's output (the hook stays: it is
        # that matmul); the scan probes the latents alone
        sae = side_by_side("GPT-2 small + SAE of 16,384 latents on transformer.h.6, against forward + encode",
                           model, data, cfg, repeats, [latents], device)

    n = 32 if args.quick else 64
    small, big = peak_rss(n), peak_rss(4 * n)
    rise = [(r["peak_kb"] - r["before_kb"]) / 1024 for r in (small, big)]
    print(f"peak RSS above the RSS before the scan (small GPT-2, 4 x 256, all MLP neurons): {n} windows "
          f"{rise[0]:.1f} MiB, {4 * n} windows {rise[1]:.1f} MiB")
    print(f"FIGURE lm_scan_vs_forward {lm:.3f}")
    print(f"FIGURE sae_scan_vs_forward_encode {sae:.3f}")
    print(f"FIGURE lm_rss_4n_over_n {rise[1] / rise[0]:.3f}")


if __name__ == "__main__":
    main()
