"""Legacy Spatial Transcriptomics (ST; Ståhl et al. 2016) -> SpotSet.

A section comes as loose files (as in HER2ST, Andersson et al. 2021)::

    counts  <section>.tsv(.gz)         spots × genes raw counts; the row index is "{x}x{y}" (array coords)
    spots   <section>_selection.tsv    x, y (array), pixel_x, pixel_y (full-resolution px), maybe selected
    image   <section>.jpg              the full-resolution H&E (usually without a pixel size)

Counts and spot table are joined on the key ``f"{x}x{y}"``, never by row position: a few spots in
a spot table have no count row. Only spots present in both (and ``selected == 1`` when the column
exists) are kept, in spot-table order.

Pixel size: ``mpp=``, else the image's metadata, else the array grid itself: legacy ST spots are
100 µm wide on a 200 µm centre-to-centre grid, so an affine fit of ``pixel_x, pixel_y`` to the
array coordinates gives pixels per micrometre (:mod:`histoindex.io.pixelsize`); the spot diameter
is ``100 µm`` in those pixels. :func:`fit_grid` reports the per-axis steps (for diagnostics).
"""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data import SPOT_DIAMETER_UM, ImageRef, SpotSet
from ..errors import InputError
from ._guard import reader
from .h5ad import looks_like_counts
from .pixelsize import reference_pixel_size
from .spaceranger import make_names_unique

SPOT_PITCH_UM = 200.0  # legacy ST centre-to-centre distance between neighbouring array positions
SPOT_TABLE_COLUMNS = ("x", "y", "pixel_x", "pixel_y")


def spot_key(x, y) -> pd.Index:
    """The ``"{x}x{y}"`` keys of integer array coordinates (the counts' row index)."""
    return pd.Index([f"{int(a)}x{int(b)}" for a, b in zip(x, y)], name="spot")


def read_spot_table(path: str | Path) -> pd.DataFrame:
    """The spot table indexed by key, restricted to ``selected == 1`` when that column exists."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"spot table not found: {path} (given with --spot-table)")
    try:
        spots = pd.read_csv(path, sep="," if path.suffix.lower() == ".csv" else "\t")
    except Exception as exc:
        raise InputError(f"cannot read spot table {path}: {exc}") from exc
    missing = [c for c in SPOT_TABLE_COLUMNS if c not in spots.columns]
    if missing:
        raise InputError(
            f"spot table {path} lacks columns {', '.join(missing)} (it has: {', '.join(map(str, spots.columns))}); "
            "a legacy ST spot table needs x, y (array coordinates) and pixel_x, pixel_y (spot centres in full-resolution pixels)"
        )
    if "selected" in spots.columns:
        spots = spots[spots["selected"] == 1].copy()
        if spots.empty:
            raise InputError(f"spot table {path}: no spot has selected == 1")
    for column in SPOT_TABLE_COLUMNS:
        if not pd.api.types.is_numeric_dtype(spots[column]) or spots[column].isna().any():
            raise InputError(f"spot table {path}: column {column} must be numbers without gaps")
    spots.index = spot_key(spots["x"], spots["y"])
    if not spots.index.is_unique:
        raise InputError(f"spot table {path}: repeated array positions {', '.join(spots.index[spots.index.duplicated()][:5])}")
    return spots


def read_st_counts(path: str | Path) -> pd.DataFrame:
    """Spots × genes counts indexed by the ``"{x}x{y}"`` key, repeated gene symbols made unique
    (``X``, ``X-1``)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"counts file not found: {path}")
    sep = "," if path.name.lower().removesuffix(".gz").endswith(".csv") else "\t"
    try:
        # the header read apart: pandas would rename repeated gene symbols X.1, anndata-style is X-1
        with gzip.open(path, "rt") if path.suffix.lower() == ".gz" else path.open() as f:
            genes = next(csv.reader([f.readline()], delimiter=sep))[1:]
        counts = pd.read_csv(path, sep=sep, header=None, skiprows=1, index_col=0)
    except Exception as exc:
        raise InputError(f"cannot read counts {path} as a spots × genes table: {exc}") from exc
    if len(genes) != counts.shape[1]:
        raise InputError(f"counts {path}: {len(genes)} gene names in the header for {counts.shape[1]} value columns")
    counts.columns = make_names_unique(genes)
    counts.index = counts.index.astype(str)
    if not counts.index.is_unique:
        raise InputError(f"counts {path}: repeated spot keys {', '.join(counts.index[counts.index.duplicated()][:5])}")
    return counts


