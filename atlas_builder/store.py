"""Store: the atlas's DuckDB file, the single hand-off between stages.

The only module that imports duckdb. Owns the schema (one DDL below), the
writes of each stage (each in one transaction, so a stage's results are all
there or not at all), the stage fingerprints that let a re-run skip work, and
typed read functions for the website. Every unit row is keyed by
(model, layer, unit). Media files (dataset images) live in the folder beside
the database (`media/`), referenced by example id; see `Store.media_dir`.
It does not compute anything and does not render.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import duckdb
import numpy as np

from .errors import AtlasError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS stages (stage VARCHAR PRIMARY KEY, fingerprint VARCHAR, seconds DOUBLE);
CREATE TABLE IF NOT EXISTS models (
    model VARCHAR PRIMARY KEY, position INTEGER, title VARCHAR, source VARCHAR, fingerprint VARCHAR,
    parameters BIGINT, accuracy DOUBLE, info_json VARCHAR);
CREATE TABLE IF NOT EXISTS layers (
    model VARCHAR, layer VARCHAR, position INTEGER, module_type VARCHAR, shape_json VARCHAR,
    n_units INTEGER, spatial_h INTEGER, spatial_w INTEGER, PRIMARY KEY (model, layer));
CREATE TABLE IF NOT EXISTS units (
    model VARCHAR, layer VARCHAR, unit INTEGER,
    count BIGINT, nonfinite BIGINT, mean DOUBLE, std DOUBLE, min DOUBLE, max DOUBLE,
    frac_active DOUBLE, position_activity DOUBLE, selectivity DOUBLE, top_class INTEGER,
    dead BOOLEAN, saturated BOOLEAN, redundant_with INTEGER, redundant_corr DOUBLE, label VARCHAR,
    hist_lo DOUBLE, hist_hi DOUBLE, hist INTEGER[], class_means DOUBLE[],
    PRIMARY KEY (model, layer, unit));
-- kind: 'top' (highest first) or 'bottom' (lowest first); map: float16 [H*W] bytes, top-k of conv units only
CREATE TABLE IF NOT EXISTS topk (
    model VARCHAR, layer VARCHAR, unit INTEGER, kind VARCHAR, rank INTEGER, example INTEGER, value DOUBLE,
    position INTEGER, map BLOB);
-- activations of the seeded sample of examples: float16 [n_units, n_examples] bytes per layer
CREATE TABLE IF NOT EXISTS samples (model VARCHAR, layer VARCHAR, n_units INTEGER, n_examples INTEGER, matrix BLOB,
    PRIMARY KEY (model, layer));
CREATE TABLE IF NOT EXISTS sample_examples (model VARCHAR, position INTEGER, example INTEGER);
-- feature visualization; kind 'positive' or 'negative'; media paths relative to the media folder
CREATE TABLE IF NOT EXISTS featurevis (
    model VARCHAR, layer VARCHAR, unit INTEGER, kind VARCHAR, activation DOUBLE, image VARCHAR, animation VARCHAR,
    PRIMARY KEY (model, layer, unit, kind));
-- maps: map_layer '' is the all-layer unit map of a model; kind 'units' (point = unit of `layer`)
-- or 'inputs' (point = example); method 'pca' or 'umap'
CREATE TABLE IF NOT EXISTS map_points (
    model VARCHAR, map_layer VARCHAR, kind VARCHAR, method VARCHAR, layer VARCHAR, point INTEGER, x DOUBLE, y DOUBLE);
CREATE TABLE IF NOT EXISTS maps (model VARCHAR, map_layer VARCHAR, kind VARCHAR, umap_ran BOOLEAN, note VARCHAR);
CREATE TABLE IF NOT EXISTS neighbours (
    model VARCHAR, layer VARCHAR, unit INTEGER, rank INTEGER, other INTEGER, similarity DOUBLE);
-- first-layer units: their weights drawn as a heatmap (excitatory red, inhibitory blue)
CREATE TABLE IF NOT EXISTS weights (model VARCHAR, layer VARCHAR, unit INTEGER, image VARCHAR,
    PRIMARY KEY (model, layer, unit));
ALTER TABLE layers ADD COLUMN IF NOT EXISTS title VARCHAR DEFAULT '';  -- added after the first stores
-- the fingerprint of the inputs of the layer's scan (a build scans only the layers without a current one)
ALTER TABLE layers ADD COLUMN IF NOT EXISTS fingerprint VARCHAR DEFAULT '';
-- the fingerprint of the inputs each unit's images were made from (a build resumes at the first unit without)
ALTER TABLE featurevis ADD COLUMN IF NOT EXISTS fingerprint VARCHAR DEFAULT '';
-- activation: the unit's value on the image in the scan's measure (as its dataset examples); objective: what the
-- optimizer reached (the channel mean by default)
ALTER TABLE featurevis ADD COLUMN IF NOT EXISTS objective DOUBLE;
-- where the objective was taken: 'output' (the unit) or 'input' (a ReLU-like activation's input, the pre-activation)
ALTER TABLE featurevis ADD COLUMN IF NOT EXISTS target VARCHAR DEFAULT 'output';
-- token outputs: the leading tokens outside the patch grid spatial_h x spatial_w (a ViT's class token); their
-- maps and positions index all the tokens
ALTER TABLE layers ADD COLUMN IF NOT EXISTS prefix_tokens INTEGER DEFAULT 0;
-- how well the unit's label predicts it: AUROC (class-selective) or the top-k's share outside one class (broad)
ALTER TABLE units ADD COLUMN IF NOT EXISTS label_score DOUBLE;
-- site.unit_attributions: gradient x input of the unit's value on a top example, float16 [h*w] scaled to max |v| 1
ALTER TABLE topk ADD COLUMN IF NOT EXISTS attribution BLOB;
ALTER TABLE topk ADD COLUMN IF NOT EXISTS attribution_h INTEGER DEFAULT 0;
ALTER TABLE topk ADD COLUMN IF NOT EXISTS attribution_w INTEGER DEFAULT 0;
-- examples across a unit's activation range: quantile bin `bin` of the sampled values spans [lo, hi]; rank 0
-- is its example of the highest value (scan.range_examples)
CREATE TABLE IF NOT EXISTS ranges (
    model VARCHAR, layer VARCHAR, unit INTEGER, bin INTEGER, lo DOUBLE, hi DOUBLE, rank INTEGER, example INTEGER,
    value DOUBLE);
-- where in the example the unit peaked (a token layer's token; -1: not recorded)
ALTER TABLE ranges ADD COLUMN IF NOT EXISTS position INTEGER DEFAULT -1;
-- effect on the output: the classes a unit pushes up ('up', effect > 0) and down ('down', < 0) most; effect =
-- mean over a seeded sample of class-c examples of activation x d logit_c / d unit, or exact = true: the
-- weight from the unit to logit c (a unit feeding the classifier directly)
CREATE TABLE IF NOT EXISTS effects (
    model VARCHAR, layer VARCHAR, unit INTEGER, direction VARCHAR, rank INTEGER, class INTEGER, effect DOUBLE,
    exact BOOLEAN);
-- a language model's top logits, in the effects' columns: class = the next token, effect = its logit through the
-- unembedding, exact = true. From the weights alone (their own stage, `logits:<model>`): kept when the scan or
-- the dataset changes; read together with effects
CREATE TABLE IF NOT EXISTS logits (
    model VARCHAR, layer VARCHAR, unit INTEGER, direction VARCHAR, rank INTEGER, class INTEGER, effect DOUBLE,
    exact BOOLEAN);
CREATE TABLE IF NOT EXISTS classes (label INTEGER PRIMARY KEY, name VARCHAR);
-- text datasets: the windows of token ids some page shows (an example is a window; a position, a token in it)
-- and the text of each token in them (whitespace made visible: text.token_text)
CREATE TABLE IF NOT EXISTS windows (example INTEGER PRIMARY KEY, tokens INTEGER[]);
CREATE TABLE IF NOT EXISTS vocab (token INTEGER PRIMARY KEY, text VARCHAR);
CREATE TABLE IF NOT EXISTS examples (example INTEGER PRIMARY KEY, label INTEGER);
CREATE TABLE IF NOT EXISTS predictions (model VARCHAR, example INTEGER, predicted INTEGER, confidence DOUBLE);
-- input pages: each layer's most active units on a few sampled inputs; map: float16 [H*W] bytes (conv units)
CREATE TABLE IF NOT EXISTS input_units (
    model VARCHAR, example INTEGER, layer VARCHAR, rank INTEGER, unit INTEGER, value DOUBLE, map BLOB);
-- the model page's architecture view: architecture.describe's JSON (torch.fx graph or module tree)
CREATE TABLE IF NOT EXISTS architecture (model VARCHAR PRIMARY KEY, description VARCHAR);
-- input pages' explanations (see explain.py), each map float16 [h*w] scaled to max |value| 1: kind 'class'
-- (name: the attribution method, of the predicted class), 'unit' (name: layer, rank: the unit's place in
-- input_units), 'attention' (name: attention module, rank: its forward order, head),
-- 'rollout'; kind 'note' (example -1, name: the text)
CREATE TABLE IF NOT EXISTS input_maps (
    model VARCHAR, example INTEGER, kind VARCHAR, name VARCHAR, rank INTEGER, head INTEGER, h INTEGER,
    w INTEGER, map BLOB);
"""

