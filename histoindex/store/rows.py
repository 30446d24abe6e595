"""Row layouts: the Arrow rows histoindex writes to the spots and predictions tables (columns as
``schemas/`` lays them out), and the SQL spelling of a value in a row predicate."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import numpy as np
import pyarrow as pa

from ..errors import StoreError
from ..schemas import layout


def sql_literal(value: str) -> str:
    """A SQL string literal (single quotes doubled)."""
    return "'" + str(value).replace("'", "''") + "'"


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
    slide_hash: str | None = None,
    embedding_key: str | None = None,
) -> pa.Table:
    """Arrow rows for the predictions table (column layout from schemas/predictions.json);
    ``settings``: the JSON of what shaped the answer (the cohort resume key); ``slide_hash`` and
    ``embedding_key``: which slide bytes were answered and the embedding settings, as the ``tiles``
    rows of those tiles carry them (None: not known, e.g. a remote slide)."""
    n, n_genes = values.shape
    return pa.table(
        {
            "run_id": [run_id] * n,
            "slide": [slide] * n,
            "slide_hash": pa.array([slide_hash] * n, pa.string()),
            "tile_id": np.asarray(ids).astype(str),
            "x": xy[:, 0],
            "y": xy[:, 1],
            "x_um": xy[:, 0] * mpp,
            "y_um": xy[:, 1] * mpp,
            "model_id": [model_id] * n,
            "spots_version": np.full(n, spots_version, np.int64),
            "filter": [predicate] * n,
            "k": np.full(n, k, np.int32),
            "embedding_key": pa.array([embedding_key] * n, pa.string()),
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
