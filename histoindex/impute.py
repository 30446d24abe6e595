"""Expression imputation from search hits: the (similarity-weighted) mean profile of each query's
neighbours (BLEEP), optionally in per-dataset z-score space, then optionally blended with the
query slide's spatial neighbourhood (:class:`~histoindex.config.RetrievalSettings`).

Averaging goes through a sparse (queries × distinct neighbours) matrix, so memory is the output
plus the distinct neighbours' profiles — never a queries × k × genes temporary (8 GB for 2,048
tiles, k = 50 and 20,000 genes). Smoothing streams too: a position's output waits only for its
graph neighbours (a few grid rows)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np
import scipy.sparse as sp

from .config import RetrievalSettings
from .data import DatasetStats, Hits


class ExpressionSource(Protocol):
    def expression(self, row_ids: np.ndarray) -> np.ndarray: ...

    def dataset_codes(self, row_ids: np.ndarray) -> np.ndarray: ...

    def dataset_stats(self) -> DatasetStats: ...


class ProfileMatrix:
    """Reference profiles held in memory (``evaluate``, tests): rows indexed by position, each of
    a dataset (code or name per row)."""

    def __init__(self, values: np.ndarray, datasets: np.ndarray | None = None):
        self.values = np.asarray(values, np.float32)
        labels = np.zeros(len(self.values), np.int64) if datasets is None else np.asarray(datasets)
        _, self.codes = np.unique(labels, return_inverse=True)
        self._stats: DatasetStats | None = None

    def expression(self, row_ids: np.ndarray) -> np.ndarray:
        return self.values[row_ids]

    def dataset_codes(self, row_ids: np.ndarray) -> np.ndarray:
        return self.codes[row_ids]

    def dataset_stats(self) -> DatasetStats:
        if self._stats is None:
            self._stats = DatasetStats.of(self.values, self.codes)
        return self._stats


def similarity_weights(similarities: np.ndarray, tau: float) -> np.ndarray | None:
    """``softmax(similarity / tau)`` over each query's neighbours (None for ``tau`` = 0: equal)."""
    if tau <= 0:
        return None
    s = np.asarray(similarities, np.float64)
    return np.exp((s - s.max(axis=1, keepdims=True)) / tau)


