"""The CLI as a new user meets it every day: no silent stretches, a first ingest that says it will
train (recipe and estimate), `query --spots` taking the pixel size from the spots file, genes
matched on Ensembl ids or symbols, and `sql` tables that stay readable."""

from __future__ import annotations

import json

import anndata
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from PIL import Image

from histoindex.store import Store

from .conftest import TINY_BACKBONE, error_line, run

SPACERANGER_DIR = "spaceranger-1.0.0"
#: the tiny backbone, one epoch, 20 genes: a first ingest that trains in seconds
TINY_TRAINING = [*TINY_BACKBONE, "--patch-um", "110", "--epochs", "1", "--n-genes", "20", "--batch-size", "16", "--stain", "none"]


def test_ingest_help_says_it_trains_when_the_store_has_no_model():
    text = " ".join(run("ingest", "--help").output.split())
    assert "Trains a model first when the store has none" in text


def test_a_first_ingest_says_it_trains_with_the_recipe_and_an_estimate(sections, tmp_path):
    db = tmp_path / "db"
    out = run("ingest", sections.train_h5ad, "--tissue", "breast", "--db", db, *TINY_TRAINING).output
    lines = out.splitlines()
    first = lines.index(f"reading {sections.train_h5ad}")
    announce = next(i for i, line in enumerate(lines) if "ingest trains one first" in line)
    recipe = next(i for i, line in enumerate(lines) if line.startswith("training bleep: backbone test_resnet"))
    estimate = next(i for i, line in enumerate(lines) if line.startswith("estimated time on cpu"))
    trained = next(i for i, line in enumerate(lines) if line.startswith("registered model"))
    assert first < announce < recipe < estimate < trained, out
    assert "no store yet" in lines[announce] and "spots" in lines[announce]
    assert "1 epochs" in lines[recipe] and "20 genes" in lines[recipe] and "random initialisation, fine-tuned" in lines[recipe]
    # an estimate, from the backbone timed here, with the embedding that follows training counted
    assert "~" in lines[estimate] and "patches/s" in lines[estimate] and "then embedding" in lines[estimate], lines[estimate]
    # progress as plain lines (not a terminal), for the patches and for the spots embedded after
    assert any(line.startswith("epochs: 1/1") for line in lines) and any(line.startswith("spots: ") for line in lines), out


def test_train_with_a_frozen_backbone_estimates_the_feature_pass(sections, tmp_path):
    frozen = [a if a != "--fine-tune" else "--freeze-backbone" for a in TINY_TRAINING]
    out = run("train", sections.train_h5ad, "--db", tmp_path / "db", *frozen).output
    (estimate,) = [line for line in out.splitlines() if line.startswith("estimated time")]
    assert "backbone features of" in estimate and "× 8 views" in estimate and "epochs of the heads" in estimate, estimate
    assert "then embedding" not in estimate  # `train` embeds nothing after
    assert "backbone features: 0/" in out or "backbone features: " in out


def test_query_says_what_it_loads_and_opens(store, sections, tmp_path, monkeypatch):
    from histoindex import api

    monkeypatch.setattr(api.querying, "LARGE_SLIDE_BYTES", 0)  # every slide counts as large: the line shows
    out = run("query", sections.heldout_tif, "--tissue", "breast", "--db", store).output
    lines = out.splitlines()
    loading = next(i for i, line in enumerate(lines) if line.startswith("loading model bleep-"))
    opening = next(i for i, line in enumerate(lines) if line.startswith(f"opening {sections.heldout_tif.name} ("))
    tiles = next(i for i, line in enumerate(lines) if "tissue tiles" in line)
    assert loading < opening < tiles, out


def _plain_png(sections, tmp_path):
    from histoindex.io import open_slide

    slide = open_slide(sections.heldout_tif)
    png = tmp_path / "heldout.png"  # the whole section, no pixel size in the file
    Image.fromarray(slide.read_region(0, 0, slide.width, slide.height)).save(png)
    slide.close()
    assert open_slide(png).mpp is None
    return png


def test_query_spots_takes_the_pixel_size_from_the_spots_file(store, sections, tmp_path):
    png = _plain_png(sections, tmp_path)
    out = tmp_path / "spots.parquet"
    result = run("query", png, "--tissue", "breast", "--spots", sections.heldout_h5ad, "--out", out, "--db", store)
    (line,) = [line for line in result.output.splitlines() if "has no pixel size in its metadata" in line]
    assert f"from {sections.heldout_h5ad.name} (visium spot pitch 100 µm" in line, line
    # the synthetic section is drawn at 1 µm/px: the spot pitch finds it
    provenance = json.loads(pq.read_schema(out).metadata[b"histoindex"])
    assert provenance["mpp"] == pytest.approx(1.0, rel=0.01)
    assert pl.read_parquet(out).height == anndata.read_h5ad(sections.heldout_h5ad, backed="r").n_obs
    # a CSV of positions carries no spot layout: still --mpp
    csv = tmp_path / "spots.csv"
    csv.write_text("spot,x,y\na,1000,1000\nb,1200,1000\n")
    result = run("query", png, "--tissue", "breast", "--spots", csv, "--db", store, ok=False)
    error_line(result, "heldout.png has no pixel size", "--mpp")


