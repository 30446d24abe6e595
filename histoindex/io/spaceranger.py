"""10x Space Ranger ``outs/`` folder -> SpotSet.

Expected layout (Space Ranger 1.x and ≥ 2.0)::

    outs/
      filtered_feature_bc_matrix.h5      10x HDF5: matrix/{data,indices,indptr,shape,barcodes,features/...}
      spatial/tissue_positions.csv       ≥ 2.0, with a header; or
      spatial/tissue_positions_list.csv  1.x, no header; columns in both: barcode, in_tissue,
                                         array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres
      spatial/scalefactors_json.json     spot_diameter_fullres, tissue_hires_scalef, ...
      spatial/tissue_hires_image.png     a downscaled copy of the H&E

Spots are the barcodes in the matrix that are ``in_tissue == 1``, joined to the positions by
barcode. Only ``Gene Expression`` features are kept; repeated gene symbols are made unique the
way anndata's ``var_names_make_unique`` does (``X``, ``X-1``, ...). Space Ranger does not keep the
full-resolution H&E: pass it as ``image=``, else the hires PNG is used (with a warning).
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data import ImageRef, SpotSet
from ..errors import InputError, LowResolutionImageWarning
from ._guard import reader
from .h5ad import looks_like_counts
from .pixelsize import reference_pixel_size, scale_factor

MATRIX_FILE = "filtered_feature_bc_matrix.h5"
POSITIONS_V2 = "tissue_positions.csv"
POSITIONS_V1 = "tissue_positions_list.csv"
SCALEFACTORS_FILE = "scalefactors_json.json"
HIRES_IMAGE = "tissue_hires_image.png"
POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
GENE_EXPRESSION = "Gene Expression"


def make_names_unique(names: Iterable[str], join: str = "-") -> np.ndarray:
    """Keep the first occurrence of each name and suffix later ones ``-1``, ``-2``, ... skipping
    suffixed names that already exist (as anndata's ``var_names_make_unique``)."""
    values = np.asarray([str(n) for n in names], dtype=object)
    duplicated = pd.Index(values).duplicated(keep="first")
    if not duplicated.any():
        return values.astype(str)
    taken = set(values)
    counter: Counter[str] = Counter()
    for i in np.flatnonzero(duplicated):
        name = values[i]
        while True:
            counter[name] += 1
            candidate = f"{name}{join}{counter[name]}"
            if candidate not in taken:
                break
        taken.add(candidate)
        values[i] = candidate
    return values.astype(str)


def _outs_folder(path: Path) -> Path:
    if not path.exists():
        raise InputError(f"Space Ranger folder not found: {path}")
    if not path.is_dir():
        raise InputError(f"{path} is not a folder: expected a Space Ranger outs/ folder")
    if not (path / MATRIX_FILE).exists() and (path / "outs" / MATRIX_FILE).exists():
        return path / "outs"  # the run folder rather than its outs/
    return path


def _strings(values: np.ndarray) -> np.ndarray:
    return np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=str)


