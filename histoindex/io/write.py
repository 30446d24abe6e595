"""Writing predictions: wide Parquet (one column per gene) or AnnData .h5ad."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import InputError

OUTPUT_SUFFIXES = (".parquet", ".h5ad")


def check_output_path(path: str | Path, suffixes: tuple[str, ...] = OUTPUT_SUFFIXES, *, kind: str = "type") -> Path:
    """Fail before any work when the output's type is unsupported or its folder is missing."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise InputError(f"--out {path}: unsupported {kind}; use {' or '.join(suffixes)}")
    if not path.parent.exists():
        raise InputError(f"--out {path}: folder {path.parent} does not exist")
    return path


def write_predictions(
    path: str | Path,
    *,
    ids: np.ndarray,
    id_column: str,
    slide: str,
    xy: np.ndarray,
    mpp: float,
    genes: list[str],
    values: np.ndarray,
    provenance: dict,
) -> Path:
    """Write per-tile (or per-spot) predictions; ``provenance`` (model id, spots version, filter,
    k, ...) goes into the Parquet metadata or ``uns['histoindex']``."""
    path = check_output_path(path)
    if path.suffix.lower() == ".parquet":
        columns = {
            "slide": pa.array([slide] * len(ids)),
            id_column: pa.array(ids.astype(str)),
            "x": pa.array(xy[:, 0]),
            "y": pa.array(xy[:, 1]),
            "x_um": pa.array(xy[:, 0] * mpp),
            "y_um": pa.array(xy[:, 1] * mpp),
        }
        clash = [g for g in genes if g in columns]
        if clash:
            raise InputError(f"gene names clash with output columns: {', '.join(clash)}")
        for j, gene in enumerate(genes):
            columns[gene] = pa.array(np.ascontiguousarray(values[:, j]))
        table = pa.table(columns)
        table = table.replace_schema_metadata({"histoindex": json.dumps(provenance, default=str)})
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
        return path

    import anndata
    import pandas as pd

    obs = pd.DataFrame({"slide": slide, "x_um": xy[:, 0] * mpp, "y_um": xy[:, 1] * mpp}, index=pd.Index(ids.astype(str), name=id_column))
    adata = anndata.AnnData(X=values.astype(np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(genes, name="gene")))
    adata.obsm["spatial"] = xy.astype(np.float64)
    adata.uns["histoindex"] = {k: (v if isinstance(v, (int, float, str)) else json.dumps(v, default=str)) for k, v in provenance.items()}
    library = Path(slide).stem
    adata.uns["spatial"] = {library: {"scalefactors": {"tissue_hires_scalef": 1.0}, "metadata": {"source_image_path": str(provenance.get("slide_path", ""))}, "images": {}}}
    tmp = path.with_name(path.name + ".tmp.h5ad")
    adata.write_h5ad(tmp)
    tmp.replace(path)
    return path
