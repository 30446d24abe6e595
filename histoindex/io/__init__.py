"""Readers and writers between files and histoindex's data types."""

from __future__ import annotations

from .h5ad import read_h5ad, write_h5ad
from .hest import hest_samples, read_hest
from .readers import read_reference
from .slides import open_slide, write_pyramidal_tiff
from .spaceranger import read_spaceranger
from .st import read_st
from .tables import read_positions

__all__ = [
    "read_reference",
    "read_h5ad",
    "write_h5ad",
    "open_slide",
    "write_pyramidal_tiff",
    "read_positions",
    "read_spaceranger",
    "read_st",
    "hest_samples",
    "read_hest",
]
