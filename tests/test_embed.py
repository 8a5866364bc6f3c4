"""Embed stage: determinism, small-map fallback, nearest units against brute force, maps on the pages."""

from __future__ import annotations

import re

import numpy as np
import pytest

from atlas_builder import embed
from atlas_builder.build import build
from atlas_builder.config import load_config
from atlas_builder.store import Store
from sitecheck import broken_links, read_page


def profiles(n_units=40, n_examples=120, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((3, n_examples))
    return (rng.standard_normal((n_units, 3)) @ basis + 0.1 * rng.standard_normal((n_units, n_examples))).astype(
        np.float16)


def test_same_seed_same_coordinates_and_other_seed_differs():
    layers = {"a": profiles(), "b": profiles(12, seed=1)}
    one, two = embed.embed_model(layers, seed=3), embed.embed_model(layers, seed=3)
    for key in ("a", "b", ""):
        np.testing.assert_array_equal(one.units[key].umap, two.units[key].umap)
        np.testing.assert_array_equal(one.units[key].pca, two.units[key].pca)
    np.testing.assert_array_equal(one.inputs["a"].umap, two.inputs["a"].umap)
    other = embed.embed_model(layers, seed=4)
    assert not np.allclose(other.units["a"].umap, one.units["a"].umap)
    assert one.units[""].umap.shape == (52, 2)  # the all-layer map: every unit of every layer
    assert one.inputs["a"].umap.shape == (120, 2)


def test_tiny_layer_falls_back_to_pca_and_says_so():
    emb = embed.embed_model({"tiny": profiles(3, 50)}, seed=0)
    m = emb.units["tiny"]
    assert not m.umap_ran and "UMAP needs at least" in m.note
    np.testing.assert_array_equal(m.umap, m.pca)
    assert m.pca.shape == (3, 2)
    ids, sims = emb.neighbours["tiny"]
    assert ids.shape == (3, 2)  # k capped at the other units
    ten = embed.embed_model({"ten": profiles(10, 50)}, seed=0).units["ten"]
    assert ten.umap_ran and "n_neighbors=9" in ten.note  # capped below the number of points


def test_pca_matches_sklearn_up_to_sign():
    from sklearn.decomposition import PCA

    x = embed.standardize(profiles(30, 80).T)
    ours = embed.pca_2d(x, 0)
    ref = PCA(n_components=2, svd_solver="full").fit_transform(x)
    for axis in range(2):
        assert np.allclose(ours[:, axis], ref[:, axis], atol=1e-8) or np.allclose(ours[:, axis], -ref[:, axis],
                                                                                    atol=1e-8)


def test_nearest_units_against_brute_force():
    x = embed.standardize(profiles(25, 60, seed=5).astype(np.float64).T).T
    x[7] = x[3] * 2.0  # a planted twin: cosine similarity 1
    ids, sims = embed.nearest_units(x, 4)
    for u in range(25):
        brute = []
        for v in range(25):
            if v != u:
                denom = np.linalg.norm(x[u]) * np.linalg.norm(x[v])
                brute.append((-(x[u] @ x[v]) / denom if denom else 0.0, v))
        brute.sort()
        assert list(ids[u]) == [v for _, v in brute[:4]]
        np.testing.assert_allclose(sims[u], [-s for s, _ in brute[:4]], rtol=1e-9, atol=1e-12)
    assert ids[3][0] == 7 and sims[3][0] == pytest.approx(1.0)


def test_standardize_handles_constant_and_nonfinite_columns():
    x = np.array([[1.0, 5.0, np.nan], [3.0, 5.0, 1.0], [5.0, 5.0, 2.0]])
    z = embed.standardize(x)
    assert np.isfinite(z).all()
    np.testing.assert_allclose(z[:, 0], [-1.2247448714, 0, 1.2247448714])
    assert (z[:, 1] == 0).all()


def test_maps_and_neighbours_reach_the_pages(tiny_config):
    cfg = load_config(tiny_config)
    build(cfg, progress=False)
    site = cfg.atlas.site_dir
    with Store(cfg.store_dir, read_only=True) as store:
        points = store.map_points("tiny-mlp", "fc1", "units")
        near = store.neighbours("tiny-mlp", "fc1")
        inputs = store.map_points("tiny-mlp", "fc1", "inputs")
    assert len(points["umap"]) == len(points["pca"]) == 5 and not points["umap_ran"]  # 5 < MIN_UMAP_POINTS
    assert len(inputs["umap"]) == 40 and inputs["umap_ran"]
    layer = (site / "tiny-mlp/fc1/index.html").read_text()
    assert layer.count('data-method="umap"') == 1 and layer.count('data-method="pca"') == 1
    assert "UMAP needs at least" in layer  # the fallback is said on the page
    unit = read_page(site / "tiny-mlp/fc1/0/index.html")
    links = [a["href"] for a in unit.find("a")]
    expected = [f"../{other}/index.html" for other, _ in near[0]]
    assert len(expected) == 4 and any(links[i:i + 4] == expected for i in range(len(links)))  # in order
    page = (site / "tiny-mlp/fc1/0/index.html").read_text()
    assert '<img src="../units.svg"' in page and re.search(r'<i style="left:[0-9.]+%;top:[0-9.]+%"></i></a>', page)
    assert (site / "tiny-mlp/fc1/units.svg").read_text().count("h0") == 5  # the layer's dots, its own on top
    model = (site / "tiny-mlp/index.html").read_text()
    assert model.count("<details") == 3  # an input map per layer
    assert "data-thumb=\"../media/examples/" in model  # hover shows the input
    assert broken_links(site) == []
