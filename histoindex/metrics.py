"""Scoring predictions against truth: per-gene Pearson r across spots, and MSE; the scored gene
sets (HEG-n, HVG-n, markers, all) defined on the truth."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pearson_per_gene(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Pearson r for each gene (column) across spots (rows). A constant prediction or constant
    truth has no linear relationship to score: it counts as 0, never NaN."""
    t = truth.astype(np.float64) - truth.mean(axis=0)
    p = predicted.astype(np.float64) - predicted.mean(axis=0)
    denom = np.sqrt((t**2).sum(axis=0) * (p**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (t * p).sum(axis=0) / denom
    constant = (np.ptp(truth, axis=0) == 0) | (np.ptp(predicted, axis=0) == 0)  # exactly, not up to rounding
    return np.where(constant | ~(denom > 0), 0.0, r)


def mse(truth: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.mean((truth.astype(np.float64) - predicted) ** 2))


def gene_sets(truth: np.ndarray, genes: Sequence[str], markers: Sequence[str], n: int = 50) -> dict[str, np.ndarray]:
    """Indices of the scored gene sets, defined on the held-out truth: HEG-n (highest mean),
    HVG-n (highest variance), MG (the markers in the panel), all."""
    sets = {
        f"HEG-{n}": np.argsort(-truth.mean(axis=0), kind="stable")[:n],
        f"HVG-{n}": np.argsort(-truth.var(axis=0), kind="stable")[:n],
    }
    index = {g: i for i, g in enumerate(genes)}
    present = [index[g] for g in markers if g in index]
    if present:
        sets[f"MG-{len(present)}"] = np.asarray(present)
    sets["all"] = np.arange(len(genes))
    return sets


def score(truth: np.ndarray, predicted: np.ndarray, sets: dict[str, np.ndarray]) -> dict[str, float]:
    r = pearson_per_gene(truth, predicted)
    out = {name: float(r[idx].mean()) for name, idx in sets.items()}
    out["MSE"] = mse(truth, predicted)
    return out
