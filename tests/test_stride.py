"""`query --stride-um`: predictions on a grid finer than the model's patch (overlapping windows of the
patch size centred every stride µm), its default (the references' spot pitch), its provenance and
geometry in every output, and clear errors for strides that make no sense."""

from __future__ import annotations

import json
import re

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from histoindex.io import open_slide
from histoindex.patch import default_stride_um, tile_grid, tissue_mask
from histoindex.store import Store
from histoindex.synthetic import make_section, write_section

from .conftest import error_line, run

PATCH_UM = 110.0  # conftest.TRAIN_ARGS


def _query(store, slide, out, *options):
    return run("query", slide, "--tissue", "breast", "--k", "10", "--precision", "fp32", "--out", out, "--db", store, *options)


def _provenance(parquet) -> dict:
    return json.loads(pq.read_schema(parquet).metadata[b"histoindex"])


@pytest.fixture(scope="module")
def tissue_px(sections) -> float:
    """Tissue area of the held-out slide, level-0 pixels² (the mask tile_grid uses)."""
    slide = open_slide(sections.heldout_tif)
    try:
        return float(tissue_mask(slide.thumbnail(2048)).mean() * slide.width * slide.height)
    finally:
        slide.close()


def test_a_finer_stride_overlaps_windows_on_a_finer_grid_and_keeps_the_coarse_tiles_predictions(store, sections, tmp_path, tissue_px):
    coarse, fine = tmp_path / "coarse.parquet", tmp_path / "fine.parquet"
    # --smooth 0: a window's own prediction (smoothing blends it with its grid neighbours', which differ by grid)
    _query(store, sections.heldout_tif, coarse, "--stride-um", PATCH_UM, "--smooth", "0")
    result = _query(store, sections.heldout_tif, fine, "--stride-um", "55", "--smooth", "0")
    assert "centred every 55 µm (--stride-um)" in result.output
    a, b = pl.read_parquet(coarse), pl.read_parquet(fine)
    mpp = _provenance(fine)["mpp"]
    assert _provenance(fine)["stride_um"] == 55.0 and _provenance(coarse)["stride_um"] == PATCH_UM
    assert _provenance(fine)["patch_um"] == PATCH_UM, "each window is still the model's patch"

    # centres on a grid of pitch 55 µm, level-0 pixels; ids name the row and column on that grid
    step = 55.0 / mpp
    for column in ("x", "y"):
        centres = np.unique(b[column].to_numpy())
        np.testing.assert_allclose(np.diff(centres) / step, np.round(np.diff(centres) / step), atol=1e-6)
        assert np.diff(centres).min() == pytest.approx(step)
    rows_cols = np.array([[int(v) for v in re.fullmatch(r"r(\d+)_c(\d+)", i).groups()] for i in b["tile_id"]])
    margin = (PATCH_UM - 55.0) / mpp / 2  # the first window starts at the slide's edge
    np.testing.assert_allclose(b.select("y", "x").to_numpy(), margin + (rows_cols + 0.5) * step)
    assert b["tile_id"].is_unique().all()

    # about one window per stride² of tissue (and about 4× the tiles of the coarse grid)
    for frame, stride in ((a, PATCH_UM), (b, 55.0)):
        expected = tissue_px / (stride / mpp) ** 2
        assert abs(frame.height - expected) < 0.15 * expected, (frame.height, expected, stride)
    assert 3.5 < b.height / a.height < 4.5

    # the same window gives the same embedding, so the same prediction: a coarse tile's centre is
    # on the fine grid (55 divides 110), as r{2i}_c{2j}
    genes = list(Store(store).model().cfg.genes)
    joined = a.join(b, on=["x", "y"], suffix="_fine")
    assert joined.height >= 0.9 * a.height
    expected_ids = [f"r{2 * int(r)}_c{2 * int(c)}" for r, c in (re.fullmatch(r"r(\d+)_c(\d+)", i).groups() for i in joined["tile_id"])]
    assert joined["tile_id_fine"].to_list() == expected_ids
    np.testing.assert_allclose(joined.select(genes).to_numpy(), joined.select([f"{g}_fine" for g in genes]).to_numpy(), rtol=1e-4, atol=1e-5)


def test_stride_equal_to_the_patch_is_the_grid_of_tiles_side_by_side(sections):
    slide = open_slide(sections.heldout_tif)
    try:
        tiles, same = tile_grid(slide, tile_um=PATCH_UM), tile_grid(slide, tile_um=PATCH_UM, stride_um=PATCH_UM)
        side = PATCH_UM / slide.mpp
    finally:
        slide.close()
    assert (tiles.ids == same.ids).all() and (tiles.xy == same.xy).all()
    rows_cols = np.array([[int(v) for v in re.fullmatch(r"r(\d+)_c(\d+)", i).groups()] for i in tiles.ids])
    np.testing.assert_allclose(tiles.xy[:, ::-1], (rows_cols + 0.5) * side)


