"""Reading back what ``query --out`` wrote (wide Parquet or ``.h5ad``): positions, provenance and the
values of chosen genes, for pictures and for anyone re-using the predictions."""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

#: how each normalisation's values read on a colour bar
UNITS = {"log1p_cp10k": "log1p CP10k"}
_FIXED_COLUMNS = ("slide", "tile_id", "spot", "x", "y", "x_um", "y_um")


@dataclass(frozen=True)
class Predictions:
    """Predictions read back from a ``query --out`` file (Parquet or ``.h5ad``).

    Attributes
    ----------
    path: the file.
    slide: the slide's file name.
    id_column: ``tile_id`` (a tissue grid) or ``spot`` (given positions).
    ids: tile or spot ids, n_obs.
    xy: centres in level-0 slide pixels, n_obs × 2.
    genes: every gene in the file.
    values: expression of the ``loaded`` genes only, n_obs × len(loaded).
    loaded: the genes whose values were read (those asked for), in ``values`` column order.
    provenance: the query's provenance (slide_path, mpp, patch_um, model_id, ...).
    """

    path: Path
    slide: str
    id_column: str
    ids: np.ndarray = field(repr=False)
    xy: np.ndarray = field(repr=False)
    genes: tuple[str, ...] = field(repr=False)
    values: np.ndarray = field(repr=False)
    loaded: tuple[str, ...]
    provenance: dict = field(repr=False)

    @property
    def n_obs(self) -> int:
        return len(self.ids)

    @property
    def is_grid(self) -> bool:
        return self.id_column == "tile_id"

    @property
    def mpp(self) -> float | None:
        return _positive(self.provenance.get("mpp"))

    @property
    def units(self) -> str:
        norm = str(self.provenance.get("normalisation", "log1p_cp10k"))
        return UNITS.get(norm, norm)

    def gene(self, name: str) -> np.ndarray:
        return self.values[:, self.loaded.index(name)]


def _positive(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def check_gene_names(genes: Sequence[str], available: Sequence[str], *, where: str) -> list[str]:
    """``genes`` without repeats, or an InputError naming the unknown ones and a few known ones."""
    genes = list(dict.fromkeys(str(g) for g in genes))
    if not genes:
        raise InputError("name at least one gene to plot (--gene FASN)")
    known = set(available)
    unknown = [g for g in genes if g not in known]
    if unknown:
        lower = {g.lower(): g for g in available}
        hints = []
        for g in unknown:
            close = [lower[g.lower()]] if g.lower() in lower else difflib.get_close_matches(g, list(available), n=2, cutoff=0.6)
            hints += [f"{c} (for {g})" if len(unknown) > 1 else c for c in close]
        hint = f"; did you mean {' or '.join(hints)}?" if hints else "."
        shown = ", ".join(list(available)[:10])
        raise InputError(
            f"gene{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} not in {where}{hint} "
            f"It has {len(available)} genes, e.g. {shown}{', …' if len(available) > 10 else ''}"
        )
    return genes


def read_predictions(path: str | Path, *, genes: Sequence[str]) -> Predictions:
    """Read positions, provenance and the values of ``genes`` from a predictions file written by
    ``query --out`` (wide Parquet or ``.h5ad``)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"predictions file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path, genes)
    if suffix == ".h5ad":
        return _read_h5ad(path, genes)
    raise InputError(f"unsupported predictions file {path}: expected the .parquet or .h5ad written by `histoindex query --out`")


def _read_parquet(path: Path, genes: Sequence[str]) -> Predictions:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:
        raise InputError(f"cannot read {path} as Parquet: {exc}") from exc
    names = schema.names
    id_column = next((c for c in ("tile_id", "spot") if c in names), None)
    missing = [c for c in ("x", "y") if c not in names]
    if id_column is None or missing:
        raise InputError(f"{path} is not a histoindex predictions file: it lacks {', '.join(missing or ['tile_id or spot'])}")
    available = [n for n in names if n not in _FIXED_COLUMNS]
    genes = check_gene_names(genes, available, where=path.name)
    meta = schema.metadata or {}
    provenance = json.loads(meta[b"histoindex"]) if b"histoindex" in meta else {}
    columns = [c for c in ("slide", id_column, "x", "y", "x_um") if c in names] + genes
    table = pq.read_table(path, columns=columns)
    xy = np.stack([table.column("x").to_numpy(), table.column("y").to_numpy()], axis=1).astype(np.float64)
    if _positive(provenance.get("mpp")) is None and "x_um" in names:  # recover the pixel size from the µm columns
        x, x_um = xy[:, 0], table.column("x_um").to_numpy()
        ok = x > 0
        if ok.any():
            provenance["mpp"] = float(np.median(x_um[ok] / x[ok]))
    slide = provenance.get("slide") or (table.column("slide")[0].as_py() if "slide" in names and table.num_rows else path.stem)
    values = np.stack([table.column(g).to_numpy().astype(np.float64) for g in genes], axis=1)
    return Predictions(
        path=path,
        slide=str(slide),
        id_column=id_column,
        ids=np.asarray(table.column(id_column).to_pylist(), dtype=str),
        xy=xy,
        genes=tuple(available),
        values=values,
        loaded=tuple(genes),
        provenance=provenance,
    )


def _read_h5ad(path: Path, genes: Sequence[str]) -> Predictions:
    import anndata
    import scipy.sparse as sp

    try:
        adata = anndata.read_h5ad(path, backed="r")
    except Exception as exc:
        raise InputError(f"cannot read {path} as AnnData .h5ad: {exc}") from exc
    try:
        available = [str(g) for g in adata.var_names]
        genes = check_gene_names(genes, available, where=path.name)
        provenance = {}
        for key, value in dict(adata.uns.get("histoindex", {})).items():
            if isinstance(value, np.generic):
                value = value.item()
            provenance[key] = value
        if "spatial" in adata.obsm:
            xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
        elif {"x_um", "y_um"} <= set(adata.obs.columns) and _positive(provenance.get("mpp")):
            xy = adata.obs[["x_um", "y_um"]].to_numpy(np.float64) / float(provenance["mpp"])
        else:
            raise InputError(f"{path} has no positions: neither obsm['spatial'] nor obs x_um/y_um with a pixel size")
        index = {g: i for i, g in enumerate(available)}
        columns = [index[g] for g in genes]
        order = np.argsort(columns)  # h5py reads need increasing indices
        block = adata.X[:, sorted(columns)]
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        values = np.empty_like(block, dtype=np.float64)
        values[:, order] = block
        ids = np.asarray(adata.obs_names, dtype=str)
        id_column = adata.obs.index.name or ""
        if id_column not in ("tile_id", "spot"):  # tile ids look like r12_c34
            id_column = "tile_id" if all(i.startswith("r") and "_c" in i for i in ids[:50]) else "spot"
        slide = provenance.get("slide") or (str(adata.obs["slide"].iloc[0]) if "slide" in adata.obs and adata.n_obs else path.stem)
    finally:
        adata.file.close()
    return Predictions(
        path=path,
        slide=str(slide),
        id_column=id_column,
        ids=ids,
        xy=xy,
        genes=tuple(available),
        values=values,
        loaded=tuple(genes),
        provenance=provenance,
    )
