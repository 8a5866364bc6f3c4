"""The demo atlas end to end, as `make site` builds it, plus the CLI around it."""

from __future__ import annotations

import pytest

from atlas_builder import cli, demo_models
from atlas_builder.build import build
from atlas_builder.store import Store
from conftest import REPO
from sitecheck import broken_links, read_page

DEMO_LAYERS = {  # every conv/linear/activation module of both demo models
    "digits-mlp": {"fc1": 20, "relu1": 20, "fc2": 10},
    "digits-cnn": {"conv1": 16, "relu1": 16, "conv2": 32, "relu2": 32, "fc": 10},
}


@pytest.fixture(scope="module")
def demo(demo_build):
    return demo_build


def test_demo_site_has_one_page_per_unit_of_every_layer(demo):
    cfg, report = demo
    site = cfg.atlas.site_dir
    for model, layers in DEMO_LAYERS.items():
        for layer, n in layers.items():
            pages = sorted(int(p.parent.name) for p in (site / model / layer).glob("*/index.html"))
            assert pages == list(range(n)), (model, layer)
    assert {p.parent.name for p in site.glob("*/index.html")} == set(DEMO_LAYERS) | {"inputs", "search", "about"}
    assert report.units == sum(sum(v.values()) for v in DEMO_LAYERS.values()) == 156
    assert broken_links(site) == []


def test_demo_models_are_accurate_and_accuracy_is_shown(demo):
    cfg, report = demo
    for name in DEMO_LAYERS:
        assert report.accuracy[name] > 0.9
    page = read_page(cfg.atlas.site_dir / "digits-cnn/index.html")
    assert f"{100 * report.accuracy['digits-cnn']:.1f}%" in page.text
    with Store(cfg.store_dir, read_only=True) as store:
        [mlp] = [m for m in store.models() if m.model == "digits-mlp"]
        assert mlp.info["test_accuracy"] == pytest.approx(report.accuracy["digits-mlp"], abs=1e-4)
        assert len(store.labels()) == 540


def test_rebuild_skips_scans_and_gives_the_same_pages(demo):
    cfg, _ = demo
    site = cfg.atlas.site_dir
    before = {p.relative_to(site): p.read_bytes() for p in site.rglob("*.html")}
    again = build(cfg, progress=False)
    assert sorted(again.skipped) == ["embed:digits-cnn", "embed:digits-mlp", "featurevis:digits-cnn",
                                     "featurevis:digits-mlp", "scan:digits-cnn", "scan:digits-mlp"]
    assert "embed" not in again.seconds
    assert "featurevis" not in again.seconds
    assert "scan" not in again.seconds
    assert {p.relative_to(site): p.read_bytes() for p in site.rglob("*.html")} == before


def test_demo_training_is_deterministic(tmp_path):
    a, rec_a = demo_models.load_builtin("digits-mlp", tmp_path / "a", seed=0)
    b, rec_b = demo_models.load_builtin("digits-mlp", tmp_path / "b", seed=0)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert (x == y).all(), name
    assert rec_a["test_accuracy"] == rec_b["test_accuracy"]
    cached, rec_c = demo_models.load_builtin("digits-mlp", tmp_path / "a", seed=0)  # from the cache
    assert rec_c == rec_a


def test_cli_layers_lists_shapes(capsys):
    assert cli.main(["layers", str(REPO / "examples/demo.toml")]) == 0
    out = capsys.readouterr().out
    assert "digits-cnn:" in out and "digits-mlp:" in out
    line = next(l for l in out.splitlines() if l.split()[:1] == ["conv2"])
    assert "Conv2d" in line and "32×8×8" in line and "yes" in line


def test_cli_unknown_layer_lists_valid_ones(tmp_path, capsys):
    path = tmp_path / "a.toml"
    path.write_text('[dataset]\nsource = "builtin:digits"\n'
                    '[[models]]\nname = "m"\nsource = "builtin:digits-mlp"\nlayers = ["fc9"]\n'
                    f'[atlas]\ndata_dir = "{tmp_path}/data"\nsite_dir = "{tmp_path}/site"\n')
    assert cli.main(["--quiet", "build", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("atlas: error:") and "'fc9'" in err and "fc1, relu1, fc2" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "site").exists()
