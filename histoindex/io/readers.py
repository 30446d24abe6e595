"""Reading a reference dataset by what its path is: a Space Ranger ``outs/`` folder, legacy ST
counts (``.tsv``/``.csv``, optionally gzipped, with a spot table and the image), or an AnnData
``.h5ad`` in the scanpy/squidpy Visium layout. Every reader returns a :class:`~histoindex.data.SpotSet`."""

from __future__ import annotations

from pathlib import Path

from ..data import SpotSet
from ..errors import InputError
from .h5ad import read_h5ad
from .spaceranger import read_spaceranger
from .st import read_st


def read_reference(
    path: str | Path,
    *,
    image: str | Path | None = None,
    platform: str = "visium",
    name: str | None = None,
    mpp: float | None = None,
    spot_table: str | Path | None = None,
    log_normalised: bool = False,
) -> SpotSet:
    """Read a reference dataset, by what ``path`` is.

    * a folder: a Space Ranger ``outs/`` folder (:func:`~histoindex.io.read_spaceranger`);
    * ``.tsv``/``.csv`` (optionally ``.gz``): legacy ST counts, spots × genes
      (:func:`~histoindex.io.read_st`), which needs ``spot_table`` and ``image``;
    * ``.h5ad``: AnnData in the scanpy/squidpy Visium layout (:func:`~histoindex.io.read_h5ad`).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".gz":
        suffix = Path(path.stem).suffix.lower() + suffix
    if not path.exists():
        raise InputError(f"reference file not found: {path}")
    if path.is_dir():
        reader = read_spaceranger
    elif suffix in {".tsv", ".tsv.gz", ".csv", ".csv.gz"}:
        missing = [option for option, value in (("--spot-table", spot_table), ("--image", image)) if value is None]
        if missing:
            raise InputError(
                f"{path} is read as legacy ST counts (spots × genes), which need {' and '.join(missing)}: "
                "the spot table (x, y, pixel_x, pixel_y) and the full-resolution H&E"
            )
        return read_st(path, spots=spot_table, image=image, name=name, mpp=mpp)
    elif suffix == ".h5ad":
        reader = read_h5ad
    else:
        raise InputError(
            f"unsupported reference {path}: expected an .h5ad file (scanpy/squidpy Visium layout), a Space Ranger outs/ "
            "folder, or legacy ST counts (.tsv/.csv, optionally .gz) with --spot-table and --image"
        )
    if spot_table is not None:
        raise InputError(f"--spot-table applies to legacy ST counts (.tsv/.csv), not to {path}")
    if reader is read_h5ad:
        return read_h5ad(path, image=image, platform=platform, name=name, mpp=mpp, log_normalised=log_normalised)
    return reader(path, image=image, platform=platform, name=name, mpp=mpp)
