"""The store package: :class:`Store` (``core``) and everything the rest of histoindex imports from
it, re-exported so ``from histoindex.store import Store, spot_rows, WEIGHTS, ...`` names one place."""

from __future__ import annotations

from .core import Store
from .history import RestoreResult
from .indexes import VECTOR_INDEX_TYPES, vector_index_config
from .records import WEIGHTS, ModelRecord
from .rows import prediction_rows, spot_rows, sql_literal
from .tables import SCHEMA_VERSION_KEY, check_schema_version, has_vector_index, stored_schema_version
from .tables import _local_path as _local_path  # private, but histoindex.sql reads a local store's folder with it
from .tiles import tile_rows
from .upkeep import COMPACT_GRACE, PINNED_TAG, Compaction, DeleteResult, SlideDeleteResult
from .writes import OPERATION_KEY, WRITE_ATTEMPTS, WRITE_TIMEOUT

__all__ = [
    "COMPACT_GRACE",
    "OPERATION_KEY",
    "PINNED_TAG",
    "SCHEMA_VERSION_KEY",
    "VECTOR_INDEX_TYPES",
    "WEIGHTS",
    "WRITE_ATTEMPTS",
    "WRITE_TIMEOUT",
    "Compaction",
    "DeleteResult",
    "ModelRecord",
    "RestoreResult",
    "SlideDeleteResult",
    "Store",
    "check_schema_version",
    "has_vector_index",
    "prediction_rows",
    "spot_rows",
    "sql_literal",
    "stored_schema_version",
    "tile_rows",
    "vector_index_config",
]
