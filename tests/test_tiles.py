"""Slides are indexed too (issue 22): a query keeps its slide's tile embeddings in the ``tiles``
table; asking the same slide bytes again (another filter, k, reference version) reads them, not
the image, and answers exactly as a fresh query does."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from histoindex import api
from histoindex.store import Store

from .conftest import run


def _query(db, slide, **options):
    return api.query(slide, db=db, tissue="breast", precision="fp32", workers=0, **options)


@pytest.fixture
def indexed(store, sections, tmp_path):
    """A private store in which a private copy of the held-out slide was queried once."""
    slide = tmp_path / "slide.tif"
    shutil.copy(sections.heldout_tif, slide)
    first = _query(store, slide, k=5)
    return store, slide, first


def test_a_query_indexes_its_slide_in_one_commit(indexed):
    store, slide, first = indexed
    assert not first.indexed
    tiles = Store(store).table("tiles")
    rows = tiles.to_arrow()
    assert rows.num_rows == first.n_tiles
    assert set(rows.column("slide_path").to_pylist()) == {str(slide.resolve())}
    assert len(set(rows.column("slide_hash").to_pylist())) == 1
    assert rows.column("tile_id").to_pylist() == [str(i) for i in first.ids]
    assert np.allclose(np.linalg.norm(np.stack(rows.column("embedding").to_numpy(zero_copy_only=False)), axis=1), 1, atol=1e-4)
    made = [v for v in Store(store).versions()["tiles"] if v["version"] > 1]
    assert len(made) == 1, "one slide, one tiles version"


def test_a_requery_reads_no_image_and_equals_a_fresh_query(indexed, store, tmp_path):
    db, slide, first = indexed
    again = _query(db, slide, k=5)  # same settings: search only, the same answer
    assert again.indexed and np.array_equal(again.predictions, first.predictions)

    # another filter and k, with the slide file gone: still answered (from its tiles), equal to a fresh query
    fresh_copy = tmp_path / "fresh.tif"
    shutil.copy(slide, fresh_copy)
    slide.unlink()
    requery = _query(db, slide, k=3, where="dataset = 'train'", out=tmp_path / "requery.parquet")
    assert requery.indexed and requery.n_tiles == first.n_tiles
    fresh = _query(db, fresh_copy, k=3, where="dataset = 'train'", keep_tiles=False, re_embed=True)
    assert not fresh.indexed
    assert np.array_equal(requery.predictions, fresh.predictions)
    assert list(requery.ids) == list(fresh.ids)
    provenance = json.loads(pq.read_schema(tmp_path / "requery.parquet").metadata[b"histoindex"])
    assert provenance["k"] == 3 and "dataset = 'train'" in provenance["filter"]

    # the CLI says it: search only
    result = run("query", slide, "--tissue", "breast", "--k", "2", "--db", db, "--precision", "fp32")
    assert "indexed before (tiles table): search only" in result.output


def test_a_changed_slide_file_is_embedded_again(indexed, sections):
    db, slide, first = indexed
    shutil.copy(sections.other_tif, slide)  # another image at the same path: new bytes
    changed = _query(db, slide, k=5)
    assert not changed.indexed
    rows = Store(db).table("tiles").to_arrow()
    assert len(set(rows.column("slide_hash").to_pylist())) == 2, "the old slide's tiles stay beside the new"
    again = _query(db, slide, k=5)
    assert again.indexed and np.array_equal(again.predictions, changed.predictions)


def test_other_embedding_settings_embed_again(indexed):
    db, slide, first = indexed
    coarser = _query(db, slide, k=5, stride_um=110)
    assert not coarser.indexed and coarser.n_tiles < first.n_tiles
    assert _query(db, slide, k=5, stride_um=110).indexed

    # the slide is indexed at both strides, under the same tile ids (r{row}_c{col}, other positions):
    # in SQL each run's predictions meet the tiles of its own embedding settings, once, at their positions
    def joined(using: str) -> dict:
        rows = api.sql(
            f"SELECT p.run_id, count(*) AS n, max(abs(t.x_um - p.x_um)) AS dx FROM tiles t JOIN predictions p USING ({using}) GROUP BY p.run_id", db=db
        )
        return {r["run_id"]: (r["n"], r["dx"]) for r in rows.to_pylist()}

    by_run = joined("slide, slide_hash, model_id, embedding_key, tile_id")
    assert by_run[first.run_id] == (first.n_tiles, 0.0) and by_run[coarser.run_id] == (coarser.n_tiles, 0.0) and len(by_run) == 3
    common = len(set(first.ids) & set(coarser.ids))
    assert common > 0 and joined("slide, tile_id")[first.run_id][0] == first.n_tiles + common, "the join on name and tile id alone multiplied"


def test_no_keep_tiles_and_no_store_index_nothing(store, sections, tmp_path):
    slide = tmp_path / "slide.tif"
    shutil.copy(sections.heldout_tif, slide)
    _query(store, slide, keep_tiles=False)
    _query(store, slide, no_store=True, out=tmp_path / "x.parquet")
    assert Store(store).table("tiles").count_rows() == 0
    assert not _query(store, slide).indexed


def test_a_query_stopped_while_streaming_indexes_no_partial_slide(store, sections, tmp_path, monkeypatch):
    """An error part-way through the slide (after tiles rows were handed to LanceDB) commits no
    tiles, as it commits no predictions; the next query embeds the whole slide."""
    from histoindex import pipeline

    slide = tmp_path / "slide.tif"
    shutil.copy(sections.heldout_tif, slide)
    monkeypatch.setattr(pipeline, "SEARCH_CHUNK", 8)
    real = pipeline.answer
    seen = []

    def failing(embeddings, *args, **kwargs):
        for i, chunk in enumerate(real(embeddings, *args, **kwargs)):
            seen.append(i)
            if i == 3:
                raise KeyboardInterrupt  # as Ctrl-C
            yield chunk

    monkeypatch.setattr(pipeline, "answer", failing)
    before = Store(store).table("tiles").version
    with pytest.raises(KeyboardInterrupt):
        _query(store, slide, batch_size=8)
    assert seen == [0, 1, 2, 3]
    tiles = Store(store).table("tiles")
    assert tiles.version == before and tiles.count_rows() == 0
    monkeypatch.setattr(pipeline, "answer", real)
    assert not _query(store, slide).indexed


def test_a_copy_of_a_slide_is_answered_from_its_tiles_and_indexed_under_its_name(indexed, tmp_path):
    db, slide, first = indexed
    copy = tmp_path / "copy-of-slide.tif"
    shutil.copy(slide, copy)
    answer = _query(db, copy, k=5)
    assert answer.indexed and np.array_equal(answer.predictions, first.predictions), "the same bytes: no image read"
    rows = Store(db).table("tiles").to_arrow()
    by_path = {p: rows.filter(rows.column("slide_path").to_numpy(zero_copy_only=False) == p).num_rows for p in set(rows.column("slide_path").to_pylist())}
    assert by_path == {str(slide.resolve()): first.n_tiles, str(copy.resolve()): first.n_tiles}, "the copy's tiles, under its own path (similar finds it)"
    assert len(set(rows.column("slide_hash").to_pylist())) == 1
    version = Store(db).table("tiles").version
    _query(db, copy, k=2)
    assert Store(db).table("tiles").version == version, "indexed under that name already: nothing written"


def test_a_no_store_query_reads_the_reference_stores_tiles_and_writes_nothing(indexed, tmp_path):
    """A shared reference store, asked with --no-store: its indexed slides answer, search only."""
    db, slide, first = indexed
    version = Store(db).table("tiles").version
    answer = _query(db, slide, k=5, no_store=True, out=tmp_path / "mine.parquet")
    assert answer.indexed and np.array_equal(answer.predictions, first.predictions)
    assert Store(db).table("tiles").version == version
