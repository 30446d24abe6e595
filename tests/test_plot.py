"""Pictures: `histoindex plot` and `query --plot` on real predictions of the held-out section."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histoindex import api
from histoindex.errors import InputError
from histoindex.metrics import pearson_per_gene
from histoindex.plot import check_gene_names, colour_limits, picture_path, read_predictions, render_predictions, value_colours
from histoindex.store import Store

from .conftest import error_line, run


@dataclass(frozen=True)
class Predicted:
    db: Path
    grid_parquet: Path
    grid_h5ad: Path
    spots_h5ad: Path
    query_output: str


@pytest.fixture(scope="module")
def predicted(trained_store, sections, tmp_path_factory) -> Predicted:
    """Three real queries of the held-out slide on one private copy of the trained store: tissue
    tiles to Parquet (drawing FASN on the way) and to h5ad, and the reference's spots to h5ad."""
    directory = tmp_path_factory.mktemp("plots")
    db = directory / "db"
    shutil.copytree(trained_store, db)
    grid_parquet, grid_h5ad, spots_h5ad = directory / "grid.parquet", directory / "grid.h5ad", directory / "spots.h5ad"
    result = run("query", sections.heldout_tif, "--tissue", "breast", "--out", grid_parquet, "--plot", "FASN", "--db", db)
    run("query", sections.heldout_tif, "--tissue", "breast", "--out", grid_h5ad, "--db", db)
    run("query", sections.heldout_tif, "--tissue", "breast", "--spots", sections.heldout_h5ad, "--out", spots_h5ad, "--db", db)
    return Predicted(db, grid_parquet, grid_h5ad, spots_h5ad, result.output)


def _picture(path: Path) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 10_000
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB")).astype(np.float64)


def _looks_drawn(pixels: np.ndarray) -> None:
    """Not blank: varied pixels and many colours (tissue, overlay, colour bar, text)."""
    assert pixels.std() > 20
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 500


def test_query_plot_draws_beside_the_predictions(predicted):
    picture = predicted.grid_parquet.with_name("grid.FASN.png")
    assert predicted.query_output.count(str(picture)) == 1, predicted.query_output  # said once
    pixels = _picture(picture)
    height, width = pixels.shape[:2]
    assert 600 < width < 1100 and 0.7 < height / width < 1.3  # one square-ish panel and its colour bar
    _looks_drawn(pixels)


@pytest.mark.parametrize("which", ["grid_parquet", "grid_h5ad"])
def test_plot_grid_predictions_one_row_per_gene(predicted, which, tmp_path):
    out = tmp_path / "two.png"
    result = run("plot", getattr(predicted, which), "--gene", "FASN", "--gene", "COL1A1", "--out", out)
    assert result.output.strip() == str(out)
    pixels = _picture(out)
    height, width = pixels.shape[:2]
    assert 1.6 < height / width < 2.4  # two rows of one panel
    _looks_drawn(pixels)


def test_parquet_and_h5ad_read_back_alike(predicted):
    a = read_predictions(predicted.grid_parquet, genes=["FASN"])
    b = read_predictions(predicted.grid_h5ad, genes=["FASN"])
    assert a.id_column == b.id_column == "tile_id" and a.slide == b.slide
    assert list(a.ids) == list(b.ids)
    np.testing.assert_allclose(a.xy, b.xy)
    np.testing.assert_allclose(a.gene("FASN"), b.gene("FASN"), rtol=1e-6)
    assert a.provenance["patch_um"] == b.provenance["patch_um"] == 110.0
    assert a.mpp == b.mpp and a.units == "log1p CP10k"


def test_plot_spots_beside_truth_with_pearson_r(predicted, sections, tmp_path):
    out = tmp_path / "truth.png"
    run("plot", predicted.spots_h5ad, "--gene", "FASN", "--truth", sections.heldout_h5ad, "--out", out)
    pixels = _picture(out)
    height, width = pixels.shape[:2]
    assert 1.5 < width / height < 2.6  # measured | predicted, side by side
    _looks_drawn(pixels)

    fig = render_predictions(predicted.spots_h5ad, genes=["FASN", "KRT8"], truth=sections.heldout_h5ad)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title().split()[0] for ax in panels] == ["FASN", "FASN", "KRT8", "KRT8"]
    assert "measured" in panels[0].get_title() and "predicted" in panels[1].get_title()
    truth = api.read_reference(sections.heldout_h5ad)
    pred = read_predictions(predicted.spots_h5ad, genes=["FASN"])
    assert list(pred.ids) == list(truth.obs_names)  # matched by spot id
    r = pearson_per_gene(truth.normalized(["FASN"]), pred.gene("FASN")[:, None])[0]
    assert f"r = {r:.2f}, n = {truth.n_obs}" in panels[1].get_title()
    assert r > 0.3
    # one colour scale for both panels of a row
    (left,), (right,) = panels[0].collections, panels[1].collections
    assert left.norm is right.norm


def _pixel(fig, ax, xy: np.ndarray) -> np.ndarray:
    """RGB (0-255) of the rendered figure at level-0 slide position(s) ``xy``."""
    buf = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(np.float64)
    disp = ax.transData.transform(np.atleast_2d(xy))
    cols = np.round(disp[:, 0]).astype(int)
    rows = np.round(buf.shape[0] - disp[:, 1]).astype(int)
    return np.stack([buf[r - 1 : r + 2, c - 1 : c + 2].reshape(-1, 3).mean(axis=0) for r, c in zip(rows, cols)])


