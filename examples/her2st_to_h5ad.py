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

The reading, joining and grid fit live in :mod:`histoindex.io.st` (``histoindex ingest`` reads
these files directly too: ``histoindex ingest C2.tsv.gz --spot-table C2_selection.tsv --image C2.jpg
--platform st ...``); this script adds the HER2ST extras and writes ``.h5ad`` through
:func:`histoindex.io.write_h5ad`. :func:`convert_section` can be imported and tested.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd

from histoindex.io.h5ad import write_h5ad
from histoindex.io.st import fit_grid, read_spot_table, read_st, spot_key

SECTIONS = ("B4", "C2", "C3", "C4", "C5")


def section_paths(her2st_dir: str | Path, section: str) -> dict[str, Path]:
    root = Path(her2st_dir)
    return {
        "counts": root / "counts" / f"{section}.tsv.gz",
        "spots": root / "spots" / f"{section}_selection.tsv",
        "image": root / "images" / f"{section}.jpg",
        "clusters": root / "clusters" / f"{section}-cluster-annotation.tsv.gz",
    }


def read_clusters(path: str | Path) -> pd.Series:
    """The authors' cluster label per spot key. The file's own index is ``"{pixel_x}x{pixel_y}"``,
    so the key is rebuilt from its ``x``/``y`` (array) columns."""
    table = pd.read_csv(path, sep="\t", index_col=0)
    labels = pd.Series(table["label"].astype(str).to_numpy(), index=spot_key(table["x"], table["y"]), name="cluster")
    return labels[~labels.index.duplicated(keep="first")]


def convert_section(her2st_dir: str | Path, section: str, out_dir: str | Path) -> anndata.AnnData:
    """Write ``<out_dir>/<section>.h5ad`` (see module docstring) and return it as AnnData.

    The section is read with :func:`histoindex.io.read_st` and written with
    :func:`histoindex.io.write_h5ad`; the HER2ST extras (``obs`` ``array_x``/``array_y``/``cluster``,
    ``uns['her2st']`` with the grid fit and the table sizes) are added on top.
    """
    paths = section_paths(her2st_dir, section)
    for kind in ("counts", "spots", "image"):
        if not paths[kind].exists():
            raise FileNotFoundError(f"section {section}: {kind} file {paths[kind]} not found")
    spots = read_st(paths["counts"], spots=paths["spots"], image=paths["image"].resolve(), name=section)
    if not spots.is_counts:
        raise ValueError(f"section {section}: counts are not integers")
    path = write_h5ad(spots, Path(out_dir) / f"{section}.h5ad", library=section)

    # the extras: array coordinates, the authors' clusters and the grid fit, for reference
    table = read_spot_table(paths["spots"])  # selected spots, indexed by key
    n_spots_table = len(table)
    n_counts_rows = len(pd.read_csv(paths["counts"], sep="\t", usecols=[0]))
    table = table.loc[spots.obs_names]  # the joined spots, as read_st kept them
    fit = fit_grid(table)  # the fit read_st used for the pixel size (the JPEGs carry none)
    adata = anndata.read_h5ad(path)
    keys = adata.obs_names
    adata.obs["array_x"] = table.loc[keys, "x"].to_numpy(np.int64)
    adata.obs["array_y"] = table.loc[keys, "y"].to_numpy(np.int64)
    if paths["clusters"].exists():
        labels = read_clusters(paths["clusters"]).reindex(keys)  # NaN where the authors gave none
        adata.obs["cluster"] = pd.Categorical(labels.to_numpy(), categories=sorted(labels.dropna().unique(), key=_natural))
    adata.uns["her2st"] = {
        "section": section,
        "px_per_step_x": fit.px_per_step_x,
        "px_per_step_y": fit.px_per_step_y,
        "um_per_px": fit.um_per_px,
        "n_spots_table": n_spots_table,  # selected spots in the spot table
        "n_counts_rows": n_counts_rows,
    }
    adata.write_h5ad(path)
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
        adata = convert_section(args.her2st, section, args.out)
        info = adata.uns["her2st"]
        diameter = adata.uns["spatial"][section]["scalefactors"]["spot_diameter_fullres"]
        path = args.out / f"{section}.h5ad"
        print(
            f"{section}: {adata.n_obs} spots (spot table {info['n_spots_table']}, count rows {info['n_counts_rows']}) x {adata.n_vars} genes; "
            f"{info['px_per_step_x']:.2f}/{info['px_per_step_y']:.2f} px per array step (x/y) -> "
            f"{info['um_per_px']:.4f} µm/px ({1 / info['um_per_px']:.4f} px/µm), spot diameter {diameter:.1f} px -> {path}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
