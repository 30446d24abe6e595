"""Bad inputs: a clear `Error:`, a non-zero exit code, and the store exactly as it was."""

from __future__ import annotations

import anndata
import numpy as np
import polars as pl
import pytest
from PIL import Image

from histoindex.store import Store

from .conftest import error_line, run


def _snapshot(db):
    store = Store(db)
    return store.versions(), [m.model_id for m in store.models()], {name: store.table(name).count_rows() for name in store.table_names()}


def test_h5ad_without_spatial(store, sections, tmp_path):
    adata = anndata.read_h5ad(sections.other_h5ad)
    del adata.obsm["spatial"]
    bad = tmp_path / "nospatial.h5ad"
    adata.write_h5ad(bad)
    before = _snapshot(store)
    result = run("ingest", bad, "--tissue", "breast", "--db", store, ok=False)
    assert result.exit_code == 1
    error_line(result, f"{bad} has no obsm['spatial']")
    assert _snapshot(store) == before


def test_image_missing(store, sections, tmp_path):
    adata = anndata.read_h5ad(sections.other_h5ad)
    lib = next(iter(adata.uns["spatial"]))
    adata.uns["spatial"][lib]["metadata"]["source_image_path"] = str(tmp_path / "gone.tif")
    bad = tmp_path / "noimage.h5ad"
    adata.write_h5ad(bad)
    before = _snapshot(store)
    result = run("ingest", bad, "--tissue", "breast", "--db", store, ok=False)
    assert result.exit_code == 1
    assert "no H&E image" in result.output and "gone.tif does not exist" in result.output and "--image" in result.output
    result = run("ingest", sections.other_h5ad, "--image", tmp_path / "nope.tif", "--tissue", "breast", "--db", store, ok=False)
    assert result.exit_code == 1 and "Error: image not found" in result.output
    assert _snapshot(store) == before


def test_ingest_into_new_store_with_bad_input_creates_nothing(sections, tmp_path):
    adata = anndata.read_h5ad(sections.other_h5ad)
    del adata.obsm["spatial"]
    bad = tmp_path / "nospatial.h5ad"
    adata.write_h5ad(bad)
    result = run("ingest", bad, "--tissue", "breast", "--db", tmp_path / "new.db", ok=False)
    assert result.exit_code == 1
    assert not (tmp_path / "new.db").exists()


def test_slide_without_pixel_size_needs_mpp(store, sections, tmp_path):
    from histoindex.io import open_slide

    slide = open_slide(sections.heldout_tif)
    image = slide.read_region(0, 0, 1300, 1300)
    png = tmp_path / "plain.png"
    Image.fromarray(image).save(png)
    before = _snapshot(store)
    result = run("query", png, "--tissue", "breast", "--db", store, ok=False)
    assert result.exit_code == 1
    assert "Error: plain.png has no pixel size" in result.output and "--mpp" in result.output
    assert _snapshot(store) == before
    # with --mpp it works (the PNG is a crop at 1 µm/px)
    out = tmp_path / "p.parquet"
    run("query", png, "--tissue", "breast", "--mpp", "1.0", "--out", out, "--db", store)
    assert out.exists()


def test_other_bad_inputs(store, sections, tmp_path):
    before = _snapshot(store)
    cases = [
        (["query", tmp_path / "missing.svs", "--db", store], "Error: slide not found"),
        (["query", sections.heldout_tif, "--out", tmp_path / "x.csv", "--db", store], "unsupported type; use .parquet or .h5ad"),
        (["query", sections.heldout_tif, "--k", "0", "--db", store], "--k must be at least 1"),
        (["query", sections.heldout_tif, "--db", tmp_path / "nostore"], "no histoindex store at"),
        (["ingest", tmp_path / "missing.h5ad", "--tissue", "x", "--db", store], "Error: reference file not found"),
        (["ingest", sections.train_tif, "--tissue", "x", "--db", store], "expected an .h5ad file"),
        (["sql", "SELECT * FROM nope", "--db", store], "Error: Catalog Error"),
        (["train", sections.train_h5ad, "--backbone", "no_such_net", "--db", store], "unknown timm backbone 'no_such_net'"),
    ]
    for args, message in cases:
        result = run(*args, ok=False)
        assert result.exit_code != 0, args
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert _snapshot(store) == before


