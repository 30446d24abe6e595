"""The store: one LanceDB database holding the spots, predictions and models tables (model weights
included, as safetensors bytes in ``models.weights``). Every access goes through LanceDB's own URI
handling, so the store can live in a folder, a ``file://`` URI or an object store (``s3://...``).
Every write reports the version it made."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
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
from .errors import HistoindexError, StoreError, UnknownValue, one_line
from .schemas import PRIMARY_KEY_METADATA, TABLES, conform, layout

_INDEX_CONFIGS = {"bitmap": Bitmap, "btree": BTree, "label_list": LabelList}

#: tag metadata saying what wrote the tagged version (``ingest``, ``restore``), read by :meth:`Store.versions`
OPERATION_KEY = "histoindex.operation"
#: the tag that keeps a spots version a stored prediction searched (``compact`` never removes it without --force)
PINNED_TAG = "pinned-by-predictions-v{version}"
#: the models column holding the safetensors bytes: read for one model at a time, never when listing
WEIGHTS = "weights"
#: how long a write may take, retries after a concurrent commit included (LanceDB's default of
#: 30 s after the first attempt is too short for a large reference on a busy machine)
WRITE_TIMEOUT = timedelta(minutes=10)
#: how many times a write is made whole again on the table's then latest version when the table
#: changed under it (a concurrent commit Lance could not rebase, or ``compact`` removing the version
#: it read) before the command ends with "the store changed while writing …; retry"
WRITE_ATTEMPTS = 3
#: ``compact`` never removes a version that stopped being current less than this long ago: a command
#: that opened it then (a query searching it, an ingest merging into it) may still be reading it, and
#: a query records the version it searched only when it commits (Lance's advice: a grace period)
COMPACT_GRACE = timedelta(hours=1)
#: words in Lance's messages for a commit that lost a race (retried when the table's version moved)
_CONFLICT_WORDS = ("conflict", "concurrent", "retryable", "retry")


def sql_literal(value: str) -> str:
    """A SQL string literal (single quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


def _tag_safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text)


#: the schema metadata key holding a table's layout version (``schema_version`` in schemas/*.json)
SCHEMA_VERSION_KEY = b"histoindex.schema_version"


def stored_schema_version(schema: pa.Schema) -> int:
    """The layout version a table was written with (0: before histoindex recorded one)."""
    raw = (schema.metadata or {}).get(SCHEMA_VERSION_KEY, b"0") or b"0"
    try:
        return int(raw)
    except ValueError as exc:
        raise StoreError(f"the table's {SCHEMA_VERSION_KEY.decode()} is {raw.decode(errors='replace')!r}, not a number") from exc


def check_schema_version(name: str, schema: pa.Schema, uri: str) -> None:
    """Refuse a table written by a newer histoindex: its layout may mean things this release does not
    know, so reading it could give wrong answers and writing it could damage it."""
    try:
        found = stored_schema_version(schema)
    except StoreError as exc:
        raise StoreError(f"the {name} table at {uri}: {exc}") from None
    current = layout(name).schema_version
    if found > current:
        raise StoreError(
            f"the {name} table at {uri} was written by a newer histoindex (table schema version {found}; this release, "
            f"{_release()}, knows schema version {current} and older): upgrade histoindex to open this store"
        )


def _release() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"histoindex {version('histoindex')}"
    except PackageNotFoundError:
        return "histoindex"


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


@dataclass(frozen=True)
class RestoreResult:
    table: str
    restored: int  # the version made current again
    version: int  # the new version holding it
    rows: int
    tag: str | None


@dataclass(frozen=True)
class DeleteResult:
    dataset: str
    model_id: str | None
    rows: int
    version: int


