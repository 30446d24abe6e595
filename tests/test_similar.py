"""Search by example (issue 22): ``histoindex similar`` finds the indexed tiles most like a slide
position, a tile, or an image patch, across every slide a query indexed."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from histoindex import api
from histoindex.api.similar import SHEET_CELL_PX, SHEET_COLUMNS
from histoindex.io.slides import open_slide
from histoindex.store import Store

from .conftest import error_line, run


@pytest.fixture(scope="module")
def indexed(trained_store, sections, tmp_path_factory):
    """A store in which the held-out slide, a byte-for-byte copy under another name and a second
    copy whose file is then removed were queried (the copies with --re-embed: a copy's tiles are
    indexed under its own name)."""
    root = tmp_path_factory.mktemp("similar")
    db = root / "db"
    shutil.copytree(trained_store, db)
    slide, copy, gone = root / "slide.tif", root / "copy.tif", root / "gone.tif"
    for path in (slide, copy, gone):
        shutil.copy(sections.heldout_tif, path)
    api.query(slide, db=db, tissue="breast", precision="fp32", workers=0)
    for path in (copy, gone):
        api.query(path, db=db, tissue="breast", precision="fp32", workers=0, re_embed=True)
    gone.unlink()
    tiles = Store(db).table("tiles").to_lance().to_table(filter="slide = 'slide.tif'")
    return db, slide, tiles


def _hits(db, tmp_path, *args):
    out = tmp_path / "hits.parquet"
    run("similar", *args, "--db", db, "--out", out)
    return pq.read_table(out).to_pylist()


def _a_tile(tiles, n=None):
    i = tiles.num_rows // 2 if n is None else n
    return {c: tiles.column(c)[i].as_py() for c in ("tile_id", "x_um", "y_um", "x", "y", "mpp")}


def test_similar_finds_its_own_tile_first_and_its_duplicates_on_copies(indexed, tmp_path):
    db, _, tiles = indexed
    tile = _a_tile(tiles)
    near = f"{tile['x_um'] + 10:.3f},{tile['y_um'] - 10:.3f}"  # inside the tile, off its centre
    hits = _hits(db, tmp_path, "--slide", "slide.tif", "--at", near, "--k", "5")
    assert len(hits) == 5
    first = hits[0]
    assert (first["source"], first["slide"], first["tile_id"]) == ("tiles", "slide.tif", tile["tile_id"])
    assert first["similarity"] == pytest.approx(1.0, abs=1e-5) and first["distance_um"] == pytest.approx(0.0)
    # the same tile on the two copies: similarity 1, no distance (another slide)
    dupes = [h for h in hits[1:3]]
    assert {h["slide"] for h in dupes} == {"copy.tif", "gone.tif"} and {h["tile_id"] for h in dupes} == {tile["tile_id"]}
    assert all(h["similarity"] == pytest.approx(1.0, abs=1e-4) and h["distance_um"] is None for h in dupes)
    # the rest: other tiles, less similar, at their distance on the query's slide
    for h in hits[3:]:
        assert h["similarity"] < 1.0 - 1e-6
        if h["slide"] == "slide.tif":
            assert h["distance_um"] > 0

    by_id = _hits(db, tmp_path, "--tile", f"copy.tif:{tile['tile_id']}", "--k", "3")
    assert by_id[0]["slide"] == "copy.tif" and by_id[0]["tile_id"] == tile["tile_id"] and by_id[0]["distance_um"] == pytest.approx(0.0)
    assert {h["slide"] for h in by_id} == {"slide.tif", "copy.tif", "gone.tif"}


def test_slide_where_keeps_only_the_slides_it_names(indexed, tmp_path):
    db, _, tiles = indexed
    tile = _a_tile(tiles)
    hits = _hits(db, tmp_path, "--tile", f"slide.tif:{tile['tile_id']}", "--slide-where", "slide <> 'slide.tif'", "--k", "4")
    assert {h["slide"] for h in hits} <= {"copy.tif", "gone.tif"} and hits[0]["tile_id"] == tile["tile_id"]


def test_where_filters_on_predicted_expression(indexed, tmp_path):
    db, _, tiles = indexed
    predictions = Store(db).table("predictions").to_arrow()
    genes = list(Store(db).model().cfg.genes)
    gene = genes[0]
    values = {(s, t): e[0] for s, t, e in zip(*(predictions.column(c).to_pylist() for c in ("slide", "tile_id", "expression")))}
    threshold = float(np.median([v for (s, _), v in values.items() if s == "slide.tif"]))
    above = {key for key, v in values.items() if v > threshold}
    assert 0 < len(above) < len(values)
    tile = _a_tile(tiles)
    hits = _hits(db, tmp_path, "--tile", f"slide.tif:{tile['tile_id']}", "--where", f"{gene} > {threshold!r}", "--k", "100000")
    assert {(h["slide"], h["tile_id"]) for h in hits} == above  # every tile above, none below


def test_an_image_patch_finds_the_tile_it_was_cut_from(indexed, tmp_path):
    db, slide, tiles = indexed
    tile = _a_tile(tiles, n=3)
    cfg = Store(db).model().cfg
    side = cfg.patch_um / tile["mpp"]
    opened = open_slide(slide)
    try:
        pixels = opened.read_region(tile["x"] - side / 2, tile["y"] - side / 2, side, round(side))
    finally:
        opened.close()
    patch = tmp_path / "patch.png"
    Image.fromarray(pixels).save(patch)
    hits = _hits(db, tmp_path, "--image", patch, "--k", "3", "--precision", "fp32")
    assert {h["tile_id"] for h in hits} == {tile["tile_id"]} and {h["slide"] for h in hits} == {"slide.tif", "copy.tif", "gone.tif"}
    assert all(h["similarity"] > 0.99 and h["distance_um"] is None for h in hits)


def test_the_vector_index_on_tiles_answers_as_the_exact_search(indexed, tmp_path):
    db, _, tiles = indexed
    tile = _a_tile(tiles)
    exact = _hits(db, tmp_path, "--tile", f"slide.tif:{tile['tile_id']}", "--k", "3", "--search", "exact")
    assert "indexed tiles@" in run("index", "--db", db, "--table", "tiles", "--type", "IVF_FLAT").output
    ann = _hits(db, tmp_path, "--tile", f"slide.tif:{tile['tile_id']}", "--k", "3", "--search", "ann")
    assert [(h["slide"], h["tile_id"]) for h in ann] == [(h["slide"], h["tile_id"]) for h in exact]
    assert np.allclose([h["similarity"] for h in ann], [h["similarity"] for h in exact], atol=1e-4)


def test_references_are_searched_by_their_image_embeddings(indexed, tmp_path):
    db, _, tiles = indexed
    tile = _a_tile(tiles)
    hits = _hits(db, tmp_path, "--tile", f"slide.tif:{tile['tile_id']}", "--k", "20", "--references")
    spots = [h for h in hits if h["source"] == "spots"]
    assert spots and all(h["slide"] == "train" for h in spots)  # the dataset the reference was ingested as
    assert [h["similarity"] for h in hits] == sorted((h["similarity"] for h in hits), reverse=True)


def test_the_contact_sheet_is_a_png_of_the_hits(indexed, tmp_path):
    db, _, tiles = indexed
    tile = _a_tile(tiles)
    sheet = tmp_path / "hits.png"
    result = run("similar", "--tile", f"slide.tif:{tile['tile_id']}", "--k", "7", "--out", sheet, "--db", db)
    assert str(sheet) in result.output
    with Image.open(sheet) as img:
        assert img.format == "PNG"
        rows = 2  # 7 hits, 5 a row
        assert img.size == (SHEET_COLUMNS * SHEET_CELL_PX, rows * (SHEET_CELL_PX + 28))
        pixels = np.asarray(img.convert("RGB"))
    hits = api.similar(db=db, tile=f"slide.tif:{tile['tile_id']}", k=7).table.to_pylist()
    for n, hit in enumerate(hits):
        x0, y0 = (n % SHEET_COLUMNS) * SHEET_CELL_PX, (n // SHEET_COLUMNS) * (SHEET_CELL_PX + 28)
        corner = pixels[y0 + 2, x0 + 2]
        grey = bool(np.all(corner == 170))
        assert grey == (hit["slide"] == "gone.tif"), (n, hit)  # the removed slide: a grey box; the others: its pixels


def test_bad_inputs_are_one_line_errors(indexed, store, tmp_path):
    db, _, tiles = indexed
    error_line(run("similar", "--slide", "nope.tif", "--at", "10,10", "--db", db, ok=False), "nope.tif", "slide.tif")
    error_line(run("similar", "--slide", "slide.tif", "--at", "-5000,-5000", "--db", db, ok=False), "off the indexed tiles", "slide.tif")
    error_line(run("similar", "--tile", "slide.tif:r999_c999", "--db", db, ok=False), "r999_c999")
    error_line(run("similar", "--at", "10,10", "--db", db, ok=False), "--slide")
    error_line(run("similar", "--slide", "slide.tif", "--db", db, ok=False), "give one query")
    error_line(run("similar", "--tile", "slide.tif:" + _a_tile(tiles)["tile_id"], "--where", "NOT_A_GENE > 1", "--db", db, ok=False), "NOT_A_GENE")
    assert run("similar", "--slide", "slide.tif", "--at", "ten,10", "--db", db, ok=False).exit_code == 2
    error_line(run("similar", "--slide", "slide.tif", "--at", "10,10", "--db", store, ok=False), "histoindex query")  # no tiles yet


def test_where_filters_each_tile_by_the_predictions_of_its_own_slide_bytes(store, sections, tmp_path):
    """--where reads the run that predicted the tiles searched (same slide bytes and embedding
    settings), not the slide name's latest run: a file changed under the same name and answered
    again without indexing its tiles leaves the old tiles filtered by their own predictions. Runs
    that predate recorded slide hashes still filter their slide's tiles by name, as before."""
    slide = tmp_path / "s.tif"
    shutil.copy(sections.heldout_tif, slide)
    old = api.query(slide, db=store, tissue="breast", precision="fp32", workers=0)
    shutil.copy(sections.other_tif, slide)  # other bytes, same name
    new = api.query(slide, db=store, tissue="breast", precision="fp32", workers=0, keep_tiles=False)
    predictions = Store(store).table("predictions").to_arrow()
    gene = list(Store(store).model().cfg.genes)[0]
    values = {r: {} for r in (old.run_id, new.run_id)}
    for run_id, tile_id, expression in zip(*(predictions.column(c).to_pylist() for c in ("run_id", "tile_id", "expression"))):
        values[run_id][tile_id] = expression[0]
    threshold = float(np.median(list(values[old.run_id].values())))
    above = {run_id: {t for t, v in by_tile.items() if v > threshold} for run_id, by_tile in values.items()}
    assert above[old.run_id] and above[old.run_id] != above[new.run_id]  # the two runs disagree on which tiles pass
    tile = Store(store).table("tiles").to_lance().to_table(columns=["tile_id"], filter="slide = 's.tif'").column("tile_id")[0].as_py()

    def passed() -> set[str]:
        hits = api.similar(db=store, tile=f"s.tif:{tile}", where=f"{gene} > {threshold!r}", k=100000).table
        assert set(hits.column("slide").to_pylist()) <= {"s.tif"}
        return set(hits.column("tile_id").to_pylist())

    assert passed() == above[old.run_id]  # the indexed tiles are the old file's: its own run filters them
    Store(store).table("predictions").update(where=f"run_id = '{old.run_id}'", values_sql={"slide_hash": "NULL", "embedding_key": "NULL"})
    assert passed() == above[old.run_id]  # a run without slide hash (before schema v3) still filters its slide's tiles
