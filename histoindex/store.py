"""The store: one LanceDB database holding the spots, predictions and models tables (model weights
included, as safetensors bytes in ``models.weights``). Every access goes through LanceDB's own URI
handling, so the store can live in a folder, a ``file://`` URI or an object store (``s3://...``).
Every write reports the version it made."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
from lancedb.index import Bitmap, BTree, LabelList
from lancedb.util import get_uri_scheme

from .config import ModelConfig
from .errors import StoreError, UnknownValue
from .schemas import PRIMARY_KEY_METADATA, TABLES, conform, layout

_INDEX_CONFIGS = {"bitmap": Bitmap, "btree": BTree, "label_list": LabelList}

#: the models column holding the safetensors bytes: read for one model at a time, never when listing
WEIGHTS = "weights"
#: how long a write may take, retries after a concurrent commit included (LanceDB's default of
#: 30 s after the first attempt is too short for a large reference on a busy machine)
WRITE_TIMEOUT = timedelta(minutes=10)


def sql_literal(value: str) -> str:
    """A SQL string literal (single quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


def _tag_safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text)


@dataclass(frozen=True)
class ModelRecord:
    """A registered model, without its weights: :meth:`weights` reads them from the store."""

    model_id: str
    cfg: ModelConfig
    created_at: datetime
    train_datasets: tuple[str, ...]
    metrics: dict
    _fetch: Callable[[str], bytes] = field(repr=False, compare=False)

    def weights(self) -> bytes:
        """The model's safetensors bytes (``load_model(record.cfg, record.weights())``)."""
        return self._fetch(self.model_id)


def _local_path(uri: str) -> Path | None:
    """The folder of a local URI, read the way LanceDB reads it; None for any other scheme."""
    if get_uri_scheme(uri) != "file":
        return None
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif uri.startswith("file:/"):
        uri = uri[len("file:") :]
    return Path(uri).expanduser()


def _list_tables(db) -> list[str]:
    names: list[str] = []
    token = None
    while True:
        page = db.list_tables(page_token=token)
        names.extend(page.tables)
        token = getattr(page, "page_token", None)
        if not token:
            return names


