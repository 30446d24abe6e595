"""SpatialData (scverse): `query --out x.zarr` read back with `spatialdata.read_zarr` and drawn with
`spatialdata-plot`; `ingest sample.zarr` reads a store written with spatialdata's own models and gives
what the `.h5ad` reader gives for the same spots."""

from __future__ import annotations

import warnings

import numpy as np
import polars as pl
import pytest

from histoindex.io import open_slide
from histoindex.store import Store

from .conftest import ONE_EPOCH_MODEL, SHARED_DATA, run

VISIUM_H5AD = SHARED_DATA / "visium-mousebrain-crop" / "test_data.h5ad"
VISIUM_IMG = SHARED_DATA / "visium-mousebrain-crop" / "test_img.jpg"


@pytest.fixture(scope="module")
def sd():
    spatialdata = pytest.importorskip("spatialdata", reason="spatialdata is an optional extra (pip install 'histoindex[spatialdata]'); CI installs it")
    return spatialdata


@pytest.fixture(scope="module")
def sdplot(sd):
    pytest.importorskip("spatialdata_plot", reason="spatialdata-plot is an optional extra (pip install 'histoindex[spatialdata]'); CI installs it")
    import matplotlib

    matplotlib.use("Agg")
    import spatialdata_plot

    return spatialdata_plot


