"""Store round trip: what a scan writes is what the website reads back."""

from __future__ import annotations

import numpy as np
import pytest

from atlas_builder.hooks import LayerInfo
from atlas_builder.scan import LayerScan, ModelScan, TopKResult
from atlas_builder.store import ModelRecord, Store


def fake_layer(info: LayerInfo, rng, n: int, k: int, n_classes: int = 3) -> LayerScan:
    u = info.n_units
    m = info.spatial[0] * info.spatial[1] if info.spatial else 0

    def ranked(sign):
        values = (sign * np.sort(-sign * rng.standard_normal((u, k)), axis=1)).astype(np.float32)
        return TopKResult(values, rng.integers(0, n, (u, k)),
                          rng.integers(0, max(m, 1), (u, k)) if m else np.full((u, k), -1),
                          rng.standard_normal((u, k, m)).astype(np.float16) if m and sign == 1 else None,
                          np.ones((u, k), dtype=bool))

    top, bottom = ranked(1), ranked(-1)
    top.valid[0, -1] = False  # fewer than k finite activations for unit 0
    stats = {"count": np.full(u, n), "nonfinite": np.arange(u), "mean": rng.standard_normal(u),
             "std": rng.random(u), "min": top.values[:, -1].astype(np.float64) - 1, "max": top.values[:, 0].astype(np.float64),
             "frac_active": rng.random(u), "position_activity": rng.random(u), "selectivity": rng.random(u),
             "top_class": rng.integers(0, n_classes, u), "dead": np.arange(u) == 1, "saturated": np.arange(u) == 2,
             "redundant_with": np.where(np.arange(u) == 0, 1, -1), "redundant_corr": np.where(np.arange(u) == 0, 0.99, np.nan)}
    sample = rng.standard_normal((n, u)).astype(np.float16)
    return LayerScan(info, top, bottom, stats, [f"label {i}" for i in range(u)], rng.integers(0, 9, (u, 5)),
                     rng.standard_normal(u), rng.standard_normal(u) + 5, rng.standard_normal((u, n_classes)), sample)


def fake_scan(model="m", n=12, k=3, seed=0) -> ModelScan:
    rng = np.random.default_rng(seed)
    conv = LayerInfo("features.0", "Conv2d", (4, 5, 6), True)
    fc = LayerInfo("fc", "Linear", (3,), True)
    layers = [fake_layer(info, rng, n, k) for info in (conv, fc)]
    return ModelScan(model, layers, np.arange(n) % 3, rng.integers(0, 3, n), rng.random(n), n, 0.5, 0.25,
                     np.arange(n))


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
                for got, want in ((u.top, expected.top), (u.bottom, expected.bottom)):
                    keep = want.valid[u.unit]
                    np.testing.assert_allclose([t.value for t in got], want.values[u.unit][keep], rtol=1e-6)
                    assert [t.example for t in got] == list(want.ids[u.unit][keep])
                    assert [t.position for t in got] == list(want.positions[u.unit][keep])
                    assert [t.rank for t in got] == list(np.arange(3)[keep])
                    if want.maps is None or layer.spatial is None:
                        assert all(t.map is None for t in got)
                    else:
                        for t in got:
                            np.testing.assert_array_equal(
                                t.map, want.maps[u.unit, t.rank].astype(np.float32).reshape(layer.spatial))
                st = expected.stats
                assert u.mean == pytest.approx(st["mean"][u.unit])
                assert (u.count, u.nonfinite) == (st["count"][u.unit], st["nonfinite"][u.unit])
                assert (u.std, u.frac_active, u.position_activity, u.selectivity) == pytest.approx(
                    (st["std"][u.unit], st["frac_active"][u.unit], st["position_activity"][u.unit],
                     st["selectivity"][u.unit]))
                assert u.top_class == st["top_class"][u.unit]
                assert (u.dead, u.saturated) == (u.unit == 1, u.unit == 2)
                assert u.redundant_with == (1 if u.unit == 0 else -1)
                assert u.redundant_corr == (pytest.approx(0.99) if u.unit == 0 else None)
                assert u.label == f"label {u.unit}"
                assert u.hist == tuple(expected.hist_counts[u.unit])
                assert (u.hist_lo, u.hist_hi) == pytest.approx((expected.hist_lo[u.unit], expected.hist_hi[u.unit]))
                assert u.class_means == pytest.approx(tuple(expected.class_means[u.unit]))
                assert "dead" in u.flags if u.unit == 1 else "dead" not in u.flags
            sample, ids = store.sample("m", layer.layer)
            np.testing.assert_array_equal(sample, expected.sample.T)
            np.testing.assert_array_equal(ids, np.arange(12))
        preds = store.predictions("m")
        assert preds[5] == (int(scan.predicted[5]), pytest.approx(scan.confidence[5]))
        assert store.stage_fingerprint("scan:m") == "scan-fp"
        assert store.meta() == {"title": "T"}
        shown = {int(i) for l in scan.layers for t in (l.top, l.bottom) for i in t.ids[t.valid]}
        assert store.referenced_examples() == sorted(shown)


