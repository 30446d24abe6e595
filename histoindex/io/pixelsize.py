"""Pixel size of a section, from every source it carries, cross-checked.

The spot layout tells the platform: Visium array coordinates form a hexagonal lattice (row and
column of one parity), legacy ST a square one (so do the spot centres: 6 neighbours at the spacing,
or 4). A platform given (``--platform``) only confirms it: one the lattice contradicts is an error.

The sources, most trustworthy first: the user's ``--mpp``; the dataset's own metadata (HEST's
``pixel_size_um_estimated``, a SpatialData transformation to micrometres); the image's metadata; the
**spot pitch** — spots sit on a grid of known centre-to-centre spacing (Visium 100 µm, legacy ST
200 µm), so an affine fit of pixel positions to array coordinates, and the median nearest-neighbour
distance, give pixels per micrometre; last, ``spot_diameter_fullres``. That last one is the pixel
width of 10x's *theoretical 65 µm* spot (not of the 55 µm capture area), so it is divided into
65 µm on Visium; on legacy ST it is the 100 µm spot. The first source at hand is used; all are
compared: more than 10 % apart is said on one line, more than 1.5× apart is refused unless
``--mpp`` is given.

Every reader records which source it used (``SpotSet.mpp_source``), and models keep it per dataset.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, PixelSizeWarning
from .slides import image_mpp

#: centre-to-centre spacing of neighbouring spots, micrometres
SPOT_PITCH_UM = {"visium": 100.0, "st": 200.0}
#: what ``spot_diameter_fullres`` measures: Visium's theoretical 65 µm spot (10x's definition of the
#: scale factor), legacy ST's 100 µm spot
DIAMETER_SCALE_UM = {"visium": 65.0, "st": 100.0}
#: sources of one section's pixel size further apart than this (max / min) are said on one line
NOTE_RATIO = 1.10
#: ... and further apart than this are refused unless ``--mpp`` is given
REFUSE_RATIO = 1.5
#: the order sources are used in (the first one a section has)
PRIORITY = "--mpp, the dataset's metadata, the image's metadata, the array-coordinate fit, the nearest-neighbour spacing, spot_diameter_fullres"
#: array coordinates with at most this fraction of spots off the common parity are hexagonal...
ONE_PARITY = 0.02
#: ... and with at least this fraction on each parity, square
BOTH_PARITIES = 0.2


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
    """Micrometres per full-resolution pixel, where that number came from, the platform the spot
    layout was read as, and the one-line note when the section's sources disagree."""

    mpp: float
    source: str
    platform: str | None = None
    note: str = ""


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


def array_lattice(rows: np.ndarray | None, cols: np.ndarray | None) -> str | None:
    """``"visium"`` when integer array coordinates form a hexagonal lattice (every spot's row and
    column of one parity: neighbours at column ±2, or row ±1 and column ±1), ``"st"`` when they form
    a square one (both parities, in about equal numbers), None when they do not tell (too few spots,
    non-integer coordinates, a mixture)."""
    if rows is None or cols is None or len(rows) < 3:
        return None
    rows, cols = np.asarray(rows, np.float64), np.asarray(cols, np.float64)
    if np.abs(rows - np.round(rows)).max() > 0.01 or np.abs(cols - np.round(cols)).max() > 0.01:
        return None
    odd = float(((np.round(rows) + np.round(cols)) % 2).mean())
    minority = min(odd, 1 - odd)
    if minority <= ONE_PARITY:
        return "visium"
    return "st" if minority >= BOTH_PARITIES else None


def position_lattice(xy_px: np.ndarray) -> str | None:
    """The lattice the spot centres themselves form: ``"visium"`` when many spots have 5–6
    neighbours at the nearest-neighbour spacing (hexagonal), ``"st"`` when none has more than 4 and
    many have 4 (square), None when they do not tell (few spots, irregular positions such as cells)."""
    xy_px = np.asarray(xy_px, np.float64)
    if len(xy_px) < 7:
        return None
    pitch = nearest_neighbour_pitch_px(xy_px)
    if not pitch:
        return None
    from scipy.spatial import cKDTree

    tree = cKDTree(xy_px)
    probe = xy_px if len(xy_px) <= 20_000 else xy_px[np.random.default_rng(0).choice(len(xy_px), 20_000, replace=False)]
    neighbours = tree.query_ball_point(probe, 1.25 * pitch, return_length=True) - 1
    if (neighbours >= 5).mean() >= 0.2:
        return "visium"
    if (neighbours >= 5).mean() <= ONE_PARITY and (neighbours == 4).mean() >= 0.2:
        return "st"
    return None


def detect_lattice(rows: np.ndarray | None, cols: np.ndarray | None, xy_px: np.ndarray) -> tuple[str | None, str]:
    """The platform the spot layout shows (``visium``: hexagonal, ``st``: square) and what showed it:
    the array coordinates when they tell, else the spot centres."""
    found = array_lattice(rows, cols)
    if found is not None:
        return found, "array coordinates"
    found = position_lattice(xy_px)
    return found, ("spot positions" if found is not None else "")


LATTICE_WORDS = {"visium": "a hexagonal lattice (Visium)", "st": "a square grid (legacy ST)"}