def _read(sd, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sd.read_zarr(path)


def test_tile_query_writes_a_spatialdata_store_that_spatialdata_plot_draws(sd, sdplot, store, sections, tmp_path):
    import matplotlib.pyplot as plt
    from PIL import Image
    from spatialdata.transformations import get_transformation

    out, parquet = tmp_path / "grid.zarr", tmp_path / "grid.parquet"
    run("query", sections.heldout_tif, "--tissue", "breast", "--out", out, "--k", "10", "--db", store)
    run("query", sections.heldout_tif, "--tissue", "breast", "--out", parquet, "--k", "10", "--db", store)
    model = Store(store).model()
    genes = list(model.cfg.genes)
    frame = pl.read_parquet(parquet)
    sdata = _read(sd, out)

    # the tiles: one square per prediction, in level-0 pixels ("global" is the slide's level 0)
    tiles = sdata.shapes["tiles"]
    assert len(tiles) == frame.height > 50
    assert get_transformation(tiles, to_coordinate_system="global").to_affine_matrix(("x", "y"), ("x", "y")).tolist() == np.eye(3).tolist()
    bounds = tiles.geometry.bounds.to_numpy()  # minx, miny, maxx, maxy
    slide = open_slide(sections.heldout_tif)
    stride_um = float(sdata.tables["table"].uns["histoindex"]["stride_um"])
    assert 0 < stride_um <= model.cfg.patch_um
    side = stride_um / slide.mpp  # the grid cell each prediction stands for: squares tile the plane
    np.testing.assert_allclose(bounds[:, 2] - bounds[:, 0], side)
    np.testing.assert_allclose(bounds[:, 3] - bounds[:, 1], side)

    # the table annotates the tiles; its values are the predictions
    table = sdata.tables["table"]
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == "tiles" and attrs["region_key"] == "region"
    order = tiles.index.get_indexer(table.obs[attrs["instance_key"]])
    assert (order >= 0).all()
    centres = (bounds[order, :2] + bounds[order, 2:]) / 2
    np.testing.assert_allclose(centres, frame.select("x", "y").to_numpy())
    assert table.obs["tile_id"].tolist() == frame["tile_id"].to_list()
    assert list(table.var_names) == genes
    np.testing.assert_allclose(np.asarray(table.X), frame.select(genes).to_numpy(), atol=1e-6)
    assert table.uns["histoindex"]["model_id"] == model.model_id
    assert table.uns["histoindex"]["patch_um"] == pytest.approx(model.cfg.patch_um)

    # the slide image: a multiscale copy mapped onto level 0
    image = sdata.images["slide"]
    level0 = image["scale0"].ds["image"]
    assert level0.dtype == np.uint8 and level0.sizes["c"] == 3
    scale = get_transformation(image, to_coordinate_system="global").to_affine_matrix(("x", "y"), ("x", "y"))
    assert scale[0, 0] * level0.sizes["x"] == pytest.approx(slide.width)
    assert scale[1, 1] * level0.sizes["y"] == pytest.approx(slide.height)

    # spatialdata-plot colours the tiles by a gene over the slide, as the store is
    gene = genes[0]
    picture = tmp_path / "grid.png"
    figure, axes = plt.subplots(figsize=(4, 4), dpi=80)
    sdata.pl.render_images("slide").pl.render_shapes("tiles", color=gene, table_name="table").pl.show(coordinate_systems="global", ax=axes)
    figure.savefig(picture)
    plt.close(figure)
    pixels = np.asarray(Image.open(picture).convert("RGB"))
    assert picture.stat().st_size > 5_000
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200, "the picture shows the slide and a colour map, not a blank canvas"

    # a second query replaces the store in place (a .zarr is one output, not a cohort folder)
    run("query", sections.heldout_tif, "--tissue", "breast", "--out", out, "--k", "5", "--db", store)
    assert _read(sd, out).tables["table"].uns["histoindex"]["k"] == 5
    assert not list(tmp_path.glob(".grid*"))


def test_spot_query_writes_circles(sd, store, sections, tmp_path):
    import anndata

    out = tmp_path / "spots.zarr"
    run("query", sections.heldout_tif, "--tissue", "breast", "--spots", sections.heldout_h5ad, "--out", out, "--db", store)
    sdata = _read(sd, out)
    spots = sdata.shapes["spots"]
    table = sdata.tables["table"]
    reference = anndata.read_h5ad(sections.heldout_h5ad)
    assert len(spots) == reference.n_obs and table.uns["spatialdata_attrs"]["region"] == "spots"
    assert set(spots.geometry.geom_type) == {"Point"} and (spots["radius"] > 0).all()
    assert table.obs["spot"].tolist() == list(reference.obs_names)
    positions = np.column_stack([spots.geometry.x, spots.geometry.y])[spots.index.get_indexer(table.obs["instance_id"])]
    np.testing.assert_allclose(positions, np.asarray(reference.obsm["spatial"], np.float64)[:, :2])


def test_an_existing_folder_that_is_not_a_zarr_store_is_not_replaced(sd, store, sections, tmp_path):
    out = tmp_path / "mine.zarr"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = run("query", sections.heldout_tif, "--tissue", "breast", "--out", out, "--db", store, ok=False)
    assert result.exit_code != 0 and "is not a Zarr store" in result.output
    assert (out / "notes.txt").read_text() == "keep me"


# ---- reading a SpatialData reference --------------------------------------------------------
def _visium_as_spatialdata(path, *, image_scale: float = 1.0, micron_mpp: float | None = None):
    """The Visium crop as spatialdata-io's Visium reader lays it out: the table (spot_id, region),
    the spots as circles of radius spot_diameter_fullres / 2 in full-resolution pixels, and the H&E,
    here optionally downscaled by ``image_scale`` (with its Scale) or mapped to micrometres."""
    import anndata
    import pandas as pd
    import spatialdata as sd
    from PIL import Image
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    adata = anndata.read_h5ad(VISIUM_H5AD)
    (library,) = adata.uns["spatial"].values()
    radius = float(library["scalefactors"]["spot_diameter_fullres"]) / 2
    n = adata.n_obs
    shapes = ShapesModel.parse(
        np.asarray(adata.obsm["spatial"], np.float64), geometry=0, radius=np.full(n, radius), index=np.arange(n), transformations={"global": Identity()}
    )
    # a second name per gene, as spatialdata-io's Visium reader keeps Space Ranger's Ensembl ids
    var = pd.DataFrame({"gene_ids": [f"ENSMUSG{i:011d}" for i in range(adata.n_vars)]}, index=adata.var_names)
    table = anndata.AnnData(X=adata.X, obs=adata.obs.copy(), var=var)
    table.obs["region"] = pd.Categorical(["spots"] * n)
    table.obs["spot_id"] = np.arange(n)
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="spot_id")
    picture = Image.open(VISIUM_IMG).convert("RGB")
    if image_scale != 1.0:
        picture = picture.resize((round(picture.width / image_scale), round(picture.height / image_scale)), Image.BILINEAR)
    to = {"global": Scale([image_scale, image_scale], axes=("y", "x")) if image_scale != 1.0 else Identity()}
    if micron_mpp is not None:
        to["um"] = Scale([micron_mpp * image_scale] * 2, axes=("y", "x"))
    image = Image2DModel.parse(np.asarray(picture), dims=("y", "x", "c"), transformations=to)
    sdata = sd.SpatialData(images={"he": image}, shapes={"spots": shapes}, tables={"table": table})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata.write(path)
    return path


