"""HEST-1k folders: ``histoindex ingest HEST_DIR --id ID`` / ``--hest-where KEY=VALUE``.

The fixture is a small folder in HEST's layout (``st/ID.h5ad``, ``wsis/ID.tif``, ``metadata/ID.json``,
as ``hest.iter_hest`` reads it) built at test time from the HER2ST sections in ../shared/data: the
sections B4 and C2 under their HEST ids (SPA145, SPA141), each H&E downscaled 4× and written as a
pyramidal TIFF, the spots' pixel positions scaled to it, and ``pixel_size_um_estimated`` fitted to
the 200 µm spot grid. A third sample (TENX152) has only its metadata, as in a partial download.
Everything runs through the real CLI and a real LanceDB store, with a tiny one-epoch model.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from .conftest import ONE_EPOCH_MODEL, SHARED_DATA, error_line, run

HER2ST = SHARED_DATA / "her2st"
#: HEST ids of the HER2ST sections (HEST_v1_1_0.csv: subseries B4 -> SPA145, C2 -> SPA141)
SECTIONS = {"SPA145": ("B4", "Patient B"), "SPA141": ("C2", "Patient C")}
DOWNSCALE = 4  # the JPEG is decoded at 1/4 size (about 2.75 µm per pixel): quick to write and to read
ST_PITCH_UM = 200.0


def _grid_mpp(spots: pd.DataFrame, xy_px: np.ndarray) -> float:
    """Micrometres per pixel from an affine fit of the pixel positions to the 200 µm array grid."""
    design = np.column_stack([spots["x"] * ST_PITCH_UM, spots["y"] * ST_PITCH_UM, np.ones(len(spots))])
    coef, *_ = np.linalg.lstsq(design, xy_px, rcond=None)
    return 1.0 / float(np.sqrt(abs(np.linalg.det(coef[:2].T))))


UNCALIBRATED = "SPA141"


def _write_sample(root: Path, hest_id: str, section: str, patient: str) -> dict:
    import anndata
    from PIL import Image

    from histoindex.io import write_pyramidal_tiff

    spots = pd.read_csv(HER2ST / "spots" / f"{section}_selection.tsv", sep="\t")
    spots = spots[spots["selected"] == 1]
    spots.index = [f"{int(x)}x{int(y)}" for x, y in zip(spots["x"], spots["y"])]
    counts = pd.read_csv(HER2ST / "counts" / f"{section}.tsv.gz", sep="\t", index_col=0)
    counts = counts.loc[:, ~counts.columns.duplicated()]
    keep = spots.index.intersection(counts.index)  # a few spots have no count row
    spots, counts = spots.loc[keep], counts.loc[keep]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # 92 Mpx: a real scan, not a bomb
        with Image.open(HER2ST / "images" / f"{section}.jpg") as jpeg:
            full = jpeg.size
            jpeg.draft("RGB", (full[0] // DOWNSCALE, full[1] // DOWNSCALE))  # JPEG decodes at 1/4 directly
            image = np.asarray(jpeg.convert("RGB"))
    scale = image.shape[1] / full[0]
    xy = spots[["pixel_x", "pixel_y"]].to_numpy(np.float64) * scale
    mpp = _grid_mpp(spots, xy)
    # one sample's WSI carries no calibration of its own: its pixel size is only in HEST's metadata
    write_pyramidal_tiff(root / "wsis" / f"{hest_id}.tif", image, mpp=None if hest_id == UNCALIBRATED else mpp)

    adata = anndata.AnnData(X=sp.csr_matrix(counts.to_numpy(np.float32)), obs=pd.DataFrame(index=counts.index), var=pd.DataFrame(index=counts.columns))
    adata.obs["array_col"], adata.obs["array_row"] = spots["x"].to_numpy(), spots["y"].to_numpy()
    adata.obsm["spatial"] = xy  # HEST: spot centres in pixels of the full-resolution WSI
    thumb_scale = 0.1
    thumb = np.asarray(Image.fromarray(image).resize((round(image.shape[1] * thumb_scale), round(image.shape[0] * thumb_scale))))
    adata.uns["spatial"] = {
        "ST": {
            "images": {"downscaled_fullres": thumb},
            "scalefactors": {"spot_diameter_fullres": 100.0 / mpp, "tissue_downscaled_fullres_scalef": thumb_scale},
        }
    }
    adata.write_h5ad(root / "st" / f"{hest_id}.h5ad")

    metadata = {
        "dataset_title": "Spatial deconvolution of HER2-positive breast cancer delineates tumor-associated cell type interactions",
        "id": hest_id,
        "image_filename": f"{hest_id}.tif",
        "organ": "Breast",
        "disease_state": "Cancer",
        "oncotree_code": "IDC",
        "species": "Homo sapiens",
        "patient": patient,
        "st_technology": "Spatial Transcriptomics",
        "inter_spot_dist": 200.0,
        "spot_diameter": 100.0,
        "spots_under_tissue": int(len(spots)),
        "nb_genes": int(counts.shape[1]),
        "pixel_size_um_embedded": None,
        "pixel_size_um_estimated": mpp,
        "fullres_px_width": int(image.shape[1]),
        "fullres_px_height": int(image.shape[0]),
        "subseries": section,
    }
    (root / "metadata" / f"{hest_id}.json").write_text(json.dumps(metadata))
    return {"n_spots": len(spots), "mpp": mpp}


@pytest.fixture(scope="module")
def hest(tmp_path_factory):
    """(folder, {id: {n_spots, mpp}}): the HEST-layout fixture."""
    needed = [
        HER2ST / sub / f"{section}{suffix}"
        for section, _ in SECTIONS.values()
        for sub, suffix in (("spots", "_selection.tsv"), ("counts", ".tsv.gz"), ("images", ".jpg"))
    ]
    missing = [p for p in needed if not p.exists()]
    if missing:
        pytest.skip(f"real test data not found: {', '.join(map(str, missing))} (expected ../shared/data beside the repo, at {SHARED_DATA})")
    root = tmp_path_factory.mktemp("hest") / "hest_data"
    for sub in ("st", "wsis", "metadata"):
        (root / sub).mkdir(parents=True)
    samples = {hest_id: _write_sample(root, hest_id, section, patient) for hest_id, (section, patient) in SECTIONS.items()}
    # a sample whose st/ and wsis/ files are not downloaded (its metadata as in HEST_v1_1_0.csv)
    visium = {"id": "TENX152", "organ": "Bowel", "species": "Homo sapiens", "st_technology": "Visium", "oncotree_code": "COAD", "patient": "Patient 1"}
    (root / "metadata" / "TENX152.json").write_text(json.dumps({**visium, "inter_spot_dist": 100.0, "spot_diameter": 55.0, "pixel_size_um_estimated": 0.2737}))
    return root, samples


@pytest.fixture(scope="module")
def hest_store(hest, tmp_path_factory):
    """A store made by ingesting both HER2ST samples by id (training a tiny model first)."""
    root, _ = hest
    db = tmp_path_factory.mktemp("hest-store") / "db"
    result = run("ingest", root, "--id", "SPA145", "--id", "SPA141", "--db", db, *ONE_EPOCH_MODEL)
    return db, result


def _datasets(db: Path) -> dict[str, dict]:
    from histoindex.store import Store

    return {d["dataset"]: d for d in Store(db).info()["datasets"]}


def _spots_version(db: Path) -> int:
    from histoindex.store import Store

    return Store(db).info()["tables"]["spots"]["version"]


def test_ingest_by_id_takes_labels_and_pixel_size_from_metadata(hest, hest_store):
    from histoindex.io.hest import MPP_SOURCE
    from histoindex.store import Store

    root, samples = hest
    db, result = hest_store
    for hest_id, sample in samples.items():
        assert f"{hest_id}: {sample['n_spots']} spots" in result.stdout, result.output
    datasets = _datasets(db)
    assert set(datasets) == {"SPA145", "SPA141"}, "one dataset per HEST sample, named by its id"
    for hest_id, sample in samples.items():
        row = datasets[hest_id]
        assert (row["tissue"], row["platform"], row["species"], row["spots"]) == ("breast", "st", "human", sample["n_spots"])

    (model,) = Store(db).models()
    assert sorted(model.train_datasets) == ["SPA141", "SPA145"], "a first HEST ingest trains on every selected sample"
    for hest_id, sample in samples.items():
        recorded = model.metrics["datasets"][hest_id]
        assert recorded["mpp_source"] == MPP_SOURCE and recorded["mpp"] == pytest.approx(sample["mpp"])
    from histoindex.io import read_hest

    spots = read_hest(root, "SPA141")
    assert spots.mpp == pytest.approx(samples["SPA141"]["mpp"]) and spots.mpp_source == MPP_SOURCE
    assert spots.mpp == pytest.approx(0.687 * DOWNSCALE, rel=0.03), "the HER2ST grid: ~0.687 µm per full-resolution JPEG pixel"
    assert spots.image.path == root / "wsis" / "SPA141.tif", "the WSI, not the downscaled image in the h5ad"


def test_ingest_by_metadata_selection_with_overrides(hest, hest_store, tmp_path):
    root, samples = hest
    db = tmp_path / "db"
    shutil.copytree(hest_store[0], db)
    where = ["--hest-where", "patient='Patient C'", "--hest-where", "technology=spatial transcriptomics"]
    result = run("ingest", root, *where, "--tissue", "her2 breast", "--species", "homo sapiens", "--db", db)
    assert "SPA141: " in result.stdout and "SPA145" not in result.stdout, result.output
    datasets = _datasets(db)
    labels = (datasets["SPA141"]["tissue"], datasets["SPA141"]["platform"], datasets["SPA141"]["species"])
    assert labels == ("her2 breast", "st", "homo sapiens"), "--tissue and --species override the metadata"
    assert (datasets["SPA145"]["tissue"], datasets["SPA145"]["species"]) == ("breast", "human"), "the sample left out keeps its rows"


def test_selection_syntax(hest):
    from histoindex.errors import InputError
    from histoindex.io import hest_samples

    root, _ = hest
    ids = lambda where: [s.id for s in hest_samples(root, where=where)]  # noqa: E731
    assert ids("platform=st") == ["SPA141", "SPA145"]
    assert ids(["inter_spot_dist=200", "Patient=patient b"]) == ["SPA145"], "numbers match as numbers, keys and values case-insensitively"
    assert ids({"oncotree_code": ["IDC", "COAD"], "species": "Homo sapiens"}) == ["SPA141", "SPA145"]
    assert [s.id for s in hest_samples(root, ids=["SPA145", "SPA141", "SPA145"])] == ["SPA145", "SPA141"], "ids in the given order, once"
    (sample,) = hest_samples(root, ids=["SPA145"], where="subseries=B4")
    assert (sample.tissue, sample.platform, sample.species) == ("breast", "st", "human")
    said: list[str] = []  # organ=Breast,Bowel also matches TENX152, whose st/ file is not downloaded: skipped, said so
    assert [s.id for s in hest_samples(root, where="organ=breast,BOWEL", log=said.append)] == ["SPA141", "SPA145"]
    assert len(said) == 1 and "TENX152" in said[0] and "skipped" in said[0]
    for where, message in (
        ("organ", "expected KEY=VALUE"),
        ("organ=Breast; DROP TABLE spots", "no HEST sample"),
        ("colour=pink", "unknown key colour"),
        (["organ=Breast", "organ=Bowel"], "repeats organ"),
    ):
        with pytest.raises(InputError, match=message):
            hest_samples(root, where=where)


@pytest.mark.parametrize(
    ("args", "naming"),
    [
        (["--id", "SPA145", "--id", "SPA999"], ("SPA999", "no sample")),  # one good id, one unknown: nothing is written
        (["--id", "TENX152"], ("TENX152", "st/TENX152.h5ad", "not found")),
        (["--hest-where", "organ=Liver"], ("organ=Liver", "Breast")),
        (["--hest-where", "stain=HE"], ("unknown key stain",)),
        ([], ("HEST folder of 3 samples", "--id")),
        (["--id", "SPA145", "--image", "x.tif"], ("--image", "HEST folder")),
        (["--id", "SPA145", "--id", "SPA141", "--dataset", "both"], ("--dataset", "2 HEST samples")),
    ],
)
def test_bad_hest_input_fails_cleanly_and_writes_nothing(hest, hest_store, tmp_path, args, naming):
    root, _ = hest
    db = tmp_path / "db"
    shutil.copytree(hest_store[0], db)
    before = _spots_version(db)
    error_line(run("ingest", root, *args, "--db", db, ok=False), *naming)
    assert _spots_version(db) == before, "a refused ingest writes nothing"


def test_missing_wsi_and_not_a_hest_folder(hest, tmp_path):
    root, _ = hest
    copy = tmp_path / "hest_data"
    shutil.copytree(root, copy)
    (copy / "wsis" / "SPA141.tif").unlink()
    db = tmp_path / "db"
    error_line(run("ingest", copy, "--id", "SPA145", "--id", "SPA141", "--db", db, ok=False), "SPA141", "wsis")
    error_line(run("ingest", copy / "st", "--id", "SPA145", "--db", db, ok=False), "not a HEST folder")
    assert not db.exists(), "nothing is written, not even an empty store"


def test_from_a_hest_sample_to_a_qupath_overlay_in_two_commands(hest, hest_store, tmp_path):
    """ingest (done by the fixture) then query the sample's own WSI: its pixel size comes from HEST's
    metadata, since the TIFF carries none."""
    from histoindex.io import open_slide

    root, samples = hest
    db = tmp_path / "db"
    shutil.copytree(hest_store[0], db)
    slide = root / "wsis" / f"{UNCALIBRATED}.tif"
    assert open_slide(slide).mpp is None
    out = tmp_path / "overlay.geojson"
    result = run("query", slide, "--tissue", "breast", "--out", out, "--db", db)
    assert "from HEST's metadata" in result.output
    collection = json.loads(out.read_text())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) > 10
    assert collection["histoindex"]["mpp"] == pytest.approx(samples[UNCALIBRATED]["mpp"])
