"""The streaming slide pipeline: background readers, batched embedding, chunked search and
writing; bf16 embedding; a failure half-way leaves nothing behind."""

from __future__ import annotations

import shutil

import lancedb
import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile

from histoindex import api, pipeline
from histoindex.io.slides import open_slide
from histoindex.patch import iter_patches, stream_patches, tile_grid

from .conftest import run


def test_background_readers_return_the_serial_patches_in_order(sections):
    slide = open_slide(sections.heldout_tif)
    try:
        grid = tile_grid(slide, tile_um=110)
        serial = np.concatenate(list(iter_patches(slide, grid.xy, side_px=110 / grid.mpp, out_px=48, batch_size=16)))
    finally:
        slide.close()
    assert len(serial) == len(grid) > 50
    for workers, batch_size, prefetch in ((0, 16, None), (1, 16, None), (3, 7, 2)):
        batches = list(
            stream_patches(
                lambda: open_slide(sections.heldout_tif), grid.xy, side_px=110 / grid.mpp, out_px=48, batch_size=batch_size, workers=workers, prefetch=prefetch
            )
        )
        assert [len(b) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
        np.testing.assert_array_equal(np.concatenate(batches), serial)


def _predict(db, slide, **options):
    return api.query(slide, db=db, tissue="breast", precision="fp32", **options)


def test_workers_batches_and_search_chunks_do_not_change_predictions(store, sections, monkeypatch):
    reference = _predict(store, sections.heldout_tif, workers=0, batch_size=64)
    monkeypatch.setattr(pipeline, "SEARCH_CHUNK", 50)  # several search/write chunks per slide
    streamed = _predict(store, sections.heldout_tif, workers=2, batch_size=7)
    assert reference.n_tiles == streamed.n_tiles > 100
    np.testing.assert_array_equal(streamed.ids, reference.ids)
    np.testing.assert_allclose(streamed.predictions, reference.predictions, rtol=1e-5, atol=1e-6)
    tbl = lancedb.connect(str(store)).open_table("predictions")
    rows = tbl.search().where(f"run_id = '{streamed.run_id}'").limit(None).to_arrow()
    assert rows.num_rows == streamed.n_tiles  # every chunk reached the table, in one version
    assert tbl.version == streamed.predictions_version


def test_bf16_embedding_leaves_predictions_within_noise(store, sections):
    fp32 = _predict(store, sections.heldout_tif)
    bf16 = api.query(sections.heldout_tif, db=store, tissue="breast", precision="bf16")
    diff = np.abs(bf16.predictions - fp32.predictions)
    spread = fp32.predictions.std(axis=0).mean()
    assert diff.mean() < 0.02 * spread, (diff.mean(), spread)
    per_gene_r = [np.corrcoef(a, b)[0, 1] for a, b in zip(fp32.predictions.T, bf16.predictions.T) if a.std() > 0]
    assert np.median(per_gene_r) > 0.99


def _damage_second_half(tif, out):
    """Copy ``tif`` with the level-0 JPEG tiles of its lower half overwritten (lower levels intact)."""
    shutil.copy(tif, out)
    with tifffile.TiffFile(tif) as t:
        page = t.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
    data = bytearray(out.read_bytes())
    for offset, count in list(zip(offsets, counts))[len(offsets) // 2 :]:
        data[offset + count // 4 : offset + count] = bytes(count - count // 4)
    out.write_bytes(bytes(data))
    return out


def test_a_slide_failing_half_way_writes_nothing(store, sections, tmp_path):
    bad = _damage_second_half(sections.heldout_tif, tmp_path / "damaged.tif")
    out = tmp_path / "pred.parquet"
    out.write_bytes(b"an earlier result")
    run("query", sections.heldout_tif, "--db", store, "--tissue", "breast")  # an earlier run, which must survive
    tbl = lancedb.connect(str(store)).open_table("predictions")
    before = (tbl.version, tbl.count_rows())
    result = run("query", bad, "--spots", sections.heldout_h5ad, "--db", store, "--out", out, "--batch-size", "16", ok=False)
    assert result.exit_code == 1
    assert "cannot read damaged.tif at" in result.output
    assert "Traceback" not in result.output
    tbl = lancedb.connect(str(store)).open_table("predictions")
    assert (tbl.version, tbl.count_rows()) == before
    assert out.read_bytes() == b"an earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.tif", "db", "pred.parquet"]  # no partial file left


def test_query_streams_to_parquet_with_progress_and_rate(store, sections, tmp_path):
    out = tmp_path / "pred.parquet"
    result = run("query", sections.heldout_tif, "--db", store, "--tissue", "breast", "--out", out, "--workers", "2", "--precision", "fp32")
    assert "tiles/s" in result.output
    table = pq.read_table(out)
    streamed = _predict(store, sections.heldout_tif)
    assert table.num_rows == streamed.n_tiles
    assert table.column("tile_id").to_pylist() == streamed.ids.tolist()
    gene = streamed.genes[0]
    np.testing.assert_allclose(table.column(gene).to_numpy(), streamed.predictions[:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("option", [["--workers", "-1"], ["--batch-size", "0"]])
def test_bad_pipeline_options_fail_cleanly(store, sections, option):
    result = run("query", sections.heldout_tif, "--db", store, *option, ok=False)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
