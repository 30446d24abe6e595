"""Top-k search of query image embeddings against the reference expression embeddings, with the
filter pushed down into LanceDB (prefilter), for a whole batch of queries at once.

A small planner picks the path. ``exact``: the filtered reference embeddings are read once (the
filter runs inside the Lance scan) and top-k comes from chunked matrix products (torch, on the GPU
when present) — exact, and the fastest path while the candidates fit in memory. ``ann``: LanceDB's
vector index (``histoindex index``), with ``nprobes`` and ``refine_factor``, for references too large
to hold; without an index LanceDB falls back to its own flat scan. ``auto``: exact up to
``EXACT_MAX_ROWS`` candidates, else ann."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import Hits
from .errors import StoreError, UnknownValue
from .store import Store, has_vector_index, sql_literal


@dataclass(frozen=True)
class ReferenceBlock:
    """The filtered reference rows a search may return: their LanceDB row ids (sorted) and
    expression profiles, read once at one table version."""

    row_ids: np.ndarray
    expression: np.ndarray
    spots_version: int
    embeddings: np.ndarray | None = None  # expression embeddings, for the exact path


SEARCH_MODES = ("auto", "exact", "ann")
#: candidates held in memory for exact search: 2M × 256 float32 = 2 GB
EXACT_MAX_ROWS = 2_000_000
#: queries per LanceDB batched search (a batch of 10k exhausts file handles on 1M rows)
ANN_BATCH = 1024


def plan_search(mode: str, n_candidates: int) -> str:
    """``exact`` or ``ann`` for a search over ``n_candidates`` filtered rows."""
    if mode not in SEARCH_MODES:
        raise StoreError(f"unknown search mode {mode!r}; use one of {', '.join(SEARCH_MODES)}")
    if mode == "auto":
        return "exact" if n_candidates <= EXACT_MAX_ROWS else "ann"
    return mode


def build_filter(*, model_id: str, tissue: str | None = None, platform: str | None = None, species: str | None = None, where: str | None = None) -> str:
    """The SQL predicate for a query: always the model (embeddings of different models live in
    different spaces), then the user's filters."""
    clauses = [f"model_id = {sql_literal(model_id)}"]
    for column, value in (("tissue", tissue), ("platform", platform), ("species", species)):
        if value is not None:
            clauses.append(f"{column} = {sql_literal(value)}")
    if where:
        clauses.append(f"({where})")
    return " AND ".join(clauses)


def check_filter_values(store: Store, *, version: int | None, model_id: str, **filters: str | None) -> None:
    """A filter value absent from the reference is a user error: say which values exist."""
    for column, value in filters.items():
        if value is None:
            continue
        present = store.distinct("spots", column, where=f"model_id = {sql_literal(model_id)}", version=version)
        if value not in present:
            raise UnknownValue(
                f"no reference spots with {column} {value!r} (model {model_id}); "
                f"{column} values present: {', '.join(map(str, present)) or 'none'}"
            )


def load_references(store: Store, *, where: str, version: int | None = None, embeddings: bool = False) -> ReferenceBlock:
    """The rows matching ``where`` (one Lance scan with the filter pushed down): row ids, expression
    profiles and, with ``embeddings``, the expression embeddings for exact search."""
    tbl = store.table("spots", version=version)
    columns = ["expression", "expression_embedding"] if embeddings else ["expression"]
    try:
        arrow = tbl.search().where(where).select(columns).with_row_id(True).limit(None).to_arrow()
    except Exception as exc:
        raise StoreError(f"cannot apply filter {where!r}: {exc}") from exc
    if arrow.num_rows == 0:
        raise StoreError(f"no reference spots match {where!r} in spots@{tbl.version}")
    row_ids = arrow.column("_rowid").to_numpy()
    order = np.argsort(row_ids)
    lists = arrow.column("expression").combine_chunks()
    n_genes = len(lists[0])
    expression = lists.flatten().to_numpy(zero_copy_only=False).reshape(-1, n_genes)
    keys = None
    if embeddings:
        vectors = arrow.column("expression_embedding").combine_chunks()
        keys = vectors.flatten().to_numpy(zero_copy_only=False).reshape(len(vectors), -1)[order]
    return ReferenceBlock(row_ids=row_ids[order], expression=expression[order], spots_version=tbl.version, embeddings=keys)


