"""Dictionary latents (issue 31): sparse autoencoders in SAELens's saved format (cfg.json and
sae_weights.safetensors, written here with seeded weights), attached to the tiny byte transformer at its
first block's output (the residual stream, width 32): each latent is a unit. Checked against a direct
computation: the latents of ReLU, JumpReLU and TopK dictionaries, each latent's top activation over the
dataset, its top logits (W_U @ W_dec[i]); and the bad input: a d_in that is not the hook point's width, a
hook point the model lacks, a folder without the files.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fixtures_models
from atlas_builder import dictionaries
from atlas_builder.build import build
from atlas_builder.config import load_config
from atlas_builder.errors import AtlasError
from atlas_builder.sources import load_dataset
from atlas_builder.store import Store
from conftest import atlas_section, write_config

D_IN, D_SAE = 32, 48


def save_sae(folder, architecture="standard", d_in=D_IN, hook="blocks.0", k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = {"W_enc": torch.randn(d_in, D_SAE, generator=g) / d_in ** 0.5, "b_enc": torch.randn(D_SAE, generator=g) * 0.1,
               "W_dec": torch.randn(D_SAE, d_in, generator=g) / D_SAE ** 0.5, "b_dec": torch.randn(d_in, generator=g) * 0.1}
    if architecture == "jumprelu":
        weights["threshold"] = torch.rand(D_SAE, generator=g) * 0.3
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "sae_weights.safetensors"))
    cfg = {"d_in": d_in, "d_sae": D_SAE, "architecture": architecture, "hook_name": hook,
           "apply_b_dec_to_input": True}
    if architecture == "topk":
        cfg["activation_fn_kwargs"] = {"k": k}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return weights


def latents(weights, x, architecture, k=4):
    """The brute-force encoder, one latent at a time in numpy (float64)."""
    w = {n: t.double().numpy() for n, t in weights.items()}
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if architecture == "jumprelu":
        return np.where(pre > w["threshold"], pre, 0.0)
    if architecture == "topk":
        out = np.zeros_like(pre)
        for idx in np.ndindex(pre.shape[:-1]):
            best = np.argsort(-pre[idx], kind="stable")[:k]
            out[idx][best] = np.maximum(pre[idx][best], 0)
        return out
    return np.maximum(pre, 0)


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_dictionary_latents_match_a_direct_computation(tmp_path, architecture):
    weights = save_sae(tmp_path / "sae", architecture)
    net = fixtures_models.tiny_lm()
    layer = dictionaries.attach(net, tmp_path / "sae", "sae", "", "test")
    assert layer == "blocks.0.sae"
    seen = {}
    handle = net.blocks[0].register_forward_hook(lambda m, a, out: seen.__setitem__("x", out.detach()))
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(1))
    before = fixtures_models.tiny_lm()(ids)
    with torch.no_grad():
        after = net(ids)
        got = net.blocks[0].sae(seen["x"])
    handle.remove()
    torch.testing.assert_close(after, before)  # attached, the model's outputs are the same
    np.testing.assert_allclose(got.numpy(), latents(weights, seen["x"].double().numpy(), architecture),
                               rtol=1e-4, atol=1e-5)
    assert (got > 0).sum(-1).max() <= (4 if architecture == "topk" else D_SAE)


@pytest.fixture(scope="module")
def sae_atlas(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sae-atlas")
    weights = save_sae(tmp / "sae", "topk")
    (tmp / "corpus.txt").write_text(("def f(x):\n    return x * 2\n" "print('hello <world>')\n") * 30)
    cfg = load_config(write_config(tmp, atlas_section(tmp, "sae") + """
        [dataset]
        source = "text:corpus.txt"
        context = 32
        [scan]
        top_k = 3
        batch_size = 8
        [embed]
        enabled = false
        [[models]]
        name = "lm"
        source = "fixtures_models:tiny_lm"
        [[models.dictionaries]]
        path = "sae"
    """))
    build(cfg, progress=False)
    return cfg, weights


def test_sae_atlas_has_a_unit_per_latent_with_its_top_activation_and_logits(sae_atlas):
    cfg, weights = sae_atlas
    ds = load_dataset(cfg)
    net = fixtures_models.tiny_lm()
    seen = []
    net.blocks[0].register_forward_hook(lambda m, a, out: seen.append(out.detach().double().numpy()))
    with torch.no_grad():
        net(torch.from_numpy(ds.data.tokens))
    acts = latents(weights, seen[0], "topk")  # [N, T, d_sae]
    best = acts.max(1)  # each window's value: the max over its tokens
    with Store(cfg.store_dir) as store:
        assert [l.layer for l in store.layers("lm")] == ["blocks.0.mlp.act", "blocks.0.sae", "blocks.1.mlp.act"]
        units = store.units("lm", "blocks.0.sae")
    assert len(units) == D_SAE
    w_u = net.unembed.weight.detach().double().numpy()
    for u in units:
        if best[:, u.unit].max() <= 0:
            assert u.top[0].value == pytest.approx(0.0, abs=1e-6) or u.dead
            continue
        assert u.top[0].value == pytest.approx(best[:, u.unit].max(), rel=1e-4)
        assert best[u.top[0].example, u.unit] == pytest.approx(u.top[0].value, rel=1e-4)
        logits = w_u @ weights["W_dec"][u.unit].double().numpy()
        assert [c for c, _ in u.effects.up] == np.argsort(-logits, kind="stable")[:10].tolist()


def test_bad_dictionaries_say_what_to_change(tmp_path):
    net = fixtures_models.tiny_lm()
    save_sae(tmp_path / "wide", d_in=64, hook="blocks.0")
    dictionaries.attach(net, tmp_path / "wide", "sae", "", "models[lm].dictionaries[0]")
    with pytest.raises(AtlasError, match=r"dictionaries\[0\] has d_in = 64 but its hook point's output is \(5, 32\)"):
        net(torch.zeros(1, 5, dtype=torch.long))
    save_sae(tmp_path / "lost", hook="blocks.9.mlp")
    with pytest.raises(AtlasError, match="hook point 'blocks.9.mlp' is not a module of the model; set hook"):
        dictionaries.attach(fixtures_models.tiny_lm(), tmp_path / "lost", "sae", "", "d")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AtlasError, match="cfg.json' does not exist"):
        dictionaries.attach(fixtures_models.tiny_lm(), tmp_path / "empty", "sae", "", "d")