MODEL_TABLES = ("layers", "units", "topk", "ranges", "effects", "predictions", "samples", "sample_examples",
                "input_units", "input_maps")  # the scan's
LAYER_TABLES = ("layers", "units", "topk", "ranges", "effects", "samples", "input_units")  # ... with rows per layer
FEATUREVIS_TABLES = ("featurevis", "weights")
EMBED_TABLES = ("map_points", "maps", "neighbours")  # rows replaced when a model is re-scanned
EFFECTS = "(SELECT * FROM effects UNION ALL SELECT * FROM logits)"  # a unit's effects: on classes, or top logits


@dataclass(frozen=True)
class ModelRecord:
    model: str
    position: int
    title: str
    source: str
    fingerprint: str
    parameters: int
    accuracy: float | None
    info: dict[str, Any]


@dataclass(frozen=True)
class LayerRecord:
    model: str
    layer: str
    position: int
    module_type: str
    shape: tuple[int, ...]
    n_units: int
    spatial: tuple[int, int] | None  # (H, W) grid the positions index, None for flat outputs
    title: str = ""  # what it is: "Conv2d+ReLU 64×112×112", "Linear 2048→1000" ("" in stores before titles)
    prefix: int = 0  # token outputs: leading tokens before the patch grid (a ViT's class token)


@dataclass(frozen=True)
class TopKRecord:
    rank: int
    example: int
    value: float
    position: int  # flat index into the layer's spatial grid, -1 when flat
    map: np.ndarray | None = None  # [H, W] float32 activation map (top-k of conv units)
    attribution: np.ndarray | None = None  # [h, w] gradient x input of the unit's value (site.unit_attributions)


@dataclass(frozen=True)
class FeatureVisRecord:
    image: str  # media path of the final image
    animation: str | None  # media path of the optimization animation
    activation: float  # the unit's value on the final image, in the scan's measure (as its dataset examples)
    objective: float | None = None  # what the optimizer reached on it (the channel mean by default) ...
    target: str = "output"  # ... of the unit, its "input" (a ReLU-like unit's pre-activation) or, for a block
    # ending in one, "input:<activation>" (the input of that activation's last call in the block)


@dataclass(frozen=True)
class VisualRecord:
    """What the feature-vis stage stored for one unit (any part may be missing)."""
    positive: FeatureVisRecord | None = None
    negative: FeatureVisRecord | None = None
    weights: str | None = None  # media path of the weight heatmap (first-layer units)
    diverse: tuple[FeatureVisRecord, ...] = ()  # the diversity row (featurevis.diversity images), in order


@dataclass(frozen=True)
class RangeRecord:
    bin: int  # quantile bin of the sampled values, 0 = lowest
    lo: float
    hi: float
    examples: tuple[TopKRecord, ...]  # highest value first (position: a token layer's peak token; else -1)


@dataclass(frozen=True)
class EffectsRecord:
    up: tuple[tuple[int, float], ...]  # (class, effect > 0), largest first
    down: tuple[tuple[int, float], ...]  # (class, effect < 0), most negative first
    exact: bool  # the weights to the logits (a unit feeding the classifier), not an estimate


@dataclass(frozen=True)
class UnitRecord:
    model: str
    layer: str
    unit: int
    count: int  # finite activations seen
    nonfinite: int  # NaN/Inf activations seen (left out of every statistic)
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    frac_active: float  # fraction of examples on which it is active
    position_activity: float  # mean fraction of positions on which it is active
    selectivity: float | None  # class-selectivity index, None without labels
    top_class: int  # -1 without labels
    dead: bool
    saturated: bool
    redundant_with: int  # unit of the same layer it duplicates, -1 if none
    redundant_corr: float | None
    label: str
    hist_lo: float
    hist_hi: float
    hist: tuple[int, ...]
    class_means: tuple[float | None, ...]
    top: tuple[TopKRecord, ...]
    bottom: tuple[TopKRecord, ...]
    label_score: float | None = None  # how well the label predicts the unit (scan.label_scores), None: no score
    ranges: tuple["RangeRecord", ...] = ()  # examples across the activation range, lowest bin first
    effects: "EffectsRecord | None" = None  # the classes it pushes up and down most, None: not computed

    @property
    def flags(self) -> list[str]:
        return [name for name, on in (("dead", self.dead), ("saturated", self.saturated),
                                      ("redundant", self.redundant_with >= 0), ("non-finite", self.nonfinite > 0))
                if on]