@dataclass(frozen=True)
class Compaction:
    """What ``compact`` did to one table."""

    table: str
    version: int  # current version afterwards
    compacted: bool  # whether data files were rewritten (Lance commits that as two versions)
    fragments_removed: int
    fragments_added: int
    removed: list[int]  # versions removed
    bytes_removed: int
    kept: dict[int, str]  # old versions kept, and why (tags, stored predictions)
    tags_dropped: list[str]  # tags deleted with their versions (--force)
    unpinned: list[int]  # spots versions stored predictions searched that were removed (--force)


def _age(timestamp: datetime) -> timedelta:
    now = datetime.now(timestamp.tzinfo) if timestamp.tzinfo else datetime.now()  # Lance lists naive local times
    return now - timestamp


def _transaction(dataset, version: int):
    try:
        return dataset.read_transaction(version)
    except Exception:  # removed, or written before Lance kept transactions
        return None


_DELETE_PREDICATE = re.compile(r"^dataset = '((?:[^']|'')*)'(?: AND model_id = '((?:[^']|'')*)')?$")
_OPERATIONS = {
    "Rewrite": "compaction",
    "CreateIndex": "index build or refresh",
    "Append": "rows added",
    "Update": "rows merged or updated",
    "UpdateConfig": "metadata update",
    "Project": "columns changed",
    "Merge": "columns added",
}


def _what(table: str, version: int, tags: list[tuple[str, dict]], txn) -> str:
    """What made a version, from what histoindex wrote beside it (tag metadata) and Lance's own
    transaction record; "unknown" when neither says."""
    op = type(txn.operation).__name__ if txn is not None and getattr(txn, "operation", None) is not None else None
    if op == "BaseOperation":  # an operation pylance does not describe (e.g. compaction reserving fragment ids)
        op = None
    for tag, meta in tags:
        if meta.get(OPERATION_KEY) == "ingest" or (tag.startswith("ingest-") and not meta):
            dataset = meta.get("histoindex.dataset") or re.sub(r"^ingest-(.*)-v\d+$", r"\1", tag)
            return f"ingest of {dataset}" + (" (rows folded into the indexes)" if op == "CreateIndex" else "")
    if op is None:
        return "unknown"
    if op == "Restore":
        return f"restore of {table}@{txn.operation.version}"
    if op == "Overwrite":
        return "created" if version == 1 else "every row replaced"
    if op == "Delete":
        found = _DELETE_PREDICATE.match(getattr(txn.operation, "predicate", "") or "")
        if not found:
            return "rows deleted"
        dataset, model = (g.replace("''", "'") if g is not None else None for g in found.groups())
        return f"delete of {dataset}" + (f" (model {model})" if model else "")
    if op == "Update" and table == "predictions":
        return "rows merged or updated"
    if op == "Append" and table == "predictions":
        return "predictions added"
    if op == "Update" and table == "models":
        return "model added or updated"
    return _OPERATIONS.get(op, f"Lance operation {op}")


def _local_path(uri: str) -> Path | None:
    """The folder of a local URI, read the way LanceDB reads it; None for any other scheme."""
    if get_uri_scheme(uri) != "file":
        return None
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif uri.startswith("file:/"):
        uri = uri[len("file:") :]
    return Path(uri).expanduser()


def _model_config(model_id: str, text: str) -> ModelConfig:
    try:
        return ModelConfig.from_json(text)
    except Exception as exc:  # a models row edited by hand, or written by other code
        raise StoreError(f"model {model_id}: its config_json is not a histoindex model config ({type(exc).__name__}: {exc})") from exc


