"""The demo's language-model atlas (issue 31, part 5), and two atlases in one site.

`builtin:byte-lm` (demo_lm.ByteTransformer trained on Python's documentation topics), `builtin:pydoc` (the
held-out topics) and the builtin TopK SAE, trained here for a few steps only (the demo trains for ~1 min):
the atlas has the MLP neurons and the SAE's latents, each unit page lists the tokens it fires on, the search
index carries them; built into a sub-folder of another atlas's site, it survives that atlas's rebuild and is
listed on its home page.
"""

from __future__ import annotations

import json
import re
import shutil
from html import unescape

import pytest
from torch import nn

from atlas_builder import demo_lm, text
from atlas_builder.build import build
from atlas_builder.config import ConfigError, load_config
from atlas_builder.errors import AtlasError
from atlas_builder.store import Store
from atlas_builder.website import MARKER
from conftest import write_config, write_tiny_config


def text_demo_config(folder, site_dir):
    return write_config(folder, f"""
        [atlas]
        name = "lm"
        data_dir = "{folder / 'data'}"
        site_dir = "{site_dir}"
        [site]
        title = "Tiny LM demo"
        input_pages = 0
        [dataset]
        source = "builtin:pydoc"
        limit = 48
        [scan]
        top_k = 6
        batch_size = 16
        sample_size = 48
        [embed]
        enabled = false
        [[models]]
        name = "byte-lm"
        source = "builtin:byte-lm"
        [[models.dictionaries]]
        builtin = "byte-lm-sae"
        """, "lm.toml")


@pytest.fixture(scope="module")
def two_atlases(tmp_path_factory):
    """A tiny image atlas in site/, the language-model demo (trained a few steps) in site/text/."""
    folder = tmp_path_factory.mktemp("demo_text")
    patch = pytest.MonkeyPatch()
    patch.setattr(demo_lm, "TRAIN_STEPS", 30)
    patch.setattr(demo_lm, "SAE_STEPS", 30)
    try:
        outer = load_config(write_tiny_config(folder))
        lm = load_config(text_demo_config(folder, outer.atlas.site_dir / "text"))
        build(lm, progress=False)
        build(outer, progress=False)
    finally:
        patch.undo()
    return folder, outer, lm


def test_pydoc_split_holds_out_every_tenth_topic():
    test, train = demo_lm.pydoc_documents("test"), demo_lm.pydoc_documents("train")
    names = sorted(name for name, _ in test + train)
    assert [name for name, _ in test] == names[::demo_lm.HOLDOUT]
    assert not {n for n, _ in test} & {n for n, _ in train} and len(test) * demo_lm.HOLDOUT >= len(names)


def test_demo_lm_atlas_has_neurons_and_sae_latents_in_saelens_format(two_atlases):
    folder, _, lm = two_atlases
    with Store(lm.store_dir) as store:
        layers = {layer.layer: layer.n_units for layer in store.layers("byte-lm")}
        info = store.models()[0].info
    assert layers == {"blocks.0.mlp.act": 256, "blocks.1.mlp.act": 256, f"{demo_lm.SAE_HOOK}.sae": demo_lm.SAE_LATENTS}
    assert info["steps"] == 30 and info["held_out_bits_per_byte"] > 0
    saved = list((folder / "data" / "models").glob("byte-lm-sae-*/cfg.json"))
    assert len(saved) == 1
    cfg = json.loads(saved[0].read_text())
    assert (cfg["architecture"], cfg["activation_fn_kwargs"]["k"], cfg["hook_name"]) == ("topk", demo_lm.SAE_K,
                                                                                         demo_lm.SAE_HOOK)


