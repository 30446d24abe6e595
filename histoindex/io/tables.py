"""Spot position tables (CSV/Parquet with columns spot, x, y) and h5ad spot lists for ``query --spots``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError


def read_positions(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Spot ids and centres (level-0 slide pixels) from an .h5ad (obs_names, obsm['spatial']) or a
    CSV/Parquet file with columns ``spot, x, y``."""
    import polars as pl

    path = Path(path)
    if not path.exists():
        raise InputError(f"spots file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".h5ad":
        import anndata

        adata = anndata.read_h5ad(path, backed="r")
        try:
            if "spatial" not in adata.obsm:
                raise InputError(f"{path} has no obsm['spatial']")
            return np.asarray(adata.obs_names, dtype=str), np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
        finally:
            adata.file.close()
    try:
        if suffix == ".csv":
            frame = pl.read_csv(path, schema_overrides={"spot": pl.Utf8})
        elif suffix in (".parquet", ".pq"):
            frame = pl.read_parquet(path)
        else:
            raise InputError(f"unsupported spots file {path}: expected .h5ad, .csv or .parquet")
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot read spots file {path}: {exc}") from exc
    missing = [c for c in ("spot", "x", "y") if c not in frame.columns]
    if missing:
        raise InputError(f"spots file {path} lacks column(s) {', '.join(missing)}; expected spot, x, y (slide pixels)")
    ids = frame["spot"].cast(pl.Utf8).to_numpy().astype(str)
    xy = frame.select(pl.col("x").cast(pl.Float64), pl.col("y").cast(pl.Float64)).to_numpy()
    if len(set(ids)) != len(ids):
        raise InputError(f"spots file {path}: spot ids are not unique")
    return ids, xy
