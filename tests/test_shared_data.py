"""Tests on the real data in ../shared/data (beside the repo; never copied into it).

Each test skips with a reason when the data is absent (a fresh checkout); CI always has it.
Everything runs through the real readers, a real LanceDB store and the real CLI (click's
CliRunner), on a tiny timm backbone (``test_resnet``) so the whole file stays fast on CPU.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from .conftest import ONE_EPOCH_MODEL

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]

SVS = DATA / "slides" / "CMU-1-Small-Region.svs"
VISIUM_H5AD = DATA / "visium-mousebrain-crop" / "test_data.h5ad"
VISIUM_IMG = DATA / "visium-mousebrain-crop" / "test_img.jpg"
HER2ST = DATA / "her2st"

SVS_MPP = 0.499
TILE_UM = 110.0  # ModelConfig.patch_um default: the tile size query uses for a model trained with defaults


def need(*paths: Path) -> None:
    """Skip the calling test when any of ``paths`` is missing from ../shared/data."""
    missing = [p for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"real test data not found: {', '.join(str(p) for p in missing)} (expected ../shared/data beside the repo, at {DATA})")


def invoke(args: list[str]):
    """Run the real CLI in-process; returns click's Result (output holds stdout and stderr)."""
    from click.testing import CliRunner

    from histoindex.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def describe(result) -> str:
    exc = f"\n{type(result.exception).__name__}: {result.exception}" if result.exception and not isinstance(result.exception, SystemExit) else ""
    return f"exit {result.exit_code}\n{result.output}{exc}"


# ---- whole-slide image --------------------------------------------------------------------
def test_aperio_svs_opens_with_size_and_pixel_size():
    need(SVS)
    from histoindex.io import open_slide

    slide = open_slide(SVS)
    try:
        assert (slide.width, slide.height) == (2220, 2967)
        assert slide.mpp == pytest.approx(SVS_MPP, abs=1e-3)

        patch = slide.read_region(500, 800, 300, 64)
        assert patch.shape == (64, 64, 3) and patch.dtype == np.uint8
        assert patch.std() > 5, "a 300 px region inside the slide should not be flat"

        outside = slide.read_region(slide.width + 100, slide.height + 100, 50, 16)
        assert outside.shape == (16, 16, 3) and (outside == 255).all(), "areas outside the scan read as white"
    finally:
        slide.close()


