"""Hugging Face language models (`hf:PATH`, issue 31): a tiny GPT-2 built from a config with random weights and
a byte-level BPE tokenizer trained with `tokenizers` on a small corpus, both saved with save_pretrained into a
temporary folder (nothing downloaded), then an atlas built from them: its default layers are each block's
MLP activation (transformers' own activation module), its windows are the model's own tokens, its top
logits are the neurons' Conv1D output rows through the tied unembedding, and its pages escape the tokens.

Skipped without transformers (the optional extra `pip install -e '.[hf]'`, which `make test` installs);
with $ATLAS_REQUIRE_BROWSER (CI) set, a missing transformers is a failure instead.
"""

from __future__ import annotations

import os
import re
from html import unescape

import pytest

if os.environ.get("ATLAS_REQUIRE_BROWSER"):  # CI installs the extra: a missing one fails here
    __import__("transformers")
transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

from atlas_builder import text, urls  # noqa: E402
from atlas_builder.build import build  # noqa: E402
from atlas_builder.config import load_config  # noqa: E402
from atlas_builder.ids import UnitId  # noqa: E402
from atlas_builder.sources import load_dataset  # noqa: E402
from atlas_builder.store import Store  # noqa: E402
from conftest import atlas_section, write_config  # noqa: E402

CORPUS = ["def area(r):\n    return 3.14 * r * r\n", "x = 'a quoted <b>bold</b> string'\n",
          "The quick brown fox jumps over the lazy dog.\n", "for i in range(10):\n    print(i)\n"] * 30


def save_tiny_gpt2(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(fast),
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="module")
def hf_atlas(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf-atlas")
    tokenizer = save_tiny_gpt2(tmp / "gpt2")
    (tmp / "corpus.txt").write_text("".join(CORPUS), encoding="utf-8")
    cfg = load_config(write_config(tmp, atlas_section(tmp, "hf") + """
        [dataset]
        source = "text:corpus.txt"
        context = 24
        [scan]
        top_k = 4
        batch_size = 16
        [embed]
        enabled = false
        [[models]]
        name = "gpt2"
        source = "hf:gpt2"
    """))
    build(cfg, progress=False)
    return cfg, tokenizer


def test_hf_atlas_reads_the_text_with_the_models_own_tokenizer(hf_atlas):
    cfg, tokenizer = hf_atlas
    ds = load_dataset(cfg, tokenizer)
    stream = tokenizer.encode("".join(c if c.endswith("\n") else c + "\n" for c in ["".join(CORPUS)]),
                              add_special_tokens=False)
    assert ds.data.tokens[0].tolist() == stream[:24] and ds.data.tokens[1].tolist() == stream[24:48]
    with Store(cfg.store_dir) as store:
        assert [l.layer for l in store.layers("gpt2")] == ["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"]
        assert store.layers("gpt2")[0].n_units == 4 * 32
        windows, _ = store.windows()
    for example, tokens in windows.items():
        assert tokens.tolist() == ds.data.tokens[example].tolist()


def test_hf_top_logits_are_the_conv1d_rows_through_the_tied_unembedding(hf_atlas):
    cfg, tokenizer = hf_atlas
    model = transformers.AutoModelForCausalLM.from_pretrained(cfg.resolve("gpt2"), local_files_only=True)
    w = (model.lm_head.weight @ model.transformer.h[1].mlp.c_proj.weight.T).detach()  # [V, hidden]
    with Store(cfg.store_dir) as store:
        units = store.units("gpt2", "transformer.h.1.mlp.act")
    for u in units[:6]:
        assert [c for c, _ in u.effects.up] == torch.argsort(w[:, u.unit], descending=True)[:10].tolist()
        html = (cfg.atlas.site_dir / urls.unit_page(UnitId("gpt2", "transformer.h.1.mlp.act", u.unit))).read_text()
        bars = html.split('<ol class="bars effects"')[1].split("</ol>")[0]
        names = [unescape(n) for n in re.findall(r"<span[^>]*>(.*?)</span>", bars)]
        assert names == [text.visible(tokenizer.decode([c])) for c, _ in u.effects.up + u.effects.down]


def test_hf_pages_escape_the_tokens(hf_atlas):
    cfg, _ = hf_atlas
    pages = list(cfg.atlas.site_dir.glob("gpt2/*/*/index.html"))
    assert pages and not any("<b>bold</b>" in p.read_text(encoding="utf-8") for p in pages)
    assert any("&lt;b&gt;" in "".join(re.findall(r'<p class="context">(.*?)</p>', p.read_text(encoding="utf-8")))
               for p in pages)
