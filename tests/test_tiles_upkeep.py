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
def test_sql_tiles_joins_predictions_on_slide_and_tile(two_slides, sections):
    heldout = sections.heldout_tif.name
    n_predicted = Store(two_slides).table("predictions").count_rows(f"slide = '{heldout}'")
    assert n_predicted > 0
    rows = _sql(
        two_slides,
        f"SELECT count(*) AS n, max(abs(t.x_um - p.x_um)) AS dx, max(abs(t.y_um - p.y_um)) AS dy "
        f"FROM tiles t JOIN predictions p USING (slide, tile_id) WHERE slide = '{heldout}'",
    )
    assert rows == [{"n": n_predicted, "dx": 0.0, "dy": 0.0}], "each predicted tile joins its one tiles row, at its position"
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
    assert _sql(store, "SELECT count(*) AS n FROM tiles JOIN predictions USING (slide, tile_id)") == [{"n": 0}]
    assert _sql(store, "SELECT count(*) AS n FROM tiles_embeddings") == [{"n": 0}]
    assert "slide_hash" in [r["column_name"] for r in _sql(store, "DESCRIBE tiles")]
    assert "tiles" not in Store(store).table_names(), "reading creates nothing"


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
