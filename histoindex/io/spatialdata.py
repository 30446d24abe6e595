"""SpatialData (scverse) ``.zarr`` stores: predictions written as one, references read from one.

Writing (``query --out x.zarr``): the slide as a multiscale image (a copy whose longer side is at most
:data:`IMAGE_SIDE` pixels, with a Scale transformation onto level 0), the tiles as squares (or the
``--spots`` positions as circles of the window they were predicted from) in the slide's level-0 pixel
coordinate system ``global``, and the predictions as an AnnData table annotating those shapes
(``region`` / ``instance_id``), the query's provenance in ``table.uns['histoindex']``. So
``spatialdata-plot`` and napari-spatialdata colour the shapes by any gene over the slide as they are.

Reading (``ingest sample.zarr``): the table, the shapes it annotates (circles: centres and radius;
polygons: centroids) and the finest image that shares a coordinate system with them; spot centres are
mapped into that image's pixels through the coordinate transformations. The pixel size comes from a
transformation to a coordinate system named in micrometres (``um``, ``micron``, ``microns``,
``micrometer(s)``, ``micrometre(s)``, or ending in ``_um``) when there is one, else from the usual
rules (:mod:`histoindex.io.pixelsize`: spot pitch, then the circles' diameter).

spatialdata is imported inside the functions: it is an optional extra (``pip install
histoindex[spatialdata]``) and slow to import.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np

from ..data import ImageRef, SpotSet
from ..errors import InputError, LowResolutionImageWarning
from ._guard import reader
from .geometry import cell_um

#: the slide copy in a ``query --out x.zarr``: longer side at most this many pixels (level 0 if the
#: slide is smaller), then halved per pyramid level down to about :data:`PYRAMID_FLOOR` pixels
IMAGE_SIDE = 4096
PYRAMID_FLOOR = 512
#: the names of the elements a ``query --out x.zarr`` writes
IMAGE_NAME, TABLE_NAME, COORDINATE_SYSTEM = "slide", "table", "global"
REGION_KEY, INSTANCE_KEY = "region", "instance_id"
#: files at the top of a Zarr group (v2: .zgroup/.zattrs, v3: zarr.json)
ZARR_MARKERS = ("zarr.json", ".zgroup", ".zattrs")
MICRON_NAMES = {"um", "µm", "micron", "microns", "micrometer", "micrometers", "micrometre", "micrometres"}


def _need_spatialdata(purpose: str):
    try:
        import spatialdata
    except ImportError as exc:
        raise InputError(f"{purpose} needs the spatialdata package: pip install 'histoindex[spatialdata]'") from exc
    return spatialdata


def is_zarr_store(path: str | Path) -> bool:
    """A folder that is a Zarr group (what SpatialData writes)."""
    path = Path(path)
    return path.is_dir() and any((path / marker).is_file() for marker in ZARR_MARKERS)


def check_zarr_target(path: Path) -> None:
    """Before any work: spatialdata is installed, and an existing ``--out x.zarr`` is replaced only when
    it is a Zarr store (never a user's folder)."""
    import importlib.util

    if importlib.util.find_spec("spatialdata") is None:
        raise InputError(f"--out {path}: writing SpatialData needs the spatialdata package: pip install 'histoindex[spatialdata]'")
    if path.exists() and not is_zarr_store(path):
        raise InputError(f"--out {path}: exists and is not a Zarr store; it is not replaced (choose another name or remove it)")


# ---------------------------------------------------------------------------------------------
# writing


def write_spatialdata(
    path: str | Path,
    *,
    ids: np.ndarray,
    xy: np.ndarray,
    values: np.ndarray,
    genes: list[str],
    id_column: str,
    slide: str,
    mpp: float,
    provenance: dict,
    metadata: dict | None = None,
    image_side: int | None = IMAGE_SIDE,
) -> Path:
    """Write predictions as a SpatialData ``.zarr`` (see the module docstring). ``image_side=None``
    copies the slide at full resolution. The store is written beside ``path`` and moved into place
    when complete; an existing store at ``path`` is replaced."""
    _need_spatialdata(f"--out {path}")
    import anndata
    import pandas as pd
    import spatialdata as sd
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity

    path = Path(path)
    check_zarr_target(path)
    ids, xy, values = np.asarray(ids).astype(str), np.asarray(xy, np.float64).reshape(-1, 2), np.asarray(values, np.float32)
    n = len(ids)
    shapes_name = "spots" if id_column == "spot" else "tiles"
    # spots: the window each prediction comes from; tiles: the grid cell each stands for (its stride)
    half = (float(provenance.get("patch_um", 0.0)) if shapes_name == "spots" else cell_um(provenance)) / mpp / 2
    index = pd.RangeIndex(n, name=INSTANCE_KEY)
    to_global = {COORDINATE_SYSTEM: Identity()}
    if shapes_name == "spots":  # measured positions: circles of the window they were predicted from
        shapes = ShapesModel.parse(xy, geometry=0, radius=np.full(n, half), index=index, transformations=to_global)
    else:  # tiles: their squares
        import geopandas as gpd
        import shapely

        squares = shapely.box(xy[:, 0] - half, xy[:, 1] - half, xy[:, 0] + half, xy[:, 1] + half)
        shapes = ShapesModel.parse(gpd.GeoDataFrame(geometry=squares, index=index), transformations=to_global)

    obs = pd.DataFrame(
        {
            id_column: ids,
            "slide": slide,
            **(metadata or {}),
            "x": xy[:, 0],
            "y": xy[:, 1],
            "x_um": xy[:, 0] * mpp,
            "y_um": xy[:, 1] * mpp,
            REGION_KEY: pd.Categorical([shapes_name] * n),
            INSTANCE_KEY: np.arange(n),
        },
        index=pd.Index(ids, name=None),
    )
    adata = anndata.AnnData(X=values, obs=obs, var=pd.DataFrame(index=pd.Index(list(genes), name="gene")))
    adata.obsm["spatial"] = xy
    adata.uns["histoindex"] = {
        k: (v if isinstance(v, (int, float, str)) and not isinstance(v, bool) else json.dumps(v, default=str)) for k, v in provenance.items()
    }
    table = TableModel.parse(adata, region=shapes_name, region_key=REGION_KEY, instance_key=INSTANCE_KEY)

    images = {}
    source = str(provenance.get("slide_path", ""))
    if source and Path(source).exists():
        images[IMAGE_NAME] = _slide_image(source, mpp=mpp, image_side=image_side)
    sdata = sd.SpatialData(images=images, shapes={shapes_name: shapes}, tables={TABLE_NAME: table})

    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    old = path.with_name(f".{path.stem}.old{path.suffix}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*autosharding.*")  # zarr's notice of a future default
            sdata.write(tmp)
        if path.exists():  # replace: the old store goes only once the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            path.replace(old)
            tmp.replace(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.replace(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _slide_image(source: str, *, mpp: float, image_side: int | None):
    """The slide as a multiscale image: level 0 or a copy whose longer side is ``image_side``, a
    pyramid halving it down to about :data:`PYRAMID_FLOOR` px, and a Scale onto level-0 pixels."""
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    from .slides import ArraySlide, open_slide

    slide = open_slide(source, mpp=mpp)
    try:
        longest = max(slide.width, slide.height)
        if image_side is None or longest <= image_side:
            image = slide.array if isinstance(slide, ArraySlide) else slide.read_region(0, 0, longest, longest)[: slide.height, : slide.width]
        else:
            image = slide.thumbnail(image_side)
        width, height = slide.width, slide.height
    finally:
        slide.close()
    h, w = image.shape[:2]
    factors, side = [], max(h, w)
    while side / 2 >= PYRAMID_FLOOR:
        factors.append(2)
        side /= 2
    scale = Scale([height / h, width / w], axes=("y", "x"))
    return Image2DModel.parse(
        np.ascontiguousarray(image[..., :3]),
        dims=("y", "x", "c"),
        c_coords=["r", "g", "b"],
        scale_factors=factors or None,
        chunks=(3, 1024, 1024),
        transformations={COORDINATE_SYSTEM: scale},
    )


# ---------------------------------------------------------------------------------------------
# reading


def _affine(transformation) -> np.ndarray:
    """A transformation's 3×3 affine on (x, y, 1)."""
    return np.asarray(transformation.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), np.float64)


def _apply(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ matrix[:2, :2].T + matrix[:2, 2]


def _linear_scale(matrix: np.ndarray) -> float:
    return float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))


def _is_micron_system(name: str) -> bool:
    lowered = name.lower()
    return lowered in MICRON_NAMES or lowered.endswith(("_um", "_µm", "_micron", "_microns"))


def _annotated_shapes(sdata, path: Path) -> tuple[str, str, object]:
    """(table name, shapes name, table) of the table annotating a shapes element, preferring circles."""
    pairs = []
    for table_name, table in sdata.tables.items():
        attrs = table.uns.get("spatialdata_attrs", {})
        regions = attrs.get("region")
        regions = [regions] if isinstance(regions, str) else list(regions or [])
        pairs += [(table_name, region, table) for region in regions if region in sdata.shapes]
    if not pairs:
        tables = ", ".join(sdata.tables) or "none"
        shapes = ", ".join(sdata.shapes) or "none"
        raise InputError(
            f"{path}: no table annotates a shapes element (tables: {tables}; shapes: {shapes}); a reference needs the spots' expression table linked to their shapes"
        )
    circles = [p for p in pairs if "radius" in sdata.shapes[p[1]].columns]
    pairs = circles or pairs
    if len(pairs) > 1:
        found = ", ".join(f"{t} → {s}" for t, s, _ in pairs)
        raise InputError(f"{path}: several tables/shapes could be the spots ({found}); keep one (spatialdata's sdata.subset) and write it out")
    return pairs[0]


@reader("a SpatialData .zarr")
def read_spatialdata(
    path: str | Path,
    *,
    image: str | Path | None = None,
    platform: str | None = None,
    name: str | None = None,
    mpp: float | None = None,
    log_normalised: bool = False,
) -> SpotSet:
    """Read a SpatialData ``.zarr`` reference into a SpotSet (see the module docstring).

    With ``image`` (``--image``), the shapes' own coordinates must be that image's pixels, as
    spatialdata-io's Visium reader writes them (full-resolution pixels) when it was given no
    full-resolution image; without it, the finest image in the store is used."""
    _need_spatialdata(f"reading {path}")
    import scipy.sparse as sp
    import spatialdata as sd
    from spatialdata.transformations import get_transformation

    from .h5ad import array_coordinates, expression_matrix, gene_aliases
    from .pixelsize import PixelSize, reference_pixel_size

    path = Path(path)
    where = str(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # spatialdata's notices about formats and versions
        sdata = sd.read_zarr(path)
    table_name, shapes_name, table = _annotated_shapes(sdata, path)
    attrs = table.uns["spatialdata_attrs"]
    region_key, instance_key = attrs["region_key"], attrs["instance_key"]
    rows = np.asarray(table.obs[region_key].astype(str) == shapes_name)
    table = table[rows]
    shapes = sdata.shapes[shapes_name]
    instances = table.obs[instance_key].to_numpy()
    missing = ~np.isin(instances, shapes.index.to_numpy())
    if missing.any():
        raise InputError(
            f"{where}: {int(missing.sum())} rows of table {table_name!r} have no shape in {shapes_name!r} (e.g. {instance_key} {instances[missing][0]!r})"
        )
    shapes = shapes.loc[instances]
    geometry = shapes.geometry
    circles = "radius" in shapes.columns
    if circles:
        centres = np.column_stack([geometry.x.to_numpy(), geometry.y.to_numpy()])
        radius = shapes["radius"].to_numpy(np.float64)
    else:  # polygons (cells, bins): their centroids
        centroid = geometry.centroid
        centres = np.column_stack([centroid.x.to_numpy(), centroid.y.to_numpy()])
        radius = None
    shapes_to = get_transformation(sdata.shapes[shapes_name], get_all=True)

    size: PixelSize | None = None
    if image is not None:  # the shapes' own coordinates are this image's pixels
        image = Path(image)
        if not image.exists():
            raise InputError(f"image not found: {image} (given with --image)")
        image_ref, xy, px_per_unit = ImageRef(path=image), centres, 1.0
        microns = [cs for cs in shapes_to if _is_micron_system(cs)]
        if microns:
            size = PixelSize(_linear_scale(_affine(shapes_to[microns[0]])), f"coordinate transformation of shapes {shapes_name!r} to {microns[0]!r}")
    else:
        image_name, system, to_image = _finest_image(sdata, shapes_to, path)
        matrix = np.linalg.inv(_affine(get_transformation(sdata.images[image_name], to_coordinate_system=system))) @ to_image
        xy, px_per_unit = _apply(matrix, centres), _linear_scale(matrix)
        if px_per_unit < 1 / 1.5:
            warnings.warn(
                f"{where}: the finest image, {image_name!r}, has {1 / px_per_unit:.3g}× coarser pixels than the spot coordinates (a downscaled "
                "copy such as Space Ranger's hires image?); patches will be blurry. Pass --image with the full-resolution H&E.",
                LowResolutionImageWarning,
                stacklevel=3,
            )
        image_ref = ImageRef(array=_image_array(sdata.images[image_name], where=f"{where}: image {image_name!r}"))
        image_to = get_transformation(sdata.images[image_name], get_all=True)
        microns = [cs for cs in image_to if _is_micron_system(cs)]
        if microns:
            size = PixelSize(_linear_scale(_affine(image_to[microns[0]])), f"coordinate transformation of image {image_name!r} to {microns[0]!r}")
    diameter = 2 * float(np.median(radius)) * px_per_unit if radius is not None and len(radius) else None
    array_rows, array_cols = array_coordinates(table.obs)
    size = reference_pixel_size(
        mpp=mpp,
        image_path=image_ref.path,
        image_scale=1.0,
        xy_px=xy,
        platform=platform,
        array_rows=array_rows,
        array_cols=array_cols,
        spot_diameter_px=diameter,
        metadata=size,  # the transformation to micrometres, cross-checked with the spot layout
        where=where,
        diameter_source=f"2 × the radius of shapes {shapes_name!r} (spot_diameter_fullres)",
    )
    X, var_names, is_counts, values_source = expression_matrix(table, f"{where}: table {table_name!r}", log_normalised=log_normalised)
    return SpotSet(
        name=name or path.stem,
        X=X if sp.issparse(X) else np.asarray(X),
        obs_names=np.asarray(table.obs_names, dtype=str),
        var_names=var_names,
        gene_aliases=gene_aliases(table.raw.var if values_source == ".raw" else table.var, var_names),
        xy=np.asarray(xy, np.float64),
        mpp=size.mpp,
        mpp_source=size.source,
        platform=size.platform,
        image=image_ref,
        is_counts=is_counts,
        values_source=f"table {table_name!r} {values_source}",
        spot_diameter_px=diameter,
        source=where,
    )


def _finest_image(sdata, shapes_to: dict, path: Path) -> tuple[str, str, np.ndarray]:
    """The image with the smallest pixels (in the shapes' units) among those sharing a coordinate
    system with the shapes: (its name, the shared system, the shapes' affine to that system)."""
    from spatialdata.transformations import get_transformation

    best = None
    for image_name, element in sdata.images.items():
        image_to = get_transformation(element, get_all=True)
        for system in shapes_to:
            if system not in image_to:
                continue
            to_image = _affine(shapes_to[system])
            pixel = _linear_scale(_affine(image_to[system])) / _linear_scale(to_image)  # image px side in shape units
            if best is None or pixel < best[0]:
                best = (pixel, image_name, system, to_image)
    if best is None:
        found = ", ".join(sdata.images) or "none"
        raise InputError(
            f"{path}: no image shares a coordinate system with the spots (images: {found}); pass --image with the H&E whose pixels the spot coordinates are"
        )
    return best[1], best[2], best[3]


def _image_array(element, *, where: str) -> np.ndarray:
    """Level 0 of an image element as (height, width, channels), uint8 or floats in [0, 1]."""
    if hasattr(element, "children"):  # multiscale: a DataTree of scale0, scale1, ...
        element = next(iter(element["scale0"].ds.data_vars.values()))
    array = element.transpose("y", "x", "c").data
    array = np.asarray(array.compute() if hasattr(array, "compute") else array)
    if array.shape[-1] not in (1, 3, 4):
        raise InputError(f"{where} has {array.shape[-1]} channels; an H&E has 3 (RGB) or 4 (RGBA)")
    if array.shape[-1] == 1:
        array = array[..., 0]
    if np.issubdtype(array.dtype, np.integer) and array.dtype != np.uint8:
        top = float(array.max()) if array.size else 0.0
        array = (array.astype(np.float64) / (np.iinfo(array.dtype).max if top > 255 else 255.0)).clip(0, 1)
    return array