def layout_sources(
    platform: str | None,
    xy_px: np.ndarray,
    rows: np.ndarray | None,
    cols: np.ndarray | None,
    spot_diameter_px: float | None,
    diameter_source: str,
) -> list[PixelSize]:
    """The pixel sizes a spot layout gives read as ``platform``, most trustworthy first: the affine
    fit of the array coordinates (else the nearest-neighbour spacing), ``spot_diameter_fullres``."""
    found = []
    pitch_um = SPOT_PITCH_UM.get(platform or "")
    if pitch_um is not None and rows is not None and cols is not None:
        physical = array_positions_um(rows, cols, platform)
        px_per_um = fit_array_pitch(physical, xy_px, pitch_um=pitch_um) if physical is not None else None
        if px_per_um:
            found.append(PixelSize(1.0 / px_per_um, f"{platform} spot pitch {pitch_um:g} µm (array coordinates)", platform))
    if pitch_um is not None and not found:  # the spacing only without the fit: a sparse subset of spots spaces them wider
        pitch_px = nearest_neighbour_pitch_px(xy_px)
        if pitch_px:
            found.append(PixelSize(pitch_um / pitch_px, f"{platform} spot pitch {pitch_um:g} µm (nearest-neighbour spacing)", platform))
    diameter_um = DIAMETER_SCALE_UM.get(platform or "")
    if spot_diameter_px and diameter_um:
        found.append(PixelSize(diameter_um / float(spot_diameter_px), f"{diameter_source} = {diameter_um:g} µm ({platform})", platform))
    return found


def reference_pixel_size(
    *,
    mpp: float | None,
    image_path: Path | None,
    image_scale: float,
    xy_px: np.ndarray,
    platform: str | None = None,
    array_rows: np.ndarray | None = None,
    array_cols: np.ndarray | None = None,
    spot_diameter_px: float | None = None,
    metadata: PixelSize | None = None,
    where: str,
    diameter_source: str = "spot_diameter_fullres",
    default_platform: str | None = "visium",
) -> PixelSize:
    """Micrometres per full-resolution pixel of a section (see the module docstring), the one
    function every command reads a section's pixel size through.

    ``xy_px`` are the spot centres in full-resolution pixels; ``image_scale`` maps them onto the
    image at ``image_path`` (1.0 unless it is a downscaled copy such as Space Ranger's hires PNG).
    ``platform`` is the one given (``--platform``, a HEST sample's technology), or None: the lattice
    of the spots decides, else ``default_platform``; a given platform the lattice contradicts is an
    error. ``metadata`` is a pixel size the dataset's own metadata states (HEST's estimate, a
    SpatialData transformation to micrometres). Every source at hand is computed and compared:
    more than 10 % apart is said in one line (a :class:`PixelSizeWarning`), more than 1.5× apart is
    an error unless ``mpp`` is given."""
    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise InputError(f"--mpp must be a positive number of micrometres, got {mpp}")
    xy_px = np.asarray(xy_px, np.float64)
    lattice, shown_by = (None, "") if platform is not None and platform not in SPOT_PITCH_UM else detect_lattice(array_rows, array_cols, xy_px)
    if platform is not None and lattice is not None and platform != lattice:
        readings = []
        for name in (platform, lattice):
            layout = layout_sources(name, xy_px, array_rows, array_cols, spot_diameter_px, diameter_source)
            readings.append(f"as {name} {layout[0].mpp:.4g} µm/px ({layout[0].source})" if layout else f"as {name}")
        raise InputError(
            f"{where}: platform {platform!r} was given, but its {shown_by} form {LATTICE_WORDS[lattice]}: read {readings[0]}, "
            f"read {readings[1]}; pass --platform {lattice} (or no --platform), or --mpp"
        )
    resolved = platform or lattice or default_platform
    sources = [PixelSize(float(mpp), "--mpp", resolved)] if mpp is not None else []
    if metadata is not None:
        sources.append(PixelSize(metadata.mpp, metadata.source, resolved))
    if image_path is not None:
        found = image_mpp(image_path)
        if found is not None:  # a downscaled image's pixels are larger than the full-resolution pixels the spots use
            sources.append(PixelSize(float(found * image_scale), f"image metadata ({Path(image_path).name})", resolved))
    sources += layout_sources(resolved, xy_px, array_rows, array_cols, spot_diameter_px, diameter_source)
    if not sources:
        if resolved is None:
            why = "its spots show no platform (no array coordinates, no regular lattice) and none was given; pass --platform (visium, st) or --mpp"
        elif resolved not in SPOT_PITCH_UM:
            why = f"platform {resolved!r} has no known spot pitch or spot size; pass --mpp"
        else:
            why = "the spots are too few to measure their spacing; pass --mpp"
        raise InputError(f"{where}: no pixel size: the image has none in its metadata, {why}")
    chosen = sources[0]
    values = [s.mpp for s in sources]
    spread = max(values) / min(values)
    listed = "; ".join(f"{s.source}: {s.mpp:.4g} µm/px" for s in sources)
    if spread > REFUSE_RATIO and mpp is None:
        raise InputError(f"{where}: its pixel-size sources disagree {spread:.2g}×: {listed}; pass --mpp with the right one (µm per full-resolution pixel)")
    note = ""
    if spread > NOTE_RATIO:
        others = ", ".join(f"{s.source} gives {s.mpp:.4g} ({s.mpp / chosen.mpp - 1:+.0%})" for s in sources[1:])
        note = (
            f"{where}: pixel size {chosen.mpp:.4g} µm/px from {chosen.source}, the first of {PRIORITY} it has; "
            f"its other sources disagree by up to {spread - 1:.0%}: {others}"
        )
        warnings.warn(note, PixelSizeWarning, stacklevel=2)
    return PixelSize(chosen.mpp, chosen.source, resolved, note)