@dataclass(frozen=True)
class GridFit:
    """Pixels per array step along x and y (least squares), and what they imply."""

    px_per_step_x: float
    px_per_step_y: float

    @property
    def px_per_step(self) -> float:
        return (self.px_per_step_x + self.px_per_step_y) / 2

    @property
    def px_per_um(self) -> float:
        return self.px_per_step / SPOT_PITCH_UM

    @property
    def um_per_px(self) -> float:
        return 1.0 / self.px_per_um

    @property
    def spot_diameter_px(self) -> float:
        return SPOT_DIAMETER_UM["st"] * self.px_per_um


def _slope(coord, pixel) -> float:
    design = np.column_stack([np.asarray(coord, np.float64), np.ones(len(coord))])
    (slope, _), *_ = np.linalg.lstsq(design, np.asarray(pixel, np.float64), rcond=None)
    return float(abs(slope))


def fit_grid(spots: pd.DataFrame, *, where: str = "") -> GridFit:
    """Fit ``pixel_x ~ x`` and ``pixel_y ~ y`` over the spots (integer array coordinates)."""
    if spots["x"].nunique() < 2 or spots["y"].nunique() < 2:
        raise InputError(f"{where}the spots lie on fewer than two array rows or columns, too few to derive the pixel size from the grid; pass --mpp")
    fit = GridFit(_slope(spots["x"], spots["pixel_x"]), _slope(spots["y"], spots["pixel_y"]))
    if not (fit.px_per_step_x > 0 and fit.px_per_step_y > 0):
        raise InputError(f"{where}the pixel positions do not follow the array positions, so the grid gives no pixel size; pass --mpp")
    return fit


def join_st(spots: pd.DataFrame, counts: pd.DataFrame, *, where: str = "") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Spot table and counts restricted to their shared keys, in spot-table order."""
    keys = spots.index.intersection(counts.index, sort=False)
    if len(keys) == 0:
        hint = ""
        if len(spots.index.intersection(pd.Index(counts.columns.astype(str)))):
            hint = "; the counts look transposed (genes × spots): expected spots as rows"
        raise InputError(
            f"{where}no spot keys shared by the spot table and the counts (spot table keys like "
            f"{', '.join(spots.index[:3])}; count rows like {', '.join(counts.index[:3])}){hint}"
        )
    return spots.loc[keys], counts.loc[keys]


@reader("legacy ST counts with its spot table and image")
def read_st(
    counts: str | Path,
    *,
    spots: str | Path,
    image: str | Path,
    name: str | None = None,
    mpp: float | None = None,
    platform: str | None = None,
) -> SpotSet:
    """Read a legacy ST section (counts TSV + spot table + full-resolution image) into a SpotSet.

    Parameters
    ----------
    counts: spots × genes counts, TSV or CSV (optionally gzipped), row index ``"{x}x{y}"``.
    spots: the spot table (TSV) with x, y, pixel_x, pixel_y and optionally selected.
    image: the full-resolution H&E that pixel_x/pixel_y refer to.
    name: dataset name (default: the counts file name without extensions).
    mpp: micrometres per full-resolution pixel, overriding the image metadata and the grid fit.
    platform: confirms the platform the array lattice shows (st; an error when it contradicts it).
    """
    counts_path, spots_path, image_path = Path(counts), Path(spots), Path(image)
    if not image_path.exists():
        raise InputError(f"image not found: {image_path} (given with --image)")
    table = read_spot_table(spots_path)
    matrix = read_st_counts(counts_path)
    table, matrix = join_st(table, matrix, where=f"{counts_path} + {spots_path}: ")
    xy = table[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    # the usual case: JPEGs carry no pixel size, and the 200 µm grid gives it
    size = reference_pixel_size(
        mpp=mpp,
        image_path=image_path,
        image_scale=1.0,
        xy_px=xy,
        platform=platform,
        default_platform="st",
        array_rows=table["y"].to_numpy(np.float64),
        array_cols=table["x"].to_numpy(np.float64),
        where=f"{spots_path}",
    )
    diameter = SPOT_DIAMETER_UM["st"] / size.mpp

    values = matrix.to_numpy()
    if not np.issubdtype(values.dtype, np.number):
        raise InputError(f"counts {counts_path}: values are not all numbers")
    X = sp.csr_matrix(values.astype(np.float32))
    if name is None:
        name = counts_path.name
        for suffix in (".gz", ".tsv", ".csv", ".txt"):
            name = name.removesuffix(suffix)
    return SpotSet(
        name=name,
        X=X,
        obs_names=np.asarray(table.index, dtype=str),
        var_names=np.asarray(matrix.columns, dtype=str),
        xy=xy,
        mpp=size.mpp,
        mpp_source=size.source,
        platform=size.platform,
        image=ImageRef(path=image_path),
        is_counts=looks_like_counts(X),
        spot_diameter_px=diameter,
        source=str(counts_path),
    )
