"""Baselines that every evaluation reports beside the trained model, on the same genes and spots:
the training mean, retrieval by mean patch colour, cosine retrieval and ridge on the frozen
backbone's features (no training), and a spatial one: a method's predictions averaged over each
spot's graph neighbours."""

from __future__ import annotations

import numpy as np

from .graph import knn_graph
from .impute import average_rows
from .search import exact_topk


def mean_colour(patches: np.ndarray) -> np.ndarray:
    return patches.reshape(len(patches), -1, 3).mean(axis=1).astype(np.float32)


def retrieval_mean(query: np.ndarray, keys: np.ndarray, values: np.ndarray, k: int, *, metric: str = "cosine") -> np.ndarray:
    """Mean of the k nearest keys' values: cosine (unit-normalised) or euclidean distance."""
    if metric == "cosine":
        q = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
        kk = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
        idx, _ = exact_topk(q, kk, k)
    else:  # euclidean: -|q-k|² = 2 q·k - |k|² - |q|², rank by 2 q·k - |k|²
        aug_q = np.concatenate([2 * query, -np.ones((len(query), 1), np.float32)], axis=1)
        aug_k = np.concatenate([keys, (keys**2).sum(axis=1, keepdims=True)], axis=1)
        idx, _ = exact_topk(aug_q, aug_k, k)
    return average_rows(idx, values)


def ridge_on_features(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, *, n_components: int = 256) -> np.ndarray:
    """HEST-Benchmark style: standardise, PCA to 256, ridge (alpha = 100 / (n_features·n_targets)),
    all fitted on training spots only."""
    mu, sd = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    _, _, vt = np.linalg.svd(a, full_matrices=False)
    basis = vt[: min(n_components, vt.shape[0])].T
    a, b = a @ basis, b @ basis
    alpha = 100.0 / (a.shape[1] * train_y.shape[1])
    y_mean = train_y.mean(axis=0)
    a_mean = a.mean(axis=0)
    ac = a - a_mean
    w = np.linalg.solve(ac.T @ ac + alpha * np.eye(ac.shape[1]), ac.T @ (train_y - y_mean))
    return ((b - a_mean) @ w + y_mean).astype(np.float32)


def graph_smoothed(predictions: np.ndarray, xy_um: np.ndarray, *, k: int = 6) -> np.ndarray:
    """Each spot's prediction averaged with its spatial neighbours' (the symmetric kNN graph with
    self-loops that ST-GCHB uses): the simplest use of tissue context."""
    edges = knn_graph(np.asarray(xy_um, np.float64), k=k)
    n = len(predictions)
    degree = np.bincount(edges[1], minlength=n)
    width = int(degree.max())
    neighbours = np.full((n, width), -1, np.int64)
    order = np.argsort(edges[1], kind="stable")
    targets, sources = edges[1][order], edges[0][order]
    starts = np.concatenate([[0], np.cumsum(degree)[:-1]])
    slot = np.arange(len(targets)) - starts[targets]
    neighbours[targets, slot] = sources
    weights = (neighbours >= 0).astype(np.float32)
    return average_rows(np.where(neighbours >= 0, neighbours, 0), predictions, weights=weights)