def count_candidates(store: Store, *, where: str, version: int | None = None) -> int:
    tbl = store.table("spots", version=version)
    try:
        return tbl.count_rows(where)
    except Exception as exc:
        raise StoreError(f"cannot apply filter {where!r}: {exc}") from exc


def search(
    store: Store,
    queries: np.ndarray,
    *,
    where: str,
    k: int = 50,
    version: int | None = None,
    references: ReferenceBlock | None = None,
    mode: str = "auto",
    device: str = "cpu",
    nprobes: int = 20,
    refine_factor: int = 5,
) -> tuple[Hits, ReferenceBlock]:
    """For each query (unit-length image embedding), the ``k`` most cosine-similar reference
    expression embeddings among rows matching ``where``, by the path :func:`plan_search` picks."""
    if k < 1:
        raise StoreError(f"k must be at least 1, got {k}")
    if references is None:
        path = plan_search(mode, count_candidates(store, where=where, version=version))
        references = load_references(store, where=where, version=version, embeddings=path == "exact")
    else:
        path = "exact" if references.embeddings is not None and mode != "ann" else "ann"
    k_eff = min(k, len(references.row_ids))
    if path == "exact":
        indices, sims = exact_topk(queries, references.embeddings, k_eff, device=device)
        return Hits(indices=indices, similarities=sims, spots_version=references.spots_version), references

    tbl = store.table("spots", version=references.spots_version)
    indexed = has_vector_index(tbl)
    parts = []
    for start in range(0, len(queries), ANN_BATCH):  # LanceDB opens files per query: bounded batches
        builder = (
            tbl.search(np.ascontiguousarray(queries[start : start + ANN_BATCH], np.float32), vector_column_name="expression_embedding")
            .distance_type("cosine")
            .where(where, prefilter=True)
            .limit(k_eff)
        )
        if indexed:
            builder = builder.nprobes(nprobes).refine_factor(refine_factor)
        part = builder.select(["_distance"]).with_row_id(True).to_arrow()
        offset = part.column("query_index").to_numpy() if "query_index" in part.column_names else np.zeros(part.num_rows, np.int64)
        parts.append((offset + start, part.column("_rowid").to_numpy(), part.column("_distance").to_numpy()))
    query_index, row_ids, distance = (np.concatenate(columns) for columns in zip(*parts))
    # group by query, nearest first
    order = np.lexsort((distance, query_index))
    query_index, row_ids, distance = query_index[order], row_ids[order], distance[order]
    counts = np.bincount(query_index, minlength=len(queries))
    if not (counts == k_eff).all():
        raise StoreError(f"search returned {counts.min()}..{counts.max()} neighbours per query, expected {k_eff}")
    positions = np.searchsorted(references.row_ids, row_ids)
    hits = Hits(
        indices=positions.reshape(len(queries), k_eff),
        similarities=(1.0 - distance).astype(np.float32).reshape(len(queries), k_eff),
        spots_version=references.spots_version,
    )
    return hits, references


#: similarity matrix entries computed at once (float32: 1 GiB), which sets the query chunk
EXACT_CHUNK_ELEMENTS = 2**28


def exact_topk(queries: np.ndarray, keys: np.ndarray, k: int, *, device: str = "cpu", chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product (cosine for unit vectors) with chunked matrix products:
    returns (indices, similarities), each n_query × k, nearest first. Queries go in chunks of
    ``chunk`` (default: as many as keep one similarity block within ``EXACT_CHUNK_ELEMENTS``)."""
    import torch

    k = min(k, len(keys))
    if chunk is None:
        chunk = int(np.clip(EXACT_CHUNK_ELEMENTS // max(len(keys), 1), 1, 8192))
    keys_t = torch.from_numpy(np.require(keys, np.float32, ["C", "W"])).to(device)  # Arrow buffers are read-only
    indices = np.empty((len(queries), k), np.int64)
    sims = np.empty((len(queries), k), np.float32)
    with torch.inference_mode():
        for start in range(0, len(queries), chunk):
            q = torch.from_numpy(np.ascontiguousarray(queries[start : start + chunk], np.float32)).to(device)
            values, idx = torch.topk(q @ keys_t.T, k, dim=1)
            indices[start : start + len(q)] = idx.cpu().numpy()
            sims[start : start + len(q)] = values.cpu().numpy()
    return indices, sims
