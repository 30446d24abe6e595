"""The store: one LanceDB database holding the spots, predictions and models tables (model weights
included, as safetensors bytes in ``models.weights``). Every access goes through LanceDB's own URI
handling, so the store can live in a folder, a ``file://`` URI or an object store (``s3://...``).
Every write reports the version it made.

:class:`Store` opens or creates the store; what it does is spread over one module per
responsibility, each a mixin it inherits (each below the next, as the import-linter contract on
this package holds them): ``tables`` (opening, creating, schema versions), ``writes`` (commits
with conflict handling and retry; spots and predictions), ``indexes``, ``records`` (models),
``history`` (versions, restore, info), ``upkeep`` (delete, compact); ``rows`` lays out the rows."""

from __future__ import annotations

from pathlib import Path

import lancedb

from ..errors import StoreError
from ..schemas import CREATED_TABLES, TABLES
from .history import _History
from .indexes import _Indexes
from .records import _Records
from .tables import _list_tables, _local_path, _Tables
from .tiles import _Tiles
from .upkeep import _Upkeep
from .writes import _Writes


class Store(_Upkeep, _History, _Records, _Indexes, _Tiles, _Writes, _Tables):
    """A histoindex store at ``uri`` (a directory, ``file://`` URI, or any LanceDB URI).

    Creating a store creates its four tables (a store made before ``tiles`` existed gets it with
    its first indexed slide), empty, with the layouts in ``schemas/`` (version 1
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
            for name in CREATED_TABLES:
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