UNIT_COLUMNS = ("count, nonfinite, mean, std, min, max, frac_active, position_activity, selectivity, top_class, "
                "dead, saturated, redundant_with, redundant_corr, label, hist_lo, hist_hi, hist, class_means")


DATABASE_ID = slice(124, 140)  # the random 16-byte database identifier in a DuckDB file's main header
HEADER = 4096  # the main header block: an 8-byte checksum, then its contents


def duckdb_checksum(data: bytes) -> int:
    """DuckDB's block checksum (duckdb/src/common/checksum.cpp) of a multiple of 8 bytes: 5381 xor-folded with
    each little-endian 64-bit word times 0xbf58476d1ce4e5b9 (mod 2^64)."""
    words = np.frombuffer(data, dtype="<u8")
    with np.errstate(over="ignore"):
        return int(np.bitwise_xor.reduce(words * np.uint64(0xBF58476D1CE4E5B9), initial=np.uint64(5381)))


def reproducible_database(data: bytes, content: bytes) -> bytes:
    """A DuckDB file with its random database identifier replaced by one derived from `content` (the data it
    holds) and its header's checksum redone, so two builds of the same data give the same bytes. Checked: the
    identifier is the only difference between two such files, and DuckDB opens the result read-only and
    read-write (`test_store`)."""
    out = bytearray(data)
    if out[8:12] != b"DUCK" or len(out) < HEADER:
        raise AtlasError("DuckDB wrote a database file of a layout this version of Neuron Atlas does not know; "
                         "pin the duckdb package to the version in its tests, or report it")
    out[DATABASE_ID] = hashlib.sha1(content).digest()[:16]
    out[:8] = duckdb_checksum(bytes(out[8:HEADER])).to_bytes(8, "little")
    return bytes(out)


def _object_rows(matrix: np.ndarray) -> np.ndarray:
    """A 2-D array as a 1-D object array of rows (DuckDB reads it as a LIST column)."""
    out = np.empty(len(matrix), dtype=object)
    out[:] = list(matrix)
    return out


def grid_map(blob: bytes, prefix: int, shape: tuple[int, int]) -> np.ndarray:
    """A stored float16 map as float32 over its grid (a token map without its leading `prefix` tokens)."""
    return np.frombuffer(blob, dtype=np.float16)[prefix or 0:].astype(np.float32).reshape(shape)


def _none_if_nan(value):
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else value


