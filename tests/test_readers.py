"""Reference readers on real files: a Space Ranger outs/ folder (1.x layout as shipped, and a ≥ 2.0
copy), legacy ST (HER2ST) sections, the reader dispatch in ``api.read_reference`` and ``ingest``
through the CLI. Expectations are computed from the raw files here, independently of the readers.
Skips when ../shared/data is absent."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import shutil
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from histoindex import api
from histoindex.cli import cli
from histoindex.data import SpotSet
from histoindex.errors import InputError, LowResolutionImageWarning
from histoindex.io import read_spaceranger, read_st
from histoindex.io.spaceranger import make_names_unique

from .conftest import ONE_EPOCH_MODEL

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SPACERANGER = DATA / "spaceranger-1.0.0"
HER2ST = DATA / "her2st"
SVS = DATA / "slides" / "CMU-1-Small-Region.svs"
VISIUM_PITCH_UM = 100.0  # Visium spots, centre to centre
POSITION_HEADER = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


@pytest.fixture
def spaceranger(shared_data) -> Path:
    if not SPACERANGER.is_dir():
        pytest.skip(f"real data not available: {SPACERANGER} is absent")
    return SPACERANGER


def her2st(section: str) -> dict[str, Path]:
    paths = {
        "counts": HER2ST / "counts" / f"{section}.tsv.gz",
        "spots": HER2ST / "spots" / f"{section}_selection.tsv",
        "image": HER2ST / "images" / f"{section}.jpg",
    }
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        pytest.skip(f"real data not available: {', '.join(missing)} absent")
    return paths


def dense(X) -> np.ndarray:
    return X.toarray() if hasattr(X, "toarray") else np.asarray(X)


def assert_same_spots(a: SpotSet, b: SpotSet) -> None:
    assert list(a.obs_names) == list(b.obs_names)
    assert list(a.var_names) == list(b.var_names)
    np.testing.assert_array_equal(dense(a.X), dense(b.X))
    np.testing.assert_array_equal(a.xy, b.xy)
    assert (a.mpp, a.spot_diameter_px, a.is_counts, a.image.scale) == (b.mpp, b.spot_diameter_px, b.is_counts, b.image.scale)


# ---- Space Ranger ---------------------------------------------------------------------------
def raw_spaceranger(folder: Path) -> dict:
    """What the folder holds, read without the reader: the h5 matrix decoded by hand (CSC, features
    × barcodes) and the v1 positions CSV through the csv module."""
    with h5py.File(folder / "filtered_feature_bc_matrix.h5", "r") as f:
        m = f["matrix"]
        n_genes, n_barcodes = m["shape"][:]
        data, indices, indptr = m["data"][:], m["indices"][:], m["indptr"][:]
        barcodes = [b.decode() for b in m["barcodes"][:]]
        genes = [g.decode() for g in m["features/name"][:]]
    counts = np.zeros((n_barcodes, n_genes))
    for j in range(n_barcodes):  # column j (a barcode) holds data[indptr[j]:indptr[j+1]] at rows indices[...]
        counts[j, indices[indptr[j] : indptr[j + 1]]] = data[indptr[j] : indptr[j + 1]]
    with open(folder / "spatial" / "tissue_positions_list.csv", newline="") as f:
        rows = {r[0]: r for r in csv.reader(f)}
    keep = [i for i, b in enumerate(barcodes) if b in rows and rows[b][1] == "1"]
    return {
        "barcodes": [barcodes[i] for i in keep],
        "genes": genes,
        "counts": counts[keep],
        "xy": np.array([[float(rows[barcodes[i]][5]), float(rows[barcodes[i]][4])] for i in keep]),  # (col, row) = (x, y)
        "rows": rows,
    }


def row_neighbour_px(raw: dict) -> float:
    """Median pixel distance between in-tissue spots of one array row two columns apart: one Visium
    pitch, measured straight from the positions file."""
    spots = {(int(r[2]), int(r[3])): (float(r[5]), float(r[4])) for r in raw["rows"].values() if r[1] == "1"}
    gaps = [np.hypot(x2 - x1, y2 - y1) for (row, col), (x1, y1) in spots.items() if (row, col + 2) in spots for x2, y2 in [spots[(row, col + 2)]]]
    assert len(gaps) > 10
    return float(np.median(gaps))


def v2_copy(source: Path, target: Path, *, shuffle: bool = True) -> Path:
    """A Space Ranger ≥ 2.0 layout of ``source``: tissue_positions.csv with a header (rows shuffled,
    so only a join by barcode can work) instead of tissue_positions_list.csv."""
    shutil.copytree(source, target)
    for path in target.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # the shared data is read-only
    v1 = target / "spatial" / "tissue_positions_list.csv"
    table = pd.read_csv(v1, header=None, names=POSITION_HEADER, dtype={"barcode": str})
    if shuffle:
        table = table.sample(frac=1.0, random_state=0)
    table.to_csv(target / "spatial" / "tissue_positions.csv", index=False)
    v1.unlink()
    return target


def test_spaceranger_v1_reads_barcodes_genes_positions_and_warns_about_hires(spaceranger):
    raw = raw_spaceranger(spaceranger)
    with pytest.warns(LowResolutionImageWarning, match="--image"):
        spots = api.read_reference(spaceranger)
    assert spots.name == "spaceranger-1.0.0"
    assert list(spots.obs_names) == raw["barcodes"] and spots.n_obs == 100
    assert list(spots.var_names) == raw["genes"] and spots.n_vars == 100
    np.testing.assert_array_equal(dense(spots.X), raw["counts"])
    np.testing.assert_array_equal(spots.xy, raw["xy"])
    assert spots.is_counts
    assert spots.image.path == spaceranger / "spatial" / "tissue_hires_image.png"
    assert spots.image.scale == pytest.approx(0.150015)
    assert spots.spot_diameter_px == pytest.approx(89.42751063343188)
    # no image metadata: Visium spots sit 100 µm apart; neighbours in an array row are 2 columns apart
    assert spots.mpp == pytest.approx(VISIUM_PITCH_UM / row_neighbour_px(raw), rel=0.005)
    assert spots.mpp == pytest.approx(65.0 / 89.42751063343188, rel=0.01), "spot_diameter_fullres is 10x's 65 µm spot"
    assert spots.mpp_source == "visium spot pitch 100 µm (array coordinates)"


def test_spaceranger_v2_layout_gives_the_same_spots(spaceranger, tmp_path):
    v2 = v2_copy(spaceranger, tmp_path / "v2")
    with pytest.warns(LowResolutionImageWarning):
        a = read_spaceranger(spaceranger, name="x")
    with pytest.warns(LowResolutionImageWarning):
        b = read_spaceranger(v2, name="x")
    assert_same_spots(a, b)


def test_spaceranger_joins_on_barcode_and_keeps_in_tissue_only(spaceranger, tmp_path):
    v2 = v2_copy(spaceranger, tmp_path / "sample" / "outs")
    positions = v2 / "spatial" / "tissue_positions.csv"
    table = pd.read_csv(positions, dtype={"barcode": str})
    raw = raw_spaceranger(spaceranger)
    off, dropped = raw["barcodes"][:3], raw["barcodes"][3:5]
    table.loc[table["barcode"].isin(off), "in_tissue"] = 0
    table[~table["barcode"].isin(dropped)].to_csv(positions, index=False)
    with pytest.warns(LowResolutionImageWarning):
        spots = api.read_reference(v2.parent)  # the run folder holding outs/ reads too
    assert spots.name == "sample"
    expected = [b for b in raw["barcodes"] if b not in off + dropped]
    assert list(spots.obs_names) == expected
    keep = [raw["barcodes"].index(b) for b in expected]
    np.testing.assert_array_equal(dense(spots.X), raw["counts"][keep])
    np.testing.assert_array_equal(spots.xy, raw["xy"][keep])


def test_spaceranger_keeps_gene_expression_features_with_unique_names(spaceranger, tmp_path):
    folder = v2_copy(spaceranger, tmp_path / "outs", shuffle=False)
    with h5py.File(folder / "filtered_feature_bc_matrix.h5", "r+") as f:
        features = f["matrix/features"]
        names = [n.decode() for n in features["name"][:]]
        names[1] = names[4] = names[0]  # a symbol three times
        types = ["Gene Expression"] * len(names)
        types[2] = "Antibody Capture"
        for key, values in (("name", names), ("feature_type", types)):
            del features[key]
            features[key] = np.array(values, dtype="S")
    raw = raw_spaceranger(spaceranger)
    with pytest.warns(LowResolutionImageWarning):
        spots = read_spaceranger(folder)
    keep = [i for i in range(len(names)) if i != 2]
    assert list(spots.var_names[:4]) == [names[0], f"{names[0]}-1", names[3], f"{names[0]}-2"]
    assert spots.n_vars == 99 and len(set(spots.var_names)) == 99
    np.testing.assert_array_equal(dense(spots.X), raw["counts"][:, keep])


def test_make_names_unique_matches_anndata():
    from anndata.utils import make_index_unique

    names = ["A", "B", "A", "A-1", "A", "C", "B", "B-1-1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata warns that "A-1" collides; that is the case tested
        expected = list(make_index_unique(pd.Index(names)))
    assert list(make_names_unique(names)) == expected == ["A", "B", "A-2", "A-1", "A-3", "C", "B-1", "B-1-1"]
    assert list(make_names_unique(["a", "b"])) == ["a", "b"]


def test_spaceranger_with_an_image_uses_it_without_warning(spaceranger, tmp_path):
    jpg = tmp_path / "he.jpg"
    Image.new("RGB", (64, 48), (220, 180, 200)).save(jpg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LowResolutionImageWarning)
        spots = api.read_reference(spaceranger, image=jpg)
        assert spots.image.path == jpg and spots.image.scale == 1.0
        assert spots.mpp == pytest.approx(VISIUM_PITCH_UM / row_neighbour_px(raw_spaceranger(spaceranger)), rel=0.005), "a JPEG has no pixel size"
        assert api.read_reference(spaceranger, image=jpg, mpp=0.3).mpp == 0.3
        if SVS.exists():  # an image with a pixel size in its metadata wins over the spot size
            assert api.read_reference(spaceranger, image=SVS).mpp == pytest.approx(0.499, abs=1e-3)


def test_spaceranger_missing_pieces_are_clear_errors(spaceranger, tmp_path):
    folder = v2_copy(spaceranger, tmp_path / "outs", shuffle=False)
    (folder / "spatial" / "tissue_positions.csv").unlink()
    with pytest.raises(InputError, match=r"tissue_positions\.csv.*tissue_positions_list\.csv"):
        api.read_reference(folder)
    (folder / "filtered_feature_bc_matrix.h5").unlink()
    with pytest.raises(InputError, match=r"filtered_feature_bc_matrix\.h5 not found.*outs/ folder"):
        api.read_reference(folder)

    no_hires = v2_copy(spaceranger, tmp_path / "no-hires", shuffle=False)
    (no_hires / "spatial" / "tissue_hires_image.png").unlink()
    with pytest.raises(InputError, match=r"no H&E image.*--image"):
        api.read_reference(no_hires)
    with pytest.raises(InputError, match="--spot-table applies to legacy ST"):
        api.read_reference(no_hires, image=SPACERANGER / "spatial" / "tissue_lowres_image.png", spot_table=tmp_path / "x.tsv")


# ---- legacy ST ------------------------------------------------------------------------------
def _load_converter():
    path = REPO / "examples" / "her2st_to_h5ad.py"
    spec = importlib.util.spec_from_file_location("her2st_to_h5ad", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("section", ["C5", "B4"])
def test_st_section_matches_raw_files_and_the_example_converter(shared_data, tmp_path, section):
    paths = her2st(section)
    spots = read_st(paths["counts"], spots=paths["spots"], image=paths["image"])

    # independent: selected spot-table rows joined to count rows on "{x}x{y}", spot-table order
    table = pd.read_csv(paths["spots"], sep="\t")
    if "selected" in table.columns:
        table = table[table["selected"] == 1]
    table.index = [f"{x}x{y}" for x, y in zip(table["x"], table["y"])]
    counts = pd.read_csv(paths["counts"], sep="\t", index_col=0)
    shared = [k for k in table.index if k in set(counts.index.astype(str))]
    assert len(shared) < len(table), f"{section} has spots without a count row: the join must be on the key"
    assert spots.name == section
    assert list(spots.obs_names) == shared
    assert list(spots.var_names) == list(counts.columns)
    np.testing.assert_array_equal(dense(spots.X), counts.loc[shared].to_numpy())
    np.testing.assert_array_equal(spots.xy, table.loc[shared, ["pixel_x", "pixel_y"]].to_numpy(np.float64))
    slope_x = np.polyfit(table.loc[shared, "x"], table.loc[shared, "pixel_x"], 1)[0]
    slope_y = np.polyfit(table.loc[shared, "y"], table.loc[shared, "pixel_y"], 1)[0]
    px_per_um = (abs(slope_x) + abs(slope_y)) / 2 / 200.0
    # the reader fits both axes at once (an affine map: rotation and shear allowed); per-axis slopes agree
    assert spots.mpp == pytest.approx(1 / px_per_um, rel=1e-3) and 0.6 < spots.mpp < 0.8
    assert spots.mpp_source == "st spot pitch 200 µm (array coordinates)"
    assert spots.spot_diameter_px == pytest.approx(100 / spots.mpp)
    assert spots.is_counts and spots.image.path == paths["image"]

    # the example converter writes the same spots to .h5ad
    assert _load_converter().main(["--her2st", str(HER2ST), "--out", str(tmp_path), "--sections", section]) == 0
    from_h5ad = api.read_reference(tmp_path / f"{section}.h5ad", platform="st")
    assert_same_spots(spots, from_h5ad)
    assert from_h5ad.image.path.resolve() == paths["image"].resolve()


def test_st_mpp_option_overrides_the_grid_fit(shared_data):
    paths = her2st("C5")
    spots = api.read_reference(paths["counts"], spot_table=paths["spots"], image=paths["image"], mpp=0.5, name="c5")
    assert (spots.name, spots.mpp, spots.spot_diameter_px) == ("c5", 0.5, pytest.approx(200.0))


def test_st_bad_inputs_are_clear_errors(shared_data, tmp_path):
    paths = her2st("C5")
    with pytest.raises(InputError, match=r"legacy ST counts.*need --spot-table and --image"):
        api.read_reference(paths["counts"])
    with pytest.raises(InputError, match=r"need --image:"):
        api.read_reference(paths["counts"], spot_table=paths["spots"])
    with pytest.raises(InputError, match=r"need --spot-table:"):
        api.read_reference(paths["counts"], image=paths["image"])

    bad_table = tmp_path / "C5_selection.tsv"
    pd.read_csv(paths["spots"], sep="\t").drop(columns=["pixel_y"]).to_csv(bad_table, sep="\t", index=False)
    with pytest.raises(InputError, match=r"C5_selection\.tsv lacks columns pixel_y"):
        api.read_reference(paths["counts"], spot_table=bad_table, image=paths["image"])

    transposed = tmp_path / "T.tsv"
    with gzip.open(paths["counts"], "rt") as f:
        pd.read_csv(f, sep="\t", index_col=0).iloc[:, :50].T.to_csv(transposed, sep="\t")
    with pytest.raises(InputError, match="transposed"):
        api.read_reference(transposed, spot_table=paths["spots"], image=paths["image"])


def test_cli_counts_without_spot_table_is_an_error(shared_data, tmp_path):
    paths = her2st("C5")
    result = CliRunner().invoke(cli, ["ingest", str(paths["counts"]), "--image", str(paths["image"]), "--tissue", "breast", "--db", str(tmp_path / "db")])
    assert result.exit_code == 1, result.output
    assert "Error: " in result.output and "need --spot-table" in result.output
    assert not (tmp_path / "db").exists(), "a bad input leaves no store behind"


def test_cli_ingests_legacy_st_counts(shared_data, tmp_path):
    from histoindex.store import Store

    paths = her2st("C5")
    db = tmp_path / "db"
    args = [
        "ingest",
        paths["counts"],
        "--spot-table",
        paths["spots"],
        "--image",
        paths["image"],
        "--platform",
        "st",
        "--tissue",
        "breast",
        "--db",
        db,
        *ONE_EPOCH_MODEL,
    ]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    expected = read_st(paths["counts"], spots=paths["spots"], image=paths["image"])
    assert f"C5: {expected.n_obs} spots" in result.stdout
    rows = Store(db).table("spots").to_arrow().to_pydict()
    assert sorted(rows["spot_id"]) == sorted(expected.obs_names)
    assert set(rows["dataset"]) == {"C5"} and set(rows["platform"]) == {"st"} and set(rows["tissue"]) == {"breast"}
