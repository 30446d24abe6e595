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

from ..data import ImageRef, SpotSet
from ..errors import InputError, LowResolutionImageWarning
from ._guard import reader
from .pixelsize import PixelSize, reference_pixel_size, scale_factor


def _read(path: Path):
    import anndata

    if not path.exists():
        raise InputError(f"reference file not found: {path}")
    try:
        return anndata.read_h5ad(path)
    except Exception as exc:
        raise InputError(f"cannot read {path} as AnnData .h5ad: {exc}") from exc


def looks_like_counts(X) -> bool:
    """True when X holds non-negative integers (raw counts); False for other non-negative values."""
    values = X.data if sp.issparse(X) else np.asarray(X).ravel()
    sample = values[:200_000]
    if sample.size == 0:
        return True
    if not np.isfinite(sample).all():
        raise InputError("expression has NaN or infinite values: expected counts or log-normalised values")
    if (sample < 0).any():
        raise InputError("expression has negative values: expected counts or log-normalised values")
    return bool(np.all(np.equal(np.mod(sample, 1), 0)))


#: per-spot totals of expm1(X) that pass as log1p(counts per 10,000): within 1 %
CP10K_TOLERANCE = 0.01


def _row_sums(X) -> np.ndarray:
    return np.asarray(X.sum(axis=1), dtype=np.float64).ravel()


def _expm1(X):
    if sp.issparse(X):
        out = X.astype(np.float64, copy=True)
        out.data = np.expm1(out.data)
        return out
    return np.expm1(np.asarray(X, np.float64))


def _describe(totals: np.ndarray) -> str:
    lo, hi = np.percentile(totals, [5, 95])
    return f"{lo:,.0f}..{hi:,.0f}" if abs(hi - lo) > 0.5 else f"{lo:,.0f}"


def expression_matrix(adata, where: str, *, log_normalised: bool = False):
    """The expression histoindex should use: ``(X, var_names, is_counts, source)``.

    Raw counts are preferred wherever they are: ``X`` if it holds integers, else
    ``layers['counts']``, else ``.raw``. A non-integer ``X`` with no counts beside it is accepted
    only if it is log1p(counts per 10,000) over all genes (``expm1(X)`` sums to 10,000 per spot),
    or when the caller asserts it (``log_normalised``: X is log1p(CP10k) of a gene subset, which
    cannot be checked). Anything else — CP10k without the log, log1p of CPM, scaled values — is an
    error that names the layer to use."""
    var_names = np.asarray(adata.var_names, dtype=str)
    if looks_like_counts(adata.X):
        return adata.X, var_names, True, "X"
    counts = adata.layers.get("counts") if hasattr(adata, "layers") else None
    if counts is not None and looks_like_counts(counts):
        return counts, var_names, True, "layers['counts']"
    if adata.raw is not None and looks_like_counts(adata.raw.X):
        return adata.raw.X, np.asarray(adata.raw.var_names, dtype=str), True, ".raw"
    if log_normalised:
        return adata.X, var_names, False, "X (log1p CP10k, as asserted with --log-normalised)"
    totals = _row_sums(_expm1(adata.X))
    if np.all(np.abs(totals / 1e4 - 1) <= CP10K_TOLERANCE):
        return adata.X, var_names, False, "X (log1p CP10k)"
    plain = _row_sums(adata.X)
    if np.all(np.abs(plain / 1e4 - 1) <= CP10K_TOLERANCE):
        guess = "X looks like counts per 10,000 without log1p"
    elif np.all(np.abs(totals / 1e6 - 1) <= CP10K_TOLERANCE):
        guess = "X looks like log1p of counts per million, not per 10,000"
    else:
        guess = "X is not log1p(counts per 10,000) over all genes (a gene subset, another normalisation or scaled values?)"
    layers = ", ".join(adata.layers.keys()) if len(adata.layers) else "none"
    raise InputError(
        f"{where}: X holds non-integer values and no raw counts are beside it (layers: {layers}; .raw: "
        f"{'not counts' if adata.raw is not None else 'none'}); expm1(X) sums to {_describe(totals)} per spot: "
        f"{guess}. Store raw counts in X, layers['counts'] or .raw; or, if X really is log1p(CP10k) of a "
        "gene subset, pass --log-normalised"
    )