def _ranges(numbers: list[int]) -> str:
    """``1..3, 5, 8..9``: version numbers as runs (old versions removed by ``compact`` leave gaps)."""
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(f"{a}..{b}" if b > a else str(a) for a, b in runs)


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
        if local is not None and local.exists() and not local.is_dir():
            raise StoreError(f"{uri} is a file, not a histoindex store (a store is a folder); pass --db a store folder or a new path")
        if local is not None and not local.is_dir():
            return None
        db = cls._connect(uri)
        try:
            names = _list_tables(db)
        except Exception as exc:
            raise StoreError(f"cannot list the tables of the store at {uri}: {exc}") from exc
        if any(name in names for name in TABLES):
            return db
        if local is not None:  # a folder holding other things is not a store, and must not become one
            ours = {f"{name}.lance" for name in TABLES}
            foreign = sorted(p.name for p in local.iterdir() if p.name not in ours and not p.name.startswith("."))
            if foreign:
                shown = ", ".join(foreign[:5]) + (f", … ({len(foreign)} entries)" if len(foreign) > 5 else "")
                raise StoreError(
                    f"{uri} is not a histoindex store: the folder holds {shown} and none of the tables {', '.join(TABLES)}; "
                    "pass --db a histoindex store, or a new or empty folder to create one"
                )
        return None

    # ---- tables -------------------------------------------------------------------------
    def table_names(self) -> list[str]:
        names = _list_tables(self.db)
        return [t for t in TABLES if t in names]

    def unwritable(self, name: str) -> str | None:
        """Why table ``name`` cannot be written by this process (a read-only folder or files), or
        None when it can or it cannot be known without writing (object stores: a write's own error
        says it then). Checked before a command does minutes of work that ends in a write."""
        local = _local_path(self.uri)
        if local is None:
            return None
        table = local / f"{name}.lance"
        folders = [table, *(table / sub for sub in ("_versions", "data", "_transactions", "_indices"))] if table.exists() else [local]
        for folder in folders:
            if folder.exists() and not os.access(folder, os.W_OK | os.X_OK):
                return f"{folder} is not writable by this user"
        return None

    def has_table(self, name: str) -> bool:
        return name in self.table_names()

    def table(self, name: str, *, version: int | str | None = None, create: bool = False):
        """Open table ``name`` (checked out at ``version`` if given: a number or a tag)."""
        if not self.has_table(name):
            if not create:
                raise StoreError(f"the store at {self.uri} has no {name!r} table yet")
            return self._create(name)
        tbl = self._open(name)
        if version is not None:
            try:
                tbl.checkout(int(version) if str(version).isdigit() else version)
            except Exception as exc:
                known = [v["version"] for v in tbl.list_versions()]
                raise UnknownValue(
                    f"table {name!r} has no version {version!r}; versions are {_ranges(known)}"
                    + (f", tags: {', '.join(tbl.tags.list())}" if tbl.tags.list() else "")
                ) from exc
        return tbl

    def _open(self, name: str):
        """Open table ``name`` (its latest version), refusing one written by a newer histoindex."""
        try:
            tbl = self.db.open_table(name)
        except Exception as exc:  # listed but unreadable: its manifests gone or damaged
            raise StoreError(f"cannot open the {name} table of the store at {self.uri}: {one_line(exc)}") from exc
        check_schema_version(name, tbl.schema, self.uri)
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
        tbl = self.table(name, create=True)  # refuses a table written by a newer histoindex
        found = stored_schema_version(tbl.schema)
        current = layout(name).schema_version
        key = layout(name).key
        unmarked = [c for c in key if not (tbl.schema.field(c).metadata or {}).get(b"lance-schema:unenforced-primary-key")]
        if unmarked or found < current:
            dataset = tbl.to_lance()
            if unmarked:
                dataset.update_field_metadata({c: dict(PRIMARY_KEY_METADATA) for c in key})
            added = [f for f in layout(name).schema if f.name not in tbl.schema.names]
            if added:  # columns a newer layout added are nullable: all-null in the older rows (metadata only)
                dataset.add_columns(added)
            dataset.update_schema_metadata({"histoindex.schema_version": str(current)})
            tbl.checkout_latest()
        return tbl

    def _commit(self, name: str, what: str, write: Callable[[Any], Any], *, replayable: bool = True) -> Any:
        """``write(table)``: one commit to table ``name``, opened (by :meth:`_writable`) at its latest
        version. When the table changed under it (another process committed, or ``compact`` removed
        the version it read: Lance then reports a conflict or a file not found) it is made again on
        the then latest version, WRITE_ATTEMPTS times at most; then a :class:`StoreError` saying to
        retry. A failed attempt commits nothing, so nothing of it is ever visible. A write that is
        not ``replayable`` (it consumes a stream) is made once, and only Lance naming a conflict
        counts as the table changing (an error from the stream itself is left as it is)."""
        last: Exception | None = None
        attempts = WRITE_ATTEMPTS if replayable else 1
        for _ in range(attempts):
            read = None
            try:
                tbl = self._writable(name)
                read = tbl.version if replayable else None
                return write(tbl)
            except HistoindexError:
                raise
            except Exception as exc:
                if not self._changed_under(name, read, exc):
                    raise
                last = exc
        raise StoreError(
            f"the store changed while writing {what} (another process wrote to the {name} table, or removed old versions of it, "
            f"at the same time) and the write could not be re-applied in {attempts} attempt(s); nothing of it was written: retry "
            f"(Lance: {one_line(last)})"
        ) from last

    def _changed_under(self, name: str, read: int | None, exc: Exception) -> bool:
        """Whether ``exc``, raised by a write to ``name`` that read version ``read``, came from the table
        changing under it (a new version since, or Lance naming a conflict), not from a damaged store."""
        if not isinstance(exc, (RuntimeError, OSError, ValueError)):
            return False
        if any(word in str(exc).lower() for word in _CONFLICT_WORDS):
            return True
        if read is None or isinstance(exc, ValueError):  # Lance reports missing files as RuntimeError / OSError
            return False
        try:
            return self.db.open_table(name).version != read
        except Exception:
            return False

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
        data = conform("models", pa.Table.from_pylist([row], schema=layout("models").schema))

        def write(tbl) -> int:
            return tbl.merge_insert("model_id").when_matched_update_all().when_not_matched_insert_all().execute(data, timeout=WRITE_TIMEOUT).version

        return model_id, self._commit("models", f"model {model_id}", write)

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
                cfg=_model_config(r["model_id"], r["config_json"]),
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
        """One dataset's spots (see :meth:`write_datasets`)."""
        return self.write_datasets(rows, model_id=model_id, datasets=[dataset])

    def write_datasets(self, rows: pa.Table, *, model_id: str, datasets: Sequence[str]) -> int:
        """Write datasets' spots under one model in a single commit, replacing the rows that each
        (model, dataset) had; returns the version that holds them, tagged
        ``ingest-<dataset>-v<version>`` (several: ``ingest-<first>-and-<n>-more-v<version>``, the
        tag's metadata listing them all).

        Always one ``merge_insert`` keyed on (model_id, dataset, spot_id): matching spots are
        updated, new ones inserted, the (model, dataset) rows it no longer has deleted. The key
        columns carry Lance's primary-key metadata, so two concurrent ingests of the same dataset
        conflict at commit and the later one is re-run against the earlier one's rows (no
        duplicates). When the table has a vector index, the new rows are folded into it (one more
        version, the one returned and tagged)."""
        data = conform("spots", rows)
        datasets = list(datasets)
        if set(data.column("model_id").unique().to_pylist()) != {model_id}:
            raise StoreError(f"rows for model_id {model_id!r} carry other model_id values")
        if set(data.column("dataset").unique().to_pylist()) != set(datasets):
            raise StoreError(f"rows for datasets {', '.join(map(repr, datasets))} carry other dataset values (or lack one)")
        scope = f"model_id = {sql_literal(model_id)} AND dataset IN ({', '.join(sql_literal(d) for d in datasets)})"
        dataset = datasets[0] if len(datasets) == 1 else f"{datasets[0]}-and-{len(datasets) - 1}-more"

        def write(tbl) -> int:
            return (
                tbl.merge_insert(list(layout("spots").key))
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .when_not_matched_by_source_delete(scope)
                .execute(data, timeout=WRITE_TIMEOUT)
            ).version

        version = self._commit("spots", dataset, write)
        tbl = self.table("spots")
        if has_vector_index(tbl):  # keep `query --search ann` on the index for every row
            try:
                version = self.refresh_indexes()
            except StoreError as exc:
                raise StoreError(
                    f"wrote {dataset} whole (spots@{version}), but folding its rows into the indexes failed: {exc}; "
                    "run `histoindex index` (until then `query --search ann` misses them)"
                ) from exc
        try:
            tag = _tag_safe(f"ingest-{dataset}-v{version}")
            tbl.tags.create(tag, version)
            tbl.to_lance().tags.replace_metadata(tag, {OPERATION_KEY: "ingest", "histoindex.dataset": ", ".join(datasets), "histoindex.model_id": model_id})
        except Exception:  # a tag is a convenience; the version itself is the record
            pass
        return version

    def measured_genes(self, *, version: int | str | None = None, where: str | None = None) -> dict[tuple[str, str], list[str]]:
        """(model_id, dataset) → every gene the dataset measured (its ``dataset_genes``, which
        ``profile_index`` counts in), for the datasets of spots at ``version`` (``where``: a
        predicate narrowing them) ingested at schema version 3 or later; older datasets are absent
        (their profile is their ``expression`` over the model's genes)."""
        if not self.has_table("spots"):
            return {}
        tbl = self.table("spots", version=version)
        if "dataset_genes" not in tbl.schema.names:
            return {}
        predicate = "dataset_genes IS NOT NULL" + (f" AND ({where})" if where else "")
        rows = tbl.to_lance().to_table(columns=["model_id", "dataset", "dataset_genes"], filter=predicate)
        return {(m, d): g for m, d, g in zip(*(rows.column(c).to_pylist() for c in ("model_id", "dataset", "dataset_genes")))}

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

        def write(tbl) -> int:
            tbl.to_lance().optimize.optimize_indices()
            tbl.checkout_latest()
            return tbl.version

        return self._commit(table, f"the {table} indexes", write)

    # ---- upkeep -------------------------------------------------------------------------
    def restore(self, version: int | str, *, table: str = "spots") -> RestoreResult:
        """Make ``version`` (a number or a tag) of ``table`` current again: one new version whose
        content equals it, tagged ``restore-of-<version>``. Nothing is lost: every version stays."""
        if table not in TABLES:
            raise UnknownValue(f"no table {table!r}; tables are {', '.join(TABLES)}")
        target = self.table(table, version=version).version  # a tag resolves; an unknown version is an error listing the known ones

        def write(tbl):
            if target == tbl.version:
                raise StoreError(f"{table}@{target} is already the current version; nothing to restore")
            tbl.restore(target)
            tbl.checkout_latest()
            return tbl

        tbl = self._commit(table, f"the restore of {table}@{target}", write)
        tag = self._tag(tbl, f"restore-of-{target}", tbl.version, {OPERATION_KEY: "restore", "histoindex.restored": str(target)})
        return RestoreResult(table=table, restored=target, version=tbl.version, rows=tbl.count_rows(), tag=tag)

    def delete_dataset(self, dataset: str, *, model_id: str | None = None) -> DeleteResult:
        """Delete one dataset's spots (every model's rows of it, or only ``model_id``'s) in one new
        spots version. The values are matched literally; nothing matching is an error naming the
        datasets the store holds."""
        if not dataset or not dataset.strip():
            raise StoreError("--dataset must not be empty")
        where = f"dataset = {sql_literal(dataset)}" + (f" AND model_id = {sql_literal(model_id)}" if model_id is not None else "")
        n = self.table("spots").count_rows(where) if self.has_table("spots") else 0
        if n == 0:
            held = [f"{d} ({m})" for m, datasets in self.spot_models().items() for d in datasets]
            under = f" under model {model_id}" if model_id is not None else ""
            raise UnknownValue(f"no spots of dataset {dataset!r}{under} in {self.uri}; datasets (model): {', '.join(held) or 'none'}")

        def write(tbl):
            result = tbl.delete(where)
            tbl.checkout_latest()
            return tbl, result

        tbl, result = self._commit("spots", f"the delete of {dataset}", write)
        deleted = getattr(result, "num_deleted_rows", None)
        return DeleteResult(dataset=dataset, model_id=model_id, rows=int(n if deleted is None else deleted), version=tbl.version)

    def compact(self, *, keep_versions: int | None = None, older_than: timedelta | None = None, force: bool = False) -> list[Compaction]:
        """Compact every table's data files (Lance ``compact_files``: one new version where there is
        something to rewrite), then remove old versions: those that stopped being current more than
        ``older_than`` ago (default :data:`COMPACT_GRACE`: a command that opened a version while it
        was current may still be reading it) and, with ``keep_versions``, are not among the
        ``keep_versions`` newest; the current one always stays, and so do tagged versions and spots
        versions a stored prediction searched, which are tagged ``pinned-by-predictions-v<N>`` first.
        With ``force`` those go too (their tags deleted); the grace period still holds.

        Unlike LanceDB's ``optimize()``, nothing is pruned by a default age: only what is asked."""
        if keep_versions is not None and keep_versions < 1:
            raise StoreError(f"--keep-versions must be at least 1 (the current version), got {keep_versions}")
        if older_than is not None and older_than < timedelta(0):
            raise StoreError(f"--older-than must not be negative, got {older_than.days} days")
        grace = COMPACT_GRACE if older_than is None else older_than
        searched = set(self.distinct("predictions", "spots_version")) if self.has_table("predictions") else set()
        reports = []
        for name in self.table_names():
            before, metrics = None, None

            def rewrite(tbl):
                nonlocal before, metrics
                before = tbl.version
                metrics = tbl.to_lance().optimize.compact_files()
                return tbl

            try:
                tbl = self._commit(name, f"the compaction of the {name} table", rewrite)
            except StoreError:
                raise
            except Exception as exc:
                raise StoreError(f"compacting the {name} table failed (nothing was removed): {one_line(exc)}") from exc
            tbl.checkout_latest()
            dataset = tbl.to_lance()
            listed = {v["version"]: v for v in dataset.versions()}
            numbers = sorted(listed)
            latest = numbers[-1]
            # when each version stopped being current: the next one's timestamp (where compact removed
            # the versions between, a later time: the grace period then lasts longer, never less)
            replaced = {n: listed[after]["timestamp"] for n, after in zip(numbers, numbers[1:])}
            window = {n for n in numbers if n not in replaced or _age(replaced[n]) < grace}
            if keep_versions is not None:
                window |= set(numbers[-keep_versions:])
            window.add(latest)
            pinned = sorted(n for n in searched if n in listed) if name == "spots" else []
            if not force:
                for n in pinned:
                    self._tag(tbl, PINNED_TAG.format(version=n), n, {OPERATION_KEY: "pin"}, unique=True)
            dataset = tbl.to_lance()
            tags: dict[int, list[str]] = {}
            for tag, info in dataset.tags.list().items():
                tags.setdefault(info["version"], []).append(tag)
            kept: dict[int, str] = {}
            remove: list[int] = []
            for n in sorted(set(listed) - window):
                reasons = []
                if n in tags:
                    reasons.append("tag " + ", ".join(sorted(tags[n])))
                if n in pinned:
                    reasons.append("searched by stored predictions")
                if reasons and not force:
                    kept[n] = "; ".join(reasons)
                else:
                    remove.append(n)
            dropped = sorted(t for n in remove for t in tags.get(n, []))
            for tag in dropped:
                dataset.tags.delete(tag)
            dataset = tbl.to_lance()
            removed_bytes = 0
            if remove:
                try:
                    stats = dataset.cleanup_old_versions(versions=remove, error_if_tagged_old_versions=True)
                except Exception as exc:
                    raise StoreError(f"removing old versions of the {name} table failed: {exc}") from exc
                removed_bytes = int(stats.bytes_removed)
            tbl.checkout_latest()
            compacted = tbl.version != before
            reports.append(
                Compaction(
                    table=name,
                    version=tbl.version,
                    compacted=compacted,
                    fragments_removed=int(metrics.fragments_removed) if compacted else 0,
                    fragments_added=int(metrics.fragments_added) if compacted else 0,
                    removed=remove,
                    bytes_removed=removed_bytes,
                    kept=kept,
                    tags_dropped=dropped,
                    unpinned=sorted(n for n in pinned if n in remove),
                )
            )
        return reports

    @staticmethod
    def _tag(tbl, name: str, version: int, metadata: dict[str, str], *, unique: bool = False) -> str | None:
        """Tag ``version`` ``name`` (``name-v<version>`` if that tag exists, unless ``unique``: then
        an existing tag of that name is kept); returns the tag, or None if Lance refused."""
        existing = tbl.tags.list()
        if name in existing:
            if unique:
                return name
            name = f"{name}-v{version}"
        try:
            tbl.tags.create(name, version)
            tbl.to_lance().tags.replace_metadata(name, metadata)
        except Exception:
            return None
        return name

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
    def predicted_slides(self, *, model_id: str, spots_version: int) -> dict[str, set[str | None]]:
        """The slides ``predictions`` holds a run of by this model against this ``spots`` version,
        each with the ``settings`` of its runs (None for rows written before they were recorded):
        one scan of two columns, however many slides a cohort asks about."""
        where = f"model_id = {sql_literal(model_id)} AND spots_version = {int(spots_version)}"
        tbl = self.table("predictions")
        columns = ["slide", "settings"] if "settings" in tbl.schema.names else ["slide"]
        rows = tbl.to_lance().to_table(columns=columns, filter=where).group_by(columns).aggregate([])
        slides = rows.column("slide").to_pylist()
        settings = rows.column("settings").to_pylist() if "settings" in columns else [None] * len(slides)
        runs: dict[str, set[str | None]] = {}
        for slide, setting in zip(slides, settings):
            runs.setdefault(slide, set()).add(setting)
        return runs

    def add_predictions(self, rows: pa.Table | Iterable[pa.RecordBatch]) -> int:
        """Append prediction rows in one commit; ``rows`` may be a stream of record batches, which
        LanceDB writes as they come (nothing is committed if the stream fails)."""
        if isinstance(rows, pa.Table):
            table = conform("predictions", rows)
            return self._commit("predictions", "the predictions", lambda tbl: tbl.add(table).version)
        target = layout("predictions").schema
        batches = (b for batch in rows for b in conform("predictions", pa.Table.from_batches([batch])).to_batches())
        # a stream is read once: a write that loses a race is not made again, the command says to retry
        return self._commit("predictions", "the predictions", lambda tbl: tbl.add(pa.RecordBatchReader.from_batches(target, batches)).version, replayable=False)

    # ---- overview -----------------------------------------------------------------------
    def versions(self) -> dict[str, list[dict]]:
        """Per table: every version with its timestamp, row count, ``bytes`` (the size of the data
        files it references, Lance's ``total_files_size``: files are shared between versions, indexes
        are not counted), tags, and ``what`` made it (created, ingest of X, index build or refresh,
        restore of N, delete of X, compaction, ...; "unknown" where neither histoindex's tags nor
        Lance's transaction record say)."""
        out = {}
        for name in self.table_names():
            tbl = self._open(name)
            dataset = tbl.to_lance()
            tags: dict[int, list[tuple[str, dict]]] = {}
            for tag, info in dataset.tags.list().items():
                tags.setdefault(info["version"], []).append((tag, dict(info.get("metadata") or {})))
            rows = []
            for v in tbl.list_versions():
                number, meta = v["version"], v["metadata"]
                size = meta.get("total_files_size")
                rows.append(
                    {
                        "version": number,
                        "timestamp": v["timestamp"],
                        "rows": int(meta.get("total_rows", 0)),
                        "bytes": int(size) if size is not None else None,
                        "tags": sorted(t for t, _ in tags.get(number, [])),
                        "what": _what(name, number, tags.get(number, []), _transaction(dataset, number)),
                    }
                )
            out[name] = rows
        return out

    def info(self) -> dict:
        tables = {}
        for name in self.table_names():
            tbl = self._open(name)
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
            panels = {m.model_id: len(m.cfg.genes) for m in self.models()}
            measured = self.measured_genes()
            for d in datasets:  # how many genes a query can ask this dataset for (before schema 3: the model's)
                genes = measured.get((d["model_id"], d["dataset"]))
                d["genes"] = len(genes) if genes is not None else panels.get(d["model_id"])
        models = [
            {
                "model_id": m.model_id,
                "method": m.cfg.method,
                "backbone": m.cfg.backbone,
                "genes": len(m.cfg.genes),
                "trained_on": list(m.train_datasets),
                "created_at": m.created_at,
                "views": m.cfg.views,
                "retrieval": m.cfg.retrieval_settings.to_dict(),
                "inner_check": m.metrics.get("inner_check"),
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
    settings: str | None = None,
    genes: Sequence[str] | None = None,
) -> pa.Table:
    """Arrow rows for the predictions table (column layout from schemas/predictions.json);
    ``settings``: the JSON of what shaped the answer (the cohort resume key)."""
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
            "settings": pa.array([settings] * n, pa.string()),
            "created_at": pa.array([created_at] * n, pa.timestamp("us", tz="UTC")),
            "expression": pa.ListArray.from_arrays(
                pa.array(np.arange(0, (n + 1) * n_genes, n_genes, dtype=np.int32)), pa.array(np.ascontiguousarray(values, np.float32).ravel())
            ),
            # the genes predicted when they are not the model's (query --genes); null: the model's
            "genes": pa.array([list(genes)] * n if genes is not None else [None] * n, pa.list_(pa.string())),
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
    profile=None,
    dataset_genes: Sequence[str] | None = None,
) -> pa.Table:
    """Arrow rows for the spots table (column layout from schemas/spots.json). ``profile``: the
    imputation panel, a scipy sparse (n, len(dataset_genes)) matrix of log1p(CP10k) values over
    ``dataset_genes`` (every gene the dataset measured), stored as each spot's non-zero entries;
    ``dataset_genes`` goes on the first row only (None: rows without a profile, as before schema
    version 3)."""
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
            **_profile_columns(profile, dataset_genes, n),
            "source_values": pa.array([source_values] * n),
            "model_id": pa.array([model_id] * n),
        }
    )


