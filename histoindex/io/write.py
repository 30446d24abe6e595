"""Writing predictions as they stream in: wide Parquet (one column per gene), AnnData .h5ad, or
QuPath-ready GeoJSON (one feature per tile or spot, the genes as its measurements)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import InputError
from .geometry import cell_um

OUTPUT_SUFFIXES = (".parquet", ".h5ad", ".geojson", ".zarr")  # .zarr: SpatialData (io/spatialdata.py)
#: outputs that ``plot`` and ``query --plot`` read back
TABLE_SUFFIXES = (".parquet", ".h5ad")
#: decimals kept for a GeoJSON measurement (log1p values: 1e-4 is far below any model's error)
GEOJSON_DECIMALS = 4


def check_output_path(path: str | Path, suffixes: tuple[str, ...] = OUTPUT_SUFFIXES, *, kind: str = "type") -> Path:
    """Fail before any work when the output's type is unsupported or its folder is missing."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise InputError(f"--out {path}: unsupported {kind}; use {' or '.join(suffixes)}")
    if not path.parent.exists():
        raise InputError(f"--out {path}: folder {path.parent} does not exist")
    if path.suffix.lower() == ".zarr":
        from .spatialdata import check_zarr_target

        check_zarr_target(path)
    return path


def json_values(value):
    """``value`` as JSON's own types, nested containers kept (dicts with string keys, lists,
    str, int, float, bool, None): numpy scalars and arrays as numbers and lists, a non-finite
    float as None, anything else (paths, dates) as its str; never a Python repr of a container."""
    if isinstance(value, dict):
        return {str(k): json_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset, np.ndarray)):
        return [json_values(v) for v in (sorted(value, key=str) if isinstance(value, (set, frozenset)) else value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if value is None or isinstance(value, (str, int)):  # bool is an int
        return value
    return str(value)


class PredictionWriter:
    """Per-tile (or per-spot) predictions written batch by batch: Parquet streams row groups and
    GeoJSON streams features to ``<out>.tmp`` (flat memory); .h5ad (one matrix) collects and writes
    at :meth:`close`. The file appears at ``path`` only when complete; ``provenance`` (model id,
    spots version, filter, k, ...) goes into the Parquet metadata, ``uns['histoindex']`` or the
    GeoJSON FeatureCollection's ``histoindex`` member."""

    def __init__(self, path: str | Path, *, id_column: str, slide: str, mpp: float, genes: list[str], provenance: dict, metadata: dict | None = None):
        self.path = check_output_path(path)
        self.parquet = self.path.suffix.lower() == ".parquet"
        self.geojson = self.path.suffix.lower() == ".geojson"
        self.id_column, self.slide, self.mpp, self.genes = id_column, slide, mpp, list(genes)
        self.provenance = json_values(dict(provenance))  # the same JSON in every format
        # a cohort manifest's columns (patient, site, ...): the same value on every row of the slide
        self.metadata = {str(k): v for k, v in (metadata or {}).items()}
        base = ["slide", id_column, "x", "y", "x_um", "y_um"]
        clash = [g for g in self.genes if g in base]
        if clash:
            raise InputError(f"gene names clash with output columns: {', '.join(clash)}")
        clash = [c for c in self.metadata if c in base or c in self.genes]
        if clash:
            raise InputError(f"manifest columns clash with output columns or gene names: {', '.join(clash)}")
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._writer: pq.ParquetWriter | None = None
        self._tmp = self.path.with_name(self.path.name + (".tmp.h5ad" if self.path.suffix.lower() == ".h5ad" else ".tmp"))
        self._geojson = None  # the open GeoJSON file while features stream in
        self._features = 0
        if self.parquet:
            fields = [pa.field("slide", pa.string()), pa.field(id_column, pa.string())]
            fields += [pa.field(name, pa.float64()) for name in base[2:]]
            fields += [pa.field(name, pa.scalar(value).type if value is not None else pa.string()) for name, value in self.metadata.items()]
            fields += [pa.field(gene, pa.float32()) for gene in self.genes]
            self.schema = pa.schema(fields, metadata={"histoindex": json.dumps(self.provenance)})

    def write(self, ids: np.ndarray, xy: np.ndarray, values: np.ndarray) -> None:
        if self.geojson:
            self._write_features(np.asarray(ids).astype(str), np.asarray(xy, np.float64), np.asarray(values, np.float32))
            return
        if not self.parquet:
            self._parts.append((np.asarray(ids).astype(str), np.asarray(xy, np.float64), np.asarray(values, np.float32)))
            return
        columns = [
            pa.array([self.slide] * len(ids), pa.string()),
            pa.array(np.asarray(ids).astype(str)),
            pa.array(xy[:, 0], pa.float64()),
            pa.array(xy[:, 1], pa.float64()),
            pa.array(xy[:, 0] * self.mpp, pa.float64()),
            pa.array(xy[:, 1] * self.mpp, pa.float64()),
        ]
        columns += [pa.array([value] * len(ids), self.schema.field(name).type) for name, value in self.metadata.items()]
        columns += [pa.array(np.ascontiguousarray(values[:, j], np.float32)) for j in range(values.shape[1])]
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._tmp, self.schema)
        self._writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))

    def close(self) -> Path:
        """Finish the file and move it into place."""
        if self.geojson:
            if self._geojson is None:
                self._open_geojson()
            self._geojson.write("\n]}\n")
            self._geojson.close()
            self._tmp.replace(self.path)
            return self.path
        if self.parquet:
            if self._writer is None:
                self._writer = pq.ParquetWriter(self._tmp, self.schema)
            self._writer.close()
            self._tmp.replace(self.path)
            return self.path
        ids = np.concatenate([p[0] for p in self._parts]) if self._parts else np.zeros(0, str)
        xy = np.concatenate([p[1] for p in self._parts]) if self._parts else np.zeros((0, 2))
        values = np.concatenate([p[2] for p in self._parts]) if self._parts else np.zeros((0, len(self.genes)), np.float32)
        if self.path.suffix.lower() == ".zarr":  # SpatialData: written whole, like .h5ad
            from .spatialdata import write_spatialdata

            table = dict(id_column=self.id_column, slide=self.slide, mpp=self.mpp, provenance=self.provenance, metadata=getattr(self, "metadata", None))
            return write_spatialdata(self.path, ids=ids, xy=xy, values=values, genes=self.genes, **table)
        self._write_h5ad(ids, xy, values)
        return self.path

    def abort(self) -> None:
        """Drop the partial file; whatever was at ``path`` before stays."""
        if self._writer is not None:
            self._writer.close()
        if self._geojson is not None:
            self._geojson.close()
        self._tmp.unlink(missing_ok=True)

    def _write_h5ad(self, ids: np.ndarray, xy: np.ndarray, values: np.ndarray) -> None:
        import anndata
        import pandas as pd

        mpp = self.mpp
        obs = pd.DataFrame({"slide": self.slide, **self.metadata, "x_um": xy[:, 0] * mpp, "y_um": xy[:, 1] * mpp}, index=pd.Index(ids, name=self.id_column))
        adata = anndata.AnnData(X=values, obs=obs, var=pd.DataFrame(index=pd.Index(self.genes, name="gene")))
        adata.obsm["spatial"] = xy
        adata.uns["histoindex"] = {k: (v if isinstance(v, (int, float, str)) else json.dumps(v)) for k, v in self.provenance.items()}
        adata.uns["spatial"] = {Path(self.slide).stem: self._scanpy_spatial(xy)}
        adata.write_h5ad(self._tmp)
        self._tmp.replace(self.path)

    def _scanpy_spatial(self, xy: np.ndarray) -> dict:
        """``uns['spatial'][library]`` as Space Ranger's reader makes it, so ``scanpy.pl.spatial``
        draws the predictions over the slide as it is: ``hires`` (longer side 2,000 px) and
        ``lowres`` (600 px) images cut from the slide, their scale factors to level-0 pixels, and
        the diameter to draw: a tile's cell (the grid's stride: tiles side by side, as many as were
        predicted, however much their windows overlap), or 0.55 × the spacing of given spots (the
        ratio of Visium's and legacy ST's spots to their pitch)."""
        from .slides import open_slide

        source = str(self.provenance.get("slide_path", ""))
        side = cell_um(self.provenance) / self.mpp
        diameter = side
        if self.id_column == "spot" and len(xy) > 1:
            from scipy.spatial import cKDTree

            distance, _ = cKDTree(xy).query(xy, k=2)
            spacing = float(np.median(distance[:, 1]))
            diameter = 0.55 * spacing if spacing > 0 else side
        entry = {"scalefactors": {"spot_diameter_fullres": diameter}, "metadata": {"source_image_path": source}, "images": {}}
        if not source:
            entry["scalefactors"].update(tissue_hires_scalef=1.0, tissue_lowres_scalef=1.0)
            return entry
        slide = open_slide(source, mpp=self.mpp)
        try:
            for name, longest in (("hires", 2000), ("lowres", 600)):
                image = slide.thumbnail(longest)
                entry["images"][name] = image
                entry["scalefactors"][f"tissue_{name}_scalef"] = image.shape[1] / slide.width
        finally:
            slide.close()
        return entry

    # QuPath's GeoJSON import (File > Import objects): a FeatureCollection whose features carry
    # ``properties.objectType`` ("tile", "detection", ...), an optional ``name``, and
    # ``properties.measurements`` as a name → number object; coordinates in level-0 pixels.
    def _open_geojson(self) -> None:
        self._geojson = open(self._tmp, "w", encoding="utf-8")
        head = {
            "type": "FeatureCollection",
            "histoindex": self.provenance,
        }
        self._geojson.write(json.dumps(head)[:-1] + ', "features": [\n')

    def _write_features(self, ids: np.ndarray, xy: np.ndarray, values: np.ndarray) -> None:
        if self._geojson is None:
            self._open_geojson()
        spots = self.id_column == "spot"
        # a spot: the radius of the window it was predicted from; a tile: half its cell (the grid's
        # stride), so the squares tile the plane without overlap however much the windows overlap
        half = (float(self.provenance.get("patch_um", 0.0)) if spots else cell_um(self.provenance)) / self.mpp / 2
        rounded = np.round(values.astype(np.float64), GEOJSON_DECIMALS).tolist()  # NaN (no neighbour measured it): left out, as QuPath reads missing
        lines = []
        for i, (x, y) in enumerate(xy.tolist()):
            if spots:  # a measured position: a point, with the radius of the window it was predicted from
                geometry = {"type": "Point", "coordinates": [x, y]}
                extra = {"radius": half}
            else:  # a tile: the square cell around its centre
                x0, y0, x1, y1 = x - half, y - half, x + half, y + half
                geometry = {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}
                extra = {}
            properties = {
                "objectType": "detection" if spots else "tile",
                "name": ids[i],
                **extra,
                "measurements": {g: v for g, v in zip(self.genes, rounded[i]) if v == v},
            }
            lines.append(json.dumps({"type": "Feature", "geometry": geometry, "properties": properties}))
        if lines:
            self._geojson.write((",\n" if self._features else "") + ",\n".join(lines))
            self._features += len(lines)
