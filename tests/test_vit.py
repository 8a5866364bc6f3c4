"""Token-output models on the site: a tiny ViT (planted patch, attention, attributions, architecture view)
and a token model that torch.fx cannot trace and whose attention is hand-rolled (notes, no traceback)."""

from __future__ import annotations

import html
import re

import numpy as np
import pytest

from atlas_builder import urls
from atlas_builder.build import build
from atlas_builder.config import load_config
from atlas_builder.ids import UnitId
from atlas_builder.store import Store
from conftest import atlas_section, write_config
from fixtures_models import PLANTED_PATCH
from sitecheck import broken_links, read_page

BLOCK0 = "encoder.layers.encoder_layer_0"


@pytest.fixture(scope="module")
def vit_site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vit")
    path = write_config(tmp, atlas_section(tmp, "vit") + """
        [dataset]
        source = "fixtures_models:tiny_rgb_dataset"
        [scan]
        top_k = 3
        batch_size = 16
        [site]
        input_pages = 4
        attribution_steps = 8
        unit_attributions = true
        [featurevis]
        steps = 8
        frames = 4
        [[models]]
        name = "vit"
        source = "fixtures_models:tiny_vit"
        [[models]]
        name = "odd"
        source = "fixtures_models:untraceable_tokens"
        layers = ["attention", "head"]
        """)
    cfg = load_config(path)
    return cfg, build(cfg, progress=False)


def test_default_layers_of_a_vit_are_its_blocks_and_head(vit_site):
    cfg, _ = vit_site
    with Store(cfg.store_dir, read_only=True) as store:
        layers = store.layers("vit")
    assert [l.layer for l in layers] == [BLOCK0, "encoder.layers.encoder_layer_1", "heads.head"]
    block = layers[0]
    assert (block.n_units, block.spatial, block.prefix) == (16, (4, 4), 1)  # 1 class token + 4 x 4 patches


def test_planted_patch_is_outlined_on_its_unit_page(vit_site):
    cfg, _ = vit_site
    site = cfg.atlas.site_dir
    page = read_page(site / urls.unit_page(UnitId("vit", BLOCK0, 0)))
    row, col = divmod(PLANTED_PATCH, 4)
    boxes = [a["style"] for a in page.find("span", cls="where")]
    assert len(boxes) == 3  # each top example outlines the patch it fired on most
    assert all(b == f"left:{25.0 * col}%;top:{25.0 * row}%;width:25.0%;height:25.0%" for b in boxes), boxes
    grids = page.find("span", cls="patches")
    assert len(grids) == 6 and all("background-size:25.0% 25.0%" in g["style"] for g in grids)
    assert "4×4 patch grid" in page.text
    with Store(cfg.store_dir, read_only=True) as store:
        top = store.units("vit", BLOCK0)[0].top
    assert [t.position for t in top] == [1 + PLANTED_PATCH] * 3  # stored positions index all the tokens


def test_vit_units_have_feature_visualizations(vit_site):
    cfg, _ = vit_site
    with Store(cfg.store_dir, read_only=True) as store:
        vis = store.visuals("vit", BLOCK0)
    assert sorted(vis) == list(range(16))
    assert all(v.positive and v.negative and np.isfinite(v.positive.activation) for v in vis.values())
    # the planted unit's image excites it more than its negative image does
    assert vis[0].positive.activation > vis[0].negative.activation
    page = read_page(cfg.atlas.site_dir / urls.unit_page(UnitId("vit", BLOCK0, 0)))
    assert any(a["src"].startswith("../../../media/fv/vit/") for a in page.find("img"))


