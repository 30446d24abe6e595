"""ST-GCHB through the product: train, ingest, query (tissue grid and given spots), evaluate, with
the same store, search and imputation as BLEEP; the method is recorded with the model and queries
take it from there."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from histoindex import api, pipeline
from histoindex.metrics import pearson_per_gene
from histoindex.store import Store

from .conftest import run

STGCHB_ARGS = [
    "--method",
    "stgchb",
    "--method-param",
    "pretrain_epochs=3",
    "--method-param",
    "hidden=64",
    "--backbone",
    "resnet10t",
    "--weights",
    "none",
    "--freeze-backbone",
    "--views",
    "1",
    "--patch-px",
    "64",
    "--patch-um",
    "110",
    "--epochs",
    "40",
    "--n-genes",
    "48",
    "--lr",
    "1e-3",
    "--seed",
    "0",
]


@pytest.fixture(scope="module")
def stgchb_store(tmp_path_factory, sections):
    """An empty store in which `ingest --method stgchb` trains the model, then the spots."""
    db = tmp_path_factory.mktemp("stgchb") / "db"
    result = run("ingest", sections.train_h5ad, "--tissue", "breast", "--dataset", "train", "--db", db, *STGCHB_ARGS)
    return db, result


def test_ingest_into_an_empty_store_trains_the_graph_method(stgchb_store):
    db, result = stgchb_store
    (model,) = Store(db).models()
    assert model.cfg.method == "stgchb" and model.model_id.startswith("stgchb-")
    assert model.cfg.method_params["hidden"] == 64 and model.cfg.method_params["graph_k"] == 6
    assert model.cfg.method_params["epochs"] == 40, "--epochs sets the method's training epochs"
    assert len(model.metrics["train_loss"]) == 3 + 40
    info = Store(db).info()
    assert info["models"][0]["method"] == "stgchb"
    spots = Store(db).table("spots").to_arrow()
    image = np.stack(spots.column("image_embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-4)


def test_query_takes_the_method_from_the_model(stgchb_store, sections, tmp_path):
    db, _ = stgchb_store
    out = tmp_path / "spots.parquet"
    run("query", sections.heldout_tif, "--tissue", "breast", "--spots", sections.heldout_h5ad, "--out", out, "--db", db)
    frame = pl.read_parquet(out)
    heldout = api.read_reference(sections.heldout_h5ad)
    genes = list(Store(db).model().cfg.genes)
    r = pearson_per_gene(heldout.normalized(genes), frame.select(genes).to_numpy())
    assert r.mean() > 0.2, f"held-out mean r {r.mean():.3f}: the graph method learns the morphology signal"
    grid = tmp_path / "grid.parquet"
    result = run("query", sections.heldout_tif, "--tissue", "breast", "--out", grid, "--db", db)
    assert "tiles" in result.stdout and pl.read_parquet(grid).height > 10
    stored = Store(db).table("predictions").to_arrow()
    assert len(set(stored.column("run_id").to_pylist())) == 2


def test_graph_query_does_not_depend_on_how_the_slide_streams(stgchb_store, sections, monkeypatch):
    """Each tile's embedding uses its neighbours; blocks, batches and search chunks are only how the
    slide streams through, never what a tile sees."""
    db, _ = stgchb_store

    def predict(batch_size: int) -> np.ndarray:
        result = api.query(sections.heldout_tif, db=db, tissue="breast", batch_size=batch_size, workers=0)
        return result.predictions

    whole = predict(256)
    monkeypatch.setattr(pipeline, "SEARCH_CHUNK", 7)
    chunked = predict(3)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)


def test_evaluate_the_graph_method_with_its_spatial_baseline(sections):
    result = run(
        "evaluate",
        sections.train_h5ad,
        sections.other_h5ad,
        sections.heldout_h5ad,
        "--holdout",
        "syn-heldout",
        "--json",
        *STGCHB_ARGS,
    )
    report = json.loads(result.stdout)
    (fold,) = report["folds"]
    assert fold["epochs"] == 43
    scores = fold["scores"]
    assert {"histoindex", "neighbour-mean", "frozen-retrieval"} <= set(scores)
    assert scores["histoindex"]["all"] > 0.2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "stgchb", "--fine-tune"], "trains on frozen-backbone features; drop --fine-tune"),
        (["--method", "stgchb", "--method-param", "depth=2"], "unknown stgchb parameter(s) depth"),
        (["--method", "stgchb", "--method-param", "sigma=wide"], "sigma must be a number or 'median'"),
        (["--method", "bleep", "--method-param", "layers=2"], "unknown bleep parameter(s) layers"),
        (["--method-param", "layers"], "expected KEY=VALUE"),
    ],
)
def test_bad_method_options_are_clear_errors(sections, tmp_path, args, message):
    db = tmp_path / "db"
    result = run("train", sections.train_h5ad, "--db", db, "--backbone", "resnet10t", "--weights", "none", "--epochs", "1", *args, ok=False)
    assert result.exit_code != 0
    assert message in result.output
    assert not db.exists() or not Store(db).models()
