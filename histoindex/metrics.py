"""Scoring predictions against truth: per-gene Pearson r across spots, and MSE."""

from __future__ import annotations

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