class Store:
    """An open atlas store; use as a context manager (closes the connection)."""

    def __init__(self, folder: Path, read_only: bool = False):
        self.folder = Path(folder)
        if not read_only:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "atlas.duckdb"
        try:
            self.con = duckdb.connect(str(self.path), read_only=read_only)
            if not read_only:
                self.con.execute(SCHEMA)
        except duckdb.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AtlasError(f"cannot open the store {self.path} ({first}); make atlas.data_dir writable, "
                             f"or wait for the other build that holds it open") from None

    @property
    def media_dir(self) -> Path:
        return self.folder / "media"

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- transactions and fingerprints --------------------------------------

    def _transaction(self):
        store = self

        class _Tx:
            def __enter__(self):
                store.con.execute("BEGIN TRANSACTION")

            def __exit__(self, exc_type, *rest):
                store.con.execute("ROLLBACK" if exc_type else "COMMIT")

        return _Tx()

    def stage_fingerprint(self, stage: str) -> str | None:
        row = self.con.execute("SELECT fingerprint FROM stages WHERE stage = ?", [stage]).fetchone()
        return row[0] if row else None

    def _mark_stage(self, stage: str, fingerprint: str, seconds: float) -> None:
        self.con.execute("INSERT OR REPLACE INTO stages VALUES (?, ?, ?)", [stage, fingerprint, seconds])

    # --- writes -------------------------------------------------------------

    def write_meta(self, items: dict[str, str]) -> None:
        with self._transaction():
            self.con.execute("DELETE FROM meta")
            self.con.executemany("INSERT INTO meta VALUES (?, ?)", sorted(items.items()))

    def write_dataset(self, class_names: Iterable[str], labels: np.ndarray, fingerprint: str) -> None:
        """Classes and example labels; clears everything that referred to an older dataset."""
        with self._transaction():
            if self.stage_fingerprint("dataset") != fingerprint:  # (the top logits, of the weights alone, stay)
                for table in ("classes", "examples", "windows", "vocab") + MODEL_TABLES + \
                        FEATUREVIS_TABLES + EMBED_TABLES:
                    self.con.execute(f"DELETE FROM {table}")
                self.con.execute("DELETE FROM stages WHERE NOT starts_with(stage, 'logits:')")
            self.con.execute("DELETE FROM classes")
            if list(class_names):  # a text dataset has none
                self.con.executemany("INSERT INTO classes VALUES (?, ?)", list(enumerate(class_names)))
            self.con.execute("DELETE FROM examples")
            self._insert("examples", {"example": np.arange(len(labels), dtype=np.int32),
                                      "label": labels.astype(np.int32)})
            self._mark_stage("dataset", fingerprint, 0.0)

    def write_model(self, record: ModelRecord) -> None:
        with self._transaction():
            self.con.execute("DELETE FROM models WHERE model = ?", [record.model])
            self.con.execute("INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [
                record.model, record.position, record.title, record.source, record.fingerprint,
                record.parameters, record.accuracy, json.dumps(record.info, sort_keys=True)])

    def keep_models(self, names: list[str]) -> None:
        """Drop every model (and its rows) not in `names`: the config no longer lists it."""
        with self._transaction():
            gone = [r[0] for r in self.con.execute("SELECT model FROM models").fetchall() if r[0] not in names]
            for model in gone:
                for table in ("models", "architecture", "logits") + MODEL_TABLES + FEATUREVIS_TABLES + \
                        EMBED_TABLES:
                    self.con.execute(f"DELETE FROM {table} WHERE model = ?", [model])
                self.con.execute("DELETE FROM stages WHERE stage IN (?, ?, ?, ?, ?)",
                                 [f"scan:{model}", f"featurevis:{model}", f"embed:{model}",
                                  f"architecture:{model}", f"logits:{model}"])

    def layer_fingerprints(self, model: str) -> dict[str, str]:
        """layer -> the fingerprint of its stored scan."""
        return dict(self.con.execute("SELECT layer, fingerprint FROM layers WHERE model = ?", [model]).fetchall())

    def keep_layers(self, model: str, layers: list[str], fingerprint: str) -> None:
        """Drop the scan rows of a model's layers not in `layers` (no longer probed); the rest take their
        places in that order."""
        with self._transaction():
            for table in LAYER_TABLES:
                self.con.execute(f"DELETE FROM {table} WHERE model = ? AND NOT list_contains(?, layer)",
                                 [model, list(layers)])
            for position, name in enumerate(layers):
                self.con.execute("UPDATE layers SET position = ? WHERE model = ? AND layer = ?", [position, model, name])
            self._mark_stage(f"scan:{model}", fingerprint, 0.0)

    def write_scan(self, scan, fingerprint: str, layers: list[str] | None = None,
                   fingerprints: dict[str, str] | None = None) -> None:
        """The rows of one model's scan (a scan.ModelScan), replacing its previous ones.

        layers: every layer the model now has, in order (default: the scan's);
        rows of the layers the scan did not cover are kept (scanned before, with
        the same inputs), those of layers not listed are dropped. fingerprints:
        {layer: fingerprint of its scan's inputs}.
        """
        model = scan.model
        scanned = [layer.info.name for layer in scan.layers]
        layers = list(layers) if layers is not None else scanned
        fingerprints = fingerprints or {}
        with self._transaction():
            for table in MODEL_TABLES:
                if table in LAYER_TABLES:
                    self.con.execute(f"DELETE FROM {table} WHERE model = ? AND (list_contains(?, layer) OR NOT "
                                     f"list_contains(?, layer))", [model, scanned, layers])
                elif table == "input_maps":  # a kept layer keeps its units' attributions; the rest is rewritten
                    self.con.execute("DELETE FROM input_maps WHERE model = ? AND (kind <> 'unit' OR "
                                     "list_contains(?, name) OR NOT list_contains(?, name))", [model, scanned, layers])
                else:
                    self.con.execute(f"DELETE FROM {table} WHERE model = ?", [model])
            for position, name in enumerate(layers):  # the kept layers take their new places
                self.con.execute("UPDATE layers SET position = ? WHERE model = ? AND layer = ?", [position, model, name])
            for layer in scan.layers:
                info = layer.info
                spatial = info.spatial or (0, 0)
                self.con.execute("INSERT INTO layers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
                    model, info.name, layers.index(info.name), info.module_type, json.dumps(list(info.shape)),
                    info.n_units, spatial[0], spatial[1], getattr(layer, "title", ""),
                    fingerprints.get(info.name, ""), info.prefix])
                self._write_units(model, info.name, layer)
                for kind, top in (("top", layer.top), ("bottom", layer.bottom)):
                    self._write_topk(model, info.name, kind, top,
                                     getattr(layer, "top_attributions", None) if kind == "top" else None)
                if getattr(layer, "ranges", None) is not None:
                    self._write_ranges(model, info.name, layer.ranges)
                if getattr(layer, "effects", None) is not None:
                    self._write_effects(model, info.name, layer.effects)
                self.con.execute("INSERT INTO samples VALUES (?, ?, ?, ?, ?)", [
                    model, info.name, layer.sample.shape[1], layer.sample.shape[0],
                    np.ascontiguousarray(layer.sample.T.astype(np.float16)).tobytes()])
            if scan.sample_ids is not None:
                n = len(scan.sample_ids)
                self._insert("sample_examples", {"model": np.full(n, model), "position": np.arange(n, dtype=np.int32),
                                                 "example": np.asarray(scan.sample_ids, dtype=np.int32)})
            if scan.inputs is not None:
                self._write_inputs(model, scan.inputs)
            if scan.predicted is not None:
                n = len(scan.predicted)
                self._insert("predictions", {"model": np.full(n, model),
                                             "example": np.arange(n, dtype=np.int32),
                                             "predicted": scan.predicted.astype(np.int32),
                                             "confidence": scan.confidence.astype(np.float64)})
            self._mark_stage(f"scan:{model}", fingerprint, scan.seconds)

    def _write_inputs(self, model: str, inputs) -> None:
        rows = []
        for layer, units in inputs.units.items():
            maps = inputs.maps[layer]
            for e, example in enumerate(inputs.examples):
                for rank, unit in enumerate(units[e]):
                    blob = None if maps is None else maps[e, rank].astype(np.float16).tobytes()
                    rows.append((model, int(example), layer, rank, int(unit), float(inputs.values[layer][e, rank]),
                                 blob))
        if rows:
            self.con.executemany("INSERT INTO input_units VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        ex = inputs.explained
        if ex is None:
            return
        rows = [(model, -1, "note", note, 0, 0, 0, 0, None) for note in ex.notes]

        def add(e, kind, name, rank, head, m):
            m = np.nan_to_num(np.asarray(m, np.float32))
            top = float(np.abs(m).max()) if m.size else 0.0
            blob = (m / top if top > 0 else m).astype(np.float16).tobytes()
            rows.append((model, int(inputs.examples[e]), kind, name, rank, head, m.shape[0], m.shape[1], blob))
        for e in range(len(inputs.examples)):
            for method, maps in ex.classes.items():
                add(e, "class", method, 0, 0, maps[e])
            for layer, maps in ex.units.items():
                for rank in range(maps.shape[1]):
                    add(e, "unit", layer, rank, 0, maps[e, rank])
            for order, (name, maps) in enumerate(ex.attention.items()):  # rank: the module's forward order
                for head in range(maps.shape[1]):
                    add(e, "attention", name, order, head, maps[e, head])
            if ex.rollout is not None:
                add(e, "rollout", "", 0, 0, ex.rollout[e])
        if rows:
            self.con.executemany("INSERT INTO input_maps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def keep_featurevis(self, model: str, fingerprints: dict[str, str]) -> list[str]:
        """Forget a model's feature-vis rows of layers not in `fingerprints` ({layer: fingerprint}) or made
        from other inputs; returns the layers that had rows and are no longer listed (their media can go)."""
        with self._transaction():
            had = {r[0] for r in self.con.execute("SELECT DISTINCT layer FROM featurevis WHERE model = ?",
                                                  [model]).fetchall()}
            for layer, fp in [(l, None) for l in had if l not in fingerprints] + list(fingerprints.items()):
                self.con.execute("DELETE FROM featurevis WHERE model = ? AND layer = ? AND "
                                 "(? IS NULL OR fingerprint IS DISTINCT FROM ?)", [model, layer, fp, fp])
            self.con.execute("DELETE FROM weights WHERE model = ? AND NOT list_contains(?, layer)",
                             [model, sorted(fingerprints)])
            self.con.execute("DELETE FROM stages WHERE stage = ?", [f"featurevis:{model}"])
        return sorted(had - set(fingerprints))

    def featurevis_kinds(self, model: str, layer: str) -> dict[int, set[str]]:
        """unit -> the kinds ('positive', 'negative') of feature visualization stored for it."""
        out: dict[int, set[str]] = defaultdict(set)
        for unit, kind in self.con.execute("SELECT unit, kind FROM featurevis WHERE model = ? AND layer = ?",
                                           [model, layer]).fetchall():
            out[unit].add(kind)
        return dict(out)

    def add_featurevis(self, model: str, rows: list[tuple], weights: list[tuple],
                       fingerprints: dict[str, str]) -> None:
        """Some units' feature-vis rows (a batch: kept if the build stops later), replacing theirs.

        rows: (layer, unit, kind, activation, image, animation, objective, target); weights: (layer, unit, image);
        fingerprints: {layer: the fingerprint of the inputs its images come from}.
        """
        with self._transaction():
            if rows:
                self.con.executemany("INSERT OR REPLACE INTO featurevis (model, layer, unit, kind, activation, image, "
                                     "animation, objective, target, fingerprint) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                     [(model, *r, fingerprints[r[0]]) for r in rows])
            if weights:
                self.con.executemany("INSERT OR REPLACE INTO weights VALUES (?, ?, ?, ?)",
                                     [(model, *w) for w in weights])

    def mark_stage(self, stage: str, fingerprint: str, seconds: float) -> None:
        """Record that a stage made of separately written parts (feature vis) is complete."""
        with self._transaction():
            self._mark_stage(stage, fingerprint, seconds)

    # site/data/<name>.parquet: what the atlas publishes, one query each (no media blobs); map coordinates and
    # the sampled values behind the range rows (float16 in the scan) as 4-byte floats: half the bytes
    OPEN_DATA = {
        "models": "SELECT model, position, title, source, parameters, accuracy FROM models ORDER BY position",
        "layers": "SELECT model, layer, position, module_type, shape_json, n_units, spatial_h, spatial_w, title, "
                  "prefix_tokens FROM layers ORDER BY model, position",
        # class_means as FLOAT[]: float32 activations' means (DOUBLE would double the units x classes matrix,
        # at ImageNet's 1,000 classes 4 KB of each unit's 8)
        "units": f"SELECT model, layer, unit, {UNIT_COLUMNS.replace('class_means', 'class_means::FLOAT[] AS class_means')}, "
                 "label_score FROM units ORDER BY model, layer, unit",
        "examples": "SELECT model, layer, unit, kind, rank, example, value, position FROM topk "
                    "ORDER BY model, layer, unit, kind, rank",
        "embeddings": "SELECT model, map_layer, kind, method, layer, point, x::FLOAT AS x, y::FLOAT AS y FROM map_points "
                      "ORDER BY model, map_layer, kind, method, layer, point",
        "ranges": "SELECT model, layer, unit, bin, lo::FLOAT AS lo, hi::FLOAT AS hi, rank, example, value::FLOAT AS value, "
                  "position FROM ranges "
                  "ORDER BY model, layer, unit, bin, rank",
        "effects": f"SELECT model, layer, unit, direction, rank, class, effect, exact FROM {EFFECTS} "
                   "ORDER BY model, layer, unit, direction, rank",
        "classes": "SELECT label, name FROM classes ORDER BY label",
        "labels": "SELECT example, label FROM examples ORDER BY example",
        # a text atlas's shown windows (token ids) and its tokens' texts (empty for images)
        "windows": "SELECT example, tokens FROM windows ORDER BY example",
        "vocab": "SELECT token, text FROM vocab ORDER BY token",
    }

    OPEN_DATABASE = "atlas.duckdb"  # the same tables in one DuckDB file, beside the Parquet files

    def open_data(self) -> dict[str, bytes]:
        """The atlas as Parquet files ({file name: bytes}, `OPEN_DATA`), written by DuckDB's COPY ... TO, and
        the same tables as one DuckDB database (`OPEN_DATABASE`, 16 KB blocks: DuckDB's default 256 KB
        blocks would make a small atlas's file several times its Parquet), made reproducible by
        `reproducible_database`."""
        import tempfile

        out = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, query in self.OPEN_DATA.items():
                path = Path(tmp) / f"{name}.parquet"
                self.con.execute(f"COPY ({query}) TO '{path}' (FORMAT parquet, COMPRESSION zstd)")
                out[path.name] = path.read_bytes()
            database = Path(tmp) / self.OPEN_DATABASE
            con = duckdb.connect()
            try:
                con.execute(f"ATTACH '{database}' AS atlas (BLOCK_SIZE 16384)")
                for name in self.OPEN_DATA:
                    con.execute(f"CREATE TABLE atlas.{name} AS SELECT * FROM read_parquet('{Path(tmp) / name}.parquet')")
                con.execute("DETACH atlas")
            finally:
                con.close()
            out[database.name] = reproducible_database(database.read_bytes(),
                                                       b"".join(out[f"{name}.parquet"] for name in self.OPEN_DATA))
        return out

    def open_data_schema(self) -> dict[str, list[tuple[str, str]]]:
        """{file name: [(column, DuckDB type)]} of `open_data`'s files."""
        return {f"{name}.parquet": [(r[0], r[1]) for r in self.con.execute(f"DESCRIBE {query}").fetchall()]
                for name, query in self.OPEN_DATA.items()}

    def write_architecture(self, model: str, description: dict, fingerprint: str) -> None:
        """architecture.describe's description of a model, replacing the previous one."""
        with self._transaction():
            self.con.execute("DELETE FROM architecture WHERE model = ?", [model])
            self.con.execute("INSERT INTO architecture VALUES (?, ?)", [model, json.dumps(description)])
            self._mark_stage(f"architecture:{model}", fingerprint, 0.0)

    def architecture(self, model: str) -> dict | None:
        row = self.con.execute("SELECT description FROM architecture WHERE model = ?", [model]).fetchone()
        return json.loads(row[0]) if row else None

    def write_embedding(self, model: str, emb, sample_ids: np.ndarray, fingerprint: str) -> None:
        """An embed.ModelEmbedding of a model, replacing the previous one."""
        n_units = {l.layer: l.n_units for l in self.layers(model)}  # in layer order
        layers = list(n_units)
        with self._transaction():
            for table in EMBED_TABLES:
                self.con.execute(f"DELETE FROM {table} WHERE model = ?", [model])
            cols: dict[str, list] = {k: [] for k in ("model", "map_layer", "kind", "method", "layer", "point", "x", "y")}

            def add(map_layer, kind, point_layers, points, m):
                for method, coords in (("pca", m.pca), ("umap", m.umap)):
                    n = len(coords)
                    cols["model"].append(np.full(n, model))
                    cols["map_layer"].append(np.full(n, map_layer))
                    cols["kind"].append(np.full(n, kind))
                    cols["method"].append(np.full(n, method))
                    cols["layer"].append(np.asarray(point_layers, dtype=object))
                    cols["point"].append(np.asarray(points, dtype=np.int32))
                    cols["x"].append(coords[:, 0].astype(np.float64))
                    cols["y"].append(coords[:, 1].astype(np.float64))
                self.con.execute("INSERT INTO maps VALUES (?, ?, ?, ?, ?)", [model, map_layer, kind, m.umap_ran, m.note])

            for name, m in emb.units.items():
                if name:
                    add(name, "units", [name] * n_units[name], np.arange(n_units[name]), m)
                else:
                    add("", "units", [l for l in layers for _ in range(n_units[l])],
                        np.concatenate([np.arange(n_units[l]) for l in layers]), m)
            for name, m in emb.inputs.items():
                add(name, "inputs", [name] * len(sample_ids), sample_ids, m)
            if cols["model"]:
                self._insert("map_points", {k: np.concatenate(v) for k, v in cols.items()})
            for name, (ids, sims) in emb.neighbours.items():
                u, k = ids.shape
                if u and k:
                    self._insert("neighbours", {
                        "model": np.full(u * k, model), "layer": np.full(u * k, name),
                        "unit": np.repeat(np.arange(u, dtype=np.int32), k),
                        "rank": np.tile(np.arange(k, dtype=np.int32), u),
                        "other": ids.reshape(-1).astype(np.int32), "similarity": sims.reshape(-1).astype(np.float64)})
            self._mark_stage(f"embed:{model}", fingerprint, emb.seconds)

    def map_points(self, model: str, map_layer: str, kind: str) -> dict:
        """{"pca": [(layer, point, x, y)...], "umap": [...], "umap_ran": bool, "note": str} or {} if none."""
        info = self.con.execute("SELECT umap_ran, note FROM maps WHERE model = ? AND map_layer = ? AND kind = ?",
                                [model, map_layer, kind]).fetchone()
        if info is None:
            return {}
        out = {"umap_ran": info[0], "note": info[1]}
        for method in ("pca", "umap"):
            out[method] = self.con.execute(
                "SELECT layer, point, x, y FROM map_points WHERE model = ? AND map_layer = ? AND kind = ? AND "
                "method = ? ORDER BY rowid", [model, map_layer, kind, method]).fetchall()
        return out

    def neighbours(self, model: str, layer: str) -> dict[int, list[tuple[int, float]]]:
        out: dict[int, list[tuple[int, float]]] = defaultdict(list)
        for unit, other, sim in self.con.execute(
                "SELECT unit, other, similarity FROM neighbours WHERE model = ? AND layer = ? ORDER BY unit, rank",
                [model, layer]).fetchall():
            out[unit].append((other, sim))
        return dict(out)

    def clear_featurevis(self, model: str) -> None:
        with self._transaction():
            for table in FEATUREVIS_TABLES:
                self.con.execute(f"DELETE FROM {table} WHERE model = ?", [model])
            self.con.execute("DELETE FROM stages WHERE stage = ?", [f"featurevis:{model}"])

    def _write_units(self, model: str, layer_name: str, layer) -> None:
        st = layer.stats
        n = len(st["mean"])
        columns = {"model": np.full(n, model), "layer": np.full(n, layer_name), "unit": np.arange(n, dtype=np.int32)}
        for key in ("count", "nonfinite"):
            columns[key] = st[key].astype(np.int64)
        for key in ("mean", "std", "min", "max", "frac_active", "position_activity", "selectivity"):
            columns[key] = st[key].astype(np.float64)
        columns["top_class"] = st["top_class"].astype(np.int32)
        columns["dead"], columns["saturated"] = st["dead"].astype(bool), st["saturated"].astype(bool)
        columns["redundant_with"] = st["redundant_with"].astype(np.int32)
        columns["redundant_corr"] = st["redundant_corr"].astype(np.float64)
        columns["label"] = np.array(layer.labels, dtype=object)
        columns["label_score"] = np.asarray(st.get("label_score", np.full(n, np.nan)), dtype=np.float64)
        columns["hist_lo"], columns["hist_hi"] = layer.hist_lo.astype(np.float64), layer.hist_hi.astype(np.float64)
        columns["hist"] = _object_rows(layer.hist_counts.astype(np.int32))
        columns["class_means"] = _object_rows(layer.class_means.astype(np.float64))
        self._insert("units", columns)

    def _write_topk(self, model: str, layer_name: str, kind: str, top, attributions=None) -> None:
        n_units, k = top.values.shape
        keep = top.valid.reshape(-1)
        rows = int(keep.sum())
        maps = np.full(n_units * k, None, dtype=object)
        if top.maps is not None and kind == "top":  # bottom-k maps would double the size for little
            flat = top.maps.reshape(n_units * k, -1).astype(np.float16)
            maps[:] = [row.tobytes() for row in flat]
        attr = np.full(n_units * k, None, dtype=object)
        ah = aw = 0
        if attributions is not None:  # [U, k, h, w]
            ah, aw = attributions.shape[2:]
            flat = np.nan_to_num(attributions.reshape(n_units * k, -1).astype(np.float32))
            top_abs = np.abs(flat).max(1, keepdims=True)
            flat = np.divide(flat, top_abs, out=np.zeros_like(flat), where=top_abs > 0).astype(np.float16)
            attr[:] = [row.tobytes() for row in flat]
        self._insert("topk", {
            "model": np.full(rows, model), "layer": np.full(rows, layer_name),
            "unit": np.repeat(np.arange(n_units, dtype=np.int32), k)[keep], "kind": np.full(rows, kind),
            "rank": np.tile(np.arange(k, dtype=np.int32), n_units)[keep],
            "example": top.ids.reshape(-1).astype(np.int32)[keep],
            "value": top.values.reshape(-1).astype(np.float64)[keep],
            "position": top.positions.reshape(-1).astype(np.int32)[keep], "map": maps[keep],
            "attribution": attr[keep], "attribution_h": np.full(rows, ah, dtype=np.int32),
            "attribution_w": np.full(rows, aw, dtype=np.int32)})

    def _write_ranges(self, model: str, layer_name: str, ranges) -> None:
        n_units, bins, k = ranges.examples.shape
        keep = (ranges.examples >= 0).reshape(-1)
        rows = int(keep.sum())
        grid = np.indices((n_units, bins, k)).reshape(3, -1)
        self._insert("ranges", {
            "model": np.full(rows, model), "layer": np.full(rows, layer_name),
            "unit": grid[0].astype(np.int32)[keep], "bin": grid[1].astype(np.int32)[keep],
            "lo": np.repeat(ranges.lo.reshape(-1), k)[keep], "hi": np.repeat(ranges.hi.reshape(-1), k)[keep],
            "rank": grid[2].astype(np.int32)[keep], "example": ranges.examples.reshape(-1).astype(np.int32)[keep],
            "value": ranges.values.reshape(-1).astype(np.float64)[keep],
            "position": ranges.positions.reshape(-1).astype(np.int32)[keep]})

    def write_logits(self, model: str, logits: dict[str, tuple], fingerprint: str) -> None:
        """A language model's top logits ({layer: (up tokens [U, k], up logits, down tokens, down logits, exact)},
        scan.token_logits), replacing its previous ones."""
        with self._transaction():
            self.con.execute("DELETE FROM logits WHERE model = ?", [model])
            for layer_name, top in logits.items():
                self._write_effects(model, layer_name, top, "logits")
            self._mark_stage(f"logits:{model}", fingerprint, 0.0)

    def clear_logits(self, model: str) -> None:
        """Drop a model's top logits (it is no longer scanned on text: they would join its effects)."""
        with self._transaction():
            self.con.execute("DELETE FROM logits WHERE model = ?", [model])
            self.con.execute("DELETE FROM stages WHERE stage = ?", [f"logits:{model}"])

    def _write_effects(self, model: str, layer_name: str, effects, table: str = "effects") -> None:
        """effects: (up classes [U, k], up values, down classes, down values, exact) of explain.top_effects."""
        up_c, up_v, down_c, down_v, exact = effects
        for direction, classes, values in (("up", up_c, up_v), ("down", down_c, down_v)):
            n_units, k = classes.shape
            keep = (classes >= 0).reshape(-1)
            rows = int(keep.sum())
            self._insert(table, {
                "model": np.full(rows, model), "layer": np.full(rows, layer_name),
                "unit": np.repeat(np.arange(n_units, dtype=np.int32), k)[keep], "direction": np.full(rows, direction),
                "rank": np.tile(np.arange(k, dtype=np.int32), n_units)[keep],
                "class": classes.reshape(-1).astype(np.int32)[keep],
                "effect": values.reshape(-1).astype(np.float64)[keep], "exact": np.full(rows, bool(exact))})

    def _insert(self, table: str, columns: dict[str, np.ndarray]) -> None:
        self.con.register("_rows", columns)
        try:
            self.con.execute(f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM _rows")
        finally:
            self.con.unregister("_rows")

    # --- reads --------------------------------------------------------------

    def meta(self) -> dict[str, str]:
        return dict(self.con.execute("SELECT key, value FROM meta ORDER BY key").fetchall())

    def models(self) -> list[ModelRecord]:
        rows = self.con.execute("SELECT * FROM models ORDER BY position, model").fetchall()
        return [ModelRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7])) for r in rows]

    def layers(self, model: str) -> list[LayerRecord]:
        rows = self.con.execute("SELECT * FROM layers WHERE model = ? ORDER BY position", [model]).fetchall()
        return [LayerRecord(r[0], r[1], r[2], r[3], tuple(json.loads(r[4])), r[5],
                            (r[6], r[7]) if r[6] else None, r[8] or "", r[10] or 0) for r in rows]

    def units(self, model: str, layer: str) -> list[UnitRecord]:
        """Every unit of a layer with its statistics and top-/bottom-k examples, in unit order."""
        spatial = self.con.execute("SELECT spatial_h, spatial_w, prefix_tokens FROM layers WHERE model = ? AND "
                                   "layer = ?", [model, layer]).fetchone()
        shape = (spatial[0], spatial[1]) if spatial and spatial[0] else None
        prefix = spatial[2] if spatial else 0
        ranked: dict[tuple[str, int], list[TopKRecord]] = defaultdict(list)
        for unit, kind, rank, example, value, position, blob, attr, ah, aw in self.con.execute(
                "SELECT unit, kind, rank, example, value, position, map, attribution, attribution_h, attribution_w "
                "FROM topk WHERE model = ? AND layer = ? ORDER BY unit, kind, rank", [model, layer]).fetchall():
            heat = None
            if blob is not None and shape is not None:
                heat = grid_map(blob, prefix, shape)
            attribution = np.frombuffer(attr, dtype=np.float16).astype(np.float32).reshape(ah, aw) \
                if attr is not None and ah else None
            ranked[(kind, unit)].append(TopKRecord(rank, example, value, position, heat, attribution))
        bins: dict[int, dict[int, list]] = defaultdict(dict)
        for unit, b, lo, hi, rank, example, value, position in self.con.execute(
                "SELECT unit, bin, lo, hi, rank, example, value, position FROM ranges WHERE model = ? AND layer = ? "
                "ORDER BY unit, bin, rank", [model, layer]).fetchall():
            bins[unit].setdefault(b, [lo, hi, []])[2].append(TopKRecord(rank, example, value, position))
        effects: dict[int, dict] = defaultdict(lambda: {"up": [], "down": [], "exact": False})
        for unit, direction, cls, effect, exact in self.con.execute(
                f"SELECT unit, direction, class, effect, exact FROM {EFFECTS} WHERE model = ? AND layer = ? "
                "ORDER BY unit, direction, rank", [model, layer]).fetchall():
            effects[unit][direction].append((cls, effect))
            effects[unit]["exact"] = exact
        rows = self.con.execute(f"SELECT unit, {UNIT_COLUMNS}, label_score FROM units WHERE model = ? AND layer = ? "
                                "ORDER BY unit",
                                [model, layer]).fetchall()
        out = []
        for r in rows:
            unit, values = r[0], [_none_if_nan(v) for v in r[1:-1]]
            values[17] = tuple(values[17] or ())
            values[18] = tuple(_none_if_nan(v) for v in (values[18] or ()))
            out.append(UnitRecord(model, layer, unit, *values, label_score=_none_if_nan(r[-1]),
                                  top=tuple(ranked[("top", unit)]),
                                  bottom=tuple(ranked[("bottom", unit)]),
                                  ranges=tuple(RangeRecord(b, lo, hi, tuple(ex))
                                               for b, (lo, hi, ex) in sorted(bins.get(unit, {}).items())),
                                  effects=EffectsRecord(tuple(effects[unit]["up"]), tuple(effects[unit]["down"]),
                                                        effects[unit]["exact"]) if unit in effects else None))
        return out

    def sample(self, model: str, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """The layer's sampled activations [U, S] (float16) and the example ids of its columns ([U, 0] without)."""
        row = self.con.execute("SELECT n_units, n_examples, matrix FROM samples WHERE model = ? AND layer = ?",
                               [model, layer]).fetchone()
        if row is None:
            return np.zeros((0, 0), dtype=np.float16), np.zeros(0, dtype=np.int64)
        ids = self.con.execute("SELECT example FROM sample_examples WHERE model = ? ORDER BY position",
                               [model]).fetchnumpy()["example"]
        return np.frombuffer(row[2], dtype=np.float16).reshape(row[0], row[1]), ids

    def visuals(self, model: str, layer: str) -> dict[int, VisualRecord]:
        """Feature visualizations and weight heatmaps of a layer's units, by unit."""
        parts: dict[int, dict] = defaultdict(dict)
        for unit, kind, activation, image, animation, objective, target in self.con.execute(
                "SELECT unit, kind, activation, image, animation, objective, target FROM featurevis "
                "WHERE model = ? AND layer = ?", [model, layer]).fetchall():
            parts[unit][kind] = FeatureVisRecord(image, animation, activation, objective, target)
        for unit, image in self.con.execute("SELECT unit, image FROM weights WHERE model = ? AND layer = ?",
                                            [model, layer]).fetchall():
            parts[unit]["weights"] = image
        def row(p: dict) -> tuple[FeatureVisRecord, ...]:
            return tuple(p[k] for k in sorted((k for k in p if k.startswith("diverse")), key=lambda k: int(k[7:])))
        return {u: VisualRecord(p.get("positive"), p.get("negative"), p.get("weights"), row(p))
                for u, p in sorted(parts.items())}

    def media_files(self) -> list[str]:
        """Every media path (relative to the media folder) the pages reference, sorted."""
        text = self.con.execute("SELECT count(*) FROM windows").fetchone()[0] > 0  # its examples show as tokens
        files = set() if text else {f"examples/{e}.webp" for e in self.referenced_examples()}
        for row in self.con.execute("SELECT image, animation FROM featurevis").fetchall():
            files.update(p for p in row if p)
        files.update(r[0] for r in self.con.execute("SELECT image FROM weights").fetchall())
        return sorted(files)

    def class_names(self) -> list[str]:
        return [r[0] for r in self.con.execute("SELECT name FROM classes ORDER BY label").fetchall()]

    def labels(self) -> np.ndarray:
        return self.con.execute("SELECT label FROM examples ORDER BY example").fetchnumpy()["label"]

    def predictions(self, model: str) -> dict[int, tuple[int, float]]:
        rows = self.con.execute("SELECT example, predicted, confidence FROM predictions WHERE model = ?",
                                [model]).fetchall()
        return {e: (p, c) for e, p, c in rows}

    def referenced_examples(self) -> list[int]:
        """Examples some page shows (top- and bottom-k, activation ranges, input pages, input maps' hover images),
        ascending."""
        return [r[0] for r in self.con.execute(
            "SELECT example FROM topk UNION SELECT example FROM ranges UNION SELECT example FROM input_units "
            "UNION SELECT point FROM map_points WHERE kind = 'inputs' ORDER BY 1").fetchall()]

    def write_windows(self, examples: list[int], tokens: np.ndarray, vocab: dict[int, str]) -> None:
        """A text dataset's windows `examples` ([n, context] token ids) and the texts of their tokens,
        replacing the previous ones."""
        with self._transaction():
            self.con.execute("DELETE FROM windows")
            self.con.execute("DELETE FROM vocab")
            if len(examples):
                self.con.executemany("INSERT INTO windows VALUES (?, ?)",
                                     [(int(e), [int(t) for t in row]) for e, row in zip(examples, tokens)])
            if vocab:
                self.con.executemany("INSERT INTO vocab VALUES (?, ?)", sorted(vocab.items()))

    def effect_classes(self) -> np.ndarray:
        """Every class (a text atlas: token) some unit's effects name, ascending."""
        return np.asarray([r[0] for r in self.con.execute(
            f"SELECT DISTINCT class FROM {EFFECTS} ORDER BY 1").fetchall()], dtype=np.int64)

    def windows(self) -> tuple[dict[int, np.ndarray], dict[int, str]]:
        """({example: token ids}, {token: text}) of a text dataset (both empty for images)."""
        rows = {int(e): np.asarray(t, dtype=np.int64) for e, t in self.con.execute("SELECT example, tokens FROM windows").fetchall()}
        return rows, dict(self.con.execute("SELECT token, text FROM vocab").fetchall())

    def peak_tokens(self) -> dict[tuple[str, str, int], list[int]]:
        """A text dataset's units: (model, layer, unit) -> the token at the peak of each of its top examples, in
        rank order (the tokens it fires on most often: `parts.frequent_tokens`); {} for images."""
        rows = self.con.execute(
            "SELECT t.model, t.layer, t.unit, w.tokens[t.position + 1] FROM topk t JOIN windows w USING (example) "
            "WHERE t.kind = 'top' AND t.position >= 0 ORDER BY t.model, t.layer, t.unit, t.rank").fetchall()
        out: dict[tuple[str, str, int], list[int]] = defaultdict(list)
        for model, layer, unit, token in rows:
            out[(model, layer, unit)].append(int(token))
        return dict(out)

    def input_examples(self) -> list[int]:
        """Examples that have an input page, ascending."""
        return [r[0] for r in self.con.execute("SELECT DISTINCT example FROM input_units ORDER BY example").fetchall()]

    def input_units(self, model: str) -> dict[int, dict[str, list[tuple[int, float, np.ndarray | None]]]]:
        """example -> layer -> [(unit, value, map [H, W] or None)], most active first, layers in model order."""
        rows = self.con.execute(
            "SELECT i.example, i.layer, i.unit, i.value, i.map, l.spatial_h, l.spatial_w, l.prefix_tokens "
            "FROM input_units i "
            "JOIN layers l ON l.model = i.model AND l.layer = i.layer WHERE i.model = ? "
            "ORDER BY i.example, l.position, i.rank", [model]).fetchall()
        out: dict[int, dict[str, list]] = defaultdict(dict)
        for example, layer, unit, value, blob, h, w, prefix in rows:
            heat = None
            if blob is not None and h:
                heat = grid_map(blob, prefix, (h, w))
            out[example].setdefault(layer, []).append((unit, _none_if_nan(value), heat))
        return dict(out)

    def input_maps(self, model: str) -> tuple[dict[int, dict], list[str]]:
        """({example: {"class": {method: map}, "unit": {(layer, rank): map}, "attention": {module: [map per
        head]}, "rollout": map}}, the notes of what is missing), maps float32 [h, w] scaled to max |value| 1."""
        out: dict[int, dict] = defaultdict(lambda: {"class": {}, "unit": {}, "attention": {}, "rollout": None})
        notes = []
        for example, kind, name, rank, head, h, w, blob in self.con.execute(
                "SELECT example, kind, name, rank, head, h, w, map FROM input_maps WHERE model = ? "
                "ORDER BY example, kind, rank, name, head", [model]).fetchall():
            if kind == "note":
                notes.append(name)
                continue
            m = np.frombuffer(blob, dtype=np.float16).astype(np.float32).reshape(h, w)
            if kind == "class":
                out[example]["class"][name] = m
            elif kind == "unit":
                out[example]["unit"][(name, rank)] = m
            elif kind == "attention":
                out[example]["attention"].setdefault(name, []).append(m)
            else:
                out[example]["rollout"] = m
        return dict(out), notes

    def stages(self) -> dict[str, tuple[str, float]]:
        return {s: (f, sec) for s, f, sec in self.con.execute("SELECT * FROM stages ORDER BY stage").fetchall()}
