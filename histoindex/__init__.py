"""histoindex: gene expression from H&E by retrieval from a versioned embedding index."""

from __future__ import annotations

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING

from .errors import HistoindexError, InputError, MissingPixelSize, StoreError, UnknownValue

# The public names load on first use (PEP 562), so `import histoindex` — and every CLI command's
# start-up, `--help` included — does not pay for LanceDB, anndata and torch until it needs them.
_LAZY = {
    **dict.fromkeys(("IngestResult", "QueryResult", "TrainResult", "info", "ingest", "query", "read_reference", "sql", "train", "versions"), "api"),
    "TrainOptions": "recipe",
    **dict.fromkeys(("Hits", "ImageRef", "PatchGrid", "SpotSet"), "data"),
    "Store": "store",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from .api import IngestResult, QueryResult, TrainResult, info, ingest, query, read_reference, sql, train, versions
    from .data import Hits, ImageRef, PatchGrid, SpotSet
    from .recipe import TrainOptions
    from .store import Store

__all__ = [
    "__version__",
    "TrainOptions",
    "TrainResult",
    "IngestResult",
    "QueryResult",
    "read_reference",
    "train",
    "ingest",
    "query",
    "sql",
    "versions",
    "info",
    "SpotSet",
    "ImageRef",
    "PatchGrid",
    "Hits",
    "Store",
    "HistoindexError",
    "InputError",
    "MissingPixelSize",
    "StoreError",
    "UnknownValue",
]
