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

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import duckdb
import numpy as np

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
    model VARCHAR, layer VARCHAR, unit INTEGER, mean DOUBLE, max DOUBLE, PRIMARY KEY (model, layer, unit));
CREATE TABLE IF NOT EXISTS topk (
    model VARCHAR, layer VARCHAR, unit INTEGER, rank INTEGER, example INTEGER, value DOUBLE, position INTEGER);
CREATE TABLE IF NOT EXISTS classes (label INTEGER PRIMARY KEY, name VARCHAR);
CREATE TABLE IF NOT EXISTS examples (example INTEGER PRIMARY KEY, label INTEGER);
CREATE TABLE IF NOT EXISTS predictions (model VARCHAR, example INTEGER, predicted INTEGER, confidence DOUBLE);
"""

MODEL_TABLES = ("layers", "units", "topk", "predictions")  # rows replaced when a model is re-scanned


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


@dataclass(frozen=True)
class TopKRecord:
    rank: int
    example: int
    value: float
    position: int  # flat index into the layer's spatial grid, -1 when flat


@dataclass(frozen=True)
class UnitRecord:
    model: str
    layer: str
    unit: int
    mean: float
    max: float
    top: tuple[TopKRecord, ...]


class Store:
    """An open atlas store; use as a context manager (closes the connection)."""

    def __init__(self, folder: Path, read_only: bool = False):
        self.folder = Path(folder)
        if not read_only:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "atlas.duckdb"
        self.con = duckdb.connect(str(self.path), read_only=read_only)
        if not read_only:
            self.con.execute(SCHEMA)

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
            if self.stage_fingerprint("dataset") != fingerprint:
                for table in ("classes", "examples", "stages") + MODEL_TABLES:
                    self.con.execute(f"DELETE FROM {table}")
            self.con.execute("DELETE FROM classes")
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
                for table in ("models",) + MODEL_TABLES:
                    self.con.execute(f"DELETE FROM {table} WHERE model = ?", [model])
                self.con.execute("DELETE FROM stages WHERE stage = ?", [f"scan:{model}"])

    def write_scan(self, scan, fingerprint: str) -> None:
        """All rows of one model's scan (a scan.ModelScan), replacing its previous ones."""
        model = scan.model
        with self._transaction():
            for table in MODEL_TABLES:
                self.con.execute(f"DELETE FROM {table} WHERE model = ?", [model])
            for position, layer in enumerate(scan.layers):
                info = layer.info
                spatial = info.spatial or (0, 0)
                self.con.execute("INSERT INTO layers VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [
                    model, info.name, position, info.module_type, json.dumps(list(info.shape)),
                    info.n_units, spatial[0], spatial[1]])
                n_units, k = layer.topk_values.shape
                units = np.arange(n_units, dtype=np.int32)
                self._insert("units", {"model": np.full(n_units, model), "layer": np.full(n_units, info.name),
                                       "unit": units, "mean": layer.mean.astype(np.float64),
                                       "max": layer.max.astype(np.float64)})
                self._insert("topk", {
                    "model": np.full(n_units * k, model), "layer": np.full(n_units * k, info.name),
                    "unit": np.repeat(units, k), "rank": np.tile(np.arange(k, dtype=np.int32), n_units),
                    "example": layer.topk_ids.reshape(-1).astype(np.int32),
                    "value": layer.topk_values.reshape(-1).astype(np.float64),
                    "position": layer.topk_positions.reshape(-1).astype(np.int32)})
            if scan.predicted is not None:
                n = len(scan.predicted)
                self._insert("predictions", {"model": np.full(n, model),
                                             "example": np.arange(n, dtype=np.int32),
                                             "predicted": scan.predicted.astype(np.int32),
                                             "confidence": scan.confidence.astype(np.float64)})
            self._mark_stage(f"scan:{model}", fingerprint, scan.seconds)

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
                            (r[6], r[7]) if r[6] else None) for r in rows]

    def units(self, model: str, layer: str) -> list[UnitRecord]:
        """Every unit of a layer with its top-k examples, in unit order."""
        top: dict[int, list[TopKRecord]] = defaultdict(list)
        for unit, rank, example, value, position in self.con.execute(
                "SELECT unit, rank, example, value, position FROM topk WHERE model = ? AND layer = ? "
                "ORDER BY unit, rank", [model, layer]).fetchall():
            top[unit].append(TopKRecord(rank, example, value, position))
        rows = self.con.execute("SELECT unit, mean, max FROM units WHERE model = ? AND layer = ? ORDER BY unit",
                                [model, layer]).fetchall()
        return [UnitRecord(model, layer, u, mean, mx, tuple(top[u])) for u, mean, mx in rows]

    def class_names(self) -> list[str]:
        return [r[0] for r in self.con.execute("SELECT name FROM classes ORDER BY label").fetchall()]

    def labels(self) -> np.ndarray:
        return self.con.execute("SELECT label FROM examples ORDER BY example").fetchnumpy()["label"]

    def predictions(self, model: str) -> dict[int, tuple[int, float]]:
        rows = self.con.execute("SELECT example, predicted, confidence FROM predictions WHERE model = ?",
                                [model]).fetchall()
        return {e: (p, c) for e, p, c in rows}

    def referenced_examples(self) -> list[int]:
        """Examples some page shows (the union of every unit's top-k), ascending."""
        return [r[0] for r in self.con.execute("SELECT DISTINCT example FROM topk ORDER BY example").fetchall()]

    def stages(self) -> dict[str, tuple[str, float]]:
        return {s: (f, sec) for s, f, sec in self.con.execute("SELECT * FROM stages ORDER BY stage").fetchall()}
