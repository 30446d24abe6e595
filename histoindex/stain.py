"""Stain normalisation (Macenko et al., 2009) of a whole section or slide, with torchstain.

Scanners and labs stain differently: the same tissue comes out pinker or bluer. Macenko estimates
a slide's two stain vectors (haematoxylin, eosin) and their concentration range in optical density
and maps every pixel onto a fixed reference stain (torchstain's built-in one, fitted on no data of
ours, so every section and every query maps onto the same target).

The stain is fitted once per section or slide, on a mosaic of ``SAMPLE`` of its own patches chosen
by a fixed seed (a slide's own pixels: legitimate at query time), and applied to every patch — a
slide-level normalisation, steadier than a per-patch fit on patches with little tissue. Reading the
sample costs ``SAMPLE`` patch reads per section or slide."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from .errors import InputError

STAINS = ("none", "macenko")
#: patches a section's or slide's stain is estimated from
SAMPLE = 64
#: Macenko's transmitted-light intensity (torchstain's default)
IO = 240.0


def sample_indices(n: int, *, seed: int = 0, size: int = SAMPLE) -> np.ndarray:
    """The (sorted) positions whose patches a stain fit reads: the same for a section whether its
    patches are read for training, for ingest or as queries."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


@dataclass(frozen=True)
class StainTransform:
    """A slide's stain (``he``: 3×2 optical-density vectors, ``max_c``: 99th-percentile
    concentrations) and the reference it is mapped to."""

    he: np.ndarray
    max_c: np.ndarray
    target_he: np.ndarray
    target_max_c: np.ndarray

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        """uint8 (…, 3) pixels in this slide's stain → the reference stain."""
        od = -np.log((patches.reshape(-1, 3).astype(np.float32) + 1.0) / IO)
        concentrations = od @ np.linalg.pinv(self.he).T.astype(np.float32)
        concentrations *= (self.target_max_c / self.max_c).astype(np.float32)
        rgb = IO * np.exp(-concentrations @ self.target_he.T.astype(np.float32))
        return np.clip(rgb, 0, 255).astype(np.uint8).reshape(patches.shape)

    def to_dict(self) -> dict:
        return {"he": self.he.round(5).tolist(), "max_c": self.max_c.round(5).tolist()}


def mosaic(patches: np.ndarray) -> np.ndarray:
    """Patches (n, h, w, 3) tiled into one image, 8 per row (a short last row is dropped)."""
    per_row = min(8, len(patches))
    rows = [np.concatenate(list(patches[i : i + per_row]), axis=1) for i in range(0, len(patches) - per_row + 1, per_row)]
    return np.concatenate(rows, axis=0)


def fit_macenko(patches: np.ndarray, *, where: str = "") -> StainTransform:
    """Estimate the stain of ``patches`` (uint8, one slide's sample) with torchstain's Macenko."""
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    normalizer = NumpyMacenkoNormalizer()
    target_he, target_max_c = np.array(normalizer.HERef, np.float64), np.array(normalizer.maxCRef, np.float64)
    image = mosaic(np.asarray(patches))
    od = -np.log((image.reshape(-1, 3).astype(np.float32) + 1.0) / IO)
    stained_pixels = int((od >= 0.15).all(axis=1).sum())  # torchstain's transparency cut (beta)
    if stained_pixels < 100:
        raise InputError(f"{where or 'the slide'}: its sampled patches hold {stained_pixels} stained pixels, too few to estimate the stain (Macenko)")
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            normalizer.fit(image, Io=IO)
    except Exception as exc:  # a degenerate sample: an eigen-decomposition of nothing
        raise InputError(f"{where or 'the slide'}: cannot estimate its stain (Macenko) from {len(patches)} patches: {exc}") from exc
    he, max_c = np.asarray(normalizer.HERef, np.float64), np.asarray(normalizer.maxCRef, np.float64)
    if not (np.isfinite(he).all() and np.isfinite(max_c).all() and (max_c > 0).all()):
        raise InputError(f"{where or 'the slide'}: its patches hold too little stained tissue to estimate the stain (Macenko)")
    return StainTransform(he=he, max_c=max_c, target_he=target_he, target_max_c=target_max_c)


def normalised(batches: Iterable[np.ndarray], transform: StainTransform | None) -> Iterator[np.ndarray]:
    """Patch batches through ``transform`` (unchanged when there is none)."""
    for batch in batches:
        yield batch if transform is None else transform(batch)


def check_stain(name: str) -> str:
    if name not in STAINS:
        raise InputError(f"unknown stain normalisation {name!r}; use one of {', '.join(STAINS)}")
    return name
