"""The store's upkeep verbs: ``index``, ``versions``, ``info``, ``restore``, ``delete``, ``compact``."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..store import Compaction, DeleteResult, RestoreResult, SlideDeleteResult, Store


# ---- indexes ------------------------------------------------------------------------------
def create_index(
    *, db: str | Path, index_type: str = "IVF_PQ", num_partitions: int | None = None, num_sub_vectors: int | None = None, table: str = "spots"
) -> int:
    """Build the ANN index on the reference expression embeddings (cosine) used by
    ``query --search ann`` (and ``auto`` above the exact-search size), build the scalar (bitmap)
    indexes on the filter columns if missing, and bring them up to date with rows ingested since.
    Returns the new spots version. ``table="tiles"``: the index on the indexed slides' tile
    embeddings instead (``similar``), returning the new tiles version."""
    if table == "tiles":
        return Store(db).create_tiles_vector_index(index_type, num_partitions=num_partitions, num_sub_vectors=num_sub_vectors)
    if table != "spots":
        raise InputError(f"index builds a vector index on spots or tiles, not {table!r}")
    return Store(db).create_vector_index(index_type, num_partitions=num_partitions, num_sub_vectors=num_sub_vectors)


# ---- overview -----------------------------------------------------------------------------
def versions(*, db: str | Path) -> dict[str, list[dict]]:
    return Store(db).versions()


def info(*, db: str | Path) -> dict:
    return Store(db).info()


# ---- store upkeep -------------------------------------------------------------------------
#: ``compact`` with neither ``keep_versions`` nor ``older_than_days`` removes versions older than this
COMPACT_DEFAULT_DAYS = 7.0


def restore(version: int | str, *, db: str | Path, table: str = "spots") -> RestoreResult:
    """Make ``version`` (a number or a tag) of ``table`` current again: one new version whose content
    equals it, tagged ``restore-of-<version>``; every version stays (nothing is lost)."""
    return Store(db).restore(version, table=table)


def delete(*, db: str | Path, dataset: str | None = None, slide: str | None = None, model_id: str | None = None) -> DeleteResult | SlideDeleteResult:
    """Delete dataset ``dataset``'s reference spots (one new spots version), or slide ``slide``'s
    tiles (one new tiles version; its predictions are kept): every model's rows, or only
    ``model_id``'s. Exactly one of ``dataset`` and ``slide``. Older versions keep the rows until
    :func:`compact` removes those versions."""
    if (dataset is None) == (slide is None):
        raise InputError("delete takes exactly one of --dataset or --slide")
    if slide is not None:
        return Store(db).delete_slide(slide, model_id=model_id)
    return Store(db).delete_dataset(dataset, model_id=model_id)


def compact(*, db: str | Path, keep_versions: int | None = None, older_than_days: float | None = None, force: bool = False) -> list[Compaction]:
    """Compact every table's data files, then remove old versions: those replaced by a newer one more
    than ``older_than_days`` ago (default 7 days when neither option is given; with only
    ``keep_versions``, the grace period ``store.COMPACT_GRACE``, 1 hour: a command may still be
    reading a version it opened) and, with ``keep_versions``, not among the ``keep_versions`` newest.
    Tagged versions and spots versions that stored predictions searched are kept (and tagged
    ``pinned-by-predictions-v<N>``) unless ``force``."""
    if keep_versions is None and older_than_days is None:
        older_than_days = COMPACT_DEFAULT_DAYS
    if older_than_days is not None and not (np.isfinite(older_than_days) and older_than_days >= 0):
        raise InputError(f"--older-than must be a number of days, 0 or more; got {older_than_days}")
    older_than = timedelta(days=older_than_days) if older_than_days is not None else None
    return Store(db).compact(keep_versions=keep_versions, older_than=older_than, force=force)
