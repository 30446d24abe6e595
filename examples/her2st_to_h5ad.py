#!/usr/bin/env python
"""Convert HER2ST legacy-ST sections into AnnData ``.h5ad`` files that histoindex reads.

HER2ST (Andersson et al., Nature Communications 12, 6012, 2021; GitHub almaan/her2st, Zenodo
3957257) ships each section as loose files::

    her2st/
      counts/<section>.tsv.gz                       spots x genes raw UMI counts; row index "{x}x{y}"
      spots/<section>_selection.tsv                 x, y (array), pixel_x, pixel_y (full-res px), selected
      images/<section>.jpg                          full-resolution H&E (no pixel size in the file)
      clusters/<section>-cluster-annotation.tsv.gz  the authors' expression cluster ("label") per spot

This script writes one ``<section>.h5ad`` per section in the scanpy/squidpy Visium layout:

* ``X``: raw integer UMI counts, sparse CSR float32;
* ``obs_names``: the ``"{x}x{y}"`` array keys; ``obs``: ``array_x``, ``array_y`` and, when the
  annotation file exists, ``cluster`` (categorical; NaN for spots the authors did not annotate);
* ``var_names``: gene symbols;
* ``obsm['spatial']``: (pixel_x, pixel_y) spot centres in full-resolution image pixels;
* ``uns['spatial'][section]``: ``scalefactors`` (``spot_diameter_fullres``, ``tissue_hires_scalef``
  = 1.0), ``metadata['source_image_path']`` (absolute path of the JPEG) and no embedded images.

Counts and spot table are joined on the key ``f"{x}x{y}"``, never by row position: a few spots in
the spot table have no count row. Only spots present in both (and with ``selected == 1``) are kept.

The JPEGs carry no microscope calibration, so the spot diameter in pixels is derived from the
spots themselves: legacy ST spots are 100 µm wide on a 200 µm centre-to-centre grid, so a least
squares fit of ``pixel_x ~ x`` (and ``pixel_y ~ y``) gives pixels per array step; ``px_per_um =
step / 200`` and ``spot_diameter_fullres = 100 * px_per_um``. histoindex then reads the pixel size
as ``100 µm / spot_diameter_fullres`` (``platform="st"``). On the five sections shipped here the
fit gives ~291 px per step, i.e. ~0.686 µm/px (~1.455 px/µm, spot diameter ~146 px), about 7% finer
than the ~1.36 px/µm quoted in the data folder's README; pass ``--mpp`` to histoindex to override.

Usage::

    python examples/her2st_to_h5ad.py --her2st ../shared/data/her2st --out /tmp/her2st_h5ad
    python examples/her2st_to_h5ad.py --her2st ../shared/data/her2st --out DIR --sections C2 C3
    histoindex ingest DIR/C2.h5ad --platform st --tissue breast --species human --db her2st.db

The conversion lives in functions (:func:`convert_section`) so it can be imported and tested.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

SECTIONS = ("B4", "C2", "C3", "C4", "C5")
SPOT_DIAMETER_UM = 100.0  # legacy ST spot diameter
SPOT_PITCH_UM = 200.0  # legacy ST centre-to-centre distance between neighbouring array positions


def spot_key(x, y) -> pd.Index:
    """The ``"{x}x{y}"`` keys of integer array coordinates (the counts' row index)."""
    return pd.Index([f"{int(a)}x{int(b)}" for a, b in zip(x, y)], name="spot")


def section_paths(her2st_dir: str | Path, section: str) -> dict[str, Path]:
    root = Path(her2st_dir)
    return {
        "counts": root / "counts" / f"{section}.tsv.gz",
        "spots": root / "spots" / f"{section}_selection.tsv",
        "image": root / "images" / f"{section}.jpg",
        "clusters": root / "clusters" / f"{section}-cluster-annotation.tsv.gz",
    }


def read_spots(path: str | Path) -> pd.DataFrame:
    """The spot table indexed by key, restricted to ``selected == 1`` when that column exists."""
    spots = pd.read_csv(path, sep="\t")
    missing = {"x", "y", "pixel_x", "pixel_y"} - set(spots.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    if "selected" in spots.columns:
        spots = spots[spots["selected"] == 1]
    spots.index = spot_key(spots["x"], spots["y"])
    if not spots.index.is_unique:
        raise ValueError(f"{path}: repeated array positions {list(spots.index[spots.index.duplicated()][:5])}")
    return spots


def read_counts(path: str | Path) -> pd.DataFrame:
    """Spots x genes counts indexed by the ``"{x}x{y}"`` key."""
    counts = pd.read_csv(path, sep="\t", index_col=0)
    counts.index = counts.index.astype(str)
    if not counts.index.is_unique:
        raise ValueError(f"{path}: repeated spot keys in the counts")
    return counts


def read_clusters(path: str | Path) -> pd.Series:
    """The authors' cluster label per spot key. The file's own index is ``"{pixel_x}x{pixel_y}"``,
    so the key is rebuilt from its ``x``/``y`` (array) columns."""
    table = pd.read_csv(path, sep="\t", index_col=0)
    labels = pd.Series(table["label"].astype(str).to_numpy(), index=spot_key(table["x"], table["y"]), name="cluster")
    return labels[~labels.index.duplicated(keep="first")]


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
        return SPOT_DIAMETER_UM * self.px_per_um


def _slope(coord: np.ndarray, pixel: np.ndarray) -> float:
    design = np.column_stack([np.asarray(coord, np.float64), np.ones(len(coord))])
    (slope, _), *_ = np.linalg.lstsq(design, np.asarray(pixel, np.float64), rcond=None)
    return float(abs(slope))


def fit_grid(spots: pd.DataFrame) -> GridFit:
    """Fit ``pixel_x ~ x`` and ``pixel_y ~ y`` over the spots (integer array coordinates)."""
    if spots["x"].nunique() < 2 or spots["y"].nunique() < 2:
        raise ValueError("need spots on at least two array rows and columns to derive the pixel size")
    return GridFit(_slope(spots["x"], spots["pixel_x"]), _slope(spots["y"], spots["pixel_y"]))


def convert_section(her2st_dir: str | Path, section: str) -> anndata.AnnData:
    """One HER2ST section as AnnData in the scanpy/squidpy Visium layout (see module docstring).

    ``uns['her2st']`` records the grid fit (pixels per array step, µm per pixel) for reference.
    """
    paths = section_paths(her2st_dir, section)
    for kind in ("counts", "spots", "image"):
        if not paths[kind].exists():
            raise FileNotFoundError(f"section {section}: {kind} file {paths[kind]} not found")
    spots = read_spots(paths["spots"])
    counts = read_counts(paths["counts"])

    n_spots_table, n_counts_rows = len(spots), len(counts)
    keys = spots.index.intersection(counts.index, sort=False)  # spot-table order, joined on the key
    if len(keys) == 0:
        raise ValueError(f"section {section}: no spot keys shared by {paths['spots'].name} and {paths['counts'].name}")
    spots = spots.loc[keys]
    counts = counts.loc[keys]
    fit = fit_grid(spots)

    values = counts.to_numpy()
    if not np.issubdtype(values.dtype, np.integer) and not np.all(np.mod(values, 1) == 0):
        raise ValueError(f"section {section}: counts are not integers")
    X = sp.csr_matrix(values.astype(np.float32))

    obs = pd.DataFrame(
        {"array_x": spots["x"].to_numpy(np.int64), "array_y": spots["y"].to_numpy(np.int64)},
        index=pd.Index(keys.astype(str), name="spot"),
    )
    if paths["clusters"].exists():
        labels = read_clusters(paths["clusters"]).reindex(keys)  # NaN where the authors gave none
        obs["cluster"] = pd.Categorical(labels.to_numpy(), categories=sorted(labels.dropna().unique(), key=_natural))
    var = pd.DataFrame(index=pd.Index(counts.columns.astype(str), name="gene"))

    adata = anndata.AnnData(X=X, obs=obs, var=var)
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    adata.obsm["spatial"] = spots[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    adata.uns["spatial"] = {
        section: {
            "scalefactors": {"spot_diameter_fullres": fit.spot_diameter_px, "tissue_hires_scalef": 1.0},
            "metadata": {"source_image_path": str(paths["image"].resolve())},
            "images": {},
        }
    }
    adata.uns["her2st"] = {
        "section": section,
        "px_per_step_x": fit.px_per_step_x,
        "px_per_step_y": fit.px_per_step_y,
        "um_per_px": fit.um_per_px,
        "n_spots_table": n_spots_table,  # selected spots in the spot table
        "n_counts_rows": n_counts_rows,
    }
    return adata


def _natural(label: str):
    return (0, int(label)) if label.lstrip("-").isdigit() else (1, label)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--her2st", required=True, type=Path, help="HER2ST folder (with counts/, spots/, images/, clusters/)")
    parser.add_argument("--out", required=True, type=Path, help="output folder for <section>.h5ad (created if missing)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), metavar="SECTION", help=f"default: {' '.join(SECTIONS)}")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    for section in args.sections:
        adata = convert_section(args.her2st, section)
        info = adata.uns["her2st"]
        diameter = adata.uns["spatial"][section]["scalefactors"]["spot_diameter_fullres"]
        path = args.out / f"{section}.h5ad"
        adata.write_h5ad(path)
        print(
            f"{section}: {adata.n_obs} spots (spot table {info['n_spots_table']}, count rows {info['n_counts_rows']}) x {adata.n_vars} genes; "
            f"{info['px_per_step_x']:.2f}/{info['px_per_step_y']:.2f} px per array step (x/y) -> "
            f"{info['um_per_px']:.4f} µm/px ({1 / info['um_per_px']:.4f} px/µm), spot diameter {diameter:.1f} px -> {path}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
