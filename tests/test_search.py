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
        run(
            "query",
            sections.heldout_tif,
            "--tissue",
            "breast",
            "--spots",
            sections.heldout_h5ad,
            "--k",
            "20",
            "--search",
            mode,
            "--out",
            outs[mode],
            "--db",
            store,
        )
    run("index", "--db", store, "--type", "IVF_FLAT", "--partitions", "4")
    outs["indexed"] = tmp_path / "indexed.parquet"
    run(
        "query",
        sections.heldout_tif,
        "--tissue",
        "breast",
        "--spots",
        sections.heldout_h5ad,
        "--k",
        "20",
        "--search",
        "ann",
        "--out",
        outs["indexed"],
        "--db",
        store,
    )
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
    assert "ann top-100" in result.output  # the default recipe's k


def test_exact_topk_bounds_the_similarity_block(monkeypatch):
    import histoindex.search as search_module

    rng = np.random.default_rng(1)
    keys = rng.normal(size=(300, 8)).astype(np.float32)
    queries = rng.normal(size=(50, 8)).astype(np.float32)
    whole, _ = exact_topk(queries, keys, 5)
    monkeypatch.setattr(search_module, "EXACT_CHUNK_ELEMENTS", 300 * 3)  # 3 queries per block
    chunked, _ = exact_topk(queries, keys, 5)
    assert np.array_equal(whole, chunked)


def _heldout_queries(db, sections, n=40):
    from histoindex import api
    from histoindex.embed import embed_images
    from histoindex.models import load_model
    from histoindex.patch import spot_patches
    from histoindex.store import Store

    model = Store(db).model()
    heldout = api.read_reference(sections.heldout_h5ad)
    patches = spot_patches(heldout, patch_um=model.cfg.patch_um, patch_px=model.cfg.patch_px)[:n]
    return model, embed_images(load_model(model.cfg, model.weights()), [patches], device="cpu")


def test_ann_reads_expression_only_for_the_hit_rows(store, sections):
    """The ANN path exists to avoid holding the candidates: nothing is read up front, and the
    profiles read are those of the distinct neighbours, not of every candidate."""
    from histoindex.impute import impute
    from histoindex.search import References, Scope, search
    from histoindex.store import Store

    run("ingest", sections.other_h5ad, "--tissue", "breast", "--dataset", "other", "--db", store)
    model, queries = _heldout_queries(store, sections, n=5)
    exact = References(Store(store), Scope(model_id=model.model_id), mode="exact")
    ann = References(Store(store), Scope(model_id=model.model_id), mode="ann")
    assert ann.row_ids is None and ann.keys is None and ann._expression is None
    read = []
    original = ann.expression
    ann.expression = lambda ids: read.append(len(ids)) or original(ids)
    hits = search(ann, queries, k=10)
    values = impute(hits, ann)
    assert read == [len(np.unique(hits.indices))] and read[0] <= 5 * 10 < ann.n
    np.testing.assert_allclose(values, impute(search(exact, queries, k=10), exact), atol=1e-5)


def test_exact_search_without_the_expression_cache_reads_hit_rows(store, sections, monkeypatch):
    import histoindex.search as search_module
    from histoindex.impute import impute
    from histoindex.search import References, Scope, search
    from histoindex.store import Store

    model, queries = _heldout_queries(store, sections)
    cached = References(Store(store), Scope(model_id=model.model_id))
    assert cached._expression is not None
    monkeypatch.setattr(search_module, "EXPRESSION_CACHE_BYTES", 0)
    lazy = References(Store(store), Scope(model_id=model.model_id))
    assert lazy._expression is None and lazy.keys is not None
    np.testing.assert_array_equal(impute(search(lazy, queries, k=7), lazy), impute(search(cached, queries, k=7), cached))


def test_exact_keys_are_used_in_place():
    """Given a tensor, exact_topk searches it where it is (no copy of the key matrix per chunk)."""
    import torch

    rng = np.random.default_rng(2)
    keys = torch.from_numpy(rng.normal(size=(200, 8)).astype(np.float32))
    queries = rng.normal(size=(30, 8)).astype(np.float32)
    pointer = keys.data_ptr()
    idx, _ = exact_topk(queries, keys, 4, chunk=7)
    assert keys.data_ptr() == pointer
    assert np.array_equal(idx, np.argsort(-(queries @ keys.numpy().T), axis=1)[:, :4])


def test_averaging_builds_no_queries_by_k_by_genes_temporary():
    import tracemalloc

    from histoindex.impute import average_rows

    rng = np.random.default_rng(3)
    values = rng.uniform(0, 5, (3000, 2000)).astype(np.float32)
    indices = rng.integers(0, 3000, (2048, 50))
    expected = values[indices[:8]].mean(axis=1)
    tracemalloc.start()
    out = average_rows(indices, values)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_allclose(out[:8], expected, rtol=1e-5)
    dense_temporary = 2048 * 50 * 2000 * 4  # 819 MB
    assert peak < dense_temporary / 20, f"peak {peak / 1e6:.0f} MB"
    weighted = average_rows(indices[:2], values, weights=np.arange(1, 101, dtype=np.float32).reshape(2, 50))
    w = np.arange(1, 51) / np.arange(1, 51).sum()
    np.testing.assert_allclose(weighted[0], (values[indices[0]] * w[:, None]).sum(0), rtol=1e-5)
