"""The store: one LanceDB database holding the spots, predictions and models tables, plus model
weights (safetensors) in ``models/`` under the same root. Every write reports the version it made."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lancedb
import numpy as np
from lancedb.index import Bitmap, BTree, LabelList
import pyarrow as pa

from .errors import StoreError, UnknownValue
from .config import ModelConfig
from .schemas import TABLES, conform, layout

_INDEX_CONFIGS = {"bitmap": Bitmap, "btree": BTree, "label_list": LabelList}


def sql_literal(value: str) -> str:
    """A SQL string literal (single quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


def _tag_safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text)


@dataclass(frozen=True)
class ModelRecord:
    model_id: str
    cfg: ModelConfig
    weights_path: Path
    created_at: datetime
    train_datasets: tuple[str, ...]
    metrics: dict


class Store:
    """A histoindex store at ``uri`` (a directory, ``file://`` URI, or any LanceDB URI).

    Tables are created on first write with the layouts in ``schemas/`` and their scalar indexes.
    """

    def __init__(self, uri: str | Path, *, create: bool = False):
        self.uri = str(uri)
        self.root = self._local_root(self.uri)
        if not create and self.root is not None and not self.root.exists():
            raise StoreError(f"no histoindex store at {self.uri}; create one with `histoindex ingest` or `histoindex train`")
        if create and self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
        self.db = lancedb.connect(self.uri)

    @staticmethod
    def _local_root(uri: str) -> Path | None:
        if uri.startswith("file://"):
            return Path(uri[len("file://") :])
        if "://" in uri:
            return None
        return Path(uri)

    # ---- tables -------------------------------------------------------------------------
    def table_names(self) -> list[str]:
        names = self.db.list_tables().tables
        return [t for t in TABLES if t in names]

    def has_table(self, name: str) -> bool:
        return name in self.table_names()

    def table(self, name: str, *, version: int | str | None = None, create: bool = False):
        """Open table ``name`` (checked out at ``version`` if given: a number or a tag)."""
        if not self.has_table(name):
            if not create:
                raise StoreError(f"the store at {self.uri} has no {name!r} table yet")
            return self._create(name)
        tbl = self.db.open_table(name)
        if version is not None:
            try:
                tbl.checkout(int(version) if str(version).isdigit() else version)
            except Exception as exc:
                known = [v["version"] for v in tbl.list_versions()]
                raise UnknownValue(
                    f"table {name!r} has no version {version!r}; versions are {known[0]}..{known[-1]}"
                    + (f", tags: {', '.join(tbl.tags.list())}" if tbl.tags.list() else "")
                ) from exc
        return tbl

    def _create(self, name: str):
        spec = layout(name)
        tbl = self.db.create_table(name, schema=spec.schema, exist_ok=True)
        existing = {tuple(i.columns) for i in tbl.list_indices()}
        for column, kind in spec.scalar_indexes:
            if (column,) not in existing:
                tbl.create_index(column, config=_INDEX_CONFIGS[kind]())
        return tbl

    # ---- models -------------------------------------------------------------------------
    def weights_dir(self) -> Path:
        if self.root is None:
            raise StoreError(f"model weights need a local store directory; {self.uri} is remote")
        return self.root / "models"

    def add_model(self, model, cfg: ModelConfig, *, metrics: dict, train_datasets: list[str]) -> tuple[str, int]:
        """Save weights and register the model; returns (model_id, models table version)."""
        from .models import save_weights, state_digest  # torch: only when a model is written
        model_id = f"{cfg.method}-{state_digest(model, cfg)}"
        directory = self.weights_dir()
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / f"{model_id}.safetensors"
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        os.close(fd)
        save_weights(model, tmp, cfg)
        os.replace(tmp, final)  # atomic: a reader never sees half a weights file
        row = {
            "model_id": model_id,
            "method": cfg.method,
            "backbone": cfg.backbone,
            "created_at": datetime.now(timezone.utc),
            "genes": list(cfg.genes),
            "train_datasets": list(train_datasets),
            "config_json": cfg.to_json(),
            "metrics_json": json.dumps(metrics),
            "weights_file": str(final.relative_to(self.root)),
        }
        tbl = self.table("models", create=True)
        data = conform("models", pa.Table.from_pylist([row]))
        result = tbl.merge_insert("model_id").when_matched_update_all().when_not_matched_insert_all().execute(data)
        return model_id, result.version

    def models(self) -> list[ModelRecord]:
        if not self.has_table("models"):
            return []
        rows = self.table("models").to_arrow().to_pylist()
        rows.sort(key=lambda r: r["created_at"])
        return [
            ModelRecord(
                model_id=r["model_id"],
                cfg=ModelConfig.from_json(r["config_json"]),
                weights_path=self.root / r["weights_file"] if self.root else Path(r["weights_file"]),
                created_at=r["created_at"],
                train_datasets=tuple(r["train_datasets"]),
                metrics=json.loads(r["metrics_json"]),
            )
            for r in rows
        ]

    def model(self, model_id: str | None = None) -> ModelRecord:
        """The model ``model_id``, or the newest one."""
        records = self.models()
        if not records:
            raise StoreError(f"the store at {self.uri} has no model; run `histoindex train` or `histoindex ingest`")
        if model_id is None:
            return records[-1]
        for record in records:
            if record.model_id == model_id:
                return record
        raise UnknownValue(f"no model {model_id!r}; models: {', '.join(r.model_id for r in records)}")

    # ---- spots --------------------------------------------------------------------------
    def replace_dataset(self, rows: pa.Table, dataset: str) -> int:
        """Write a dataset's spots in one commit, replacing any rows it had; returns the version."""
        data = conform("spots", rows)
        if set(data.column("dataset").unique().to_pylist()) != {dataset}:
            raise StoreError(f"rows for dataset {dataset!r} carry other dataset names")
        tbl = self.table("spots", create=True)
        result = (
            tbl.merge_insert(list(layout("spots").key))
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .when_not_matched_by_source_delete(f"dataset = {sql_literal(dataset)}")
            .execute(data)
        )
        try:
            tbl.tags.create(_tag_safe(f"ingest-{dataset}-v{result.version}"), result.version)
        except Exception:  # a tag is a convenience; the version itself is the record
            pass
        return result.version

    def distinct(self, table: str, column: str, *, where: str | None = None, version: int | None = None) -> list[Any]:
        tbl = self.table(table, version=version)
        query = tbl.search().select([column]).limit(None)
        if where:
            query = query.where(where)
        values = query.to_arrow().column(column).unique().to_pylist()
        return sorted(v for v in values if v is not None)

    # ---- predictions --------------------------------------------------------------------
    def add_predictions(self, rows: pa.Table) -> int:
        tbl = self.table("predictions", create=True)
        return tbl.add(conform("predictions", rows)).version

    # ---- overview -----------------------------------------------------------------------
    def versions(self) -> dict[str, list[dict]]:
        """Per table: every version with its timestamp, row count and tags."""
        out = {}
        for name in self.table_names():
            tbl = self.db.open_table(name)
            tags: dict[int, list[str]] = {}
            for tag, info in tbl.tags.list().items():
                tags.setdefault(info["version"], []).append(tag)
            out[name] = [
                {
                    "version": v["version"],
                    "timestamp": v["timestamp"],
                    "rows": int(v["metadata"].get("total_rows", 0)),
                    "tags": sorted(tags.get(v["version"], [])),
                }
                for v in tbl.list_versions()
            ]
        return out

    def info(self) -> dict:
        tables = {}
        for name in self.table_names():
            tbl = self.db.open_table(name)
            tables[name] = {
                "version": tbl.version,
                "rows": tbl.count_rows(),
                "indexes": [f"{i.index_type}({', '.join(i.columns)})" for i in tbl.list_indices()],
            }
        datasets = []
        if self.has_table("spots") and tables["spots"]["rows"]:
            arrow = self.table("spots").search().select(["dataset", "tissue", "platform", "species", "model_id"]).limit(None).to_arrow()
            import polars as pl

            frame = pl.from_arrow(arrow).group_by(["dataset", "tissue", "platform", "species", "model_id"]).len("spots")
            datasets = frame.sort("dataset").to_dicts()
        models = [
            {"model_id": m.model_id, "backbone": m.cfg.backbone, "genes": len(m.cfg.genes), "trained_on": list(m.train_datasets), "created_at": m.created_at}
            for m in self.models()
        ]
        return {"uri": self.uri, "tables": tables, "datasets": datasets, "models": models}