def test_outputs_draw_each_tile_as_its_stride_cell(store, sections, tmp_path):
    geo, h5ad = tmp_path / "fine.geojson", tmp_path / "fine.h5ad"
    for out in (geo, h5ad):
        _query(store, sections.heldout_tif, out, "--stride-um", "55")
    collection = json.loads(geo.read_text())
    assert collection["histoindex"]["stride_um"] == 55.0
    cell = 55.0 / collection["histoindex"]["mpp"]
    rings = np.array([f["geometry"]["coordinates"][0] for f in collection["features"]])
    np.testing.assert_allclose(rings[:, 2] - rings[:, 0], cell)  # squares of the stride: neighbours touch, never overlap
    import anndata

    adata = anndata.read_h5ad(h5ad)
    assert [f["properties"]["name"] for f in collection["features"]] == adata.obs_names.to_list()
    np.testing.assert_allclose(rings[:, :4].mean(axis=1), adata.obsm["spatial"])
    assert adata.uns["histoindex"]["stride_um"] == 55.0
    (library,) = adata.uns["spatial"]
    assert adata.uns["spatial"][library]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(cell)

    from matplotlib.collections import PolyCollection

    from histoindex.plot import render_predictions

    gene = Store(store).model().cfg.genes[0]
    figure = render_predictions(h5ad, genes=[gene])
    (marks,) = [c for c in figure.axes[0].collections if isinstance(c, PolyCollection)]
    sides = np.array([np.ptp(path.vertices[:4, 0]) for path in marks.get_paths()])
    assert len(sides) == adata.n_obs
    np.testing.assert_allclose(sides, cell)
    assert "every 55 µm" in figure.get_suptitle()


def test_the_default_stride_is_the_spot_pitch_of_one_platform_else_the_patch(store, sections, tmp_path):
    out = tmp_path / "default.parquet"
    result = _query(store, sections.heldout_tif, out)  # the store's references are Visium
    assert "centred every 100 µm (the visium spot pitch)" in result.output
    assert _provenance(out)["stride_um"] == 100.0

    st_h5ad, _ = write_section(  # a legacy-ST reference: a square 200 µm lattice (--platform st must match it)
        make_section(seed=3, size_px=2600, spot_spacing_um=200.0, spot_diameter_um=100.0, lattice="square"), tmp_path / "st", name="syn-st"
    )
    run("ingest", st_h5ad, "--tissue", "breast", "--platform", "st", "--dataset", "other", "--db", store)
    mixed = _query(store, sections.heldout_tif, out)
    assert "centred every 100 µm (the default's 100 µm limit: the references mix platforms (st, visium); --stride-um sets another)" in mixed.output
    assert _provenance(out)["stride_um"] == 100.0  # the 110 µm patch, at most 100 µm
    _query(store, sections.heldout_tif, out, "--platform", "visium")
    assert _provenance(out)["stride_um"] == 100.0
    st = _query(store, sections.heldout_tif, out, "--platform", "st")  # ST's 200 µm pitch: too coarse a map
    assert "centred every 100 µm (the default's 100 µm limit: the st spot pitch, 200 µm, is not finer; --stride-um sets another)" in st.output
    assert _provenance(out)["stride_um"] == 100.0


def test_default_stride_rule():
    assert default_stride_um(["visium"], 224.0) == (100.0, "the visium spot pitch")
    assert default_stride_um(["Visium", "visium "], 224.0)[0] == 100.0
    # legacy ST's 200 µm pitch would map a 1.5 mm section in a handful of tiles: at most 100 µm
    assert default_stride_um(["st"], 224.0) == (100.0, "the default's 100 µm limit: the st spot pitch, 200 µm, is not finer; --stride-um sets another")
    assert default_stride_um(["st"], 112.0)[0] == 100.0
    assert default_stride_um(["st"], 80.0) == (80.0, "the patch size: the st spot pitch, 200 µm, is not finer")
    assert default_stride_um(["visium"], 64.0) == (64.0, "the patch size: the visium spot pitch, 100 µm, is not finer")
    assert default_stride_um(["visium", "st"], 224.0)[0] == 100.0
    assert default_stride_um(["xenium"], 224.0)[0] == 100.0
    assert default_stride_um([], 224.0) == (100.0, "the default's 100 µm limit; --stride-um sets another")
    assert default_stride_um([], 64.0) == (64.0, "the patch size")


@pytest.mark.parametrize(
    "value, message",
    [
        ("0", "--stride-um must be a positive number of micrometres, got 0"),
        ("-55", "--stride-um must be a positive number of micrometres, got -55"),
        ("nan", "--stride-um must be a positive number of micrometres, got nan"),
        ("500", "--stride-um 500 is larger than the model's 110 µm patch"),
        ("2", "--stride-um 2 is finer than 1/16 of the model's 110 µm patch"),
    ],
)
def test_bad_strides_fail_before_any_work(store, sections, tmp_path, value, message):
    out = tmp_path / "x.parquet"
    result = run("query", sections.heldout_tif, "--stride-um", value, "--out", out, "--db", store, ok=False)
    error_line(result, message)
    assert not out.exists()


def test_stride_and_spots_are_exclusive(store, sections):
    result = run("query", sections.heldout_tif, "--spots", sections.heldout_h5ad, "--stride-um", "55", "--db", store, ok=False)
    assert result.exit_code != 0
    assert "--stride-um sets the pitch of the tile grid" in result.output