@pytest.fixture
def visium_crop(sd, shared_data):
    if not (VISIUM_H5AD.exists() and VISIUM_IMG.exists()):
        pytest.skip(f"real test data not found: {VISIUM_H5AD.parent}")
    from histoindex import api

    return api.read_reference(VISIUM_H5AD, image=VISIUM_IMG, platform="visium", log_normalised=True)


def _dense(X) -> np.ndarray:
    return np.asarray(X.todense() if hasattr(X, "todense") else X)


def test_a_spatialdata_reference_reads_as_its_h5ad(visium_crop, tmp_path):
    from PIL import Image

    from histoindex import api
    from histoindex.errors import LowResolutionImageWarning

    ref = api.read_reference(_visium_as_spatialdata(tmp_path / "crop.zarr"), platform="visium", log_normalised=True)
    h5ad = visium_crop
    assert ref.n_obs == h5ad.n_obs == 49
    assert list(ref.obs_names) == list(h5ad.obs_names) and list(ref.var_names) == list(h5ad.var_names)
    np.testing.assert_allclose(ref.xy, h5ad.xy)
    np.testing.assert_allclose(_dense(ref.X), _dense(h5ad.X))
    assert ref.mpp == pytest.approx(h5ad.mpp) and ref.mpp_source == h5ad.mpp_source  # the spot pitch, as for the .h5ad
    assert ref.spot_diameter_px == pytest.approx(h5ad.spot_diameter_px)
    assert list(ref.gene_aliases[:2]) == ["ENSMUSG00000000000", "ENSMUSG00000000001"]  # genes also match on their Ensembl ids
    with Image.open(VISIUM_IMG) as picture:
        assert ref.image.array.shape[:2] == (picture.height, picture.width)  # the image in the store, read whole

    # a transformation to micrometres gives the pixel size, whatever the spots' spacing says
    ref = api.read_reference(_visium_as_spatialdata(tmp_path / "um.zarr", micron_mpp=0.5), platform="visium", log_normalised=True)
    assert ref.mpp == pytest.approx(0.5) and "coordinate transformation" in ref.mpp_source

    # a downscaled image: the spots are mapped into its pixels through the transformations
    with pytest.warns(LowResolutionImageWarning, match="coarser pixels"):
        ref = api.read_reference(_visium_as_spatialdata(tmp_path / "half.zarr", image_scale=2.0), platform="visium", log_normalised=True)
    np.testing.assert_allclose(ref.xy, h5ad.xy / 2)
    assert ref.mpp == pytest.approx(2 * h5ad.mpp)
    # --image: the shapes' own coordinates are that image's pixels
    ref = api.read_reference(tmp_path / "half.zarr", image=VISIUM_IMG, platform="visium", log_normalised=True)
    np.testing.assert_allclose(ref.xy, h5ad.xy)
    assert ref.image.path == VISIUM_IMG and ref.mpp == pytest.approx(h5ad.mpp)


def test_ingest_reads_a_spatialdata_zarr(visium_crop, tmp_path):
    zarr = _visium_as_spatialdata(tmp_path / "brain.zarr")
    db = tmp_path / "db"
    result = run("ingest", zarr, "--log-normalised", "--tissue", "brain", "--species", "mouse", "--db", db, *ONE_EPOCH_MODEL)
    assert "brain: 49 spots" in result.output