def _profile_columns(profile, dataset_genes: Sequence[str] | None, n: int) -> dict[str, pa.Array]:
    """``profile_index`` / ``profile_values`` (each spot's non-zero entries of ``profile``, a
    sparse matrix over ``dataset_genes``) and ``dataset_genes`` (on the first row only)."""
    if profile is None:
        return {
            "profile_index": pa.nulls(n, pa.list_(pa.int32())),
            "profile_values": pa.nulls(n, pa.list_(pa.float32())),
            "dataset_genes": pa.nulls(n, pa.list_(pa.string())),
        }
    import scipy.sparse as sp

    csr = sp.csr_matrix(profile)
    csr.eliminate_zeros()
    csr.sort_indices()
    if csr.shape != (n, len(dataset_genes)):
        raise StoreError(f"profiles have shape {csr.shape}, expected ({n}, {len(dataset_genes)}): one row per spot, one column per measured gene")
    offsets = pa.array(csr.indptr.astype(np.int32))
    genes = pa.array([list(map(str, dataset_genes))] + [None] * (n - 1), pa.list_(pa.string()))
    return {
        "profile_index": pa.ListArray.from_arrays(offsets, pa.array(csr.indices.astype(np.int32))),
        "profile_values": pa.ListArray.from_arrays(offsets, pa.array(csr.data.astype(np.float32))),
        "dataset_genes": genes,
    }
