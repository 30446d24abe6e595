"""The whole chain through the real CLI on synthetic data: train → ingest → query → sql."""

from __future__ import annotations

import json

import anndata
import numpy as np
import polars as pl

from histoindex import api
from histoindex.metrics import mse, pearson_per_gene
from histoindex.store import Store

from .conftest import run


def safe_open_metadata(blob: bytes) -> dict:
    """The metadata of safetensors bytes (8-byte header length, then the JSON header)."""
    size = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + size])["__metadata__"]


def test_trained_model_is_registered_with_its_config(trained_store):
    store = Store(trained_store)
    (model,) = store.models()
    weights = model.weights()  # safetensors bytes kept in the models table, not a file beside it
    assert json.loads(safe_open_metadata(weights)["histoindex.config"])["backbone"] == "resnet10t"
    assert not (trained_store / "models").exists()
    cfg = model.cfg
    assert (cfg.backbone, cfg.patch_px, cfg.patch_um, cfg.seed) == ("resnet10t", 64, 110.0, 0)
    assert len(cfg.genes) == 48 and cfg.normalisation == "log1p_cp10k"
    assert len(model.metrics["train_loss"]) == 8
    assert model.metrics["train_loss"][-1] < model.metrics["train_loss"][0]
    assert model.train_datasets == ("syn-train",)


def test_ingest_writes_every_spot_with_both_embeddings(trained_store, sections):
    store = Store(trained_store)
    rows = store.table("spots").to_arrow()
    n_spots = anndata.read_h5ad(sections.train_h5ad).n_obs
    assert rows.num_rows == n_spots
    assert set(rows.column("dataset").to_pylist()) == {"train"}
    (model,) = store.models()
    assert set(rows.column("model_id").to_pylist()) == {model.model_id}
    image = np.stack(rows.column("image_embedding").to_numpy(zero_copy_only=False))
    expr = np.stack(rows.column("expression_embedding").to_numpy(zero_copy_only=False))
    assert image.shape == expr.shape == (n_spots, 256)
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-4)
    assert len(rows.column("expression")[0]) == 48
    # the store was created empty (version 1) and the ingest is the one version after it, tagged
    versions = store.versions()["spots"]
    assert [(v["version"], v["rows"]) for v in versions] == [(1, 0), (2, n_spots)]
    assert versions[1]["tags"] == ["ingest-train-v2"]
    assert store.table("spots").list_indices() == [], "scalar indexes come with `histoindex index`"


def test_query_at_heldout_spots_beats_a_constant_predictor(store, sections, tmp_path):
    """Held-out section (different seed = different layout and noise), same biology."""
    out = tmp_path / "heldout.parquet"
    run("query", sections.heldout_tif, "--tissue", "breast", "--spots", sections.heldout_h5ad, "--out", out, "--db", store)
    frame = pl.read_parquet(out)
    heldout = api.read_reference(sections.heldout_h5ad)
    assert frame["spot"].to_list() == list(heldout.obs_names)
    (model,) = Store(store).models()
    genes = list(model.cfg.genes)
    predicted = frame.select(genes).to_numpy()
    truth = heldout.normalized(genes)
    train_mean = api.read_reference(sections.train_h5ad).normalized(genes).mean(axis=0)
    r = pearson_per_gene(truth, predicted)
    assert r.mean() > 0.3, r.mean()
    assert mse(truth, predicted) < 0.7 * mse(truth, np.broadcast_to(train_mean, truth.shape))


