"""Text datasets and language models (issue 31, first part): `text:PATH` read, tokenized and cut into
windows; a language model from an import path (with or without its own tokenizer); an atlas of its MLP
neurons whose unit pages show each example as its tokens, shaded by the unit's activation, with the token
of its value marked, and every token escaped.

The corpus is written by the test (a few kinds of line, one holding markup); the model is
fixtures_models.tiny_lm, a seeded untrained 2-block byte transformer (context 32).
"""

from __future__ import annotations

import json
import re
from html import unescape

import numpy as np
import pytest

from atlas_builder import text, urls
from atlas_builder.website import parts
from atlas_builder.build import build
from atlas_builder.config import load_config
from atlas_builder.errors import AtlasError
from atlas_builder.ids import UnitId
from atlas_builder.sources import load_dataset
from atlas_builder.store import Store
from conftest import atlas_section, write_config

LINES = ["def area(r):\n    return 3.14 * r * r\n", "x = 'a quoted <script>alert(1)</script> string'\n",
         "The quick brown fox jumps over the lazy dog.\n", "for i in range(10):\n\tprint(i)\n"]


def corpus(n: int = 40, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return "".join(LINES[i] for i in rng.integers(0, len(LINES), n))


# --- reading and windows -----------------------------------------------------------------------

def test_byte_tokenizer_round_trip_and_visible_whitespace():
    tok = text.ByteTokenizer()
    s = "def f(x):\n\treturn 'ü'"
    ids = tok.encode(s)
    assert ids == list(s.encode("utf-8")) and tok.decode(ids) == s and text.vocab_size(tok) == 256
    assert text.visible(" a\n\tb") == "·a↵→b" and text.visible("") == "∅"
    assert text.token_text(tok, 0xC3) == "\\xc3"  # half a character shows as its byte


@pytest.mark.parametrize("context,stride,n", [(8, 8, 50), (8, 3, 50), (5, 7, 23), (8, 8, 8), (8, 8, 7)])
def test_windows_match_a_brute_force_cut(context, stride, n):
    ids = np.arange(n) * 3
    got = text.windows(ids, context, stride)
    want = [ids[s:s + context] for s in range(0, n, stride) if s + context <= n]
    assert got.shape == (len(want), context) and all((g == w).all() for g, w in zip(got, want))


def test_text_sources_txt_jsonl_and_folder(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "docs" / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n', encoding="utf-8")
    assert text.read_documents(tmp_path / "docs") == [("a.jsonl:1", "one"), ("a.jsonl:3", "two"), ("b.txt", "second")]
    (tmp_path / "bad.txt").write_bytes(b"ok \xff")
    with pytest.raises(AtlasError, match=r"bad.txt' is not UTF-8 \(byte 3"):
        text.read_documents(tmp_path / "bad.txt")
    (tmp_path / "bad.jsonl").write_text("{not json\n", encoding="utf-8")
    with pytest.raises(AtlasError, match="line 1 is not JSON"):
        text.read_documents(tmp_path / "bad.jsonl")


def test_text_dataset_windows_are_the_tokenized_documents(tmp_path):
    (tmp_path / "corpus.txt").write_text(corpus(), encoding="utf-8")
    cfg = load_config(write_config(tmp_path, atlas_section(tmp_path, "t") + '[dataset]\nsource = "text:corpus.txt"\n'
                                   'context = 16\nstride = 8\n[[models]]\nname = "lm"\n'
                                   'source = "fixtures_models:tiny_lm"\n'))
    ds = load_dataset(cfg)
    stream = np.frombuffer((corpus()).encode("utf-8"), dtype=np.uint8).astype(np.int64)
    assert ds.is_text and ds.class_names == () and len(ds) == (len(stream) - 16) // 8 + 1
    for i in (0, 1, len(ds) - 1):
        x, label = ds.data[i]
        assert label == -1 and x.tolist() == stream[8 * i:8 * i + 16].tolist()
    assert load_dataset(cfg).fingerprint == ds.fingerprint  # the same text, the same fingerprint


# --- an atlas of a language model ----------------------------------------------------------------

def tiny_lm_atlas_config(tmp):
    """The config (and its corpus) of a tiny language model's atlas in folder tmp (also the list page's test)."""
    (tmp / "corpus.txt").write_text(corpus(80), encoding="utf-8")
    return load_config(write_config(tmp, atlas_section(tmp, "text") + """
        [dataset]
        source = "text:corpus.txt"
        context = 32
        [scan]
        top_k = 5
        batch_size = 16
        [embed]
        enabled = false
        [[models]]
        name = "lm"
        source = "fixtures_models:tiny_lm_with_tokenizer"
    """))


@pytest.fixture(scope="module")
def text_atlas(tmp_path_factory):
    cfg = tiny_lm_atlas_config(tmp_path_factory.mktemp("text-atlas"))
    report = build(cfg, progress=False)
    return cfg, report


def test_language_model_atlas_probes_the_mlp_neurons_and_has_no_images(text_atlas):
    cfg, report = text_atlas
    with Store(cfg.store_dir) as store:
        layers = [l.layer for l in store.layers("lm")]
        assert layers == ["blocks.0.mlp.act", "blocks.1.mlp.act"]  # the default for a language model
        assert all(l.spatial == (1, 32) and l.prefix == 0 for l in store.layers("lm"))  # a line, not a grid
        assert not store.featurevis_kinds("lm", layers[0])  # no image to optimize
        windows, vocab = store.windows()
        assert set(windows) == set(store.referenced_examples())
    site = cfg.atlas.site_dir
    assert not (site / "media" / "examples").exists() and report.units == 2 * 64


def test_text_unit_page_shows_each_top_example_as_tokens_with_its_peak_marked(text_atlas):
    cfg, _ = text_atlas
    site = cfg.atlas.site_dir
    ds_tokens = load_dataset(cfg).data.tokens
    checked = 0
    with Store(cfg.store_dir) as store:
        for layer in ("blocks.0.mlp.act", "blocks.1.mlp.act"):
            for u in store.units("lm", layer)[:16]:
                html = (site / urls.unit_page(UnitId("lm", layer, u.unit))).read_text(encoding="utf-8")
                top = html.split('<ol class="examples text top">')[1].split("</ol>")[0]
                cards = re.findall(r'<li class="example" data-example="(\d+)"[^>]*>(.*?)</li>', top, re.S)
                assert [int(e) for e, _ in cards] == [t.example for t in u.top]
                for (_, body), t in zip(cards, u.top):
                    [marked] = re.findall(r"<mark[^>]*>(.*?)</mark>", body)
                    want = text.token_text(text.ByteTokenizer(), ds_tokens[t.example, t.position])
                    assert unescape(marked) == {"\n": "↵", "\t": "→"}.get(want, want)
                    # the shaded tokens' levels follow the stored map: the peak token has the top level
                    levels = [float(v) for v in re.findall(r'style="--a:([0-9.]+)"', body)]
                    peak = float(re.search(r'<mark[^>]*style="--a:([0-9.]+)"', body).group(1))
                    assert max(levels) == peak == pytest.approx(round(t.value / u.top[0].value, 1))
                    checked += 1
                assert u.label.startswith("fires on ") and "peak on it" in html
    assert checked == 2 * 16 * 5


def test_text_pages_speak_of_windows_and_tokens_not_examples_and_classes(text_atlas):
    cfg, _ = text_atlas
    site = cfg.atlas.site_dir
    home = (site / urls.HOME).read_text(encoding="utf-8")
    assert re.search(r"scanned over \d+ text windows of", home) and 'or token (e.g. token:&#34;(&#34;)"' in home
    search = (site / urls.SEARCH).read_text(encoding="utf-8")
    assert 'or token (e.g.' in search and "label, the tokens it fires on and flags" in search
    assert "top class" not in search
    page = (site / urls.unit_page(UnitId("lm", "blocks.1.mlp.act", 0))).read_text(encoding="utf-8")
    stats = re.findall(r"<dt>(.*?)</dt>", page.split('<dl class="facts">')[1].split("</dl>")[0])
    assert "Active on (tokens)" in stats and "Windows seen" in stats
    assert not any("class" in name.lower() for name in stats)  # text windows have no classes


def test_text_range_rows_mark_the_token_each_window_peaked_on(text_atlas):
    """Examples across the activation range show the token the unit peaked on in that window (its stored
    position, the argmax of its activations there), not the window's start."""
    cfg, _ = text_atlas
    ds_tokens = load_dataset(cfg).data.tokens
    marked = 0
    with Store(cfg.store_dir) as store:
        for u in store.units("lm", "blocks.1.mlp.act")[:6]:
            html = (cfg.atlas.site_dir / urls.unit_page(UnitId("lm", "blocks.1.mlp.act", u.unit))).read_text("utf-8")
            rows = re.findall(r'<ol class="examples range text">(.*?)</ol>', html, re.S)
            cards = [c for row in rows for c in re.findall(r"<li>(.*?)</li>", row, re.S)]
            records = [t for _, _, _, examples in parts.range_rows(u.ranges) for t in examples]
            assert len(cards) == len(records) > 0
            for body, t in zip(cards, records):
                assert 0 <= t.position < ds_tokens.shape[1]
                if t.value == 0:  # silent on the whole window: no token to point at
                    assert "<mark" not in body
                    continue
                [token] = re.findall(r"<mark[^>]*>(.*?)</mark>", body)
                want = text.token_text(text.ByteTokenizer(), ds_tokens[t.example, t.position])
                assert unescape(token) == {"\n": "↵", "\t": "→"}.get(want, want)
                marked += 1
    assert marked >= 6 * 10


def test_text_embed_card_shows_its_top_contexts(text_atlas):
    """A text unit's embeddable card has no images to draw: it shows its top 3 contexts, the peak marked."""
    cfg, _ = text_atlas
    ds_tokens = load_dataset(cfg).data.tokens
    with Store(cfg.store_dir) as store:
        u = store.units("lm", "blocks.1.mlp.act")[2]
    card = (cfg.atlas.site_dir / urls.unit_embed(UnitId("lm", "blocks.1.mlp.act", u.unit))).read_text("utf-8")
    items = re.findall(r"<li><span>[^<]*</span>(.*?)</li>", card.split('<ol class="contexts"')[1], re.S)
    assert len(items) == 3 and 'class="top"' not in card
    for body, t in zip(items, u.top):
        [token] = re.findall(r"<mark[^>]*>(.*?)</mark>", body)
        want = text.token_text(text.ByteTokenizer(), ds_tokens[t.example, t.position])
        assert unescape(token) == {"\n": "↵", "\t": "→"}.get(want, want)


def test_text_from_the_dataset_is_escaped(text_atlas):
    cfg, _ = text_atlas
    site = cfg.atlas.site_dir
    pages = list(site.glob("lm/*/*/index.html"))
    assert pages
    seen = 0
    for page in pages:
        html = page.read_text(encoding="utf-8")
        assert "<script>alert" not in html and "</script> string" not in html
        contexts = "".join(re.sub(r"<[^>]+>", "", c) for c in re.findall(r'<p class="context">(.*?)</p>', html))
        seen += "&lt;script&gt;alert(1)&lt;/script&gt;" in contexts
    assert seen  # some page shows the markup line, escaped, token by token


def test_text_unit_export_has_no_image_pattern_and_the_store_keeps_windows(text_atlas):
    cfg, _ = text_atlas
    data = json.loads((cfg.atlas.site_dir / "lm" / "blocks.1.mlp.act" / "0" / "data.json").read_text())
    assert data["example_images"] is None and data["label"].startswith("fires on ")
    ds_tokens = load_dataset(cfg).data.tokens
    with Store(cfg.store_dir) as store:
        windows, vocab = store.windows()
    for example, tokens in windows.items():
        assert tokens.tolist() == ds_tokens[example].tolist()
    assert vocab[ord("d")] == "d" and vocab[ord("\n")] == "\n"


def test_token_logits_are_the_output_weights_through_the_unembedding():
    import torch

    import fixtures_models
    from atlas_builder.explain import logit_directions

    net = fixtures_models.tiny_lm()
    example = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    got = {layer: (w_u @ directions).T.numpy() for layer, directions, w_u in
           logit_directions(net, ["blocks.0.mlp.act", "blocks.1", "blocks.1.ln2", "unembed"], example, 256)}
    w_u = net.unembed.weight.detach()
    assert set(got) == {"blocks.0.mlp.act", "blocks.1"}  # ln2 feeds the MLP's input; unembed is the output
    np.testing.assert_allclose(got["blocks.0.mlp.act"], (w_u @ net.blocks[0].mlp.down.weight.detach()).T.numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["blocks.1"], w_u.T.numpy(), rtol=1e-6)  # the residual stream: W_U itself
    assert list(logit_directions(net, ["blocks.0.mlp.act"], example, 999)) == []  # no unembedding of that vocabulary


@pytest.mark.parametrize("case", ["random", "spread norms", "ties and zeros", "below bfloat16", "non-finite"])
def test_screened_top_products_pick_what_float32_picks(case, monkeypatch):
    """top_products' bfloat16 screen with float32 rescoring against top_effects of the whole float32 product:
    the same tokens each way, the same values; rows the screen cannot be sure of (ties, a zero direction,
    NaN) take the plain product."""
    import torch

    from atlas_builder import explain

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(600, 48, generator=g), torch.randn(3000, 48, generator=g)
    if case == "spread norms":  # trained embeddings' norms differ several-fold
        b *= torch.rand(3000, 1, generator=g) * 4 + 0.1
        a *= torch.rand(600, 1, generator=g) * 10
    if case == "ties and zeros":
        a[:40] = 0
        b[100:200] = b[100]  # a hundred equal tokens: ties at the cut
        a[40:80] = torch.round(a[40:80])
        b = torch.round(b * 2) / 2
    if case == "below bfloat16":  # 200 tokens within a few bfloat16 steps of each other lead 100 rows
        b[:200] = b[0] + 1e-2 * torch.randn(200, 48, generator=g)
        a[:100] = 3 * b[0] + 0.01 * torch.randn(100, 48, generator=g)
    if case == "non-finite":
        a[5, 3] = float("nan")
    ok = []
    real = explain.top_effects

    def count(e, k=5):
        ok.append(len(e))
        return real(e, k)

    monkeypatch.setattr(explain, "top_effects", count)
    got, again = explain.top_products([a, a], b, 10)  # b's screen made once serves both
    monkeypatch.setattr(explain, "top_effects", real)
    want = real((a @ b.T).numpy(), 10)
    for column, (g_col, w_col) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(again[column], g_col)
        if column % 2 == 0:
            # the same tokens, rank by rank, but where two values are within float32 rounding of each other
            # (the rescoring sums in another order than the plain product)
            values = want[column + 1]
            close = np.zeros_like(values, dtype=bool)
            close[:, 1:] |= np.isclose(values[:, 1:], values[:, :-1], rtol=1e-6, atol=0)
            close[:, :-1] |= close[:, 1:].copy()
            np.testing.assert_array_equal(np.where(close, -2, g_col), np.where(close, -2, w_col))
        else:
            np.testing.assert_allclose(g_col, w_col, rtol=1e-5, atol=1e-5)
    assert sum(ok) >= 2 * 600 and len(got[0]) == 600
    if case == "random":  # every row through the screen, none through the plain product
        assert ok == [256, 256, 88] * 2


def test_text_unit_page_lists_its_top_logits(text_atlas):
    import torch

    import fixtures_models

    cfg, _ = text_atlas
    w = (fixtures_models.tiny_lm().unembed.weight @ fixtures_models.tiny_lm().blocks[1].mlp.down.weight).detach()
    with Store(cfg.store_dir) as store:
        units = store.units("lm", "blocks.1.mlp.act")
    for u in units[:8]:
        column = w[:, u.unit]
        assert [c for c, _ in u.effects.up] == torch.argsort(column, descending=True)[:10].tolist()
        assert [c for c, _ in u.effects.down] == torch.argsort(column)[:10].tolist()
        html = (cfg.atlas.site_dir / urls.unit_page(UnitId("lm", "blocks.1.mlp.act", u.unit))).read_text()
        bars = html.split('<ol class="bars effects"')[1].split("</ol>")[0]
        names = [unescape(n) for n in re.findall(r"<span[^>]*>(.*?)</span>", bars)]
        assert names == [text.visible(text.token_text(text.ByteTokenizer(), c))
                         for c, _ in u.effects.up + u.effects.down]
        assert "Top logits" in html and "next token's logit" in bars


def test_top_logits_are_their_own_stage_kept_when_the_dataset_changes(tmp_path):
    """The top logits depend on the weights alone: a new corpus re-scans the model but skips its logits stage,
    and every unit still has its 10 top logits each way, once (not lost with the old scan's rows, nor doubled)."""
    cfg = tiny_lm_atlas_config(tmp_path)
    first = build(cfg, progress=False)
    assert "logits" in first.seconds and "logits:lm" not in first.skipped
    with Store(cfg.store_dir) as store:
        before = {l.layer: [u.effects for u in store.units("lm", l.layer)] for l in store.layers("lm")}
    (tmp_path / "corpus.txt").write_text(corpus(80, seed=1), encoding="utf-8")
    again = build(load_config(cfg.path), progress=False)
    assert "logits:lm" in again.skipped and "scan:lm" not in again.skipped
    with Store(cfg.store_dir) as store:
        after = {l.layer: [u.effects for u in store.units("lm", l.layer)] for l in store.layers("lm")}
    assert len(before["blocks.1.mlp.act"]) == 64 and after == before
    assert all(len(e.up) == len(e.down) == 10 and e.exact for effects in after.values() for e in effects)


def test_plan_counts_the_top_logits_stage_with_the_scan(tmp_path, monkeypatch):
    """`atlas plan` times a language model's top logits (their first layer, times the layers) into its scan time."""
    import time as clock

    import atlas_builder.scan as scan_module
    from atlas_builder import plan as plan_module

    called = []

    def slow(model, dataset, layers, device, units=0):
        called.append(list(layers))
        clock.sleep(0.5)
        return {}

    monkeypatch.setattr(scan_module, "token_logits", slow)
    cfg = tiny_lm_atlas_config(tmp_path)
    with_logits = plan_module.make_plan(cfg).models[0].scan_s
    assert called == [["blocks.0.mlp.act"]] and with_logits >= 2 * 0.5
    monkeypatch.setattr(plan_module, "logits_seconds", lambda *a: 0.0)
    assert plan_module.make_plan(cfg).models[0].scan_s < with_logits - 0.5