class Store:
    """A histoindex store at ``uri`` (a directory, ``file://`` URI, or any LanceDB URI).

    Creating a store creates its three tables, empty, with the layouts in ``schemas/`` (version 1
    of each), so every later write is exactly one new version with its rows. Scalar indexes on the
    filter columns are built by ``histoindex index`` (:meth:`build_scalar_indexes`) with the vector
    index, when a reference is large enough for them to matter.
    """

    def __init__(self, uri: str | Path, *, create: bool = False):
        self.uri = str(uri)
        db = self._connect_existing(self.uri)
        if db is None:
            if not create:
                raise StoreError(f"no histoindex store at {self.uri}; create one with `histoindex ingest` or `histoindex train`")
            db = self._connect(self.uri)  # LanceDB creates a local folder itself
        self.db = db
        if create:
            for name in TABLES:
                if not self.has_table(name):
                    self._create(name)

    @classmethod
    def exists(cls, uri: str | Path) -> bool:
        """Whether LanceDB at ``uri`` holds any histoindex table (creates nothing)."""
        return cls._connect_existing(str(uri)) is not None

    @staticmethod
    def _connect(uri: str):
        try:
            return lancedb.connect(uri)
        except Exception as exc:  # a bad scheme, unreachable bucket, missing credentials...
            raise StoreError(f"cannot open the store at {uri}: {exc}") from exc

    @classmethod
    def _connect_existing(cls, uri: str):
        """A connection to ``uri`` if it holds a histoindex table, else None. A local folder that
        is not there is not looked at, since LanceDB's connect would create it."""
        local = _local_path(uri)
        if local is not None and not local.is_dir():
            return None
        db = cls._connect(uri)
        try:
            names = _list_tables(db)
        except Exception as exc:
            raise StoreError(f"cannot list the tables of the store at {uri}: {exc}") from exc
        return db if any(name in names for name in TABLES) else None

    # ---- tables -------------------------------------------------------------------------
    def table_names(self) -> list[str]:
        names = _list_tables(self.db)
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
        return self.db.create_table(name, schema=layout(name).schema, exist_ok=True)

    def build_scalar_indexes(self, name: str) -> int:
        """Create the scalar indexes ``schemas/`` lists for table ``name`` that it lacks (one version
        each); returns the table's version."""
        tbl = self.table(name)
        existing = {tuple(i.columns) for i in tbl.list_indices()}
        for column, kind in layout(name).scalar_indexes:
            if (column,) not in existing:
                tbl.create_index(column, config=_INDEX_CONFIGS[kind]())
        return tbl.version

    def _writable(self, name: str):
        """Table ``name`` for writing: a table written by a newer histoindex is refused; one written
        by an older release gets its key columns marked as keys (Lance field metadata)."""
        tbl = self.table(name, create=True)
        meta = tbl.schema.metadata or {}
        found = int(meta.get(b"histoindex.schema_version", b"0") or 0)
        current = layout(name).schema_version
        if found > current:
            raise StoreError(
                f"the {name} table at {self.uri} was written by a newer histoindex (schema version {found}, this "
                f"release knows {current}); upgrade histoindex to write to it"
            )
        key = layout(name).key
        unmarked = [c for c in key if not (tbl.schema.field(c).metadata or {}).get(b"lance-schema:unenforced-primary-key")]
        if unmarked or found < current:
            dataset = tbl.to_lance()
            if unmarked:
                dataset.update_field_metadata({c: dict(PRIMARY_KEY_METADATA) for c in key})
            dataset.update_schema_metadata({"histoindex.schema_version": str(current)})
            tbl.checkout_latest()
        return tbl

    # ---- models -------------------------------------------------------------------------
    def _models_table(self, *, create: bool = False):
        tbl = self.table("models", create=create)
        if WEIGHTS not in tbl.schema.names:
            raise StoreError(
                f"the models table at {self.uri} predates weights kept in the table (models schema "
                f"version {layout('models').schema_version}); train the model again into a new store"
            )
        return tbl

    def add_model(self, model, cfg: ModelConfig, *, metrics: dict, train_datasets: list[str]) -> tuple[str, int]:
        """Register the model, weights included (one row, one commit); returns (model_id, models version)."""
        from .models import state_digest, weights_bytes  # torch: only when a model is written

        model_id = f"{cfg.method}-{state_digest(model, cfg)}"
        row = {
            "model_id": model_id,
            "method": cfg.method,
            "backbone": cfg.backbone,
            "created_at": datetime.now(timezone.utc),
            "genes": list(cfg.genes),
            "train_datasets": list(train_datasets),
            "config_json": cfg.to_json(),
            "metrics_json": json.dumps(metrics),
            WEIGHTS: weights_bytes(model, cfg),
        }
        self._models_table(create=True)
        tbl = self._writable("models")
        data = conform("models", pa.Table.from_pylist([row], schema=layout("models").schema))
        result = tbl.merge_insert("model_id").when_matched_update_all().when_not_matched_insert_all().execute(data)
        return model_id, result.version

    def model_weights(self, model_id: str) -> bytes:
        """The safetensors bytes of model ``model_id`` (only that row's weights are read)."""
        rows = self._models_table().search().where(f"model_id = {sql_literal(model_id)}").select([WEIGHTS]).limit(None).to_arrow()
        if rows.num_rows == 0:
            raise UnknownValue(f"no model {model_id!r} in the store at {self.uri}")
        return rows.column(WEIGHTS)[0].as_py()

    def models(self) -> list[ModelRecord]:
        """Every registered model, oldest first (without reading any weights)."""
        if not self.has_table("models"):
            return []
        tbl = self.table("models")
        columns = [name for name in tbl.schema.names if name != WEIGHTS]
        rows = tbl.search().select(columns).limit(None).to_arrow().to_pylist()
        rows.sort(key=lambda r: r["created_at"])
        return [
            ModelRecord(
                model_id=r["model_id"],
                cfg=ModelConfig.from_json(r["config_json"]),
                created_at=r["created_at"],
                train_datasets=tuple(r["train_datasets"]),
                metrics=json.loads(r["metrics_json"]),
                _fetch=self.model_weights,
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

    # ---- which model -------------------------------------------------------------------
    def ingest_model(self, model_id: str | None = None, *, log: Callable[[str], None] = lambda _: None) -> str | None:
        """The model an ingest embeds with: ``model_id`` if given; else the one model the store's
        spots already use (never silently a newer one: spots of two models are two embedding spaces,
        and a query searches one); else, with no spots yet, the newest model; None when the store has
        no model (the ingest trains one)."""
        models = self.models()
        if model_id is not None:
            self.model(model_id)  # an unknown id is an error that lists the known ones
            return model_id
        in_use = self.spot_models()
        if len(in_use) > 1:
            listed = "; ".join(f"{m} ({', '.join(d)})" for m, d in in_use.items())
            raise StoreError(f"the store's spots were embedded by {len(in_use)} models: {listed}; pass --model to choose one")
        if in_use:
            (chosen,) = in_use
            newest = models[-1].model_id if models else chosen
            if newest != chosen:
                log(f"embedding with {chosen}, the model the store's spots use; the newer model {newest} has none (pass --model {newest} to ingest under it)")
            return chosen
        return models[-1].model_id if models else None

    def query_model(self, *, version: int | str | None = None, model_id: str | None = None) -> ModelRecord:
        """The model a query searches: ``model_id`` (which must have spots at ``version``), else the one
        model the spots at ``version`` were embedded by; several is an error naming them."""
        in_use = self.spot_models(version=version)
        at = f"spots@{version if version is not None else 'latest'}"
        if model_id is not None:
            record = self.model(model_id)
            if model_id not in in_use:
                raise StoreError(f"{at} holds no spots embedded by model {model_id}; models with spots: {', '.join(in_use) or 'none'}")
            return record
        if not in_use:
            raise StoreError(f"{at} holds no spots of any registered model; ingest a reference first")
        if len(in_use) > 1:
            listed = "; ".join(f"{m} ({', '.join(d)})" for m, d in in_use.items())
            raise StoreError(f"{at} holds spots of {len(in_use)} models (separate embedding spaces): {listed}; pass --model")
        (only,) = in_use
        return self.model(only)

    # ---- spots --------------------------------------------------------------------------
    def write_dataset(self, rows: pa.Table, *, model_id: str, dataset: str) -> int:
        """Write one dataset's spots under one model in a single commit, replacing the rows that
        (model, dataset) had; returns the version that holds them, tagged
        ``ingest-<dataset>-v<version>``.

        Always one ``merge_insert`` keyed on (model_id, dataset, spot_id): matching spots are
        updated, new ones inserted, the (model, dataset) rows it no longer has deleted. The key
        columns carry Lance's primary-key metadata, so two concurrent ingests of the same dataset
        conflict at commit and the later one is re-run against the earlier one's rows (no
        duplicates). When the table has a vector index, the new rows are folded into it (one more
        version, the one returned and tagged)."""
        data = conform("spots", rows)
        for column, value in (("model_id", model_id), ("dataset", dataset)):
            if set(data.column(column).unique().to_pylist()) != {value}:
                raise StoreError(f"rows for {column} {value!r} carry other {column} values")
        tbl = self._writable("spots")
        scope = f"model_id = {sql_literal(model_id)} AND dataset = {sql_literal(dataset)}"
        try:
            version = (
                tbl.merge_insert(list(layout("spots").key))
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .when_not_matched_by_source_delete(scope)
                .execute(data, timeout=WRITE_TIMEOUT)
            ).version
        except Exception as exc:
            if "concurrent" in str(exc).lower() or "conflict" in str(exc).lower():
                raise StoreError(
                    f"the store changed while writing {dataset} (another writer committed to spots at the same time) "
                    f"and the write could not be re-applied within {WRITE_TIMEOUT}; nothing of it was written: retry"
                ) from exc
            raise
        if has_vector_index(tbl):  # keep `query --search ann` on the index for every row
            version = self.refresh_indexes()
        try:
            tbl.tags.create(_tag_safe(f"ingest-{dataset}-v{version}"), version)
        except Exception:  # a tag is a convenience; the version itself is the record
            pass
        return version

    def spot_models(self, *, version: int | str | None = None) -> dict[str, list[str]]:
        """Which models the spots (at ``version``) were embedded by: model id → its datasets."""
        if not self.has_table("spots"):
            return {}
        arrow = self.table("spots", version=version).search().select(["model_id", "dataset"]).limit(None).to_arrow()
        out: dict[str, set[str]] = {}
        for model, dataset in zip(arrow.column("model_id").to_pylist(), arrow.column("dataset").to_pylist()):
            out.setdefault(model, set()).add(dataset)
        return {model: sorted(datasets) for model, datasets in sorted(out.items())}

    def has_vector_index(self) -> bool:
        return self.has_table("spots") and has_vector_index(self.table("spots"))

    def refresh_indexes(self, table: str = "spots") -> int:
        """Fold rows written since the indexes were built into them (vector and scalar), in one
        commit; returns the new version. Unlike LanceDB's ``optimize()``, this prunes no old
        versions, so ``--as-of`` keeps working."""
        tbl = self.table(table)
        tbl.to_lance().optimize.optimize_indices()
        tbl.checkout_latest()
        return tbl.version

    def distinct(self, table: str, column: str, *, where: str | None = None, version: int | None = None) -> list[Any]:
        tbl = self.table(table, version=version)
        query = tbl.search().select([column]).limit(None)
        if where:
            query = query.where(where)
        values = query.to_arrow().column(column).unique().to_pylist()
        return sorted(v for v in values if v is not None)

    def create_vector_index(self, index_type: str = "IVF_PQ", *, num_partitions: int | None = None, num_sub_vectors: int | None = None) -> int:
        """Build the ANN index on the reference expression embeddings and the scalar (bitmap)
        indexes on the filter columns if missing, and fold rows ingested since into them all.
        Returns the new spots version."""
        tbl = self.table("spots")
        n = tbl.count_rows()
        if n == 0:
            raise StoreError("the spots table is empty: ingest a reference first")
        config = vector_index_config(index_type, n, num_partitions=num_partitions, num_sub_vectors=num_sub_vectors)
        tbl.create_index("expression_embedding", config=config, replace=True)
        for name in ("spots", "predictions"):
            self.build_scalar_indexes(name)
        return self.refresh_indexes()

    # ---- predictions --------------------------------------------------------------------
    def add_predictions(self, rows: pa.Table | Iterable[pa.RecordBatch]) -> int:
        """Append prediction rows in one commit; ``rows`` may be a stream of record batches, which
        LanceDB writes as they come (nothing is committed if the stream fails)."""
        tbl = self._writable("predictions")
        if isinstance(rows, pa.Table):
            return tbl.add(conform("predictions", rows)).version
        target = layout("predictions").schema
        batches = (b for batch in rows for b in conform("predictions", pa.Table.from_batches([batch])).to_batches())
        return tbl.add(pa.RecordBatchReader.from_batches(target, batches)).version

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

            frame = pl.from_arrow(arrow).group_by(["model_id", "dataset", "tissue", "platform", "species"]).len("spots")
            datasets = frame.sort(["model_id", "dataset"]).to_dicts()
        models = [
            {
                "model_id": m.model_id,
                "method": m.cfg.method,
                "backbone": m.cfg.backbone,
                "genes": len(m.cfg.genes),
                "trained_on": list(m.train_datasets),
                "created_at": m.created_at,
                "datasets": [{k: v for k, v in d.items() if k != "model_id"} for d in datasets if d["model_id"] == m.model_id],
            }
            for m in self.models()
        ]
        return {"uri": self.uri, "tables": tables, "datasets": datasets, "models": models}


VECTOR_INDEX_TYPES = ("IVF_PQ", "IVF_FLAT", "IVF_HNSW_SQ")


def vector_index_config(index_type: str, n_rows: int, *, num_partitions: int | None = None, num_sub_vectors: int | None = None):
    """LanceDB's index config for the expression embeddings (cosine): IVF partitions ~√n of at
    least 256 rows (n/100k for HNSW, a graph per partition), 16 PQ sub-vectors by default."""
    from lancedb.index import HnswSq, IvfFlat, IvfPq

    kinds = {"IVF_PQ": IvfPq, "IVF_FLAT": IvfFlat, "IVF_HNSW_SQ": HnswSq}
    index_type = index_type.upper()
    if index_type not in kinds:
        raise UnknownValue(f"unknown index type {index_type!r}; use one of {', '.join(VECTOR_INDEX_TYPES)}")
    if num_partitions:
        partitions = num_partitions
    elif index_type == "IVF_HNSW_SQ":
        partitions = max(1, n_rows // 100_000)
    else:
        partitions = max(1, min(int(np.sqrt(n_rows)), n_rows // 256 or 1))
    options: dict[str, Any] = {"distance_type": "cosine", "num_partitions": partitions}
    if index_type == "IVF_PQ":
        options["num_sub_vectors"] = num_sub_vectors or 16
    return kinds[index_type](**options)


def has_vector_index(tbl) -> bool:
    """Whether a spots table has the ANN index on its expression embeddings (`histoindex index`)."""
    return any(i.columns == ["expression_embedding"] for i in tbl.list_indices())


def prediction_rows(
    *,
    run_id: str,
    slide: str,
    ids: np.ndarray,
    xy: np.ndarray,
    mpp: float,
    values: np.ndarray,
    model_id: str,
    spots_version: int,
    predicate: str,
    k: int,
    created_at: datetime,
) -> pa.Table:
    """Arrow rows for the predictions table (column layout from schemas/predictions.json)."""
    n, n_genes = values.shape
    return pa.table(
        {
            "run_id": [run_id] * n,
            "slide": [slide] * n,
            "tile_id": np.asarray(ids).astype(str),
            "x": xy[:, 0],
            "y": xy[:, 1],
            "x_um": xy[:, 0] * mpp,
            "y_um": xy[:, 1] * mpp,
            "model_id": [model_id] * n,
            "spots_version": np.full(n, spots_version, np.int64),
            "filter": [predicate] * n,
            "k": np.full(n, k, np.int32),
            "created_at": pa.array([created_at] * n, pa.timestamp("us", tz="UTC")),
            "expression": pa.ListArray.from_arrays(
                pa.array(np.arange(0, (n + 1) * n_genes, n_genes, dtype=np.int32)), pa.array(np.ascontiguousarray(values, np.float32).ravel())
            ),
        }
    )


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
