"""Reading a reference dataset by what its path is: a Space Ranger ``outs/`` folder, legacy ST
counts (``.tsv``/``.csv``, optionally gzipped, with a spot table and the image), or an AnnData
``.h5ad`` in the scanpy/squidpy Visium layout. Every reader returns a :class:`~histoindex.data.SpotSet`."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..data import SpotSet, check_patch_pixels
from ..errors import HistoindexWarning, InputError
from ._guard import reader
from .h5ad import read_h5ad
from .slides import ArraySlide, image_overview
from .spaceranger import read_spaceranger
from .spatialdata import is_zarr_store, read_spatialdata
from .st import read_st

#: an image whose pixels under the spots span fewer grey levels than this (1st to 99th percentile, in
#: every channel) is blank: all black, all white, one flat colour, or a test image without the tissue
BLANK_SPREAD = 12
#: a reference with more than this fraction of its spot centres off its image is refused: the image
#: is not the one the positions refer to (or its scale factor is missing); fewer (a cropped image)
#: are a warning
MAX_OFF_IMAGE = 0.5


@reader("a reference")
def read_reference(
    path: str | Path,
    *,
    image: str | Path | None = None,
    platform: str | None = None,
    name: str | None = None,
    mpp: float | None = None,
    spot_table: str | Path | None = None,
    log_normalised: bool = False,
) -> SpotSet:
    """Read a reference dataset, by what ``path`` is.

    * a folder: a Space Ranger ``outs/`` folder (:func:`~histoindex.io.read_spaceranger`);
    * ``.tsv``/``.csv`` (optionally ``.gz``): legacy ST counts, spots × genes
      (:func:`~histoindex.io.read_st`), which needs ``spot_table`` and ``image``;
    * ``.h5ad``: AnnData in the scanpy/squidpy Visium layout (:func:`~histoindex.io.read_h5ad`);
    * ``.zarr`` (or a folder that is a Zarr group): SpatialData (:func:`~histoindex.io.spatialdata.read_spatialdata`).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".gz":
        suffix = Path(path.stem).suffix.lower() + suffix
    if not path.exists():
        raise InputError(f"reference file not found: {path}")
    if suffix == ".zarr" or is_zarr_store(path):  # SpatialData (scverse)
        if spot_table is not None:
            raise InputError(f"--spot-table applies to legacy ST counts (.tsv/.csv), not to {path}")
        return read_spatialdata(path, image=image, platform=platform, name=name, mpp=mpp, log_normalised=log_normalised)
    if path.is_dir():
        reader = read_spaceranger
    elif suffix in {".tsv", ".tsv.gz", ".csv", ".csv.gz"}:
        missing = [option for option, value in (("--spot-table", spot_table), ("--image", image)) if value is None]
        if missing:
            raise InputError(
                f"{path} is read as legacy ST counts (spots × genes), which need {' and '.join(missing)}: "
                "the spot table (x, y, pixel_x, pixel_y) and the full-resolution H&E"
            )
        return read_st(path, spots=spot_table, image=image, name=name, mpp=mpp, platform=platform)
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


def check_reference_image(spots: SpotSet, *, patch_um: float | None = None) -> None:
    """Before a reference's patches are embedded: its image must show something where the spots are
    (not blank or near-constant, e.g. Space Ranger's all-black test hires PNG), the spot centres
    must lie on it (more than half off is refused; a few off, as on a cropped image, is a warning),
    and a ``patch_um`` patch must span at least 8 of its pixels."""
    ref = spots.image
    name = ref.path.name if ref.path is not None else f"the in-file image of {spots.source or spots.name}"
    if ref.array is not None:
        slide = ArraySlide(ref.array)
        width, height, thumb = slide.width, slide.height, slide.thumbnail(1024)
    else:
        width, height, thumb = image_overview(ref.path, max_side=1024)
    if patch_um is not None:
        check_patch_pixels(patch_um, spots.mpp, scale=ref.scale, where=f"{spots.source or spots.name} on {name}")
    xy = spots.xy * ref.scale
    off = (xy[:, 0] < 0) | (xy[:, 0] > width) | (xy[:, 1] < 0) | (xy[:, 1] > height)
    if off.any():
        where = (
            f"{spots.source or spots.name}: {int(off.sum())} of {len(xy)} spot centres fall outside {name} ({width}×{height} px; "
            f"spots span x {xy[:, 0].min():.0f}..{xy[:, 0].max():.0f}, y {xy[:, 1].min():.0f}..{xy[:, 1].max():.0f} px)"
        )
        if off.mean() > MAX_OFF_IMAGE:
            raise InputError(f"{where}: is this the image the spot positions refer to (the full-resolution H&E, or the hires image with its scale factor)?")
        warnings.warn(f"{where}; their patches are partly or wholly blank (a cropped image?)", HistoindexWarning, stacklevel=2)
    # the spots' bounding box, widened by half a patch (or 5 % of the image), on the thumbnail
    sy, sx = thumb.shape[0] / height, thumb.shape[1] / width
    margin = patch_um / spots.mpp * ref.scale / 2 if patch_um is not None else 0.05 * max(width, height)
    x0, x1 = int((xy[:, 0].min() - margin) * sx), int(np.ceil((xy[:, 0].max() + margin) * sx)) + 1
    y0, y1 = int((xy[:, 1].min() - margin) * sy), int(np.ceil((xy[:, 1].max() + margin) * sy)) + 1
    under = thumb[max(y0, 0) : y1, max(x0, 0) : x1].reshape(-1, thumb.shape[-1]).astype(np.float64)
    if len(under) < 64:  # a few pixels say nothing: judge the whole image
        under = thumb.reshape(-1, thumb.shape[-1]).astype(np.float64)
    low, high = np.percentile(under, [1, 99], axis=0)
    if float((high - low).max()) < BLANK_SPREAD:
        colour = ", ".join(f"{v:.0f}" for v in np.median(under, axis=0))
        raise InputError(
            f"{name} is blank where the spots are: its pixels are all about ({colour}) (1st–99th percentile spread "
            f"{float((high - low).max()):.0f} of 255); pass the H&E the spots were captured on with --image"
        )