def spot_rows(
    *,
    spot_ids: np.ndarray,
    dataset: str,
    tissue: str,
    platform: str,
    species: str,
    xy: np.ndarray,
    mpp: float,
    image_embedding: np.ndarray,
    expression_embedding: np.ndarray,
    expression: np.ndarray,
    source_values: str,
    model_id: str,
) -> pa.Table:
    """Arrow rows for the spots table (column layout from schemas/spots.json)."""
    n = len(spot_ids)
    dim = layout("spots").vector_dim("image_embedding")

    def vectors(a: np.ndarray) -> pa.Array:
        if a.shape != (n, dim):
            raise StoreError(f"embeddings have shape {a.shape}, the spots table expects ({n}, {dim})")
        return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(a, np.float32).ravel()), dim)

    n_genes = expression.shape[1]
    offsets = pa.array(np.arange(0, (n + 1) * n_genes, n_genes, dtype=np.int32))
    return pa.table(
        {
            "spot_id": pa.array(spot_ids.astype(str)),
            "dataset": pa.array([dataset] * n),
            "tissue": pa.array([tissue] * n),
            "platform": pa.array([platform] * n),
            "species": pa.array([species] * n),
            "x": pa.array(xy[:, 0].astype(np.float64)),
            "y": pa.array(xy[:, 1].astype(np.float64)),
            "mpp": pa.array(np.full(n, mpp, np.float64)),
            "image_embedding": vectors(image_embedding),
            "expression_embedding": vectors(expression_embedding),
            "expression": pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(expression, np.float32).ravel())),
            "source_values": pa.array([source_values] * n),
            "model_id": pa.array([model_id] * n),
        }
    )
