"""Bad inputs: a clear `Error:`, a non-zero exit code, and the store exactly as it was."""

from __future__ import annotations

import anndata
import numpy as np
from PIL import Image

from histoindex.store import Store

from .conftest import run


def _snapshot(db):
    store = Store(db)
    return store.versions(), [m.model_id for m in store.models()]


def test_h5ad_without_spatial(store, sections, tmp_path):
    adata = anndata.read_h5ad(sections.other_h5ad)
    del adata.obsm["spatial"]
    bad = tmp_path / "nospatial.h5ad"
    adata.write_h5ad(bad)
    before = _snapshot(store)
    result = run("ingest", bad, "--tissue", "breast", "--db", store, ok=False)
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {bad} has no obsm['spatial']")
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
        (["query", tmp_path / "missing.svs", "--db", store], "Error: image not found"),
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