def average_rows(indices: np.ndarray, values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Per query, the (weighted) mean of ``values[indices[q]]``: (n_query, n_cols) float32.

    ``indices`` (n_query, k) index rows of ``values``; ``weights`` (n_query, k), if given, need not
    be normalised."""
    n, k = indices.shape
    if weights is None:
        weights = np.full((n, k), 1.0 / k, np.float32)
    else:
        weights = np.asarray(weights, np.float64)
        weights = (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
    matrix = sp.csr_matrix((weights.ravel(), indices.ravel(), np.arange(0, n * k + 1, k)), shape=(n, len(values)))
    return np.asarray(matrix @ values, dtype=np.float32)


def average_measured(indices: np.ndarray, values: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`average_rows` where ``values`` hold NaN for genes a row's dataset did not measure:
    per query and gene, ``sum_j w_j m_jg v_jg / sum_j w_j m_jg`` over its neighbours ``j``
    (``m_jg`` = 1 where neighbour j measured gene g; the weights renormalised over those), NaN where
    none did. Returns (means, measuring neighbours per query and gene)."""
    n, k = indices.shape
    weights = np.ones((n, k)) if weights is None else np.asarray(weights, np.float64)
    rows = np.arange(0, n * k + 1, k)
    measured = ~np.isnan(values)
    matrix = sp.csr_matrix((weights.ravel(), indices.ravel(), rows), shape=(n, len(values)))
    total = matrix @ np.where(measured, values, 0.0).astype(np.float64)
    mass = matrix @ measured.astype(np.float64)
    counts = sp.csr_matrix((np.ones(n * k), indices.ravel(), rows), shape=(n, len(values))) @ measured.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(mass > 0, total / np.where(mass > 0, mass, 1.0), np.nan)
    return means.astype(np.float32), np.rint(counts).astype(np.int32)


def impute_measured(hits: Hits, references: ExpressionSource | np.ndarray, settings: RetrievalSettings | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`impute`, with how many of each query's neighbours measured each gene: (values,
    counts), counts None when every neighbour measured every gene. A gene only some neighbours'
    datasets measured is averaged over those (:func:`average_measured`); NaN where none did."""
    settings = settings or RetrievalSettings()
    if isinstance(references, np.ndarray):
        references = ProfileMatrix(references)
    weights = similarity_weights(hits.similarities, settings.tau)
    distinct, inverse = np.unique(hits.indices, return_inverse=True)
    inverse = inverse.reshape(hits.indices.shape)
    values = references.expression(distinct)
    stats = references.dataset_stats() if settings.impute == "z" else None
    if stats is not None:
        values = stats.to_z(values, references.dataset_codes(distinct))
    if np.isnan(values).any():
        means, counts = average_measured(inverse, values, weights)
    else:  # every neighbour measured every gene: the plain (weighted) mean
        means, counts = average_rows(inverse, values, weights), None
    return (stats.from_z(means) if stats is not None else means), counts


def impute(hits: Hits, references: ExpressionSource | np.ndarray, settings: RetrievalSettings | None = None) -> np.ndarray:
    """Each query's prediction from its neighbours' expression profiles, as ``settings`` say
    (default: the plain mean, BLEEP): (n_query, n_genes) float32; a gene is averaged over the
    neighbours whose dataset measured it (NaN: none did; see :func:`impute_measured`).

    ``references`` is the search's :class:`~histoindex.search.References` (profiles read for the
    distinct hit rows only), a :class:`ProfileMatrix`, or an in-memory matrix that
    ``hits.indices`` index directly (one dataset)."""
    return impute_measured(hits, references, settings)[0]


def smoothing_weights(xy_um: np.ndarray, strength: float, k: int = 6, *, pitch_um: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(edge_index, weight) of ``(1 - strength) * own + strength * mean over the neighbourhood``:
    the symmetric kNN graph of the positions with self-loops (as ST-GCHB's and the
    neighbour-mean baseline's), each node's incoming weights summing to one. The graph has no
    edge longer than 1.75 grid pitches (``pitch_um``: the tile stride where the caller knows it,
    else the positions' spacing, :func:`histoindex.graph.grid_pitch`): separate pieces of tissue
    never mix, and a position with no close neighbour keeps its own value."""
    from .graph import knn_graph

    edges = knn_graph(np.asarray(xy_um, np.float64), k=k, pitch_um=pitch_um)
    degree = np.bincount(edges[1], minlength=len(xy_um))
    weight = strength / degree[edges[1]]
    weight[edges[0] == edges[1]] += 1.0 - strength
    return edges, weight.astype(np.float32)


def smoothed(chunks: Iterable[np.ndarray], xy_um: np.ndarray, strength: float, k: int = 6, *, pitch_um: float | None = None) -> Iterator[np.ndarray]:
    """Blend each position's prediction with its spatial neighbourhood's within 1.75 grid pitches
    (see :func:`smoothing_weights`); ``chunks`` are consecutive rows of positions ``xy_um`` (µm) in
    order, the output is the same rows in order (chunked differently): exactly the whole-slide
    result, holding only the rows some pending position still needs."""
    if strength <= 0 or len(xy_um) < 2:
        yield from chunks
        return
    import torch

    from .graph import StreamingGraphEncoder

    edges, weight = smoothing_weights(xy_um, strength, k, pitch_um=pitch_um)

    def blend(features: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(features, dtype=torch.float64)
        measured = ~torch.isnan(features)
        if bool(measured.all()):
            out.index_add_(0, edge_index[1], features[edge_index[0]].double() * edge_weight[:, None].double())
            return out.float()
        # a gene no neighbour measured is NaN (missing, not zero): the blend is over the positions that
        # have it, weights renormalised; a position missing it stays missing
        values = torch.where(measured, features, torch.zeros_like(features))[edge_index[0]].double()
        out.index_add_(0, edge_index[1], values * edge_weight[:, None].double())
        total = torch.zeros_like(out)
        total.index_add_(0, edge_index[1], measured[edge_index[0]].double() * edge_weight[:, None].double())
        out = out / total
        out[~measured] = float("nan")
        return out.float()

    encoder = StreamingGraphEncoder(edges, len(xy_um), 1, blend, edge_weight=weight)
    for out in encoder.stream(torch.from_numpy(np.ascontiguousarray(c, np.float32)) for c in chunks):
        yield out.numpy()
