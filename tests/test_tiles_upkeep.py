"""The ``tiles`` table beside the others (issue 22): in ``histoindex sql`` (a ``tiles`` view without
the embeddings, ``tiles_embeddings`` with them, joinable to ``predictions``), and in the upkeep verbs:
``delete --slide``, ``versions``, ``restore --table tiles``, ``compact``; a changed slide file is a
new slide whose old rows stay."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from histoindex import api
from histoindex.store import Store

from .conftest import error_line, run


def _sql(db, statement: str) -> list[dict]:
    return json.loads(run("sql", statement, "--db", db, "--format", "json").stdout)


def _tiles(db, version=None):
    return Store(db).table("tiles", version=version).to_arrow()


#: the documented join (README, GUIDE, `sql --help`): each predicted tile meets the tiles row its run used
JOIN = "predictions p ASOF JOIN tiles t USING (slide, slide_hash, model_id, embedding_key, tile_id, created_at)"
#: the same key as a plain join: one row per predicted tile while a slide's bytes are embedded once per model and settings
KEYED = "tiles t JOIN predictions p USING (slide, slide_hash, model_id, embedding_key, tile_id)"
#: the join documented before predictions recorded which bytes they answered: multiplies rows
OLD_JOIN = "tiles t JOIN predictions p USING (slide, tile_id)"


def _per_run(db, join: str, slide: str) -> dict[str, int]:
    """Joined rows per run, for the runs of ``slide``, and whether some (run, tile) met more than one tiles row."""
    rows = _sql(db, f"SELECT p.run_id, count(*) AS n, count(DISTINCT p.tile_id) AS tiles FROM {join} WHERE slide = '{slide}' GROUP BY p.run_id")
    return {r["run_id"]: (r["n"], r["tiles"]) for r in rows}


def _predicted_per_run(db, slide: str) -> dict[str, int]:
    rows = _sql(db, f"SELECT run_id, count(*) AS n FROM predictions WHERE slide = '{slide}' GROUP BY run_id")
    return {r["run_id"]: (r["n"], r["n"]) for r in rows}


@pytest.fixture(scope="module")
def two_slides(trained_store, sections, tmp_path_factory) -> Path:
    """A store copy (never written by the tests: each copies it) where two slides were queried
    (their tiles and predictions stored)."""
    db = tmp_path_factory.mktemp("two-slides") / "db"
    shutil.copytree(trained_store, db)
    for slide in (sections.heldout_tif, sections.other_tif):
        run("query", slide, "--tissue", "breast", "--db", db)
    return db


@pytest.fixture
def indexed(two_slides, tmp_path) -> Path:
    db = tmp_path / "db"
    shutil.copytree(two_slides, db)
    return db


# ---- SQL ------------------------------------------------------------------------------------
def test_sql_tiles_joins_predictions_on_slide_bytes_model_settings_and_tile(two_slides, sections):
    heldout = sections.heldout_tif.name
    n_predicted = Store(two_slides).table("predictions").count_rows(f"slide = '{heldout}'")
    assert n_predicted > 0
    for join in (JOIN, KEYED):
        rows = _sql(
            two_slides,
            f"SELECT count(*) AS n, max(abs(t.x_um - p.x_um)) AS dx, max(abs(t.y_um - p.y_um)) AS dy FROM {join} WHERE slide = '{heldout}'",
        )
        assert rows == [{"n": n_predicted, "dx": 0.0, "dy": 0.0}], ("each predicted tile joins its one tiles row, at its position", join)
    # the predictions rows say which bytes and embedding settings they answered: those of the slide's tiles
    stamps = _sql(two_slides, f"SELECT DISTINCT slide_hash, embedding_key FROM predictions WHERE slide = '{heldout}'")
    assert stamps == _sql(two_slides, f"SELECT DISTINCT slide_hash, embedding_key FROM tiles WHERE slide = '{heldout}'")
    assert stamps[0]["slide_hash"] and json.loads(stamps[0]["embedding_key"])["patch_um"] > 0
    slides = _sql(two_slides, "SELECT slide, count(*) AS n FROM tiles GROUP BY slide ORDER BY slide")
    assert {r["slide"] for r in slides} == {sections.heldout_tif.name, sections.other_tif.name}
    # the embeddings only where asked for
    columns = [r["column_name"] for r in _sql(two_slides, "DESCRIBE tiles")]
    assert "embedding" not in columns and {"slide", "tile_id", "slide_hash", "x_um", "y_um", "model_id", "metadata"} <= set(columns)
    columns = [r["column_name"] for r in _sql(two_slides, "DESCRIBE tiles_embeddings")]
    assert "embedding" in columns
    norms = _sql(two_slides, f"SELECT min(list_dot_product(embedding, embedding)) AS lo, count(*) AS n FROM tiles_embeddings WHERE slide = '{heldout}'")
    assert norms[0]["n"] == n_predicted and norms[0]["lo"] == pytest.approx(1.0, abs=1e-4)


def test_sql_tiles_is_there_and_empty_in_a_store_from_before_tiles(store):
    shutil.rmtree(store / "tiles.lance")  # a store made before the tiles table existed
    assert "tiles" not in Store(store).table_names()
    assert _sql(store, f"SELECT count(*) AS n FROM {JOIN}") == [{"n": 0}]
    assert _sql(store, "SELECT count(*) AS n FROM tiles_embeddings") == [{"n": 0}]
    assert "slide_hash" in [r["column_name"] for r in _sql(store, "DESCRIBE tiles")]
    assert "tiles" not in Store(store).table_names(), "reading creates nothing"


def test_predictions_from_before_slide_hash_open_and_the_next_query_records_it(indexed, sections):
    """A store whose predictions were written at schema version 2 (no ``slide_hash``, no
    ``embedding_key``) opens: SQL reads both as null (the documented join meets none of those rows),
    and the next query adds them to the table (old rows null) and fills them in its own rows."""
    import lance

    path = str(indexed / "predictions.lance")
    lance.dataset(path).drop_columns(["slide_hash", "embedding_key"])
    lance.dataset(path).update_schema_metadata({"histoindex.schema_version": "2"})
    before = Store(indexed).table("predictions")
    n_old, names = before.count_rows(), before.schema.names
    assert "slide_hash" not in names and "embedding_key" not in names

    assert "predictions" in run("info", "--db", indexed).stdout
    counted = "SELECT count(*) AS n, count(slide_hash) AS hashed, count(embedding_key) AS keyed FROM predictions"
    assert _sql(indexed, counted) == [{"n": n_old, "hashed": 0, "keyed": 0}]
    assert _sql(indexed, f"SELECT count(*) AS n FROM {JOIN}") == [{"n": 0}]
    assert Store(indexed).table("predictions").schema.names == names, "reading changes nothing"

    # the next query (of an indexed slide: search only) migrates the table and stamps its rows
    heldout = sections.heldout_tif.name
    run("query", sections.heldout_tif, "--tissue", "breast", "--db", indexed)
    after = Store(indexed).table("predictions")
    assert after.schema.metadata[b"histoindex.schema_version"] == b"3"
    n_tiles = Store(indexed).table("tiles").count_rows(f"slide = '{heldout}'")
    assert _sql(indexed, counted) == [{"n": n_old + n_tiles, "hashed": n_tiles, "keyed": n_tiles}], "old rows null, the new run's filled"
    joined = _sql(indexed, f"SELECT count(*) AS n, count(DISTINCT p.run_id) AS runs, count(DISTINCT p.tile_id) AS tiles FROM {JOIN}")
    assert joined == [{"n": n_tiles, "runs": 1, "tiles": n_tiles}]
    stamps = _sql(indexed, "SELECT DISTINCT slide, slide_hash, embedding_key FROM predictions WHERE slide_hash IS NOT NULL")
    assert stamps == _sql(indexed, f"SELECT DISTINCT slide, slide_hash, embedding_key FROM tiles WHERE slide = '{heldout}'")


# ---- upkeep ---------------------------------------------------------------------------------
def test_delete_a_slide_deletes_its_tiles_in_one_version_and_keeps_its_predictions(indexed, sections):
    heldout, other = sections.heldout_tif.name, sections.other_tif.name
    before = _tiles(indexed)
    version = Store(indexed).table("tiles").version
    predictions = Store(indexed).table("predictions").count_rows()
    n = before.filter(before.column("slide").to_numpy(zero_copy_only=False) == heldout).num_rows
    result = run("delete", "--slide", heldout, "--db", indexed)
    assert result.stdout.strip() == f"deleted {n} tiles of {heldout}: tiles@{version + 1} (its predictions are kept)"
    after = _tiles(indexed)
    assert set(after.column("slide").to_pylist()) == {other} and after.num_rows == before.num_rows - n
    assert Store(indexed).table("predictions").count_rows() == predictions, "predictions are the answers: kept"
    assert _tiles(indexed, version).num_rows == before.num_rows, "the version before still holds them"
    what = {v["version"]: v["what"] for v in Store(indexed).versions()["tiles"]}
    assert what[version + 1] == f"delete of tiles of {heldout}"
    assert f"tiles of {heldout}" in what.values() and f"tiles of {other}" in what.values()
    listed = run("versions", "--db", indexed).stdout
    assert f"delete of tiles of {heldout}" in listed and f"tiles of {other}" in listed

    # a slide the table does not hold: an error naming those it does; nothing written
    result = run("delete", "--slide", "nope.tif", "--db", indexed, ok=False)
    assert "no tiles of slide 'nope.tif'" in error_line(result, other) and Store(indexed).table("tiles").version == version + 1
    # exactly one of --dataset / --slide
    for args in ((), ("--dataset", "train", "--slide", other)):
        result = run("delete", *args, "--db", indexed, ok=False)
        assert "exactly one of --dataset or --slide" in error_line(result)
    assert Store(indexed).table("tiles").version == version + 1 and Store(indexed).table("spots").count_rows() > 0

    # restore --table tiles brings them back; compact covers the table
    result = run("restore", version, "--table", "tiles", "--db", indexed)
    assert result.stdout.startswith(f"tiles@{version + 2}: the content of tiles@{version} ({before.num_rows} rows)")
    assert _tiles(indexed).num_rows == before.num_rows
    result = run("compact", "--keep-versions", "1", "--older-than", "0", "--force", "--db", indexed)
    assert any(line.startswith("tiles@") and "removed" in line for line in result.stdout.splitlines()), result.stdout
    assert [v["version"] for v in Store(indexed).versions()["tiles"]] == [Store(indexed).table("tiles").version]
    assert _tiles(indexed).num_rows == before.num_rows


def test_delete_a_slide_of_one_model_only(indexed, sections):
    heldout = sections.heldout_tif.name
    result = run("delete", "--slide", heldout, "--model", "no-such-model", "--db", indexed, ok=False)
    assert "no tiles of slide" in error_line(result, "no-such-model")
    model = Store(indexed).model().model_id
    result = run("delete", "--slide", heldout, "--model", model, "--db", indexed)
    assert f"tiles of {heldout} (model {model})" in result.stdout
    what = Store(indexed).versions()["tiles"][-1]["what"]
    assert what == f"delete of tiles of {heldout} (model {model})"


def test_a_changed_slide_file_is_a_new_slide_and_its_old_tiles_stay(store, sections, tmp_path):
    indexed = store  # no slide indexed yet
    slide = tmp_path / "slide.tif"
    shutil.copy(sections.heldout_tif, slide)
    first = api.query(slide, db=indexed, tissue="breast")
    assert not first.indexed
    old_version = Store(indexed).table("tiles").version
    shutil.copy(sections.train_tif, slide)  # new bytes at the same path (never indexed)
    changed = api.query(slide, db=indexed, tissue="breast")
    assert not changed.indexed, "new bytes are embedded, not answered from the old slide's tiles"
    again = api.query(slide, db=indexed, tissue="breast")
    assert again.indexed
    # both slides are in the table, under their hashes; the version before the change holds only the old one
    hashes = _sql(indexed, "SELECT slide_hash, count(*) AS n, min(created_at) AS t FROM tiles WHERE slide = 'slide.tif' GROUP BY slide_hash ORDER BY t")
    assert len(hashes) == 2 and [h["n"] for h in hashes] == [first.n_tiles, changed.n_tiles]
    old = _tiles(indexed, old_version)
    assert set(old.filter(old.column("slide").to_numpy(zero_copy_only=False) == "slide.tif").column("slide_hash").to_pylist()) == {hashes[0]["slide_hash"]}
    # the newest answer is the new file's: the same as a fresh query of those bytes
    reference = api.query(sections.train_tif, db=indexed, tissue="breast", re_embed=True, keep_tiles=False)
    assert again.n_tiles == reference.n_tiles and list(again.ids) == list(reference.ids)
    np.testing.assert_allclose(again.predictions, reference.predictions, rtol=1e-5, atol=1e-6)

    # in SQL, each run's predictions meet the tiles of the bytes it answered, once per tile
    predicted = _predicted_per_run(indexed, "slide.tif")
    assert set(predicted) == {first.run_id, changed.run_id, again.run_id}
    assert _per_run(indexed, JOIN, "slide.tif") == predicted == _per_run(indexed, KEYED, "slide.tif")
    # the join on the name and tile id alone met both files' tiles wherever their tile ids coincide
    common = len(set(first.ids) & set(changed.ids))
    assert common > 0
    old_join = _per_run(indexed, OLD_JOIN, "slide.tif")
    assert old_join[first.run_id] == (first.n_tiles + common, first.n_tiles)
    assert old_join[changed.run_id] == old_join[again.run_id] == (changed.n_tiles + common, changed.n_tiles)

    # embedded again (--re-embed): the bytes' tiles are in the table twice; the ASOF join takes the ones each run used
    redo = api.query(slide, db=indexed, tissue="breast", re_embed=True)
    assert not redo.indexed
    predicted = _predicted_per_run(indexed, "slide.tif")
    assert _per_run(indexed, JOIN, "slide.tif") == predicted and len(predicted) == 4
    assert _per_run(indexed, KEYED, "slide.tif")[redo.run_id] == (2 * redo.n_tiles, redo.n_tiles)
    made = {r["run_id"]: r["created_at"] for r in _sql(indexed, "SELECT DISTINCT run_id, created_at FROM predictions WHERE slide = 'slide.tif'")}
    used = {r["run_id"]: r["t"] for r in _sql(indexed, f"SELECT DISTINCT p.run_id, t.created_at AS t FROM {JOIN} WHERE slide = 'slide.tif'")}
    # a run that embedded met the tiles it wrote; the one answered from them, those
    assert used == {first.run_id: made[first.run_id], changed.run_id: made[changed.run_id], again.run_id: made[changed.run_id], redo.run_id: made[redo.run_id]}
