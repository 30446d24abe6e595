"""One pixel size per section, whatever command reads it: the spot lattice tells the platform
(hexagonal Visium, square legacy ST), a --platform that contradicts it is refused, every source a
section carries is cross-checked, and ingest refuses a dataset at another pixel size than the one
its model was trained on it at."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from histoindex.errors import InputError, PixelSizeWarning
from histoindex.io import read_reference

from .conftest import error_line, run

ST_STEP_PX = 291.0  # HER2ST: ~291 px per 200 µm grid step, 0.687 µm/px
ST_MPP = 200.0 / ST_STEP_PX


def write_spots_h5ad(tmp_path: Path, *, lattice: str, step_px: float, diameter_px: float | None, array: bool = True, name: str = "section") -> Path:
    """A spots .h5ad in the Visium layout on a square (legacy ST) or hexagonal (Visium) lattice of
    ``step_px`` between neighbours, its image a plain PNG (no pixel size in it)."""
    import anndata
    import pandas as pd
    from PIL import Image

    rows, cols = (a.ravel() for a in np.mgrid[0:8, 0:10])
    if lattice == "square":
        xy = np.column_stack([cols * step_px, rows * step_px])
    else:  # Visium: row and column of one parity, column steps of 2 between neighbours of a row
        cols = 2 * cols + rows % 2
        xy = np.column_stack([cols * step_px / 2, rows * step_px * np.sqrt(3) / 2])
    xy = xy + 200.0 + np.random.default_rng(0).normal(0, 2.0, xy.shape)  # the scan's small scatter
    image = tmp_path / f"{name}.png"
    Image.new("RGB", (16, 16), (200, 150, 180)).save(image)
    counts = np.random.default_rng(1).poisson(5, (len(xy), 30)).astype(np.float32)
    adata = anndata.AnnData(X=counts, obs=pd.DataFrame(index=[f"s{i}" for i in range(len(xy))]), var=pd.DataFrame(index=[f"G{j}" for j in range(30)]))
    if array:
        adata.obs["array_row"], adata.obs["array_col"] = rows.astype(np.int64), cols.astype(np.int64)
    adata.obsm["spatial"] = xy
    scalefactors = {"tissue_hires_scalef": 1.0}
    if diameter_px is not None:
        scalefactors["spot_diameter_fullres"] = diameter_px
    adata.uns["spatial"] = {name: {"scalefactors": scalefactors, "metadata": {"source_image_path": str(image)}, "images": {}}}
    path = tmp_path / f"{name}.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.fixture
def square_h5ad(tmp_path) -> Path:
    """A legacy ST section converted to .h5ad as her2st_to_h5ad.py writes it: square array
    coordinates, spot_diameter_fullres the 100 µm spot (145.5 px)."""
    return write_spots_h5ad(tmp_path, lattice="square", step_px=ST_STEP_PX, diameter_px=100.0 / ST_MPP)


def test_square_lattice_without_platform_reads_as_st(square_h5ad):
    with warnings.catch_warnings():
        warnings.simplefilter("error", PixelSizeWarning)  # every source agrees: nothing to say
        ref = read_reference(square_h5ad)
    assert ref.mpp == pytest.approx(ST_MPP, rel=0.01), ref.mpp_source  # not 0.226 (the Visium reading)
    assert ref.mpp_source == "st spot pitch 200 µm (array coordinates)" and ref.platform == "st"
    assert read_reference(square_h5ad, platform="st").mpp == pytest.approx(ref.mpp)


def test_square_lattice_without_array_coordinates_reads_as_st(tmp_path):
    """histoindex's own write_h5ad keeps no array coordinates: the spot centres show the lattice."""
    path = write_spots_h5ad(tmp_path, lattice="square", step_px=ST_STEP_PX, diameter_px=100.0 / ST_MPP, array=False)
    ref = read_reference(path)
    assert ref.platform == "st" and ref.mpp == pytest.approx(ST_MPP, rel=0.03), ref.mpp_source