def test_grid_query_writes_h5ad_parquet_and_the_predictions_table(store, sections, tmp_path):
    out_h5ad, out_parquet = tmp_path / "grid.h5ad", tmp_path / "grid.parquet"
    run("query", sections.heldout_tif, "--tissue", "breast", "--out", out_h5ad, "--k", "10", "--db", store)
    run("query", sections.heldout_tif, "--tissue", "breast", "--out", out_parquet, "--k", "10", "--db", store)
    adata = anndata.read_h5ad(out_h5ad)
    frame = pl.read_parquet(out_parquet)
    assert adata.n_obs == frame.height > 50
    assert list(adata.obs_names) == frame["tile_id"].to_list()
    assert adata.obsm["spatial"].shape == (adata.n_obs, 2)
    np.testing.assert_allclose(adata.X, frame.select(list(adata.var_names)).to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(frame["x_um"].to_numpy(), frame["x"].to_numpy() * 1.0)  # synthetic slides are 1 µm/px
    prov = adata.uns["histoindex"]
    assert prov["k"] == 10 and prov["spots_version"] == Store(store).table("spots").version
    assert "tissue = 'breast'" in prov["filter"]
    # every tile centre lies on tissue: the slide's glass is near-white
    from histoindex.io import open_slide

    slide = open_slide(sections.heldout_tif)
    centres = np.stack([slide.read_region(x - 2, y - 2, 4, 4).mean(axis=(0, 1)) for x, y in adata.obsm["spatial"][:40]])
    assert (centres.min(axis=1) < 240).mean() > 0.9
    stored = Store(store).table("predictions").to_arrow()
    assert stored.num_rows == 2 * adata.n_obs
    assert set(stored.column("slide").to_pylist()) == {sections.heldout_tif.name}


def test_sql_per_gene_analytics_in_one_statement(store, sections, tmp_path):
    out = tmp_path / "grid.parquet"
    run("query", sections.heldout_tif, "--tissue", "breast", "--out", out, "--db", store)
    result = run(
        "sql",
        "SELECT slide, avg(value) AS fasn FROM predictions_long WHERE gene = 'FASN' GROUP BY slide",
        "--db",
        store,
        "--format",
        "json",
    )
    (row,) = json.loads(result.stdout)
    expected = pl.read_parquet(out)["FASN"].mean()
    assert row["slide"] == sections.heldout_tif.name
    assert abs(row["fasn"] - expected) < 1e-5
    # a Parquet file named in the statement, joined with a store table
    result = run("sql", f"SELECT count(*) AS n FROM '{out}' p JOIN predictions q ON p.tile_id = q.tile_id", "--db", store, "--format", "csv")
    assert result.stdout.splitlines() == ["n", str(pl.read_parquet(out).height)]
    table = run("sql", "SELECT model_id, genes FROM models", "--db", store)
    assert "bleep-" in table.stdout


def test_info_and_versions_describe_the_store(store):
    info = run("info", "--db", store).stdout
    for text in ("spots", "models", "train", "breast", "resnet10t"):
        assert text in info
    # how the model answers: the default recipe's retrieval settings (its inner check needs two sections)
    assert "1 view(s) per tile, k 100, softmax tau 0.03, z imputation, smoothing 0.5" in info
    versions = run("versions", "--db", store).stdout
    assert "ingest-train-v" in versions  # each ingest is tagged


def test_default_db_comes_from_the_environment(store, monkeypatch):
    monkeypatch.setenv("HISTOINDEX_DB", str(store))
    from click.testing import CliRunner

    from histoindex.cli import cli

    result = CliRunner().invoke(cli, ["sql", "SELECT count(*) AS n FROM models", "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["n", "1"]


def test_query_views_override_the_models(store, sections, tmp_path):
    """--views sets how many dihedral views are averaged per tile (each is a backbone pass),
    recorded with the predictions; the model's own setting otherwise."""
    import json

    import pyarrow.parquet as pq

    outs = {}
    for views in (None, 4):
        outs[views] = tmp_path / f"v{views}.parquet"
        extra = ["--views", str(views)] if views else []
        run("query", sections.heldout_tif, "--tissue", "breast", "--spots", sections.heldout_h5ad, "--out", outs[views], "--db", store, *extra)
    meta = {v: json.loads(pq.read_schema(p).metadata[b"histoindex"]) for v, p in outs.items()}
    assert meta[None]["views"] == Store(store).model().cfg.views == 1 and meta[4]["views"] == 4
    genes = list(Store(store).model().cfg.genes)
    a, b = (pl.read_parquet(outs[v]).select(genes).to_numpy() for v in (None, 4))
    assert not np.allclose(a, b) and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.5
    result = run("query", sections.heldout_tif, "--tissue", "breast", "--views", "9", "--db", store, ok=False)
    assert result.exit_code == 2 and "--views" in result.output
