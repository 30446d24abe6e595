"""The search planner: exact in-memory top-k, LanceDB's ANN index, and the choice between them."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from histoindex.errors import StoreError
from histoindex.search import EXACT_MAX_ROWS, exact_topk, plan_search

from .conftest import run


def test_plan_search():
    assert plan_search("auto", 1000) == "exact"
    assert plan_search("auto", EXACT_MAX_ROWS + 1) == "ann"
    assert plan_search("ann", 10) == "ann"
    with pytest.raises(StoreError, match="unknown search mode"):
        plan_search("fast", 10)


def test_exact_topk_matches_brute_force_in_chunks():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(500, 16)).astype(np.float32)
    queries = rng.normal(size=(37, 16)).astype(np.float32)
    idx, sims = exact_topk(queries, keys, 7, chunk=8)
    brute = np.argsort(-(queries @ keys.T), axis=1)[:, :7]
    assert np.array_equal(idx, brute)
    np.testing.assert_allclose(sims, np.take_along_axis(queries @ keys.T, brute, 1), rtol=1e-5)


def test_exact_ann_and_lancedb_flat_agree(store, sections, tmp_path):
    outs = {}
    for mode in ("exact", "ann"):  # ann without an index = LanceDB's flat scan
        outs[mode] = tmp_path / f"{mode}.parquet"
        run("query", sections.heldout_tif, "--tissue", "breast", "--spots", sections.heldout_h5ad, "--k", "20", "--search", mode, "--out", outs[mode], "--db", store)
    run("index", "--db", store, "--type", "IVF_FLAT", "--partitions", "4")
    outs["indexed"] = tmp_path / "indexed.parquet"
    run("query", sections.heldout_tif, "--tissue", "breast", "--spots", sections.heldout_h5ad, "--k", "20", "--search", "ann", "--out", outs["indexed"], "--db", store)
    frames = {m: pl.read_parquet(p) for m, p in outs.items()}
    genes = [c for c in frames["exact"].columns if c not in ("slide", "spot", "x", "y", "x_um", "y_um")]
    exact = frames["exact"].select(genes).to_numpy()
    for mode in ("ann", "indexed"):
        # the same neighbours up to float ties: predictions agree closely
        np.testing.assert_allclose(frames[mode].select(genes).to_numpy(), exact, atol=0.05)


def test_ingest_keeps_the_vector_index_current_and_old_versions_readable(store, sections):
    import lancedb

    run("index", "--db", store, "--type", "IVF_FLAT", "--partitions", "4")
    tbl = lancedb.connect(str(store)).open_table("spots")
    before = tbl.version
    rows_before = tbl.count_rows()
    run("ingest", sections.other_h5ad, "--tissue", "lung", "--dataset", "other", "--db", store)
    tbl = lancedb.connect(str(store)).open_table("spots")
    stats = {i.name: tbl.index_stats(i.name) for i in tbl.list_indices()}
    assert stats and all(s.num_unindexed_rows == 0 for s in stats.values())  # new rows indexed, vector and scalar
    assert tbl.count_rows() > rows_before
    versions = [v["version"] for v in tbl.list_versions()]
    assert versions == list(range(1, tbl.version + 1))  # nothing pruned
    tbl.checkout(before)
    assert tbl.count_rows() == rows_before
    # the ANN path now finds the new tissue without a flat scan of unindexed rows
    result = run("query", sections.other_tif, "--tissue", "lung", "--search", "ann", "--db", store)
    assert "ann top-50" in result.output


def test_exact_topk_bounds_the_similarity_block(monkeypatch):
    import histoindex.search as search_module

    rng = np.random.default_rng(1)
    keys = rng.normal(size=(300, 8)).astype(np.float32)
    queries = rng.normal(size=(50, 8)).astype(np.float32)
    whole, _ = exact_topk(queries, keys, 5)
    monkeypatch.setattr(search_module, "EXACT_CHUNK_ELEMENTS", 300 * 3)  # 3 queries per block
    chunked, _ = exact_topk(queries, keys, 5)
    assert np.array_equal(whole, chunked)
