"""A store given as a LanceDB URI (here ``file://``): every access goes through LanceDB, model
weights included (they live in the models table, not in files beside it)."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch

from histoindex.errors import StoreError
from histoindex.models import ModelConfig, create_model, load_model, state_digest
from histoindex.store import WEIGHTS, Store

from .conftest import TINY_BACKBONE, run

#: a tiny model: seconds to train, deterministic for a seed
TINY = [
    *TINY_BACKBONE,
    "--epochs",
    "2",
    "--n-genes",
    "16",
    "--batch-size",
    "32",
    "--seed",
    "0",
]


def test_cli_pipeline_on_a_file_uri_matches_a_plain_path_store(sections, tmp_path, monkeypatch):
    workdir = tmp_path / "cwd"  # the URI must not be taken for a relative path ("file:/...")
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("COLUMNS", "400")  # rich: no wrapping of the long URI in `info`
    folder = tmp_path / "uri-db"
    uri = folder.as_uri()
    assert uri.startswith("file:///")

    # the same pipeline into a plain path and into the file:// URI: same seed, same model id
    model_ids, outs = {}, {}
    for name, db in (("plain", tmp_path / "plain-db"), ("uri", uri)):
        model_ids[name] = run("train", sections.train_h5ad, "--db", db, *TINY).stdout.strip().splitlines()[-1]
        run("ingest", sections.train_h5ad, "--tissue", "breast", "--platform", "visium", "--dataset", "train", "--db", db)
        outs[name] = tmp_path / f"{name}.parquet"
        run("query", sections.heldout_tif, "--tissue", "breast", "--spots", sections.heldout_h5ad, "--out", outs[name], "--db", db)
    model_id = model_ids["uri"]
    assert model_id == model_ids["plain"] and model_id.startswith("bleep-")

    # LanceDB made the folder; the weights are in the models table, not in a models/ folder
    assert sorted(p.name for p in folder.iterdir()) == ["models.lance", "predictions.lance", "spots.lance", "tiles.lance"]
    assert list(workdir.iterdir()) == []
    opened = Store(uri)
    (record,) = opened.models()
    reloaded = load_model(record.cfg, record.weights())
    assert f"{record.cfg.method}-{state_digest(reloaded, record.cfg)}" == model_id  # the model loads from the table
    n_spots = opened.table("spots").count_rows()
    assert n_spots == Store(tmp_path / "plain-db").table("spots").count_rows() > 0

    uri_frame, plain_frame = pl.read_parquet(outs["uri"]), pl.read_parquet(outs["plain"])
    genes = list(record.cfg.genes)
    assert uri_frame.height == plain_frame.height > 0
    assert uri_frame["spot"].to_list() == plain_frame["spot"].to_list()
    np.testing.assert_allclose(uri_frame.select(genes).to_numpy(), plain_frame.select(genes).to_numpy(), rtol=1e-5, atol=1e-6)
    assert opened.table("predictions").count_rows() == uri_frame.height

    (row,) = json.loads(run("sql", "SELECT count(*) AS n, count(DISTINCT model_id) AS m FROM spots", "--db", uri, "--format", "json").stdout)
    assert row == {"n": n_spots, "m": 1}
    (model_row,) = json.loads(run("sql", "SELECT * FROM models", "--db", uri, "--format", "json").stdout)
    assert model_row["model_id"] == model_id and WEIGHTS not in model_row  # the blob stays out of SQL
    (pred,) = json.loads(run("sql", "SELECT count(DISTINCT gene) AS genes FROM predictions_long", "--db", uri, "--format", "json").stdout)
    assert pred["genes"] == len(genes)

    versions = run("versions", "--db", uri).stdout
    assert "ingest-train-v" in versions and "predictions" in versions and "models" in versions
    info = run("info", "--db", uri).stdout
    assert f"store: {uri}" in info and model_id in info and "breast" in info
    assert list(workdir.iterdir()) == []


def test_model_round_trips_through_the_models_table(tmp_path, monkeypatch):
    torch.manual_seed(5)
    cfg = ModelConfig(backbone="test_resnet", patch_px=32, genes=("A", "B", "C"))
    model = create_model(cfg)
    uri = (tmp_path / "db").as_uri()
    model_id, version = Store(uri, create=True).add_model(model, cfg, metrics={"loss": [1.0]}, train_datasets=["x"])
    assert model_id == f"{cfg.method}-{state_digest(model, cfg)}"  # the content-hash id is unchanged
    assert Store(uri).add_model(model, cfg, metrics={}, train_datasets=["x"])[0] == model_id  # same model, same row
    store = Store(uri)
    assert store.table("models").count_rows() == 1
    assert store.table("models").schema.field(WEIGHTS).type == pa.large_binary()

    reloaded = load_model(store.model(model_id).cfg, store.model_weights(model_id))
    original, restored = model.state_dict(), reloaded.state_dict()
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, restored[name]), name
    path = tmp_path / "w.safetensors"  # a local file still loads
    path.write_bytes(store.model_weights(model_id))
    assert all(torch.equal(v, load_model(cfg, path).state_dict()[k]) for k, v in original.items())

    # listing models, or describing the store, reads no weights
    monkeypatch.setattr(Store, "model_weights", lambda self, model_id: pytest.fail("weights read while listing"))
    assert [m.model_id for m in store.models()] == [model_id]
    assert store.info()["models"][0]["model_id"] == model_id


def test_missing_store_uri_is_a_clear_error_and_creates_nothing(sections, tmp_path):
    missing = tmp_path / "missing"
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (missing, empty):
        for uri in (folder.as_uri(), str(folder)):
            assert not Store.exists(uri)
            with pytest.raises(StoreError, match="no histoindex store at"):
                Store(uri)
    result = run("query", sections.heldout_tif, "--db", missing.as_uri(), ok=False)
    assert result.exit_code == 1 and f"Error: no histoindex store at {missing.as_uri()}" in result.output
    assert run("sql", "SELECT 41 + 1 AS n", "--db", missing.as_uri(), "--format", "csv").stdout.split() == ["n", "42"]
    for command in ("info", "versions"):
        assert "no histoindex store at" in run(command, "--db", missing.as_uri(), ok=False).output
    assert not missing.exists() and list(empty.iterdir()) == []