def array_coordinates(obs) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(rows, cols) integer array coordinates from ``obs`` (``array_row``/``array_col`` as scanpy and
    squidpy write them, or legacy ST ``array_y``/``array_x``), or (None, None)."""
    for row_key, col_key in (("array_row", "array_col"), ("array_y", "array_x")):
        if row_key in obs and col_key in obs:
            rows = np.asarray(obs[row_key], dtype=np.float64)
            cols = np.asarray(obs[col_key], dtype=np.float64)
            if np.isfinite(rows).all() and np.isfinite(cols).all():
                return rows, cols
    return None, None


def _library(adata, path: Path) -> tuple[str | None, dict]:
    spatial = adata.uns.get("spatial", {})
    if not isinstance(spatial, dict):
        raise InputError(f"{path}: uns['spatial'] is a {type(spatial).__name__}, expected a dict of libraries (scanpy's Visium layout)")
    if not spatial:
        return None, {}
    libraries = list(spatial.keys())
    if len(libraries) > 1:
        raise InputError(f"{path}: uns['spatial'] holds several libraries ({', '.join(libraries)}); split them first")
    return libraries[0], spatial[libraries[0]]


#: var columns that hold a second name per gene: Ensembl ids beside symbol var_names (scanpy's
#: read_visium / read_10x_h5 write ``gene_ids``), or symbols beside Ensembl-id var_names
GENE_ALIAS_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "gene_symbols", "gene_symbol", "symbol", "feature_name", "gene_name")


def gene_aliases(var, var_names: np.ndarray) -> np.ndarray | None:
    """The first of :data:`GENE_ALIAS_COLUMNS` in ``var`` (a DataFrame indexed like the genes)
    whose values differ from ``var_names``, as strings; None when there is none."""
    if var is None or len(var) != len(var_names):
        return None
    for column in GENE_ALIAS_COLUMNS:
        if column in getattr(var, "columns", ()):
            values = np.asarray(var[column].astype(str), dtype=str)
            if not np.array_equal(values, np.asarray(var_names, dtype=str)):
                return values
    return None


def h5ad_pixel_size(path: str | Path, *, xy_px: np.ndarray, platform: str | None, default_platform: str | None = "visium") -> PixelSize:
    """The pixel size of a spots ``.h5ad`` by the rules references follow (spot pitch from the
    array coordinates or the spacing of ``xy_px``, else ``spot_diameter_fullres``), with no image:
    for ``query --spots`` on a slide whose metadata has no pixel size. The spots' lattice decides the
    platform; ``platform`` (given) must agree with it, ``default_platform`` applies when it does not tell."""
    import anndata

    path = Path(path)
    try:
        adata = anndata.read_h5ad(path, backed="r")
    except Exception as exc:
        raise InputError(f"cannot read spots file {path} as AnnData .h5ad: {exc}") from exc
    try:
        library, lib = _library(adata, path)
        scalefactors = lib.get("scalefactors", {}) if isinstance(lib, dict) else {}
        scalefactors = dict(scalefactors) if isinstance(scalefactors, dict) else {}
        diameter = scale_factor(scalefactors, "spot_diameter_fullres", where=f"{path}: uns['spatial'][{library!r}]['scalefactors']")
        rows, cols = array_coordinates(adata.obs)
    finally:
        adata.file.close()
    return reference_pixel_size(
        mpp=None, image_path=None, image_scale=1.0, xy_px=xy_px, platform=platform, array_rows=rows, array_cols=cols,
        spot_diameter_px=diameter, where=str(path), diameter_source=f"spot_diameter_fullres in {path.name}", default_platform=default_platform,
    )  # fmt: skip


@reader("a spatial AnnData .h5ad")
def read_h5ad(
    path: str | Path,
    *,
    image: str | Path | None = None,
    platform: str | None = None,
    name: str | None = None,
    mpp: float | None = None,
    log_normalised: bool = False,
    metadata: PixelSize | None = None,
) -> SpotSet:
    """Read a Visium-layout ``.h5ad`` into a SpotSet.

    Parameters
    ----------
    path: the ``.h5ad`` file.
    image: full-resolution H&E; overrides ``source_image_path`` in the file.
    platform: visium or st, to confirm the platform the spot lattice shows (an error when it
        contradicts it); None: the lattice decides, else visium (see :mod:`histoindex.io.pixelsize`).
    name: dataset name (default: the file stem).
    mpp: micrometres per full-resolution pixel, overriding every other source.
    log_normalised: X is log1p(CP10k) of a gene subset (only used when no raw counts are present).
    metadata: a pixel size the dataset's own metadata states (HEST's estimate): used before the
        image's and the spot layout's, and cross-checked with them.
    """
    path = Path(path)
    adata = _read(path)
    where = f"{path}"
    if adata.n_obs == 0:  # said first: an empty file also lacks everything else
        raise InputError(f"{where} has no spots (0 observations): nothing to ingest")
    if adata.n_vars == 0:
        raise InputError(f"{where} has no genes (0 variables): nothing to ingest")
    if "spatial" not in adata.obsm:
        raise InputError(
            f"{where} has no obsm['spatial'] (spot centres in full-resolution pixels); is this a spatial dataset in the scanpy/squidpy Visium layout?"
        )
    spatial = np.asarray(adata.obsm["spatial"])
    if spatial.ndim != 2 or spatial.shape[1] < 2 or not (np.issubdtype(spatial.dtype, np.number) and not np.iscomplexobj(spatial)):
        raise InputError(
            f"{where}: obsm['spatial'] must hold numbers, one row per spot with x and y in full-resolution pixels; it has shape "
            f"{spatial.shape}, dtype {spatial.dtype}"
        )
    xy = spatial[:, :2].astype(np.float64)
    if not np.isfinite(xy).all():
        bad = np.flatnonzero(~np.isfinite(xy).all(axis=1))
        raise InputError(f"{where}: obsm['spatial'] has NaN or infinite spot positions ({len(bad)} spots, e.g. {adata.obs_names[bad[0]]})")
    library, lib = _library(adata, path)
    if not isinstance(lib, dict):
        raise InputError(f"{where}: uns['spatial'][{library!r}] is a {type(lib).__name__}, expected a dict (scalefactors, metadata, images)")
    scalefactors = lib.get("scalefactors", {})
    scalefactors = dict(scalefactors) if isinstance(scalefactors, dict) else {}
    diameter = scale_factor(scalefactors, "spot_diameter_fullres", where=f"{where}: uns['spatial'][{library!r}]['scalefactors']")
    if adata.X is None:
        raise InputError(f"{where} has no X (expression matrix)")
    try:
        X, var_names, is_counts, values_source = expression_matrix(adata, where, log_normalised=log_normalised)
    except InputError as exc:
        if str(exc).startswith(where):
            raise
        raise InputError(f"{where}: {exc}") from exc

    image_ref = _image_ref(path, adata, lib, image, scalefactors)
    rows, cols = array_coordinates(adata.obs)
    size = reference_pixel_size(
        mpp=mpp,
        image_path=image_ref.path,
        image_scale=image_ref.scale,
        xy_px=xy,
        platform=platform,
        array_rows=rows,
        array_cols=cols,
        spot_diameter_px=diameter,
        metadata=metadata,
        where=where,
        diameter_source="uns['spatial'][...]['scalefactors']['spot_diameter_fullres']",
    )

    return SpotSet(
        name=name or path.stem,
        X=X if sp.issparse(X) else np.asarray(X),
        obs_names=np.asarray(adata.obs_names, dtype=str),
        var_names=var_names,
        xy=xy,
        mpp=size.mpp,
        mpp_source=size.source,
        platform=size.platform,
        image=image_ref,
        is_counts=is_counts,
        values_source=values_source,
        spot_diameter_px=diameter,
        source=str(path),
        gene_aliases=gene_aliases(adata.raw.var if values_source == ".raw" else adata.var, var_names),
    )


def _image_ref(path: Path, adata, lib: dict, image: str | Path | None, scalefactors: dict) -> ImageRef:
    if image is not None:
        image = Path(image)
        if not image.exists():
            raise InputError(f"image not found: {image} (given with --image)")
        return ImageRef(path=image)
    metadata = lib.get("metadata", {})
    source = metadata.get("source_image_path") if isinstance(metadata, dict) else None
    if source:
        source_path = Path(str(source))
        if not source_path.is_absolute():
            source_path = path.parent / source_path
        if source_path.exists():
            return ImageRef(path=source_path)
    images = lib.get("images", {})
    hires = images.get("hires") if isinstance(images, dict) else None
    scalef = scale_factor(scalefactors, "tissue_hires_scalef", where=f"{path}: uns['spatial'][...]['scalefactors']")
    if hires is not None and scalef:
        warnings.warn(
            f"{path}: full-resolution image not found"
            f"{f' at {source}' if source else ''}; using the hires image (scale {scalef:.4g}), patches will be blurry. "
            "Pass --image for the full-resolution H&E.",
            LowResolutionImageWarning,
            stacklevel=3,
        )
        array = np.asarray(hires)
        if not (array.ndim in (2, 3) and min(array.shape[:2]) > 0 and (array.ndim == 2 or array.shape[2] in (3, 4)) and np.issubdtype(array.dtype, np.number)):
            raise InputError(
                f"{path}: uns['spatial'][...]['images']['hires'] is not an RGB image (shape {array.shape}, dtype {array.dtype}); pass --image PATH"
            )
        return ImageRef(array=array, scale=float(scalef))
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
