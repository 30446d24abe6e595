"""The geometry a prediction stands for, shared by every output format (io/write.py, io/spatialdata.py)
and the pictures (plot.py): the formats import it from here, so neither imports the other back."""

from __future__ import annotations

import numpy as np


def cell_um(provenance: dict) -> float:
    """The side (µm) of the square a grid prediction stands for: the grid's stride (``stride_um``),
    or, in files from before strides, the patch size (tiles side by side)."""
    stride = provenance.get("stride_um")
    try:
        stride = float(stride) if stride is not None else 0.0
    except (TypeError, ValueError):
        stride = 0.0
    return stride if np.isfinite(stride) and stride > 0 else float(provenance.get("patch_um", 0.0) or 0.0)
