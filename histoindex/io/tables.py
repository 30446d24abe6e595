"""Spot position tables (CSV/Parquet with columns spot, x, y) and h5ad spot lists for ``query --spots``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from ._guard import reader


@reader("a spots file (spot, x, y)")
def read_positions(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Spot ids and centres (level-0 slide pixels) from an .h5ad (obs_names, obsm['spatial']) or a
    CSV/Parquet file with columns ``spot, x, y``."""
    import polars as pl

    path = Path(path)
    if not path.exists():
        raise InputError(f"spots file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".h5ad":
        return _checked(path, *_read_h5ad_positions(path))
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
    try:
        ids = frame["spot"].cast(pl.Utf8).to_numpy().astype(str)
        xy = frame.select(pl.col("x").cast(pl.Float64), pl.col("y").cast(pl.Float64)).to_numpy()
    except Exception as exc:
        raise InputError(f"spots file {path}: columns spot, x, y must be ids and numbers ({exc})") from exc
    if frame["spot"].null_count():
        raise InputError(f"spots file {path}: {frame['spot'].null_count()} spot id(s) are empty")
    return _checked(path, ids, xy)


def _read_h5ad_positions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import anndata

    try:
        adata = anndata.read_h5ad(path, backed="r")
    except Exception as exc:
        raise InputError(f"cannot read spots file {path} as AnnData .h5ad: {exc}") from exc
    try:
        if "spatial" not in adata.obsm:
            raise InputError(f"{path} has no obsm['spatial'] (spot centres in slide pixels)")
        spatial = np.asarray(adata.obsm["spatial"])
        if spatial.ndim != 2 or spatial.shape[1] < 2 or not np.issubdtype(spatial.dtype, np.number):
            raise InputError(f"{path}: obsm['spatial'] must be numbers, one row per spot with x and y; it has shape {spatial.shape}, dtype {spatial.dtype}")
        return np.asarray(adata.obs_names, dtype=str), spatial[:, :2].astype(np.float64)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot read spot positions from {path}: {exc}") from exc
    finally:
        adata.file.close()


def _checked(path: Path, ids: np.ndarray, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(ids) == 0:
        raise InputError(f"spots file {path} holds no spots")
    if xy.shape != (len(ids), 2):
        raise InputError(f"spots file {path}: positions have shape {xy.shape}, expected ({len(ids)}, 2)")
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        raise InputError(f"spots file {path}: {int(bad.sum())} position(s) are missing, NaN or infinite (e.g. spot {ids[np.flatnonzero(bad)[0]]})")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        repeated = [i for i in ids if i in seen or seen.add(i)]
        raise InputError(f"spots file {path}: spot ids repeat (e.g. {', '.join(dict.fromkeys(repeated[:5]))})")
    return ids, xy


def check_positions_on_slide(ids: np.ndarray, xy: np.ndarray, *, width: int, height: int, source: str | Path, slide: str) -> None:
    """Positions for ``query --spots`` must lie on the slide (level-0 pixels)."""
    off = (xy[:, 0] < 0) | (xy[:, 0] > width) | (xy[:, 1] < 0) | (xy[:, 1] > height)
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise InputError(
            f"spots file {source}: {int(off.sum())} of {len(xy)} positions fall outside {slide} ({width}×{height} px), e.g. spot {ids[i]} at "
            f"({xy[i, 0]:.0f}, {xy[i, 1]:.0f}); positions are level-0 pixels of the slide being queried"
        )
