"""Table layouts, loaded from the JSON files in the repository's ``schemas/`` folder.

Those files are the only place where column names and types are written down; everything else
asks this module. In a wheel they are shipped as ``histoindex/_schemas``; in a source checkout
(editable install) they are read from ``schemas/`` beside the package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import pyarrow as pa

from .errors import SchemaMismatch

TABLES = ("spots", "predictions", "models", "tiles")
#: the tables a new store is created with (all: a store made before ``tiles`` existed gets that
#: table from the first query that indexes a slide)
CREATED_TABLES = TABLES

_SCALARS = {
    "string": pa.string(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "bool": pa.bool_(),
    "binary": pa.binary(),
    "large_binary": pa.large_binary(),
    "timestamp[us, UTC]": pa.timestamp("us", tz="UTC"),
}


@dataclass(frozen=True)
class TableLayout:
    """One table's layout: its Arrow schema plus what the JSON says about keys and indexes."""

    name: str
    schema_version: int
    schema: pa.Schema
    key: tuple[str, ...]
    scalar_indexes: tuple[tuple[str, str], ...]

    def vector_dim(self, column: str) -> int:
        return self.schema.field(column).type.list_size


def _schema_dir() -> Path:
    packaged = resources.files("histoindex") / "_schemas"
    if packaged.is_dir():
        return Path(str(packaged))
    source = Path(__file__).resolve().parent.parent / "schemas"
    if source.is_dir():
        return source
    raise SchemaMismatch("histoindex schemas not found: expected histoindex/_schemas or schemas/ beside the package")


def _arrow_type(spec: dict) -> pa.DataType:
    kind = spec["type"]
    if kind == "vector":
        return pa.list_(pa.float32(), int(spec["dim"]))
    if kind.startswith("list<") and kind.endswith(">"):
        return pa.list_(_SCALARS[kind[5:-1]])
    if kind not in _SCALARS:
        raise SchemaMismatch(f"unknown column type {kind!r} for column {spec['name']!r}")
    return _SCALARS[kind]


#: Lance's field metadata for key columns: a concurrent merge_insert that inserts the same key
#: conflicts at commit and is retried against the newer version, instead of duplicating rows
PRIMARY_KEY_METADATA = {"lance-schema:unenforced-primary-key": "true"}


@cache
def layout(table: str) -> TableLayout:
    """The layout of ``table`` (one of spots, predictions, models)."""
    if table not in TABLES:
        raise SchemaMismatch(f"no schema for table {table!r}; tables are {', '.join(TABLES)}")
    spec = json.loads((_schema_dir() / f"{table}.json").read_text())
    # key columns in the table's column order: Lance's merge_insert detects a concurrent insert of
    # the same key only when its `on` columns come in the order of the primary-key fields
    named = set(spec.get("key", ()))
    key = tuple(c["name"] for c in spec["columns"] if c["name"] in named)
    if len(key) != len(named):
        raise SchemaMismatch(f"table {table!r}: key columns {sorted(named - set(key))} are not columns")
    fields = [
        pa.field(c["name"], _arrow_type(c), nullable=c.get("nullable", True), metadata=PRIMARY_KEY_METADATA if c["name"] in key else None)
        for c in spec["columns"]
    ]
    meta = {"histoindex.table": table, "histoindex.schema_version": str(spec["schema_version"])}
    return TableLayout(
        name=table,
        schema_version=int(spec["schema_version"]),
        schema=pa.schema(fields, metadata=meta),
        key=key,
        scalar_indexes=tuple((i["column"], i["type"]) for i in spec.get("scalar_indexes", ())),
    )


def schema(table: str) -> pa.Schema:
    return layout(table).schema


def embedding_dim() -> int:
    """Dimension of the shared embedding space, as fixed by the spots table layout."""
    return layout("spots").vector_dim("image_embedding")


def conform(table: str, data: pa.Table) -> pa.Table:
    """Reorder and cast ``data`` to ``table``'s layout; a missing or null-in-non-null column is an error."""
    target = schema(table)
    missing = [f.name for f in target if f.name not in data.column_names]
    if missing:
        raise SchemaMismatch(f"rows for table {table!r} lack column(s) {', '.join(missing)}")
    columns = []
    for f in target:
        col = data.column(f.name)
        if not f.nullable and col.null_count:
            raise SchemaMismatch(f"column {f.name!r} of table {table!r} has {col.null_count} null value(s)")
        columns.append(col.cast(f.type))
    return pa.Table.from_arrays(columns, schema=target)
