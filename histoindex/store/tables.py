"""Tables: where the store lives (a local folder or any LanceDB URI), opening and creating its
tables with the layouts in ``schemas/``, and the layout version each table records: a table written
by a newer histoindex is refused, one written by an older release is brought up to date on write."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
from lancedb.util import get_uri_scheme

from ..errors import StoreError, UnknownValue, one_line
from ..schemas import PRIMARY_KEY_METADATA, TABLES, layout

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


def has_vector_index(tbl) -> bool:
    """Whether a spots table has the ANN index on its expression embeddings (`histoindex index`)."""
    return any(i.columns == ["expression_embedding"] for i in tbl.list_indices())


def _local_path(uri: str) -> Path | None:
    """The folder of a local URI, read the way LanceDB reads it; None for any other scheme."""
    if get_uri_scheme(uri) != "file":
        return None
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif uri.startswith("file:/"):
        uri = uri[len("file:") :]
    return Path(uri).expanduser()


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


class _Tables:
    """The store's tables: listing, opening (at a version), creating, and readying one for a write."""

    uri: str
    db: Any  # the LanceDB connection

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

    def distinct(self, table: str, column: str, *, where: str | None = None, version: int | None = None) -> list[Any]:
        tbl = self.table(table, version=version)
        query = tbl.search().select([column]).limit(None)
        if where:
            query = query.where(where)
        values = query.to_arrow().column(column).unique().to_pylist()
        return sorted(v for v in values if v is not None)
