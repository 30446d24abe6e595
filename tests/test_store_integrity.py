"""The store keeps one answer per model: spots keyed on (model, dataset, spot), ingests that never
silently switch model, queries that never mix embedding spaces, filters that cannot widen, one
version per ingest, and no duplicated rows when two writers race."""

from __future__ import annotations

import multiprocessing as mp
import shutil

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from histoindex.errors import InputError, StoreError
from histoindex.search import Scope, check_where
from histoindex.store import Store, spot_rows

from .conftest import TRAIN_ARGS, run


def _rows_per_model(db) -> dict[str, int]:
    spots = Store(db).table("spots").to_arrow().select(["model_id"])
    return dict(pl.from_arrow(spots).group_by("model_id").len().iter_rows())


@pytest.fixture(scope="module")
def two_models(trained_store, sections, tmp_path_factory):
    """The trained store (model A, dataset 'train') plus a second model B trained into it, once
    for the module; tests write to copies (``two_model_store``)."""
    db = tmp_path_factory.mktemp("two-models") / "db"
    shutil.copytree(trained_store, db)
    model_a = Store(db).model().model_id
    assert TRAIN_ARGS[-2:] == ["--seed", "0"]
    model_b = run("train", sections.train_h5ad, "--db", db, *TRAIN_ARGS[:-1], "1").stdout.strip().splitlines()[-1]
    assert model_b != model_a
    return db, model_a, model_b


@pytest.fixture
def two_model_store(two_models, tmp_path):
    """A private copy of the store with models A and B."""
    db, model_a, model_b = two_models
    store = tmp_path / "db"
    shutil.copytree(db, store)
    return store, model_a, model_b


# ---- two models in one store (issue 8.4) ------------------------------------------------------
def test_ingest_stays_with_the_model_the_spots_use(two_model_store, sections):
    db, model_a, model_b = two_model_store
    result = run("ingest", sections.other_h5ad, "--tissue", "breast", "--dataset", "other", "--db", db)
    assert f"model {model_a}" in result.stdout, "a newer model does not silently take over"
    assert f"the newer model {model_b} has none" in result.output
    assert set(Store(db).spot_models()) == {model_a}


def test_a_second_model_keeps_the_first_models_rows(two_model_store, sections, tmp_path):
    db, model_a, model_b = two_model_store
    before = _rows_per_model(db)
    run("ingest", sections.train_h5ad, "--tissue", "breast", "--dataset", "train", "--model", model_b, "--db", db)
    run("ingest", sections.train_h5ad, "--tissue", "breast", "--dataset", "train", "--model", model_b, "--db", db)  # re-ingest
    after = _rows_per_model(db)
    assert after[model_a] == before[model_a], "re-ingesting under model B left model A's rows alone"
    assert after[model_b] == before[model_a]
    assert Store(db).spot_models() == {model_a: ["train"], model_b: ["train"]}

    # an ingest without --model must now choose, and a query must too
    result = run("ingest", sections.other_h5ad, "--tissue", "breast", "--db", db, ok=False)
    assert result.exit_code == 1 and "embedded by 2 models" in result.output and "--model" in result.output
    result = run("query", sections.heldout_tif, "--tissue", "breast", "--db", db, ok=False)
    assert result.exit_code == 1 and "spots of 2 models" in result.output and model_a in result.output and model_b in result.output

    out = tmp_path / "a.parquet"
    run("query", sections.heldout_tif, "--tissue", "breast", "--spots", sections.heldout_h5ad, "--model", model_a, "--out", out, "--db", db)
    stored = Store(db).table("predictions").to_arrow()
    assert set(stored.column("model_id").to_pylist()) == {model_a}
    assert f"model_id = '{model_a}'" in stored.column("filter")[0].as_py()

    info = run("info", "--db", db).stdout
    assert model_a in info and model_b in info
    summary = Store(db).info()
    assert {m["model_id"]: [d["dataset"] for d in m["datasets"]] for m in summary["models"]} == {model_a: ["train"], model_b: ["train"]}


def test_a_model_id_that_does_not_exist_is_an_error(store, sections):
    before = Store(store).versions()
    result = run("ingest", sections.other_h5ad, "--tissue", "breast", "--model", "bleep-nope", "--db", store, ok=False)
    assert result.exit_code == 1 and "no model 'bleep-nope'" in result.output
    assert Store(store).versions() == before


# ---- --where cannot escape the scope (issue 8.3) -----------------------------------------------
@pytest.mark.parametrize(
    "where, message",
    [
        ("1=1) OR (1=1", "closes a parenthesis"),
        ("tissue = 'lung') OR (1=1", "closes a parenthesis"),
        ("(1=1", "unclosed"),
        ("1=1; DROP TABLE spots", "';' is not allowed"),
        ("1=1 -- ", "comments"),
        ("1=1 /* x */", "comments"),
        ("dataset = 'it''s", "unterminated"),
    ],
)
def test_where_must_be_one_boolean_expression(where, message):
    with pytest.raises(InputError, match=message):
        check_where(where)


@pytest.mark.parametrize("where", ["dataset IN ('a', 'b')", "spot_id LIKE '%)%'", "(x = 1) OR (y = ')(' AND z = \"a)\")", "dataset = 'it''s'"])
def test_where_accepts_real_expressions(where):
    assert check_where(where) == where
    scope = Scope(model_id="m", tissue="t", where=where)
    assert scope.predicate == f"model_id = 'm' AND tissue = 't' AND ({where})"