def read_10x_h5(path: str | Path, *, with_ids: bool = False) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """A 10x feature-barcode HDF5 (Cell Ranger ≥ 3 / Space Ranger layout) as barcodes × genes.

    Returns the CSR matrix (float32), the barcodes and the gene symbols (``Gene Expression``
    features only, made unique); ``with_ids``: also their feature ids (Ensembl), or None.
    """
    import h5py

    path = Path(path)
    if not path.exists():
        raise InputError(
            f"{path} not found: a Space Ranger outs/ folder has {MATRIX_FILE} (the filtered feature-barcode matrix); "
            "pass the outs/ folder of a Space Ranger run"
        )
    try:
        with h5py.File(path, "r") as f:
            if "matrix" not in f:
                raise InputError(
                    f"{path} has no 'matrix' group: not a 10x feature-barcode HDF5 of Space Ranger / Cell Ranger ≥ 3 "
                    f"(groups found: {', '.join(f.keys()) or 'none'})"
                )
            m = f["matrix"]
            needed = ["data", "indices", "indptr", "shape", "barcodes", "features/name"]
            missing = [k for k in needed if k not in m]
            if missing:
                raise InputError(f"{path}: matrix/ lacks {', '.join(missing)}; is this a 10x feature-barcode matrix file?")
            n_features, n_barcodes = (int(v) for v in m["shape"][:2])
            X = sp.csc_matrix(
                (m["data"][:].astype(np.float32), m["indices"][:], m["indptr"][:]), shape=(n_features, n_barcodes)
            ).T.tocsr()  # stored features × barcodes, column-compressed
            barcodes = _strings(m["barcodes"][:])
            names = _strings(m["features/name"][:])
            ids = _strings(m["features/id"][:]) if "features/id" in m else None
            ids = ids if ids is not None and len(ids) == len(names) else None
            types = _strings(m["features/feature_type"][:]) if "features/feature_type" in m else np.full(n_features, GENE_EXPRESSION)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot read {path} as a 10x HDF5 feature-barcode matrix: {exc}") from exc
    keep = types == GENE_EXPRESSION
    if not keep.any():
        raise InputError(f"{path}: no '{GENE_EXPRESSION}' features (feature types: {', '.join(sorted(set(types)))})")
    if not keep.all():
        X, names = X[:, np.flatnonzero(keep)], names[keep]
        ids = ids[keep] if ids is not None else None
    if with_ids:
        return X, barcodes, make_names_unique(names), ids
    return X, barcodes, make_names_unique(names)


def read_tissue_positions(spatial: Path) -> pd.DataFrame:
    """The spot positions of a Space Ranger ``spatial/`` folder (v2 with header, or v1 without),
    indexed by barcode."""
    v2, v1 = spatial / POSITIONS_V2, spatial / POSITIONS_V1
    if v2.exists():
        path, header = v2, 0
    elif v1.exists():
        path, header = v1, None
    else:
        raise InputError(
            f"{spatial}: no spot positions: neither {POSITIONS_V2} (Space Ranger ≥ 2.0) nor {POSITIONS_V1} (1.x) exists; "
            "pass the outs/ folder of a Space Ranger run with its spatial/ subfolder"
        )
    try:
        table = pd.read_csv(path, header=header, dtype={0: str} if header is None else {"barcode": str})
    except Exception as exc:
        raise InputError(f"cannot read {path} as CSV: {exc}") from exc
    if header is None:
        if table.shape[1] < len(POSITION_COLUMNS):
            raise InputError(f"{path} has {table.shape[1]} columns, expected {len(POSITION_COLUMNS)}: {', '.join(POSITION_COLUMNS)}")
        table = table.iloc[:, : len(POSITION_COLUMNS)]
        table.columns = POSITION_COLUMNS
    else:
        missing = [c for c in POSITION_COLUMNS if c not in table.columns]
        if missing:
            raise InputError(f"{path} lacks columns {', '.join(missing)} (its header: {', '.join(map(str, table.columns))})")
    for column in POSITION_COLUMNS[1:]:
        if not pd.api.types.is_numeric_dtype(table[column]) or table[column].isna().any():
            raise InputError(f"{path}: column {column} must be numbers without gaps (found e.g. {table[column].iloc[0]!r})")
    table = table.set_index("barcode")
    if not table.index.is_unique:
        raise InputError(f"{path}: barcodes repeat (e.g. {', '.join(table.index[table.index.duplicated()][:3])})")
    return table


def _scalefactors(spatial: Path) -> dict:
    path = spatial / SCALEFACTORS_FILE
    if not path.exists():
        return {}
    try:
        values = json.loads(path.read_text())
    except Exception as exc:
        raise InputError(f"cannot read {path} as JSON: {exc}") from exc
    if not isinstance(values, dict):
        raise InputError(f"{path} holds a JSON {type(values).__name__}, expected an object of scale factors")
    return values


