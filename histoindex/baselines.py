"""Baselines that every evaluation reports beside the trained model, on the same genes and spots:
the training mean, retrieval by mean patch colour, cosine retrieval and ridge on the frozen
backbone's features (no training), a spatial one: a method's predictions averaged over each
spot's graph neighbours, and for context only a depth-only predictor that reads each held-out
spot's total counts."""

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


#: the ridge probe's penalties, searched by inner cross-validation (:func:`ridge_cv`): from almost
#: none (HEST-Benchmark's fixed 100 / (features·targets) is ~5e-4 on HER2ST) to shrinking every
#: principal component of the standardised features
RIDGE_ALPHAS = tuple(float(a) for a in 10.0 ** np.arange(-2, 8))


def _standardised_pca(train_x: np.ndarray, test_x: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    mu, sd = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    _, _, vt = np.linalg.svd(a, full_matrices=False)
    basis = vt[: min(n_components, vt.shape[0])].T
    return a @ basis, b @ basis


def _ridge_path(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, alphas, n_components: int) -> list[np.ndarray]:
    """Standardise, PCA, then ridge with an intercept, for each penalty in ``alphas`` (one SVD)."""
    a, b = _standardised_pca(np.asarray(train_x, np.float64), np.asarray(test_x, np.float64), n_components)
    a_mean, y_mean = a.mean(axis=0), train_y.mean(axis=0)
    u, s, vt = np.linalg.svd(a - a_mean, full_matrices=False)
    uty = u.T @ (train_y - y_mean)
    bv = (b - a_mean) @ vt.T
    return [(bv @ ((s / (s**2 + alpha))[:, None] * uty) + y_mean).astype(np.float32) for alpha in alphas]


def ridge_cv(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, groups: np.ndarray, *, alphas=RIDGE_ALPHAS, n_components: int = 256
) -> tuple[np.ndarray, dict]:
    """The ridge probe, HEST-Benchmark style (standardise, PCA to 256, ridge; all fitted on
    training spots only), with its penalty chosen by grouped inner cross-validation: each group of
    training spots (a training patient, section or spatial block) held out in turn, the penalty
    with the highest mean per-gene Pearson r over the held-out groups kept, then refitted on all
    training spots (with a single group, HEST-Benchmark's fixed 100 / (components·targets)).
    Returns the predictions for ``test_x`` and what was chosen: ``{"alpha", "alphas", "inner_r"}``."""
    from .metrics import pearson_per_gene

    groups = np.asarray(groups)
    labels = list(dict.fromkeys(groups.tolist()))
    alphas = [float(a) for a in alphas]
    if len(labels) < 2:  # nothing to hold out (a single training spot): HEST-Benchmark's fixed penalty
        alpha = 100.0 / (min(n_components, *train_x.shape) * train_y.shape[1])
        (pred,) = _ridge_path(train_x, train_y, test_x, [alpha], n_components)
        return pred, {"alpha": alpha, "alphas": alphas, "inner_r": None}
    inner = np.zeros(len(alphas))
    for label in labels:
        fit, held = groups != label, groups == label
        for i, pred in enumerate(_ridge_path(train_x[fit], train_y[fit], train_x[held], alphas, n_components)):
            inner[i] += pearson_per_gene(train_y[held], pred).mean() / len(labels)
    best = int(np.argmax(inner))
    (pred,) = _ridge_path(train_x, train_y, test_x, [alphas[best]], n_components)
    return pred, {"alpha": alphas[best], "alphas": alphas, "inner_r": [round(float(r), 4) for r in inner]}


def spatial_blocks(xy: np.ndarray, n: int = 4) -> np.ndarray:
    """Spots split into ``n`` stripes of equal size along the longer axis of their layout: groups
    for inner cross-validation within one section (neighbouring spots stay together)."""
    xy = np.asarray(xy, np.float64)
    axis = int(np.argmax(np.ptp(xy, axis=0)))
    ranks = np.argsort(np.argsort(xy[:, axis], kind="stable"), kind="stable")
    return (ranks * n // len(xy)).astype(np.int64)


def depth_only(train_totals: np.ndarray, train_y: np.ndarray, test_totals: np.ndarray) -> np.ndarray:
    """Context, not a competitor (it reads the truth's sequencing depth): per gene, the least-squares
    line of expression on log total counts of each training spot, applied to each held-out spot's
    own total counts."""
    x = np.log(np.maximum(np.asarray(train_totals, np.float64), 1.0))
    t = np.log(np.maximum(np.asarray(test_totals, np.float64), 1.0))
    y = np.asarray(train_y, np.float64)
    xc = x - x.mean()
    var = (xc**2).sum()
    slope = (xc @ (y - y.mean(axis=0))) / var if var > 0 else np.zeros(y.shape[1])
    return (y.mean(axis=0) + (t - x.mean())[:, None] * slope).astype(np.float32)


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