def test_text_unit_page_lists_the_tokens_it_fires_on(two_atlases):
    _, _, lm = two_atlases
    with Store(lm.store_dir) as store:
        peaks = store.peak_tokens()
        vocab = store.windows()[1]
    page = (lm.atlas.site_dir / "byte-lm" / "blocks.1.mlp.sae" / "3" / "index.html").read_text()
    tokens = peaks[("byte-lm", "blocks.1.mlp.sae", 3)]
    assert len(tokens) == 6
    best = max(dict.fromkeys(tokens), key=tokens.count)
    listed = re.search(r'<ul class="tokens">(.*?)</ul>', page, re.S).group(1)
    first = re.search(r"<code>(.*?)</code> <span class=\"muted\">×(\d+)</span>", listed)
    assert unescape(first.group(1)) == text.visible(vocab[best]) and int(first.group(2)) == tokens.count(best)
    assert "Mean activation per class" not in page
    # a TopK latent is silent on most windows: those range rows point at no token, the others at their peak
    rows = re.findall(r"<li><span class=\"value\">([^<]*)</span>(.*?)</li>",
                      page.split('id="ranges"')[1].split("Cite this unit")[0], re.S)
    silent = [body for value, body in rows if value == "0"]
    assert silent and all("<mark" not in body for body in silent)
    assert all(body.count("<mark") == 1 for value, body in rows if value != "0")


def test_search_index_carries_each_text_units_tokens(two_atlases):
    _, _, lm = two_atlases
    index_js = next((lm.atlas.site_dir / "static").glob("search-index.*.js")).read_text()
    data = json.loads(index_js.split(" = ", 1)[1].rstrip(";\n"))
    runs = {run[1]: run for run in data["layers"]}
    assert set(runs) == {"blocks.0.mlp.act", "blocks.1.mlp.act", "blocks.1.mlp.sae"}
    with Store(lm.store_dir) as store:
        peaks = store.peak_tokens()
        vocab = store.windows()[1]
    tokens = peaks[("byte-lm", "blocks.0.mlp.act", 5)]
    want = [text.visible(vocab[t]) for t in sorted(set(tokens), key=lambda t: (-tokens.count(t), tokens.index(t)))]
    assert data["tokens"][runs["blocks.0.mlp.act"][8][5]] == " ".join(want[:3])


def test_the_outer_atlas_lists_the_nested_one_and_keeps_it_on_rebuild(two_atlases):
    folder, outer, lm = two_atlases
    site = outer.atlas.site_dir
    home = (site / "index.html").read_text()
    assert '<a href="text/index.html">Tiny LM demo</a>' in home
    before = (site / "text" / "index.html").stat().st_ino
    build(outer, progress=False)  # the nested site is carried over (hard links: the same files)
    assert (site / "text" / MARKER).is_file() and (site / "text" / "index.html").stat().st_ino == before
    assert '<a href="text/index.html">' in (site / "index.html").read_text()


def test_a_nested_site_in_the_way_of_the_outer_atlas_stops_the_build(tmp_path):
    site = tmp_path / "site"
    (site / "tiny-mlp").mkdir(parents=True)  # another atlas's site where a model's folder goes
    (site / "tiny-mlp" / MARKER).write_text("title: other\n")
    (site / "tiny-mlp" / "index.html").write_text("kept")
    cfg = load_config(write_tiny_config(tmp_path))
    with pytest.raises(AtlasError, match="holds another atlas's site"):
        build(cfg, progress=False)
    assert (site / "tiny-mlp" / "index.html").read_text() == "kept"
    shutil.rmtree(site)


@pytest.mark.parametrize("table,match", [('builtin = "byte-lm-sae"\npath = "."', "not both"),
                                         ('name = "sae"', "needs path")])
def test_a_dictionary_needs_a_path_or_builtin_but_not_both(tmp_path, table, match):
    path = write_config(tmp_path, f"""
        [dataset]
        source = "builtin:pydoc"
        [[models]]
        name = "lm"
        source = "builtin:byte-lm"
        [[models.dictionaries]]
        {table}
        """)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_builtin_dictionary_needs_the_builtin_model(tmp_path):
    with pytest.raises(AtlasError, match="trained on builtin:byte-lm"):
        demo_lm.builtin_dictionary("byte-lm-sae", nn.Linear(64, 64), tmp_path, 0)
    with pytest.raises(AtlasError, match="unknown builtin dictionary"):
        demo_lm.builtin_dictionary("other", demo_lm.byte_lm(), tmp_path, 0)
