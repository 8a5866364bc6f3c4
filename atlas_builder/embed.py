"""Embed stage: 2-D maps of units and of inputs (PCA and UMAP), and each unit's nearest units.

Reads the scan's sample matrix from the store (each layer's activations on
the seeded sample of examples) and computes:

- unit maps, per layer and one across all layers of a model: each unit is
  described by its activation profile over the sample, standardized (z-score
  per unit; a constant unit is all zeros), reduced to 2-D by PCA
  (scikit-learn) and by UMAP (umap-learn) after PCA to at most 50 dims;
- input maps, per layer: each sampled example's layer representation (its
  row of the sample matrix; conv channels are already pooled by the scan's
  spatial max), standardized per unit, to 2-D by PCA and UMAP (as many
  points as the scan's sample: `scan.sample_size` bounds them);
- nearest units: for every unit the `neighbours` most similar units of the
  same layer by cosine similarity of the standardized profiles.

Everything is seeded (PCA's full SVD is exact; UMAP runs with random_state
and n_jobs=1), so the same store gives the same coordinates. One SVD per map
gives both the 2-D PCA and the 50 dims UMAP starts from. Small maps fall back: with fewer
than MIN_UMAP_POINTS points UMAP is not run and the PCA coordinates stand in
(the map records why); n_neighbors is capped below the number of points.
umap-learn is slow to import, so it is imported only inside this stage.
Pure computation: the build stores what `embed_model` returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

MIN_UMAP_POINTS = 8  # below this, UMAP's neighbour graph is meaningless: PCA stands in
PCA_DIMS = 50  # UMAP runs on at most this many principal components


@dataclass
class Map2D:
    """One 2-D map: coordinates per method for points in a fixed order."""
    pca: np.ndarray  # [N, 2]
    umap: np.ndarray  # [N, 2] (the PCA coordinates when UMAP did not run)
    umap_ran: bool
    note: str = ""  # why UMAP did not run, or how it was set up


@dataclass
class ModelEmbedding:
    units: dict[str, Map2D]  # per layer; "" = all layers of the model (points in layer order, then unit order)
    inputs: dict[str, Map2D]  # per layer; points = the sample's examples, in sample order
    neighbours: dict[str, tuple[np.ndarray, np.ndarray]]  # per layer: [U, k] unit ids and cosine similarities
    seconds: float = 0.0
    umap_seconds: float = 0.0  # of which inside umap-learn
    extra: dict = field(default_factory=dict)


def standardize(x: np.ndarray) -> np.ndarray:
    """Columns to zero mean and unit variance (float64); constant columns become zeros."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    x = x - x.mean(0)
    std = x.std(0)
    return np.where(std > 1e-12, x / np.where(std > 1e-12, std, 1.0), 0.0)


def pca_2d(x: np.ndarray, seed: int) -> np.ndarray:
    return principal_components(x, 2, seed)


def _fix_signs(coords: np.ndarray) -> np.ndarray:
    """Make each axis's sign deterministic (the largest |value| positive)."""
    idx = np.abs(coords).argmax(0)
    signs = np.sign(coords[idx, np.arange(coords.shape[1])])
    return coords * np.where(signs == 0, 1, signs)


def principal_components(x: np.ndarray, dims: int, seed: int) -> np.ndarray:
    """The first `dims` principal components of the rows of x (sign-fixed), zero-padded to `dims` columns."""
    from sklearn.decomposition import PCA

    n, d = x.shape
    k = min(dims, n, d)
    if n < 2 or k == 0 or not np.any(x != x[0]):  # all rows alike (no variance): every point at the centre
        return np.zeros((n, dims))
    coords = _fix_signs(PCA(n_components=k, svd_solver="full", random_state=seed).fit_transform(x))
    return np.pad(coords, ((0, 0), (0, dims - k)))


def map_2d(x: np.ndarray, seed: int, n_neighbors: int, timer: dict) -> Map2D:
    """PCA and UMAP of the rows of x (already standardized); one SVD serves both."""
    n = x.shape[0]
    components = principal_components(x, PCA_DIMS if n >= MIN_UMAP_POINTS and x.shape[1] > PCA_DIMS else 2, seed)
    pca = components[:, :2]
    if n < MIN_UMAP_POINTS:
        return Map2D(pca, pca, False, f"UMAP needs at least {MIN_UMAP_POINTS} points, this map has {n}: "
                                      f"showing PCA")
    if x.shape[1] > PCA_DIMS:
        x = components
    k = max(2, min(n_neighbors, n - 1))
    start = time.perf_counter()
    import umap  # slow to import: only here

    coords = umap.UMAP(n_neighbors=k, n_components=2, random_state=seed, n_jobs=1, init="spectral"
                       if n > k + 1 else "random").fit_transform(x.astype(np.float32))
    timer["umap"] = timer.get("umap", 0.0) + time.perf_counter() - start
    note = f"UMAP with n_neighbors={k}" + (f" (capped below the {n} points)" if k < n_neighbors else "")
    return Map2D(pca, np.asarray(coords, dtype=np.float64), True, note)


def nearest_units(profiles: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the k most cosine-similar other rows: ([U, k] ids, [U, k] similarities), ties by id."""
    n = profiles.shape[0]
    k = min(k, max(n - 1, 0))
    norms = np.linalg.norm(profiles, axis=1, keepdims=True)
    unit = np.where(norms > 1e-12, profiles / np.where(norms > 1e-12, norms, 1.0), 0.0)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(n), (n, n)), -sims), axis=1)[:, :k]
    return order, np.take_along_axis(sims, order, 1)


def embed_model(layers: dict[str, np.ndarray], seed: int, n_neighbors: int = 15, neighbours: int = 8) -> ModelEmbedding:
    """layers: {name: sample matrix [U, S]} in layer order -> every map and the nearest units."""
    start = time.perf_counter()
    timer: dict = {}
    units, inputs, near = {}, {}, {}
    profiles = {name: standardize(np.asarray(m, dtype=np.float64).T).T for name, m in layers.items()}  # [U, S]
    for name, matrix in layers.items():
        units[name] = map_2d(profiles[name], seed, n_neighbors, timer)
        near[name] = nearest_units(profiles[name], neighbours)
        inputs[name] = map_2d(standardize(np.asarray(matrix, dtype=np.float64).T), seed, n_neighbors, timer)
    if layers:
        units[""] = map_2d(np.concatenate(list(profiles.values())), seed, n_neighbors, timer)
    return ModelEmbedding(units, inputs, near, time.perf_counter() - start, timer.get("umap", 0.0))