def test_where_escape_through_the_cli_is_refused(two_model_store, sections):
    db, model_a, model_b = two_model_store
    run("ingest", sections.other_h5ad, "--tissue", "lung", "--dataset", "lung", "--model", model_b, "--db", db)
    before = Store(db).versions()
    result = run("query", sections.heldout_tif, "--model", model_a, "--tissue", "breast", "--where", "1=1) OR (1=1", "--db", db, ok=False)
    assert result.exit_code == 1
    assert "Error: --where '1=1) OR (1=1': a ')' closes a parenthesis" in result.output
    assert Store(db).versions() == before


def test_literal_filter_values_cannot_widen_the_scope(store, sections):
    result = run("query", sections.heldout_tif, "--tissue", "x' OR 1=1 --", "--db", store, ok=False)
    assert result.exit_code == 1 and 'no reference spots with tissue "x\' OR 1=1 --"' in result.output


def test_rows_of_another_model_or_tissue_are_refused_when_read():
    scope = Scope(model_id="A", tissue="breast")
    good = pa.table({"model_id": ["A", "A"], "tissue": ["breast", "breast"]})
    scope.verify(good, version=3)
    for column, bad in (("model_id", ["A", "B"]), ("tissue", ["breast", "lung"])):
        rows = good.set_column(good.column_names.index(column), column, pa.array(bad))
        with pytest.raises(StoreError, match=f"spots@3: the search for {column}"):
            scope.verify(rows, version=3)


# ---- one version per ingest (issue 8.6) --------------------------------------------------------
def test_every_ingest_is_one_tagged_version_and_every_version_answers(tmp_path, sections):
    db = tmp_path / "db"
    run("ingest", sections.train_h5ad, "--tissue", "breast", "--dataset", "train", "--db", db, *TRAIN_ARGS[:-2], "--seed", "0", "--epochs", "2")
    run("ingest", sections.other_h5ad, "--tissue", "breast", "--dataset", "other", "--db", db)
    versions = Store(db).versions()["spots"]
    assert [v["version"] for v in versions] == [1, 2, 3]
    assert [v["tags"] for v in versions] == [[], ["ingest-train-v2"], ["ingest-other-v3"]]
    for version in ("2", "3", "ingest-train-v2"):
        run("query", sections.heldout_tif, "--tissue", "breast", "--k", "5", "--as-of", version, "--db", db)
    result = run("query", sections.heldout_tif, "--tissue", "breast", "--as-of", "1", "--db", db, ok=False)
    assert result.exit_code == 1 and "spots@1 holds no spots" in result.output

    # with a vector index, the ingest's version is the one holding its rows and the refreshed index
    run("index", "--db", db, "--type", "IVF_FLAT", "--partitions", "2")
    result = run("ingest", sections.heldout_h5ad, "--tissue", "breast", "--dataset", "heldout", "--db", db)
    latest = Store(db).table("spots")
    assert f"spots@{latest.version}" in result.stdout
    assert latest.tags.list()[f"ingest-heldout-v{latest.version}"]["version"] == latest.version
    stats = [latest.index_stats(i.name) for i in latest.list_indices()]
    assert all(s.num_unindexed_rows == 0 for s in stats)


def test_reingest_after_indexing_updates_in_place(store, sections):
    """Bitmap indexes on the key columns (model_id, dataset) must not make merge_insert miss."""
    run("index", "--db", store, "--type", "IVF_FLAT", "--partitions", "2")
    indexed = {tuple(i.columns) for i in Store(store).table("spots").list_indices()}
    assert {("model_id",), ("dataset",)} <= indexed
    n = Store(store).table("spots").count_rows()
    run("ingest", sections.train_h5ad, "--tissue", "breast", "--dataset", "train", "--db", store)
    rows = Store(store).table("spots").to_arrow()
    assert rows.num_rows == n
    assert len(set(rows.column("spot_id").to_pylist())) == n


# ---- two writers at once (issue 8.5) ------------------------------------------------------------
def _synthetic_rows(n: int, *, model_id: str, dataset: str, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, 256)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return spot_rows(
        spot_ids=np.array([f"s{i}" for i in range(n)]),
        dataset=dataset,
        tissue="breast",
        platform="visium",
        species="human",
        xy=rng.uniform(0, 100, (n, 2)),
        mpp=0.5,
        image_embedding=emb,
        expression_embedding=emb,
        expression=rng.uniform(0, 3, (n, 8)).astype(np.float32),
        source_values="raw_counts",
        model_id=model_id,
    )


def _write_at(db: str, seed: int, start, n: int, queue) -> None:
    from histoindex.errors import StoreError

    rows = _synthetic_rows(n, model_id="bleep-m", dataset="d", seed=seed)
    store = Store(db)
    start.wait(300)  # both writers, rows ready, go at once
    try:
        queue.put(store.write_dataset(rows, model_id="bleep-m", dataset="d"))
    except StoreError as exc:  # the other outcome allowed: a clear "retry", nothing written
        queue.put(str(exc))


def test_concurrent_first_ingests_of_one_dataset_do_not_duplicate_rows(tmp_path):
    db = str(tmp_path / "db")
    Store(db, create=True)
    n = 200_000  # large enough that both merges read the empty table before either commits
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_write_at, args=(db, seed, start, n, queue)) for seed in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    outcomes = [queue.get(timeout=5) for _ in procs]
    rows = Store(db).table("spots").to_arrow()
    assert rows.num_rows == n, f"{rows.num_rows} rows for {n} spots: a concurrent ingest duplicated them"
    assert len(set(rows.column("spot_id").to_pylist())) == n
    failed = [o for o in outcomes if isinstance(o, str)]
    assert all(o.startswith("the store changed while writing d") and o.endswith("retry") for o in failed)
    assert len(failed) <= 1 and sorted(o for o in outcomes if not isinstance(o, str)) == [2, 3][: 2 - len(failed)]
