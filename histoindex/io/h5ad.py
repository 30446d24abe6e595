"""AnnData ``.h5ad`` in the scanpy/squidpy Visium layout <-> SpotSet.

Expected layout: ``X`` counts (or log-normalised values), ``obsm['spatial']`` spot centres in
full-resolution pixels, ``uns['spatial'][library]['scalefactors']`` with ``spot_diameter_fullres``
(and ``tissue_hires_scalef``), the full-resolution image from ``image=`` or
``uns['spatial'][library]['metadata']['source_image_path']``, else the hires image (with a warning).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..data import SPOT_DIAMETER_UM, ImageRef, SpotSet
from ..errors import InputError, LowResolutionImageWarning
from .slides import reference_mpp


def _read(path: Path):
    import anndata

    if not path.exists():
        raise InputError(f"reference file not found: {path}")
    try:
        return anndata.read_h5ad(path)
    except Exception as exc:
        raise InputError(f"cannot read {path} as AnnData .h5ad: {exc}") from exc


def looks_like_counts(X) -> bool:
    """True when X holds non-negative integers (raw counts); False for log-normalised values."""
    values = X.data if sp.issparse(X) else np.asarray(X).ravel()
    sample = values[: 200_000]
    if sample.size == 0:
        return True
    if (sample < 0).any():
        raise InputError("expression has negative values: expected counts or log-normalised values")
    return bool(np.all(np.equal(np.mod(sample, 1), 0)))


def _library(adata, path: Path) -> tuple[str | None, dict]:
    spatial = adata.uns.get("spatial", {})
    if not spatial:
        return None, {}
    libraries = list(spatial.keys())
    if len(libraries) > 1:
        raise InputError(f"{path}: uns['spatial'] holds several libraries ({', '.join(libraries)}); split them first")
    return libraries[0], spatial[libraries[0]]


def read_h5ad(
    path: str | Path,
    *,
    image: str | Path | None = None,
    platform: str = "visium",
    name: str | None = None,
    mpp: float | None = None,
) -> SpotSet:
    """Read a Visium-layout ``.h5ad`` into a SpotSet.

    Parameters
    ----------
    path: the ``.h5ad`` file.
    image: full-resolution H&E; overrides ``source_image_path`` in the file.
    platform: used for the spot diameter when the image has no pixel size (visium 55 µm, st 100 µm).
    name: dataset name (default: the file stem).
    mpp: micrometres per full-resolution pixel, overriding every other source.
    """
    path = Path(path)
    adata = _read(path)
    where = f"{path}"
    if "spatial" not in adata.obsm:
        raise InputError(
            f"{where} has no obsm['spatial'] (spot centres in full-resolution pixels); "
            "is this a spatial dataset in the scanpy/squidpy Visium layout?"
        )
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    library, lib = _library(adata, path)
    scalefactors = dict(lib.get("scalefactors", {}))
    diameter = scalefactors.get("spot_diameter_fullres")
    diameter = float(diameter) if diameter else None

    image_ref = _image_ref(path, adata, lib, image, scalefactors)
    mpp = reference_mpp(
        mpp=mpp, image_path=image_ref.path, image_scale=image_ref.scale, spot_diameter_px=diameter,
        spot_um=SPOT_DIAMETER_UM.get(platform), where=where, diameter_source="uns['spatial'][...]['scalefactors']",
    )

    return SpotSet(
        name=name or path.stem,
        X=adata.X if sp.issparse(adata.X) else np.asarray(adata.X),
        obs_names=np.asarray(adata.obs_names, dtype=str),
        var_names=np.asarray(adata.var_names, dtype=str),
        xy=xy,
        mpp=float(mpp),
        image=image_ref,
        is_counts=looks_like_counts(adata.X),
        spot_diameter_px=diameter,
        source=str(path),
    )


def _image_ref(path: Path, adata, lib: dict, image: str | Path | None, scalefactors: dict) -> ImageRef:
    if image is not None:
        image = Path(image)
        if not image.exists():
            raise InputError(f"image not found: {image} (given with --image)")
        return ImageRef(path=image)
    source = lib.get("metadata", {}).get("source_image_path")
    if source:
        source_path = Path(str(source))
        if not source_path.is_absolute():
            source_path = path.parent / source_path
        if source_path.exists():
            return ImageRef(path=source_path)
    hires = lib.get("images", {}).get("hires")
    scalef = scalefactors.get("tissue_hires_scalef")
    if hires is not None and scalef:
        warnings.warn(
            f"{path}: full-resolution image not found"
            f"{f' at {source}' if source else ''}; using the hires image (scale {scalef:.4g}), patches will be blurry. "
            "Pass --image for the full-resolution H&E.",
            LowResolutionImageWarning,
            stacklevel=3,
        )
        return ImageRef(array=np.asarray(hires), scale=float(scalef))
    raise InputError(
        f"{path}: no H&E image: "
        + (f"source_image_path {source} does not exist" if source else "no uns['spatial'][...]['metadata']['source_image_path']")
        + " and no hires image in the file; pass --image PATH"
    )


def write_h5ad(spots: SpotSet, path: str | Path, *, library: str | None = None) -> Path:
    """Write a SpotSet in the scanpy/squidpy Visium layout (image referenced by path)."""
    import anndata
    import pandas as pd

    path = Path(path)
    library = library or spots.name
    adata = anndata.AnnData(
        X=spots.X,
        obs=pd.DataFrame(index=pd.Index(spots.obs_names, name="spot")),
        var=pd.DataFrame(index=pd.Index(spots.var_names, name="gene")),
    )
    adata.obsm["spatial"] = np.asarray(spots.xy, dtype=np.float64)
    meta = {"source_image_path": str(spots.image.path) if spots.image.path else ""}
    scalefactors = {"tissue_hires_scalef": 1.0}
    if spots.spot_diameter_px:
        scalefactors["spot_diameter_fullres"] = float(spots.spot_diameter_px)
    adata.uns["spatial"] = {library: {"scalefactors": scalefactors, "metadata": meta, "images": {}}}
    adata.write_h5ad(path)
    return path