def test_aperio_svs_tile_grid_keeps_tissue_tiles_only():
    need(SVS)
    from histoindex.io import open_slide
    from histoindex.patch import tile_grid

    slide = open_slide(SVS)
    try:
        grid = tile_grid(slide, tile_um=TILE_UM)
    finally:
        slide.close()
    side = TILE_UM / SVS_MPP
    full = int(2220 // side) * int(2967 // side)
    assert 0 < len(grid) < full, f"{len(grid)} tissue tiles of a {full}-tile grid: background should be excluded"
    assert grid.mpp == pytest.approx(SVS_MPP, abs=1e-3)
    assert len(set(grid.ids)) == len(grid)
    half = side / 2
    assert (grid.xy[:, 0] - half >= -1e-6).all() and (grid.xy[:, 0] + half <= 2220 + 1e-6).all()
    assert (grid.xy[:, 1] - half >= -1e-6).all() and (grid.xy[:, 1] + half <= 2967 + 1e-6).all()


# ---- Visium reference ---------------------------------------------------------------------
def test_visium_crop_reads_as_log_normalised_reference_with_patches():
    need(VISIUM_H5AD, VISIUM_IMG)
    import anndata

    from histoindex import api
    from histoindex.errors import InputError
    from histoindex.patch import spot_patches

    # X is log1p(CP10k) of 1,999 highly variable genes (expm1 sums to ~4-7k, not 10k) and the file
    # keeps no raw counts: histoindex cannot check it, so the user must say so
    with pytest.raises(InputError, match=r"not log1p\(counts per 10,000\) over all genes.*--log-normalised"):
        api.read_reference(VISIUM_H5AD, image=VISIUM_IMG, platform="visium")
    ref = api.read_reference(VISIUM_H5AD, image=VISIUM_IMG, platform="visium", log_normalised=True)
    assert ref.n_obs == 49
    assert ref.is_counts is False, "X of test_data.h5ad is log-normalised, not counts"
    (library,) = anndata.read_h5ad(VISIUM_H5AD).uns["spatial"].values()
    diameter = float(library["scalefactors"]["spot_diameter_fullres"])
    assert ref.spot_diameter_px == pytest.approx(diameter)
    # a JPEG has no pixel size: Visium spots are 100 µm apart centre to centre; the crop's spots are
    # 137 px apart, so 0.730 µm/px (the 89.4 px spot_diameter_fullres is 10x's 65 µm spot: 0.727)
    xy = ref.xy
    nearest = np.sort(np.linalg.norm(xy[:, None] - xy[None], axis=-1), axis=1)[:, 1]
    assert ref.mpp == pytest.approx(100.0 / np.median(nearest), rel=1e-6)
    assert ref.mpp == pytest.approx(0.730, abs=0.002)
    assert ref.mpp == pytest.approx(65.0 / diameter, rel=0.01), "pitch and 65 µm / spot_diameter_fullres agree"
    assert "spot pitch" in ref.mpp_source

    patches = spot_patches(ref, patch_um=TILE_UM, patch_px=32)
    assert patches.shape == (49, 32, 32, 3) and patches.dtype == np.uint8
    flat = patches.reshape(49, -1).astype(np.float64)
    assert (flat.std(axis=1) > 5).all(), "every spot patch should show tissue texture"
    assert (flat.mean(axis=1) < 240).all(), "no spot patch should be blank (white)"


# ---- end to end through the CLI -----------------------------------------------------------
@pytest.fixture(scope="module")
def brain_store(tmp_path_factory):
    """A real store: ingest the Visium crop (training a tiny model, the store being empty), then
    query the Aperio slide. Returns the paths and CLI results."""
    need(VISIUM_H5AD, VISIUM_IMG, SVS)
    root = tmp_path_factory.mktemp("shared-data-e2e")
    db, out = root / "db", root / "x.parquet"
    ingest = invoke(
        [
            "ingest",
            VISIUM_H5AD,
            "--image",
            VISIUM_IMG,
            "--log-normalised",
            "--tissue",
            "brain",
            "--platform",
            "visium",
            "--species",
            "mouse",
            "--db",
            db,
            *ONE_EPOCH_MODEL,
        ]
    )
    assert ingest.exit_code == 0, describe(ingest)
    query = invoke(["query", SVS, "--db", db, "--tissue", "brain", "--k", "5", "--out", out])
    assert query.exit_code == 0, describe(query)
    return {"db": db, "out": out, "ingest": ingest, "query": query}


def _sql_json(statement: str, db: Path) -> list[dict]:
    result = invoke(["sql", statement, "--db", db, "--format", "json"])
    assert result.exit_code == 0, describe(result)
    return json.loads(result.stdout)


def test_cli_ingest_then_query_real_slide(brain_store):
    import pyarrow.parquet as pq

    from histoindex.io import open_slide
    from histoindex.patch import tile_grid

    assert "49 spots" in brain_store["ingest"].stdout
    db, out = brain_store["db"], brain_store["out"]

    (model,) = _sql_json("SELECT model_id, genes FROM models", db)
    genes = list(model["genes"])
    assert len(genes) == 20

    slide = open_slide(SVS)
    try:
        grid = tile_grid(slide, tile_um=TILE_UM, stride_um=100.0)  # query's default: the Visium references' 100 µm spot pitch
    finally:
        slide.close()

    table = pq.read_table(out)
    base = ["slide", "tile_id", "x", "y", "x_um", "y_um"]
    assert table.column_names == base + genes
    frame = table.to_pandas()
    assert len(frame) == len(grid), "one row per tissue tile"
    assert frame["tile_id"].is_unique and set(frame["tile_id"]) == set(grid.ids)
    assert (frame["slide"] == SVS.name).all()
    np.testing.assert_allclose(frame["x_um"], frame["x"] * SVS_MPP, rtol=1e-3)
    np.testing.assert_allclose(frame["y_um"], frame["y"] * SVS_MPP, rtol=1e-3)
    values = frame[genes].to_numpy()
    assert np.isfinite(values).all() and (values >= 0).all(), "log-normalised predictions are finite and non-negative"
    assert f"{len(grid)} tiles" in brain_store["query"].stdout

    (row,) = _sql_json("SELECT count(*) AS n FROM predictions", db)
    assert row["n"] == len(frame)
    (row,) = _sql_json("SELECT count(*) AS n, count(DISTINCT model_id) AS models FROM spots WHERE tissue = 'brain'", db)
    assert (row["n"], row["models"]) == (49, 1)


def test_cli_query_plain_jpeg_without_mpp_fails_cleanly(brain_store):
    db = brain_store["db"]
    (before,) = _sql_json("SELECT count(*) AS n FROM predictions", db)
    result = invoke(["query", VISIUM_IMG, "--db", db])
    assert result.exit_code != 0, describe(result)
    assert "Error:" in result.output and "--mpp" in result.output, describe(result)
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output, "a clean error, no traceback"
    (after,) = _sql_json("SELECT count(*) AS n FROM predictions", db)
    assert after == before, "a failed query must not write predictions"


# ---- the HER2ST example converter ---------------------------------------------------------
def _load_converter():
    path = REPO / "examples" / "her2st_to_h5ad.py"
    spec = importlib.util.spec_from_file_location("her2st_to_h5ad", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


def test_her2st_converter_writes_a_readable_st_reference(tmp_path, capsys):
    section = "C5"
    spots_tsv = HER2ST / "spots" / f"{section}_selection.tsv"
    counts_tsv = HER2ST / "counts" / f"{section}.tsv.gz"
    image = HER2ST / "images" / f"{section}.jpg"
    need(spots_tsv, counts_tsv, image)
    from histoindex import api

    converter = _load_converter()
    assert converter.main(["--her2st", str(HER2ST), "--out", str(tmp_path), "--sections", section]) == 0
    assert f"{section}:" in capsys.readouterr().out
    path = tmp_path / f"{section}.h5ad"

    # independent expectation: keys in both the (selected) spot table and the counts
    spots = pd.read_csv(spots_tsv, sep="\t")
    if "selected" in spots.columns:
        spots = spots[spots["selected"] == 1]
    spots.index = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"])]
    counts = pd.read_csv(counts_tsv, sep="\t", index_col=0)
    shared = set(spots.index) & set(counts.index.astype(str))
    assert len(shared) < len(spots), "C5 has spots without a count row: the join must be on the key"

    ref = api.read_reference(path, platform="st")
    assert ref.name == section
    assert ref.is_counts is True
    assert ref.n_obs == len(shared) and set(ref.obs_names) == shared
    assert list(ref.var_names) == list(counts.columns)
    np.testing.assert_allclose(ref.xy, spots.loc[ref.obs_names, ["pixel_x", "pixel_y"]].to_numpy(), rtol=0, atol=1e-6)
    X = ref.X.toarray() if hasattr(ref.X, "toarray") else np.asarray(ref.X)
    np.testing.assert_array_equal(X, counts.loc[ref.obs_names].to_numpy(), err_msg="counts joined by key, row for row")
    assert 0.6 < ref.mpp < 0.9, f"derived {ref.mpp:.3f} µm/px"
    assert ref.mpp == pytest.approx(100.0 / ref.spot_diameter_px, rel=0.01), "st: the 200 µm grid and 100 µm / spot_diameter_fullres agree"
    assert ref.image.path is not None and ref.image.path.resolve() == image.resolve()

    import anndata

    adata = anndata.read_h5ad(path)
    np.testing.assert_array_equal(adata.obs["array_x"].to_numpy(), spots.loc[adata.obs_names, "x"].to_numpy())
    np.testing.assert_array_equal(adata.obs["array_y"].to_numpy(), spots.loc[adata.obs_names, "y"].to_numpy())
    clusters_tsv = HER2ST / "clusters" / f"{section}-cluster-annotation.tsv.gz"
    if clusters_tsv.exists():
        labels = pd.read_csv(clusters_tsv, sep="\t", index_col=0)
        expected = pd.Series(labels["label"].astype(str).to_numpy(), index=[f"{x}x{y}" for x, y in zip(labels["x"], labels["y"])])
        got = adata.obs["cluster"].astype(object)
        annotated = got.notna()
        assert annotated.sum() == len(set(expected.index) & shared)
        assert (got[annotated] == expected.loc[got.index[annotated]]).all()
