"""Macenko stain normalisation: a slide's stain is estimated once from a fixed sample of its own
patches and every patch is mapped to one reference stain, so the same tissue stained differently
comes out alike."""

from __future__ import annotations

import numpy as np
import pytest

from histoindex.errors import InputError
from histoindex.stain import IO, StainTransform, fit_macenko, mosaic, normalised, sample_indices

# haematoxylin and eosin optical-density vectors (Ruifrok & Johnston), columns
HE = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])
HE = HE / np.linalg.norm(HE, axis=0)


def stained(concentrations: np.ndarray, he: np.ndarray) -> np.ndarray:
    """RGB uint8 of per-pixel (H, E) concentrations under stain vectors ``he``."""
    rgb = IO * np.exp(-concentrations @ he.T)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def tissue(seed: int, n: int = 64, side: int = 32) -> np.ndarray:
    """Patches of random nuclei (H) in stroma (E) with some background."""
    rng = np.random.default_rng(seed)
    c = np.zeros((n, side, side, 2))
    c[..., 1] = rng.uniform(0.2, 1.0, (n, side, side))
    nuclei = rng.random((n, side, side)) < 0.3
    c[..., 0] = np.where(nuclei, rng.uniform(0.5, 1.8, (n, side, side)), rng.uniform(0.0, 0.2, (n, side, side)))
    c[rng.random((n, side, side)) < 0.1] = 0.0  # glass
    return c


def test_the_same_tissue_stained_two_ways_normalises_alike():
    c = tissue(0)
    darker_eosin = HE.copy()
    darker_eosin[:, 1] = np.array([0.25, 0.93, 0.28]) / np.linalg.norm([0.25, 0.93, 0.28])
    a, b = stained(c, HE), stained(c * [1.4, 0.7], darker_eosin)
    before = np.abs(a.astype(float) - b.astype(float)).mean()
    na, nb = fit_macenko(a)(a), fit_macenko(b)(b)
    after = np.abs(na.astype(float) - nb.astype(float)).mean()
    assert after < before / 2, (before, after)
    assert na.dtype == np.uint8 and na.shape == a.shape


def test_a_stain_fit_recovers_the_stain_vectors():
    c = tissue(1)
    transform = fit_macenko(stained(c, HE))
    cosines = np.abs((transform.he / np.linalg.norm(transform.he, axis=0)).T @ HE).diagonal()
    assert (cosines > 0.95).all(), cosines


def test_the_sample_is_fixed_and_shared():
    assert np.array_equal(sample_indices(1000), sample_indices(1000))
    assert len(sample_indices(1000)) == 64 and np.all(np.diff(sample_indices(1000)) > 0)
    assert np.array_equal(sample_indices(10), np.arange(10))
    assert mosaic(np.zeros((64, 4, 5, 3), np.uint8)).shape == (32, 40, 3)


def test_no_stain_passes_patches_through_and_blank_slides_are_refused():
    batch = np.full((2, 4, 4, 3), 200, np.uint8)
    (same,) = normalised([batch], None)
    assert same is batch
    with pytest.raises(InputError, match="stain"):
        fit_macenko(np.full((8, 16, 16, 3), 255, np.uint8), where="blank.tif")
    assert isinstance(fit_macenko(stained(tissue(2), HE)), StainTransform)
