"""The demo atlas end to end, as `make site` builds it, plus the CLI around it."""

from __future__ import annotations

import pytest

from atlas_builder import cli, demo_models
from atlas_builder.build import build
from atlas_builder.store import Store
from conftest import REPO
from sitecheck import broken_links, read_page

DEMO_LAYERS = {  # the default rule: each conv/linear with its ReLU, probed after it, and the output layer
    "digits-mlp": {"relu1": 20, "fc2": 10},
    "digits-cnn": {"relu1": 16, "relu2": 32, "fc": 10},
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
    assert {p.parent.name for p in site.glob("*/index.html")} == set(DEMO_LAYERS) | {"inputs", "search", "about", "sql"}
    assert (site / "lists.html").is_file()
    assert report.units == sum(sum(v.values()) for v in DEMO_LAYERS.values()) == 88
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
    assert sorted(again.skipped) == ["architecture:digits-cnn", "architecture:digits-mlp",
                                     "embed:digits-cnn", "embed:digits-mlp", "featurevis:digits-cnn",
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
    line = next(l for l in out.splitlines() if l.split()[:1] == ["relu2"])
    assert "ReLU" in line and "32×8×8" in line and "yes" in line
    conv = next(l for l in out.splitlines() if l.split()[:1] == ["conv2"])
    assert "yes" not in conv  # one layer with its ReLU
    assert line.split()[-2] == "1"  # runs once per forward


def test_cli_layers_marks_a_module_the_forward_reuses(tmp_path, capsys):
    """torchvision's resnet18 (weights=None) calls each block's ReLU twice: shown, and no default layer."""
    path = tmp_path / "a.toml"
    path.write_text('[dataset]\nsource = "fixtures_models:rgb_dataset"\n'
                    '[[models]]\nname = "r"\nsource = "torchvision:resnet18"\n')
    assert cli.main(["layers", str(path)]) == 0
    out = capsys.readouterr().out
    relu = next(l for l in out.splitlines() if l.split()[:1] == ["layer1.0.relu"])
    assert relu.split()[-1] == "2" and "yes" not in relu  # runs twice, not probed by default
    block = next(l for l in out.splitlines() if l.split()[:1] == ["layer1.0"])
    assert block.split()[-2:] == ["1", "yes"]  # the block's output is


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


def test_demo_store_holds_the_brute_force_statistics(demo):
    """Every layer of the demo models run over the whole demo dataset with all outputs in memory (hooks of the
    test's own, the scan's batch size): the stored top-/bottom-k ids are those of the brute force, their
    values, positions and maps, the moments, activity, class means, selectivity and histograms within 1e-5."""
    import numpy as np
    import torch

    from atlas_builder.accumulators import POSITION_SAMPLE, sample_ids, unit_values
    from atlas_builder.scan import class_selectivity, histogram
    from atlas_builder.sources import load_dataset, load_model
    from test_accumulators import brute_class_means, brute_moments, brute_topk

    cfg, _ = demo
    dataset = load_dataset(cfg)
    x = torch.stack([torch.as_tensor(dataset.data[i][0]) for i in range(len(dataset))])
    labels = np.array([int(dataset.data[i][1]) for i in range(len(dataset))])
    sample = sample_ids(len(dataset), cfg.scan.sample_size, cfg.atlas.seed)
    activity = sample[:: max(1, -(-len(sample) // POSITION_SAMPLE))]
    close = dict(rtol=1e-5, atol=1e-5, equal_nan=True)
    with Store(cfg.store_dir, read_only=True) as store:
        for section in cfg.models:
            model = load_model(section, cfg).module.eval()
            layers = [layer.layer for layer in store.layers(section.name)]
            modules = dict(model.named_modules())
            outputs = {name: [] for name in layers}
            handles = [modules[name].register_forward_hook(lambda m, i, o, n=name: outputs[n].append(o.clone()))
                       for name in layers]
            try:
                with torch.inference_mode():
                    for chunk in x.split(cfg.scan.batch_size):
                        model(chunk)
            finally:
                for handle in handles:
                    handle.remove()
            for name in layers:
                out = torch.cat(outputs[name])
                v = unit_values(out).numpy()
                maps = out.flatten(2).numpy() if out.dim() == 4 else None
                units = store.units(section.name, name)
                moments = brute_moments(v)
                means = brute_class_means(v, labels, len(dataset.class_names))
                selectivity = class_selectivity(means)[0]
                counts = histogram(v[sample].astype(np.float16), cfg.scan.histogram_bins)[0]
                for kind, largest in (("top", True), ("bottom", False)):
                    values, ids, _ = brute_topk(v, cfg.scan.top_k, largest)
                    for u, unit in enumerate(units):
                        got = getattr(unit, kind)
                        assert [t.example for t in got] == ids[u].tolist(), (section.name, name, u, kind)
                        np.testing.assert_allclose([t.value for t in got], values[u], **close)
                        if maps is not None:
                            assert [t.position for t in got] == maps[ids[u], u].argmax(1).tolist()
                        if maps is not None and kind == "top":  # stored as float16
                            np.testing.assert_allclose(np.stack([t.map.reshape(-1) for t in got]), maps[ids[u], u],
                                                       rtol=1e-3, atol=1e-3)
                position = (out[activity] > 0).flatten(2).float().mean(2) if maps is not None else \
                    torch.from_numpy(v[activity] > 0).float()
                for u, unit in enumerate(units):
                    for key in ("count", "mean", "std", "min", "max"):
                        np.testing.assert_allclose(getattr(unit, key), moments[key][u], **close)
                    np.testing.assert_allclose(unit.frac_active, (v[:, u] > 0).mean(), **close)
                    np.testing.assert_allclose(unit.position_activity, position[:, u].double().mean(), **close)
                    np.testing.assert_allclose(np.array(unit.class_means, dtype=float), means[u], **close)
                    np.testing.assert_allclose(unit.selectivity, selectivity[u], **close)
                    assert list(unit.hist) == counts[u].tolist()


def test_run_stage_skips_an_unchanged_fingerprint_and_writes_a_new_one(tmp_path):
    """The stage protocol: run and write when the stored fingerprint differs, skip when it is the same; a
    fingerprint of None always runs."""
    from atlas_builder.build import BuildReport, Stage, run_stage
    from atlas_builder.distributed import Cluster

    class Counting(Stage):
        name, kind = "count:m", "count"

        def __init__(self, fp):
            self.fp, self.runs, self.writes = fp, 0, []

        def fingerprint(self, store):
            return self.fp

        def run(self, store):
            self.runs += 1
            return f"result {self.runs}"

        def write(self, store, result, fingerprint):
            self.writes.append(result)
            store._mark_stage(self.name, fingerprint, 0.0) if fingerprint else None

    with Store(tmp_path / "store") as store:
        first, report = Counting("a"), BuildReport()
        assert run_stage(first, store, Cluster(), report) == "result 1" and first.writes == ["result 1"]
        again = Counting("a")
        assert run_stage(again, store, Cluster(), report) is None and again.runs == 0
        assert report.skipped == ["count:m"] and "count" in report.seconds
        changed = Counting("b")
        assert run_stage(changed, store, Cluster(), report) == "result 1" and store.stage_fingerprint("count:m") == "b"
        always = Counting(None)
        run_stage(always, store, Cluster(), report)
        run_stage(always, store, Cluster(), report)
        assert always.runs == 2


def test_demo_diversity_rows_differ_and_each_image_still_excites_its_unit(demo):
    """The demo (featurevis.diversity = 4): each unit's 4 diverse images, decoded from the site's media and run
    through the model, are apart in their Gram features at the layer (lucid's measure), and keep most of the
    single image's activation; the unit page shows the row."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from atlas_builder.hooks import Capture
    from atlas_builder.sources import load_model

    cfg, _ = demo
    model = load_model(next(m for m in cfg.models if m.name == "digits-cnn"), cfg).module.eval()
    with Store(cfg.store_dir, read_only=True) as store:
        for layer in ("relu1", "relu2"):
            vis = store.visuals("digits-cnn", layer)
            apart, kept = [], []
            for unit, v in vis.items():
                assert len(v.diverse) == 4
                x = torch.stack([torch.from_numpy(np.asarray(Image.open(store.media_dir / d.image).convert("L"),
                                                             dtype=np.float32) / 255)[None] for d in v.diverse])
                with torch.no_grad(), Capture(model, [layer]) as capture:
                    capture(x)
                flat = capture.outputs[layer].flatten(2)
                gram = F.normalize(torch.einsum("bcm,bdm->bcd", flat, flat).flatten(1), dim=1)
                apart.append(float((1 - (gram @ gram.T)[~torch.eye(4, dtype=torch.bool)]).mean()))
                kept.append(np.mean([d.activation for d in v.diverse]) / v.positive.activation)
            assert np.median(apart) > 0.05, (layer, apart)  # without the term: 0.000 (measured on relu1)
            assert np.median(kept) >= 0.8, (layer, kept)
    page = (cfg.atlas.site_dir / "digits-cnn/relu1/3/index.html").read_text()
    assert page.count('alt="Diverse image ') == 4 and "4 different images that excite it" in page