def test_vit_input_page_shows_attention_rollout_and_attributions(vit_site):
    cfg, _ = vit_site
    site = cfg.atlas.site_dir
    with Store(cfg.store_dir, read_only=True) as store:
        example = store.input_examples()[0]
        maps, notes = store.input_maps("vit")
        units = store.input_units("vit")[example]
    page = read_page(site / urls.input_page(example))
    section = (site / urls.input_page(example)).read_text().split('<section class="input-model')[1]  # the ViT's
    # attention: 2 layers x 2 heads of the class token over the 4 x 4 patches, and the rollout
    assert section.count('alt="head ') == 4
    assert "<code>encoder.layers.encoder_layer_0.self_attention</code>" in section
    assert "Attention rollout" in section
    assert set(maps[example]["attention"]) == {f"encoder.layers.encoder_layer_{i}.self_attention" for i in (0, 1)}
    assert all(m.shape == (4, 4) for heads in maps[example]["attention"].values() for m in heads)
    # attributions of the predicted class, each method once, and one per unit listed
    assert re.search(r'alt="integrated gradients of \w+ on input', section)
    assert re.search(r'alt="gradient × input of \w+ on input', section)
    n_listed = sum(len(v) for v in units.values())
    assert section.count('class="attr"') == n_listed == len(maps[example]["unit"])
    assert 'class="attr-toggle"' in section
    assert notes == [] and 'class="note' not in section
    assert page.find("img", cls="input-image")


def test_untraceable_model_and_hand_rolled_attention_get_notes(vit_site):
    cfg, _ = vit_site
    site = cfg.atlas.site_dir
    model = (site / urls.model_page("odd")).read_text()
    assert 'data-method="module tree"' in model
    assert "torch.fx could not trace this model (TraceError" in model
    assert "Traceback" not in model
    with Store(cfg.store_dir, read_only=True) as store:
        example = store.input_examples()[0]
    section = html.unescape((site / urls.input_page(example)).read_text().split('<section class="input-model')[2])
    assert "no attention maps: this model's attention (HandRolledAttention) is not a torch.nn.MultiheadAttention" \
        in section
    assert "Why it predicts" in section  # its attributions are still there


def test_architecture_view_links_every_probed_layer(vit_site):
    cfg, _ = vit_site
    site = cfg.atlas.site_dir
    path = site / urls.model_page("vit")
    model = path.read_text()
    assert 'data-method="torch.fx"' in model
    svg_links = set(re.findall(r'<a href="([^"#]+)"><title>', model))
    with Store(cfg.store_dir, read_only=True) as store:
        expected = {urls.rel(urls.model_page("vit"), urls.layer_page("vit", l.layer)) for l in store.layers("vit")}
    assert svg_links == expected
    odd = (site / urls.model_page("odd")).read_text()  # the module tree links the probed layers too
    assert {urls.rel(urls.model_page("odd"), urls.layer_page("odd", l)) for l in ("attention", "head")} <= set(
        re.findall(r'<a href="([^"]+)">', odd))
    assert broken_links(site) == []


def test_unit_page_top_examples_carry_their_attributions(vit_site):
    """site.unit_attributions: each top example of a unit page has a gradient × input overlay behind a toggle,
    equal to the direct computation (scaled to max |value| 1, float16)."""
    import torch

    from atlas_builder import explain
    from atlas_builder.explain import TOP_ATTRIBUTION_SIDE
    import fixtures_models

    cfg, _ = vit_site
    page = (cfg.atlas.site_dir / urls.unit_page(UnitId("vit", BLOCK0, 0))).read_text()
    top_part = page.split('<ol class="examples top"')[1].split("</ol>")[0]
    assert top_part.count('<img class="attr" src="data:image/png;base64,') == 3
    assert page.count('class="attr-toggle"') == 1
    with Store(cfg.store_dir, read_only=True) as store:
        top = store.units("vit", BLOCK0)[0].top
        bottom = store.units("vit", BLOCK0)[0].bottom
    assert all(t.attribution is not None for t in top) and all(t.attribution is None for t in bottom)
    data = fixtures_models.tiny_rgb_dataset()
    x = torch.stack([data[t.example][0] for t in top])
    net = fixtures_models.tiny_vit()
    direct = explain.pooled(explain.gradient_x_input(explain.unit_value(net, BLOCK0, torch.zeros(3, dtype=torch.long),
                                                                        "max"), x), TOP_ATTRIBUTION_SIDE)
    direct /= np.abs(direct).max(axis=(1, 2), keepdims=True)
    for t, d in zip(top, direct):
        assert t.attribution.shape == (16, 16)
        np.testing.assert_allclose(t.attribution, d, atol=2e-3)