def test_gene_list_with_unknown_gene(store, sections, tmp_path):
    genes = tmp_path / "genes.txt"
    genes.write_text("FASN\nNOT_A_GENE\n")
    before = _snapshot(store)
    result = run("train", sections.train_h5ad, "--genes", genes, "--db", store, ok=False)
    assert result.exit_code == 1
    assert "1 requested gene(s) are not in every reference (e.g. NOT_A_GENE)" in result.output
    assert _snapshot(store) == before


def test_corrupt_h5ad(store, tmp_path):
    bad = tmp_path / "corrupt.h5ad"
    bad.write_bytes(np.random.default_rng(0).bytes(1000))
    result = run("ingest", bad, "--tissue", "x", "--db", store, ok=False)
    assert result.exit_code == 1 and "cannot read" in result.output


def _h5ad(sections, tmp_path, name, change):
    adata = anndata.read_h5ad(sections.other_h5ad)
    change(adata)
    path = tmp_path / name
    adata.write_h5ad(path)
    return path


def _set_count(value):
    def change(adata):
        X = np.asarray(adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X, dtype=np.float32)
        X[2, 5] = value
        adata.X = X

    return change


def test_unreadable_h5ad(store, sections, tmp_path):
    raw = sections.other_h5ad.read_bytes()
    truncated = tmp_path / "truncated.h5ad"
    truncated.write_bytes(raw[: len(raw) // 2])
    text = tmp_path / "text.h5ad"
    text.write_text("spot,x,y\n")
    before = _snapshot(store)
    for bad, problem in ((truncated, "truncated file"), (text, "file signature not found")):
        result = run("ingest", bad, "--tissue", "breast", "--db", store, ok=False)
        error_line(result, f"Error: cannot read {bad} as AnnData .h5ad", problem)
    assert _snapshot(store) == before


def _nan_xy(adata):
    adata.obsm["spatial"] = adata.obsm["spatial"].astype(float)
    adata.obsm["spatial"][3, 0] = np.nan


def _repeat_obs(adata):
    adata.obs_names = [adata.obs_names[0], *adata.obs_names[:-1]]


def _repeat_var(adata):
    adata.var_names = [adata.var_names[0], *adata.var_names[:-1]]


@pytest.mark.parametrize(
    "change, problem",
    [
        (_nan_xy, "obsm['spatial'] has NaN or infinite spot positions (1 spots, e.g. "),
        (_set_count(np.nan), "expression has NaN or infinite values"),
        (_set_count(np.inf), "expression has NaN or infinite values"),
        (_set_count(-1.0), "expression has negative values"),
        (_repeat_obs, "spot ids repeat in {bad} (e.g. "),
        (_repeat_var, "gene names repeat in {bad} (e.g. FASN); make them unique first"),
    ],
    ids=["nan-xy", "nan-counts", "inf-counts", "negative-counts", "repeated-spots", "repeated-genes"],
)
def test_bad_values_in_an_h5ad(store, sections, tmp_path, change, problem):
    bad = _h5ad(sections, tmp_path, "bad.h5ad", change)
    before = _snapshot(store)
    result = run("ingest", bad, "--tissue", "breast", "--db", store, ok=False)
    error_line(result, bad, problem.format(bad=bad))
    assert _snapshot(store) == before


def test_reference_genes_must_cover_the_model(store, sections, tmp_path):
    """A reference must measure at least half the model's genes (they shape the spot's expression
    embedding), else it is refused, naming them; gene names of another kind get a hint."""
    genes = list(Store(store).model().cfg.genes)
    renamed = _h5ad(sections, tmp_path, "ensembl.h5ad", lambda a: setattr(a, "var_names", [f"ENSG{i:011d}" for i in range(a.n_vars)]))
    dropped = sorted(genes[-(len(genes) // 2 + 1) :])
    partial = tmp_path / "partial.h5ad"
    adata = anndata.read_h5ad(sections.other_h5ad)
    adata[:, [g for g in adata.var_names if g not in dropped]].copy().write_h5ad(partial)
    before = _snapshot(store)
    result = run("ingest", renamed, "--tissue", "breast", "--db", store, ok=False)
    error_line(
        result,
        f"none of the model's {len(genes)} genes is in {renamed}: the model uses symbols",
        "the file uses Ensembl ids (e.g. ENSG00000000000",
        "--db NEW.db",
        "--model ID",
    )
    result = run("ingest", partial, "--tissue", "breast", "--db", store, ok=False)
    line = error_line(result, f"{partial} lacks {len(dropped)} of the model's {len(genes)} genes", "histoindex train --genes FILE")
    assert all(g in line for g in genes[-(len(genes) // 2 + 1) :][:10])
    assert _snapshot(store) == before


def test_bad_slides(store, sections, tmp_path):
    raw = sections.heldout_tif.read_bytes()
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(raw[: len(raw) // 3])
    noise_tif, noise_png = tmp_path / "noise.tif", tmp_path / "noise.png"
    noise_tif.write_bytes(np.random.default_rng(0).bytes(5000))
    noise_png.write_bytes(np.random.default_rng(1).bytes(5000))
    white = tmp_path / "white.png"
    Image.fromarray(np.full((1500, 1500, 3), 245, np.uint8)).save(white)
    before = _snapshot(store)
    cases = [
        (truncated, [], "cannot read a thumbnail of truncated.tif (is the file truncated or damaged?)"),
        (noise_tif, [], f"cannot open slide {noise_tif}: OpenSlide: Unsupported or missing image file; tiffslide: not a TIFF file"),
        (noise_png, ["--mpp", "1"], f"cannot read image {noise_png}: cannot identify image file"),
        (white, ["--mpp", "1"], "no tissue found on white.png"),
    ]
    for slide, extra, message in cases:
        result = run("query", slide, "--tissue", "breast", *extra, "--db", store, ok=False)
        error_line(result, message)
    assert _snapshot(store) == before


def test_blank_or_misplaced_reference_images(store, sections, tmp_path):
    black = tmp_path / "black.png"
    Image.fromarray(np.zeros((2600, 2600, 3), np.uint8)).save(black)
    small = tmp_path / "small.png"
    Image.fromarray(np.asarray(Image.open(sections.other_tif))[:300, :300]).save(small)
    before = _snapshot(store)
    result = run("ingest", sections.other_h5ad, "--image", black, "--mpp", "1", "--tissue", "breast", "--db", store, ok=False)
    error_line(result, "Error: black.png is blank where the spots are: its pixels are all about (0, 0, 0)", "--image")
    result = run("ingest", sections.other_h5ad, "--image", small, "--mpp", "1", "--tissue", "breast", "--db", store, ok=False)
    error_line(result, f"Error: {sections.other_h5ad}: ", "spot centres fall outside small.png (300×300 px;", "is this the image the spot positions refer to")
    assert _snapshot(store) == before
    # training refuses them too, before any epoch, and creates no store
    result = run("train", sections.other_h5ad, "--image", black, "--mpp", "1", "--db", tmp_path / "new", ok=False)
    error_line(result, "black.png is blank where the spots are")
    assert not (tmp_path / "new").exists()


def test_space_ranger_test_data_has_a_black_hires_image(shared_data, tmp_path):
    """scanpy's Space Ranger 1.0.0 test folder reads, but its hires PNG is all black: training on it
    (as it would, with a warning, before) is refused."""
    folder = shared_data / "spaceranger-1.0.0"
    if not folder.is_dir():
        pytest.skip(f"real data not available: {folder} is absent")
    result = run("train", folder, "--db", tmp_path / "new", "--n-genes", "20", ok=False)
    error_line(result, "tissue_hires_image.png is blank where the spots are: its pixels are all about (0, 0, 0)")
    assert not (tmp_path / "new").exists()


def test_query_positions_off_the_slide(store, sections, tmp_path):
    off = tmp_path / "off.csv"
    pl.DataFrame({"spot": ["a", "b"], "x": [100.0, 1e6], "y": [100.0, 5.0]}).write_csv(off)
    gaps = tmp_path / "gaps.csv"
    gaps.write_text("spot,x,y\na,100,100\nb,,5\n")
    before = _snapshot(store)
    result = run("query", sections.heldout_tif, "--tissue", "breast", "--spots", off, "--db", store, ok=False)
    error_line(result, f"Error: spots file {off}: 1 of 2 positions fall outside syn-heldout.tif (2600×2600 px), e.g. spot b at (1000000, 5)")
    result = run("query", sections.heldout_tif, "--tissue", "breast", "--spots", gaps, "--db", store, ok=False)
    error_line(result, f"Error: spots file {gaps}: 1 position(s) are missing, NaN or infinite (e.g. spot b)")
    assert _snapshot(store) == before


def test_a_folder_that_is_not_a_store(sections, tmp_path):
    folder = tmp_path / "documents"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    message = f"Error: {folder} is not a histoindex store: the folder holds notes.txt and none of the tables spots, predictions, models"
    for args in (
        ["query", sections.heldout_tif, "--tissue", "breast"],
        ["info"],
        ["versions"],
        ["ingest", sections.other_h5ad, "--tissue", "breast"],  # would have trained a model into it
        ["train", sections.other_h5ad],
    ):
        result = run(*args, "--db", folder, ok=False)
        error_line(result, message)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    result = run("info", "--db", folder / "notes.txt", ok=False)
    error_line(result, f"Error: {folder / 'notes.txt'} is a file, not a histoindex store")


def test_unknown_model_and_empty_filters(store, sections):
    model = Store(store).model().model_id
    before = _snapshot(store)
    cases = [
        (["query", sections.heldout_tif, "--model", "bleep-nope"], f"Error: no model 'bleep-nope'; models: {model}"),
        (["ingest", sections.other_h5ad, "--tissue", "breast", "--model", "bleep-nope"], f"Error: no model 'bleep-nope'; models: {model}"),
        (["query", sections.heldout_tif, "--tissue", "lung"], f"Error: no reference spots with tissue 'lung' (model {model}); tissue values present: breast"),
        (
            ["query", sections.heldout_tif, "--species", "mouse"],
            "Error: no reference spots with species 'mouse' (model {model}); species values present: human",
        ),
        (["query", sections.heldout_tif, "--k", "0"], "Error: --k must be at least 1, got 0"),
        (["query", sections.heldout_tif, "--where", "dataset = 'nope'"], "Error: no reference spots match"),
    ]
    for args, message in cases:
        result = run(*args, "--db", store, ok=False)
        error_line(result, message.format(model=model))
    assert _snapshot(store) == before


def test_k_above_the_candidates_averages_them_all_and_says_so(store, sections, tmp_path):
    n = Store(store).table("spots").count_rows()
    positions = tmp_path / "positions.csv"
    pl.DataFrame({"spot": ["a", "b"], "x": [800.0, 1200.0], "y": [800.0, 1200.0]}).write_csv(positions)
    out_all, out_n = tmp_path / "all.parquet", tmp_path / "n.parquet"
    result = run("query", sections.heldout_tif, "--spots", positions, "--k", str(n + 1000), "--out", out_all, "--db", store)
    assert f"--k {n + 1000} is more than the {n} reference spots that match; averaging all {n}" in result.output
    run("query", sections.heldout_tif, "--spots", positions, "--k", str(n), "--out", out_n, "--db", store)
    frame = pl.read_parquet(out_n)
    genes = [c for c, dtype in frame.schema.items() if dtype == pl.Float32 and c not in ("x", "y")]
    assert len(genes) == len(Store(store).model().cfg.genes)
    a, b = pl.read_parquet(out_all).select(genes).to_numpy(), frame.select(genes).to_numpy()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
