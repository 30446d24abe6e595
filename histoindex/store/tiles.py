"""The ``tiles`` table: the slides queries indexed. A slide's tiles (their positions and query-space
embeddings) are one commit, written while the query streams; a later query of the same slide bytes,
model and embedding settings reads them instead of the image. Created on a store's first indexed
slide (stores made before it have no ``tiles`` table until then)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from ..schemas import layout
from .rows import sql_literal
from .writes import _Writes

#: the columns a re-answer reads (not the slide's identity columns, which it matched on)
_ANSWER_COLUMNS = ["tile_id", "tile_index", "x", "y", "mpp", "embedding"]


class _Tiles(_Writes):
    """Indexed slides: written one slide per commit, found by the slide's bytes (their hash)."""

    def add_tiles(self, rows: pa.Table | Iterable[pa.RecordBatch]) -> int:
        """Append one slide's tile rows in one commit; ``rows`` may be a stream of record batches
        (nothing is committed if the stream fails)."""
        return self._append("tiles", "the slide's tiles", rows)

    def known_slide_hash(self, path: str, *, size: int | None, mtime_ns: int | None) -> str | None:
        """The content hash recorded for the file at ``path`` when it had this ``size`` and
        modification time (both None: the file is gone or unreadable; then the newest hash recorded
        for the path), or None: the bytes must be hashed (or the slide was never indexed)."""
        if not self.has_table("tiles"):
            return None
        where = f"slide_path = {sql_literal(path)}"
        if size is not None:
            where += f" AND slide_bytes = {int(size)} AND slide_mtime_ns = {int(mtime_ns)}"
        found = self.table("tiles").to_lance().to_table(columns=["slide_hash", "created_at"], filter=where)
        if not found.num_rows:
            return None
        newest = pa.compute.index(found.column("created_at"), pa.compute.max(found.column("created_at")))
        return found.column("slide_hash")[newest.as_py()].as_py()

    def indexed_as(self, slide_hash: str, *, model_id: str, embedding_key: str) -> set[tuple[str, str]]:
        """The (slide name, path) pairs these bytes' tiles are indexed under for this model and these
        settings (a copy of a slide, or the same file under another manifest name, adds a pair)."""
        if not self.has_table("tiles"):
            return set()
        where = f"slide_hash = {sql_literal(slide_hash)} AND model_id = {sql_literal(model_id)} AND embedding_key = {sql_literal(embedding_key)}"
        found = self.table("tiles").to_lance().to_table(columns=["slide", "slide_path"], filter=where).group_by(["slide", "slide_path"]).aggregate([])
        return set(zip(found.column("slide").to_pylist(), found.column("slide_path").to_pylist()))

    def slide_tiles(self, slide_hash: str, *, model_id: str, embedding_key: str) -> pa.Table | None:
        """An indexed slide's tiles in grid order (tile_id, tile_index, x, y, mpp, embedding), or None
        when these bytes were never embedded by this model with these settings."""
        if not self.has_table("tiles"):
            return None
        where = f"slide_hash = {sql_literal(slide_hash)} AND model_id = {sql_literal(model_id)} AND embedding_key = {sql_literal(embedding_key)}"
        found = self.table("tiles").to_lance().to_table(columns=[*_ANSWER_COLUMNS, "created_at"], filter=where)
        if not found.num_rows:
            return None
        newest = pa.compute.max(found.column("created_at"))  # embedded again (--re-embed): the newest commit
        found = found.filter(pa.compute.equal(found.column("created_at"), newest))
        return found.select(_ANSWER_COLUMNS).sort_by("tile_index")


def tile_rows(
    *,
    slide: dict,
    ids: np.ndarray,
    index: np.ndarray,
    xy: np.ndarray,
    mpp: float,
    model_id: str,
    embedding_key: str,
    embeddings: np.ndarray,
    created_at: datetime,
) -> pa.Table:
    """``tiles`` rows for grid positions ``index`` of one slide. ``slide``: its name, path, hash,
    bytes, mtime_ns and metadata (a dict, stored as JSON)."""
    n = len(ids)
    metadata = json.dumps(slide["metadata"], sort_keys=True, default=str) if slide.get("metadata") else None
    dim = layout("tiles").vector_dim("embedding")
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    return pa.table(
        {
            "slide": pa.array([slide["name"]] * n, pa.string()),
            "slide_path": pa.array([slide["path"]] * n, pa.string()),
            "slide_hash": pa.array([slide["hash"]] * n, pa.string()),
            "slide_bytes": pa.array([slide["bytes"]] * n, pa.int64()),
            "slide_mtime_ns": pa.array([slide["mtime_ns"]] * n, pa.int64()),
            "tile_id": pa.array([str(i) for i in ids], pa.string()),
            "tile_index": pa.array(index, pa.int32()),
            "x": pa.array(xy[:, 0], pa.float64()),
            "y": pa.array(xy[:, 1], pa.float64()),
            "x_um": pa.array(xy[:, 0] * mpp, pa.float64()),
            "y_um": pa.array(xy[:, 1] * mpp, pa.float64()),
            "mpp": pa.array([mpp] * n, pa.float64()),
            "model_id": pa.array([model_id] * n, pa.string()),
            "embedding_key": pa.array([embedding_key] * n, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), dim),
            "metadata": pa.array([metadata] * n, pa.string()),
            "created_at": pa.array([created_at] * n, pa.timestamp("us", tz="UTC")),
        }
    )
