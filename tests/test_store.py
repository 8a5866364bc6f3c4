"""Store round trip: what a scan writes is what the website reads back."""

from __future__ import annotations

import numpy as np
import pytest

from atlas_builder.probe import LayerInfo
from atlas_builder.scan import LayerScan, ModelScan
from atlas_builder.store import ModelRecord, Store


def fake_scan(model="m", n=12, k=3, seed=0) -> ModelScan:
    rng = np.random.default_rng(seed)
    conv = LayerInfo("features.0", "Conv2d", (4, 5, 6), True)
    fc = LayerInfo("fc", "Linear", (3,), True)
    layers = []
    for info in (conv, fc):
        u = info.n_units
        values = -np.sort(-rng.standard_normal((u, k)), axis=1).astype(np.float32)
        layers.append(LayerScan(info, values, rng.integers(0, n, (u, k)),
                                rng.integers(0, 30, (u, k)) if info.spatial else np.full((u, k), -1),
                                rng.standard_normal(u), values[:, 0].astype(np.float64)))
    return ModelScan(model, layers, np.arange(n) % 3, rng.integers(0, 3, n), rng.random(n), n, 0.5, 0.25)


def test_round_trip(tmp_path):
    scan = fake_scan()
    with Store(tmp_path / "s") as store:
        store.write_dataset(["a", "<b>", "c"], scan.labels, "data-fp")
        store.write_scan(scan, "scan-fp")
        store.write_model(ModelRecord("m", 0, "Model M", "builtin:x", "w-fp", 123, 0.25, {"epochs": 3}))
        store.write_meta({"title": "T"})
    with Store(tmp_path / "s", read_only=True) as store:
        assert store.class_names() == ["a", "<b>", "c"]
        np.testing.assert_array_equal(store.labels(), scan.labels)
        [m] = store.models()
        assert (m.model, m.title, m.parameters, m.accuracy, m.info) == ("m", "Model M", 123, 0.25, {"epochs": 3})
        layers = store.layers("m")
        assert [l.layer for l in layers] == ["features.0", "fc"]
        assert layers[0].shape == (4, 5, 6) and layers[0].spatial == (5, 6) and layers[0].n_units == 4
        assert layers[1].spatial is None
        for layer, expected in zip(layers, scan.layers):
            units = store.units("m", layer.layer)
            assert [u.unit for u in units] == list(range(layer.n_units))
            for u in units:
                np.testing.assert_allclose([t.value for t in u.top], expected.topk_values[u.unit], rtol=1e-6)
                assert [t.example for t in u.top] == list(expected.topk_ids[u.unit])
                assert [t.position for t in u.top] == list(expected.topk_positions[u.unit])
                assert [t.rank for t in u.top] == list(range(3))
                assert u.mean == pytest.approx(expected.mean[u.unit])
        preds = store.predictions("m")
        assert preds[5] == (int(scan.predicted[5]), pytest.approx(scan.confidence[5]))
        assert store.stage_fingerprint("scan:m") == "scan-fp"
        assert store.meta() == {"title": "T"}
        assert store.referenced_examples() == sorted(set(int(i) for l in scan.layers for i in l.topk_ids.ravel()))


def test_rescan_replaces_rows_and_dataset_change_clears(tmp_path):
    with Store(tmp_path) as store:
        store.write_dataset(["a", "b", "c"], np.arange(12) % 3, "d1")
        store.write_scan(fake_scan(seed=0), "f1")
        store.write_scan(fake_scan(seed=1), "f2")
        n = store.con.execute("SELECT count(*) FROM topk").fetchone()[0]
        assert n == (4 + 3) * 3  # replaced, not appended
        assert store.stage_fingerprint("scan:m") == "f2"
        store.write_dataset(["x"], np.zeros(5, dtype=int), "d2")  # another dataset: old scans are void
        assert store.stage_fingerprint("scan:m") is None
        assert store.con.execute("SELECT count(*) FROM topk").fetchone()[0] == 0


def test_keep_models_drops_the_rest(tmp_path):
    with Store(tmp_path) as store:
        store.write_dataset(["a", "b", "c"], np.arange(12) % 3, "d1")
        for name in ("m", "gone"):
            store.write_scan(fake_scan(model=name), "f")
            store.write_model(ModelRecord(name, 0, name, "s", "w", 1, None, {}))
        store.keep_models(["m"])
        assert [m.model for m in store.models()] == ["m"]
        assert store.layers("gone") == []
        assert store.stage_fingerprint("scan:gone") is None


def test_failed_write_leaves_previous_rows(tmp_path):
    with Store(tmp_path) as store:
        store.write_dataset(["a", "b", "c"], np.arange(12) % 3, "d1")
        store.write_scan(fake_scan(seed=0), "f1")
        bad = fake_scan(seed=1)
        bad.layers[1].topk_ids = None  # breaks half-way through the write
        with pytest.raises(AttributeError):
            store.write_scan(bad, "f2")
        assert store.stage_fingerprint("scan:m") == "f1"
        assert store.con.execute("SELECT count(*) FROM topk").fetchone()[0] == (4 + 3) * 3