def test_rescan_replaces_rows_and_dataset_change_clears(tmp_path):
    with Store(tmp_path) as store:
        store.write_dataset(["a", "b", "c"], np.arange(12) % 3, "d1")
        store.write_scan(fake_scan(seed=0), "f1")
        store.write_scan(fake_scan(seed=1), "f2")
        n = store.con.execute("SELECT count(*) FROM topk").fetchone()[0]
        assert n == (4 + 3) * 3 * 2 - 2  # top and bottom, one invalid entry per layer; replaced, not appended
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
        bad.layers[1].top = None  # breaks half-way through the write
        with pytest.raises(AttributeError):
            store.write_scan(bad, "f2")
        assert store.stage_fingerprint("scan:m") == "f1"
        assert store.con.execute("SELECT count(*) FROM topk").fetchone()[0] == (4 + 3) * 3 * 2 - 2


def test_open_data_database_is_reproducible_and_opens(tmp_path):
    """Two exports of the same rows give the same DuckDB file bytes (its random identifier replaced, its header
    checksummed again), which DuckDB opens read-only and read-write with every table of the Parquet files."""
    import duckdb

    from atlas_builder.store import duckdb_checksum

    with Store(tmp_path / "store") as store:
        store.write_scan(fake_scan(), "fp")
        first, second = store.open_data(), store.open_data()
    assert first == second
    data = first[Store.OPEN_DATABASE]
    assert int.from_bytes(data[:8], "little") == duckdb_checksum(data[8:4096])
    path = tmp_path / Store.OPEN_DATABASE
    path.write_bytes(data)
    con = duckdb.connect(str(path), read_only=True)
    assert sorted(t for (t,) in con.execute("SHOW TABLES").fetchall()) == sorted(Store.OPEN_DATA)
    assert con.execute("SELECT count(*) FROM units").fetchone()[0] == 4 + 3  # fake_scan: 4 conv units, 3 fc
    con.close()
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE notes AS SELECT 1 AS n")
    con.close()


def test_top_logits_join_the_effects_until_cleared(tmp_path):
    """A model's top logits (their own table) read as its units' effects; `clear_logits` drops them and their
    stage (a model no longer scanned on text must not keep another model's logits among its effects)."""
    import numpy as np

    from atlas_builder.store import Store

    up = (np.array([[3, 1]]), np.array([0.5, 0.25])[None], np.array([[2, 0]]), np.array([-0.5, -0.125])[None], True)
    with Store(tmp_path / "store") as store:
        store.write_logits("lm", {"blocks.0": up}, "fp")
        assert store.stage_fingerprint("logits:lm") == "fp"
        assert store.effect_classes().tolist() == [0, 1, 2, 3]
        store.clear_logits("lm")
        assert store.stage_fingerprint("logits:lm") is None and store.effect_classes().tolist() == []