@reader("a Space Ranger outs/ folder")
def read_spaceranger(
    path: str | Path,
    *,
    image: str | Path | None = None,
    platform: str | None = None,
    name: str | None = None,
    mpp: float | None = None,
) -> SpotSet:
    """Read a Space Ranger ``outs/`` folder into a SpotSet.

    Parameters
    ----------
    path: the ``outs/`` folder (or the run folder holding it).
    image: the full-resolution H&E the positions refer to (Space Ranger does not keep it); without
        it the hires PNG is used, scaled by ``tissue_hires_scalef``, with a warning.
    platform: confirms the platform the spot lattice shows (visium; an error when it contradicts it).
    name: dataset name (default: the folder name, or its parent's when it is called ``outs``).
    mpp: micrometres per full-resolution pixel, overriding every other source.
    """
    given = Path(path)
    outs = _outs_folder(given)
    spatial = outs / "spatial"
    X, barcodes, genes, gene_ids = read_10x_h5(outs / MATRIX_FILE, with_ids=True)
    if not spatial.is_dir():
        raise InputError(f"{outs} has no spatial/ folder (spot positions and scale factors); is this a Space Ranger (not Cell Ranger) run?")
    positions = read_tissue_positions(spatial)

    in_tissue = positions.index[positions["in_tissue"].astype(int) == 1]
    keep = np.flatnonzero(pd.Index(barcodes).isin(in_tissue))  # matrix order, joined on the barcode
    if len(keep) == 0:
        raise InputError(
            f"{outs}: none of the {len(barcodes)} barcodes in {MATRIX_FILE} is an in-tissue spot of "
            f"{spatial / (POSITIONS_V2 if (spatial / POSITIONS_V2).exists() else POSITIONS_V1)}; are they from the same run?"
        )
    barcodes = barcodes[keep]
    X = X[keep]
    rows = positions.loc[barcodes]
    xy = rows[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)

    scalefactors = _scalefactors(spatial)
    diameter = scale_factor(scalefactors, "spot_diameter_fullres", where=str(spatial / SCALEFACTORS_FILE))
    image_ref = _image_ref(spatial, image, scalefactors)
    size = reference_pixel_size(
        mpp=mpp,
        image_path=image_ref.path,
        image_scale=image_ref.scale,
        xy_px=xy,
        platform=platform,
        array_rows=rows["array_row"].to_numpy(np.float64),
        array_cols=rows["array_col"].to_numpy(np.float64),
        spot_diameter_px=diameter,
        where=str(outs),
        diameter_source=f"spot_diameter_fullres in {spatial / SCALEFACTORS_FILE}",
    )

    if name is None:
        name = outs.parent.name if outs.name == "outs" and outs.parent.name else outs.resolve().name
    return SpotSet(
        name=name,
        X=X,
        obs_names=barcodes,
        var_names=genes,
        xy=xy,
        mpp=size.mpp,
        mpp_source=size.source,
        platform=size.platform,
        image=image_ref,
        is_counts=looks_like_counts(X),
        spot_diameter_px=diameter,
        source=str(outs),
        gene_aliases=gene_ids,  # Ensembl ids beside the symbols: a model's genes match either
    )


def _image_ref(spatial: Path, image: str | Path | None, scalefactors: dict) -> ImageRef:
    if image is not None:
        image = Path(image)
        if not image.exists():
            raise InputError(f"image not found: {image} (given with --image)")
        return ImageRef(path=image)
    hires = spatial / HIRES_IMAGE
    scalef = scale_factor(scalefactors, "tissue_hires_scalef", where=str(spatial / SCALEFACTORS_FILE))
    if hires.exists() and scalef:
        warnings.warn(
            f"{spatial.parent}: Space Ranger keeps no full-resolution image; using {hires} (scale {scalef:.4g}), "
            "patches will be blurry. Pass --image for the full-resolution H&E.",
            LowResolutionImageWarning,
            stacklevel=3,
        )
        return ImageRef(path=hires, scale=scalef)
    reason = (
        f"{hires} does not exist" if not hires.exists() else f"{spatial / SCALEFACTORS_FILE} gives no tissue_hires_scalef to place the spots on {hires.name}"
    )
    raise InputError(f"{spatial.parent}: no H&E image: Space Ranger keeps no full-resolution image and {reason}; pass --image PATH")
