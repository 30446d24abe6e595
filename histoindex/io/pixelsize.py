"""Pixel size of a reference image, from the most trustworthy source at hand.

In order: the user's ``--mpp``; the image's own metadata; the **spot pitch** — spots sit on a grid
of known centre-to-centre spacing (Visium 100 µm, legacy ST 200 µm), so an affine fit of pixel
positions to array coordinates (or, without array coordinates, the median nearest-neighbour
distance) gives pixels per micrometre; last, ``spot_diameter_fullres``. That last one is the pixel
width of 10x's *theoretical 65 µm* spot (not of the 55 µm capture area), so it is divided into
65 µm on Visium; on legacy ST it is the 100 µm spot.

Every reader records which source it used (``SpotSet.mpp_source``), and models keep it per dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .slides import image_mpp

#: centre-to-centre spacing of neighbouring spots, micrometres
SPOT_PITCH_UM = {"visium": 100.0, "st": 200.0}
#: what ``spot_diameter_fullres`` measures: Visium's theoretical 65 µm spot (10x's definition of the
#: scale factor), legacy ST's 100 µm spot
DIAMETER_SCALE_UM = {"visium": 65.0, "st": 100.0}


def scale_factor(scalefactors: dict, key: str, *, where: str) -> float | None:
    """A Space Ranger scale factor (``spot_diameter_fullres``, ``tissue_hires_scalef``): None when
    absent or zero, else a positive finite number (anything else is an error naming it)."""
    value = scalefactors.get(key)
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not (np.isfinite(number) and number > 0):
        raise InputError(f"{where}: scale factor {key} is {value!r}, not a positive number")
    return number


@dataclass(frozen=True)
class PixelSize:
    """Micrometres per full-resolution pixel, and where that number came from."""

    mpp: float
    source: str


def array_positions_um(rows: np.ndarray, cols: np.ndarray, platform: str) -> np.ndarray | None:
    """Physical spot positions (µm) of integer array coordinates, or None for an unknown platform.

    Visium is a hexagonal lattice: ``array_col`` advances by 2 between neighbours of a row (so one
    column step is 50 µm) and rows are 100·√3/2 µm apart. Legacy ST is a square 200 µm grid."""
    rows = np.asarray(rows, np.float64)
    cols = np.asarray(cols, np.float64)
    if platform == "visium":
        pitch = SPOT_PITCH_UM["visium"]
        return np.column_stack([cols * pitch / 2, rows * pitch * np.sqrt(3) / 2])
    if platform == "st":
        pitch = SPOT_PITCH_UM["st"]
        return np.column_stack([cols * pitch, rows * pitch])
    return None


def fit_array_pitch(physical_um: np.ndarray, xy_px: np.ndarray, *, pitch_um: float) -> float | None:
    """Pixels per micrometre from an affine least-squares fit ``px = A·µm + t`` (rotation, flips and
    slight shear of the scan allowed): ``sqrt(|det A|)``. None when the spots span too little of the
    array to fit, or the fit does not explain the positions (median residual above a third of the
    pitch: the coordinates are not array coordinates of this platform)."""
    if len(physical_um) < 3:
        return None
    design = np.column_stack([physical_um, np.ones(len(physical_um))])
    if np.linalg.matrix_rank(design) < 3:
        return None
    coef, *_ = np.linalg.lstsq(design, xy_px, rcond=None)
    scale = float(np.sqrt(abs(np.linalg.det(coef[:2].T))))  # coef[:2].T: 2×2, px per µm
    if not np.isfinite(scale) or scale <= 0:
        return None
    residual_um = float(np.median(np.linalg.norm(design @ coef - xy_px, axis=1))) / scale
    return scale if residual_um <= pitch_um / 3 else None


def nearest_neighbour_pitch_px(xy_px: np.ndarray) -> float | None:
    """The median distance from each spot to its nearest neighbour, in pixels: the grid's pitch when
    spots are on a regular array (robust to missing spots and to a few off-grid ones)."""
    if len(xy_px) < 3:
        return None
    from scipy.spatial import cKDTree

    distances, _ = cKDTree(xy_px).query(xy_px, k=2)
    nearest = distances[:, 1]
    nearest = nearest[nearest > 0]
    if len(nearest) < 2:
        return None
    return float(np.median(nearest))


def reference_pixel_size(
    *,
    mpp: float | None,
    image_path: Path | None,
    image_scale: float,
    xy_px: np.ndarray,
    platform: str,
    array_rows: np.ndarray | None = None,
    array_cols: np.ndarray | None = None,
    spot_diameter_px: float | None = None,
    where: str,
    diameter_source: str = "spot_diameter_fullres",
) -> PixelSize:
    """Micrometres per full-resolution pixel of a reference (see the module docstring for the order).

    ``xy_px`` are the spot centres in full-resolution pixels; ``image_scale`` maps them onto the
    image at ``image_path`` (1.0 unless it is a downscaled copy such as Space Ranger's hires PNG)."""
    if mpp is not None:
        if not (np.isfinite(mpp) and mpp > 0):
            raise InputError(f"--mpp must be a positive number of micrometres, got {mpp}")
        return PixelSize(float(mpp), "--mpp")
    if image_path is not None:
        found = image_mpp(image_path)
        if found is not None:
            # a downscaled image's pixels are larger than the full-resolution pixels the spots use
            return PixelSize(float(found * image_scale), f"image metadata ({Path(image_path).name})")
    pitch_um = SPOT_PITCH_UM.get(platform)
    if pitch_um is not None and array_rows is not None and array_cols is not None:
        physical = array_positions_um(array_rows, array_cols, platform)
        px_per_um = fit_array_pitch(physical, np.asarray(xy_px, np.float64), pitch_um=pitch_um) if physical is not None else None
        if px_per_um:
            return PixelSize(1.0 / px_per_um, f"{platform} spot pitch {pitch_um:g} µm (array coordinates)")
    if pitch_um is not None:
        pitch_px = nearest_neighbour_pitch_px(np.asarray(xy_px, np.float64))
        if pitch_px:
            return PixelSize(pitch_um / pitch_px, f"{platform} spot pitch {pitch_um:g} µm (nearest-neighbour spacing)")
    diameter_um = DIAMETER_SCALE_UM.get(platform)
    if spot_diameter_px and diameter_um:
        return PixelSize(diameter_um / float(spot_diameter_px), f"{diameter_source} = {diameter_um:g} µm ({platform})")
    raise InputError(
        f"{where}: no pixel size: the image has none in its metadata, "
        + (f"platform {platform!r} has no known spot pitch or spot size" if pitch_um is None else "the spots are too few to measure their spacing")
        + "; pass --mpp"
    )
