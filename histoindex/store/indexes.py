"""Indexes: the ANN index on the reference expression embeddings and the scalar indexes on the
filter columns ``schemas/`` lists, built by ``histoindex index`` when a reference is large enough
for them to matter (the writes fold later rows into them)."""

from __future__ import annotations

from typing import Any

import numpy as np
from lancedb.index import Bitmap, BTree, LabelList

from ..errors import StoreError, UnknownValue
from ..schemas import layout
from .tables import has_vector_index
from .writes import _Writes

_INDEX_CONFIGS = {"bitmap": Bitmap, "btree": BTree, "label_list": LabelList}
VECTOR_INDEX_TYPES = ("IVF_PQ", "IVF_FLAT", "IVF_HNSW_SQ")


class _Indexes(_Writes):
    """Building the vector and scalar indexes."""

    def build_scalar_indexes(self, name: str) -> int:
        """Create the scalar indexes ``schemas/`` lists for table ``name`` that it lacks (one version
        each); returns the table's version."""
        tbl = self.table(name)
        existing = {tuple(i.columns) for i in tbl.list_indices()}
        for column, kind in layout(name).scalar_indexes:
            if (column,) not in existing:
                tbl.create_index(column, config=_INDEX_CONFIGS[kind]())
        return tbl.version

    def has_vector_index(self) -> bool:
        return self.has_table("spots") and has_vector_index(self.table("spots"))

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

    def create_tiles_vector_index(self, index_type: str = "IVF_PQ", *, num_partitions: int | None = None, num_sub_vectors: int | None = None) -> int:
        """Build the ANN index on the indexed slides' tile embeddings (cosine; ``similar``'s search
        above the exact-search size) and the tiles' scalar indexes if missing. Returns the new
        tiles version."""
        if not self.has_table("tiles") or self.table("tiles").count_rows() == 0:
            raise StoreError("the store has no indexed slides yet: run `histoindex query SLIDE` first (it indexes the slide's tiles)")
        tbl = self.table("tiles")
        config = vector_index_config(index_type, tbl.count_rows(), num_partitions=num_partitions, num_sub_vectors=num_sub_vectors)
        tbl.create_index("embedding", config=config, replace=True)
        return self.build_scalar_indexes("tiles")


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