def test_platform_contradicting_the_lattice_is_refused(square_h5ad, tmp_path):
    with pytest.raises(InputError) as caught:
        read_reference(square_h5ad, platform="visium")
    message = str(caught.value)
    assert "'visium' was given" in message and "square grid (legacy ST)" in message
    assert "read as st 0.68" in message  # the st reading (0.687 µm/px)...
    assert "read as visium 0.22" in message  # ...and the visium one (0.226), both named
    hexagonal = write_spots_h5ad(tmp_path, lattice="hex", step_px=137.0, diameter_px=65 * 1.37, name="hex")
    assert read_reference(hexagonal).platform == "visium"
    assert read_reference(hexagonal).mpp == pytest.approx(100 / 137.0, rel=0.01)
    with pytest.raises(InputError, match="'st' was given.*hexagonal lattice"):
        read_reference(hexagonal, platform="st")


def test_cli_train_without_platform_refuses_a_contradiction_in_one_line(square_h5ad, tmp_path):
    result = run("train", square_h5ad, "--platform", "visium", "--db", tmp_path / "db", ok=False)
    error_line(result, str(square_h5ad), "'visium' was given", "--platform st")


def test_sources_far_apart_are_refused_unless_mpp(tmp_path):
    # spot_diameter_fullres says 0.34 µm/px, the grid 0.687: twice apart
    path = write_spots_h5ad(tmp_path, lattice="square", step_px=ST_STEP_PX, diameter_px=2 * 100.0 / ST_MPP)
    with pytest.raises(InputError) as caught:
        read_reference(path)
    message = str(caught.value)
    assert "disagree 2" in message and "--mpp" in message
    assert "st spot pitch 200 µm (array coordinates): 0.68" in message and "spot_diameter_fullres" in message and ": 0.3436 µm/px" in message
    assert read_reference(path, mpp=0.7).mpp == 0.7
    result = run("train", path, "--db", tmp_path / "db", ok=False)
    error_line(result, "disagree", "--mpp")


def test_sources_apart_by_a_quarter_are_said_on_one_line(tmp_path):
    path = write_spots_h5ad(tmp_path, lattice="square", step_px=ST_STEP_PX, diameter_px=1.25 * 100.0 / ST_MPP)
    with pytest.warns(PixelSizeWarning) as caught:
        ref = read_reference(path)
    assert ref.mpp == pytest.approx(ST_MPP, rel=0.01)
    (note,) = [str(w.message) for w in caught if issubclass(w.category, PixelSizeWarning)]
    assert "\n" not in note
    assert "µm/px from st spot pitch 200 µm (array coordinates), the first of --mpp" in note  # which, and why
    assert "spot_diameter_fullres" in note and "(-20%)" in note


def test_her2st_h5ad_without_platform_reads_like_the_st_files(shared_data, tmp_path):
    """A real HER2ST section through examples/her2st_to_h5ad.py: read with no --platform, the same
    pixel size as the legacy ST files themselves."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        from her2st_to_h5ad import convert_section, section_paths
    finally:
        sys.path.pop(0)
    convert_section(shared_data / "her2st", "C2", tmp_path)
    paths = section_paths(shared_data / "her2st", "C2")
    st = read_reference(paths["counts"], spot_table=paths["spots"], image=paths["image"])
    h5ad = read_reference(tmp_path / "C2.h5ad")
    assert h5ad.platform == st.platform == "st"
    assert h5ad.mpp == pytest.approx(st.mpp, rel=1e-6) and 0.68 < h5ad.mpp < 0.70
    with pytest.raises(InputError, match="'visium' was given"):
        read_reference(tmp_path / "C2.h5ad", platform="visium")


def test_ingest_refuses_a_trained_dataset_at_another_pixel_size(store, sections):
    # the model was trained on syn-train at 1 µm/px (its TIFF's metadata); 1.3 µm/px is 30 % off
    result = run("ingest", sections.train_h5ad, "--tissue", "breast", "--mpp", "1.3", "--db", store, ok=False)
    assert "syn-train: 1.3 µm/px (--mpp)" in result.output  # the pixel size ingest uses, on one line
    error_line(result, "read at 1.3 µm/px", "trained on dataset syn-train at 1 µm/px")