def _renamed(source, target, *, ensembl_names: bool):
    """The section with Ensembl-like ids beside its symbols: as var_names (symbols in
    var['gene_symbols']) or as var['gene_ids'] (symbols as var_names), as Space Ranger files carry both."""
    adata = anndata.read_h5ad(source)
    symbols = list(map(str, adata.var_names))
    ids = [f"ENSG{i:011d}" for i in range(len(symbols))]
    if ensembl_names:
        adata.var_names = ids
        adata.var["gene_symbols"] = symbols
    else:
        adata.var["gene_ids"] = ids
    adata.write_h5ad(target)
    return target


def test_genes_match_on_symbols_or_ensembl_ids(store, sections, tmp_path):
    # a model trained on symbols ingests a file whose var_names are Ensembl ids (symbols beside)
    ensembl = _renamed(sections.other_h5ad, tmp_path / "ensembl.h5ad", ensembl_names=True)
    run("ingest", ensembl, "--tissue", "breast", "--dataset", "ens", "--db", store)
    assert Store(store).table("spots").count_rows("dataset = 'ens'") > 0
    assert not Store(store).model().cfg.genes[0].startswith("ENSG")
    # and a model trained on Ensembl ids ingests a file of symbols that carries var['gene_ids']
    db = tmp_path / "ens.db"
    run("ingest", ensembl, "--tissue", "breast", "--db", db, *TINY_TRAINING)
    assert Store(db).model().cfg.genes[0].startswith("ENSG")
    symbols = _renamed(sections.train_h5ad, tmp_path / "symbols.h5ad", ensembl_names=False)
    result = run("ingest", symbols, "--tissue", "breast", "--db", db)
    assert "symbols: " in result.output and "spots@" in result.output
    # without a second name column, the error says what each side uses and what to do
    bare = anndata.read_h5ad(sections.train_h5ad)
    bare.write_h5ad(tmp_path / "bare.h5ad")
    line = error_line(run("ingest", tmp_path / "bare.h5ad", "--tissue", "breast", "--db", db, ok=False), "the model uses Ensembl ids (e.g. ENSG")
    assert "the file uses symbols" in line and "--db NEW.db" in line and "--model ID" in line and "gene_ids" in line


def test_space_ranger_genes_carry_their_ensembl_ids(shared_data):
    from histoindex.io import read_spaceranger

    if not (shared_data / SPACERANGER_DIR).is_dir():
        pytest.skip("no Space Ranger run in the shared data")
    spots = read_spaceranger(shared_data / SPACERANGER_DIR)
    assert spots.gene_aliases is not None and str(spots.gene_aliases[0]).startswith("ENS")
    index = spots.gene_index()
    symbol, ensembl = str(spots.var_names[0]), str(spots.gene_aliases[0])
    assert index[symbol] == index[ensembl] == 0
    np.testing.assert_array_equal(spots.normalized([ensembl]), spots.normalized([symbol]))


def test_sql_shortens_wide_rows_and_writes_them_whole(store, tmp_path):
    result = run("sql", "SELECT * FROM models", "--db", store)
    genes = len(Store(store).model().cfg.genes)
    assert f"… {genes} values]" in result.stdout, result.stdout
    assert '{"backbone": ' in result.stdout and "…" in result.stdout  # the config JSON, cut
    cells = [cell.strip() for line in result.stdout.splitlines() if line.startswith("│") for cell in line.split("│")]
    assert cells and max(map(len, cells)) <= 40, result.stdout
    assert "--format csv or json" in result.stderr and "--out FILE.parquet" in result.stderr
    spots = run("sql", "SELECT image_embedding FROM spots LIMIT 1", "--db", store).stdout
    assert "… 256 values]" in spots or " values]" in spots, spots
    # --out: every value in full
    out = tmp_path / "models.parquet"
    written = run("sql", "SELECT * FROM models", "--db", store, "--out", out)
    assert f"→ {out} (parquet)" in written.stdout
    assert len(pl.read_parquet(out)["genes"][0]) == genes
    assert len(json.loads(run("sql", "SELECT genes FROM models", "--db", store, "--format", "json").stdout)[0]["genes"]) == genes
    usage = run("sql", "SELECT 1", "--db", store, "--format", "parquet", ok=False)
    assert usage.exit_code == 2 and "--out FILE.parquet" in usage.output
    # a short result is a plain table with no hint
    short = run("sql", "SELECT count(*) AS n FROM models", "--db", store)
    assert "shortened" not in short.stderr and " 1 " in short.stdout


def test_sql_rows_too_wide_for_the_terminal_read_as_blocks(store, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich: a terminal
    monkeypatch.setenv("COLUMNS", "80")
    out = run("sql", "SELECT * FROM models", "--db", store).stdout.splitlines()
    assert out[0].startswith("── row 1 ")
    fields = {name.strip(): value for name, value in (line.split(" │ ", 1) for line in out[1:] if " │ " in line)}
    assert fields["model_id"].startswith("bleep-") and fields["genes"].endswith(" values]") and fields["config_json"].endswith("…")
    assert all(len(line) <= 80 for line in out), out
