"""Expression imputation from search hits: the mean profile of each query's neighbours (BLEEP)."""

from __future__ import annotations

import numpy as np

from .data import Hits


def impute(hits: Hits, reference_expression: np.ndarray) -> np.ndarray:
    """Mean of the k neighbours' expression profiles, per query: (n_query, n_genes) float32."""
    out = np.empty((hits.indices.shape[0], reference_expression.shape[1]), np.float32)
    for start in range(0, len(out), 4096):  # bounded memory: k × genes per query at a time
        idx = hits.indices[start : start + 4096]
        out[start : start + len(idx)] = reference_expression[idx].mean(axis=1)
    return out
