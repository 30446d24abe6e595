"""histoindex: gene expression from H&E by retrieval from a versioned embedding index."""

from __future__ import annotations

__version__ = "0.1.0"

from .api import IngestResult, QueryResult, TrainOptions, TrainResult, info, ingest, query, read_reference, sql, train, versions
from .data import Hits, ImageRef, PatchGrid, SpotSet
from .errors import HistoindexError, InputError, MissingPixelSize, StoreError, UnknownValue
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