def test_overlay_colours_encode_the_values(predicted):
    pred = read_predictions(predicted.grid_parquet, genes=["FASN"])
    values = pred.gene("FASN")
    vmin, vmax = colour_limits(values)

    # without a slide the tiles are opaque: each tile's pixels are exactly its value's colour
    blank = replace(pred, provenance={**pred.provenance, "slide_path": str(predicted.db / "gone.tif")})
    fig = render_predictions(blank, genes=["FASN"], cmap="viridis")
    fig.canvas.draw()
    ax = fig.axes[0]
    assert any("slide not found" in t.get_text() for t in ax.texts)
    y_top = pred.xy[:, 1].min() + 0.8 * np.ptp(pred.xy[:, 1])  # above the note and the scale bar
    rows = np.flatnonzero(pred.xy[:, 1] < y_top)
    expected = value_colours(values[rows], vmin=vmin, vmax=vmax, cmap="viridis")[:, :3] * 255
    got = _pixel(fig, ax, pred.xy[rows])
    close = np.abs(got - expected).max(axis=1) <= 4
    assert close.mean() > 0.95

    # over the slide, the highest and lowest tiles still read as the two ends of the scale
    fig = render_predictions(pred, genes=["FASN"], cmap="viridis")
    fig.canvas.draw()
    ax = fig.axes[0]
    order = np.argsort(values)
    low_px, high_px = _pixel(fig, ax, pred.xy[order[:5]]), _pixel(fig, ax, pred.xy[order[-5:]])
    ends = value_colours(np.array([vmin, vmax]), vmin=vmin, vmax=vmax)[:, :3] * 255
    assert (np.linalg.norm(high_px - ends[1], axis=1) < np.linalg.norm(high_px - ends[0], axis=1)).all()
    assert (np.linalg.norm(low_px - ends[0], axis=1) < np.linalg.norm(low_px - ends[1], axis=1)).all()
    assert np.linalg.norm(high_px.mean(axis=0) - low_px.mean(axis=0)) > 100


def test_unknown_gene_is_a_clear_error(predicted, tmp_path):
    out = tmp_path / "x.png"
    result = run("plot", predicted.grid_parquet, "--gene", "fasn", "--gene", "NOTAGENE", "--out", out, ok=False)
    assert result.exit_code == 1
    assert result.output.startswith("Error: genes fasn, NOTAGENE not in grid.parquet; did you mean FASN (for fasn)?")
    assert "It has 48 genes, e.g. " in result.output
    assert not out.exists()


def test_missing_slide_or_unrelated_truth_are_clear_errors(predicted, sections, tmp_path):
    out = tmp_path / "x.png"
    result = run("plot", predicted.grid_parquet, "--gene", "FASN", "--slide", tmp_path / "gone.tif", "--out", out, ok=False)
    assert result.exit_code == 1 and result.output.startswith(f"Error: slide not found: {tmp_path / 'gone.tif'}")
    result = run("plot", predicted.grid_parquet, "--gene", "FASN", "--out", tmp_path / "x.jpg", ok=False)
    assert result.exit_code == 1 and "unsupported picture type" in result.output
    truth = api.read_reference(sections.heldout_h5ad)
    elsewhere = replace(truth, xy=truth.xy + 1e5)  # spots on no tile of these predictions
    with pytest.raises(InputError, match="no spot of .* lies on a prediction of grid.parquet"):
        render_predictions(predicted.grid_parquet, genes=["FASN"], truth=elsewhere)
    assert not out.exists()


def test_query_plot_checks_before_any_work(predicted, sections, tmp_path):
    before = Store(predicted.db).versions()
    result = run("query", sections.heldout_tif, "--tissue", "breast", "--plot", "FASN", "--db", predicted.db, ok=False)
    assert result.exit_code == 2 and "--plot needs --out" in result.output
    result = run("query", sections.heldout_tif, "--tissue", "breast", "--out", tmp_path / "p.parquet", "--plot", "NOPE", "--db", predicted.db, ok=False)
    assert result.exit_code == 1 and error_line(result, "gene NOPE measured by none of the references searched")
    assert "tissue tiles" not in result.output, "the gene is checked before the slide is tiled"
    assert not (tmp_path / "p.parquet").exists()
    assert Store(predicted.db).versions() == before


def test_small_helpers():
    assert colour_limits(np.arange(101.0)) == (1.0, 99.0)
    assert colour_limits(np.zeros(5), np.ones(5) * 2)[1] == 2.0
    low, high = colour_limits(np.full(4, 3.0))  # a constant gene still gets a scale
    assert low < 3.0 < high
    rgba = value_colours(np.array([-5.0, 0.0, 1.0, 9.0]), vmin=0, vmax=1, alpha=0.5)
    # clipped at both ends (two statements: assert_allclose returns None, so `a and b` never ran b)
    np.testing.assert_allclose(rgba[0], rgba[1])
    np.testing.assert_allclose(rgba[2], rgba[3])
    assert (rgba[:, 3] == 0.5).all() and not np.allclose(rgba[1], rgba[2])
    assert check_gene_names(["A", "B", "A"], ["A", "B"], where="x") == ["A", "B"]
    with pytest.raises(InputError, match="did you mean FASN"):
        check_gene_names(["FASM"], ["FASN", "CD74"], where="x")
    assert picture_path("/d/slide.parquet", "HLA-DRA") == Path("/d/slide.HLA-DRA.png")
