"""Filters are pushed into the search: other tissues never appear among the neighbours."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from histoindex import api
from histoindex.embed import embed_images
from histoindex.errors import InputError
from histoindex.models import load_model
from histoindex.patch import spot_patches
from histoindex.search import References, Scope, check_where, search
from histoindex.store import Store

from .conftest import error_line, run


def test_other_tissue_never_in_neighbours(store, sections):
    run("ingest", sections.other_h5ad, "--tissue", "lung", "--platform", "visium", "--dataset", "lung-set", "--db", store)
    st = Store(store)
    model = st.model()
    heldout = api.read_reference(sections.heldout_h5ad)
    patches = spot_patches(heldout, patch_um=model.cfg.patch_um, patch_px=model.cfg.patch_px)[:60]
    queries = embed_images(load_model(model.cfg, model.weights()), [patches], device="cpu")
    for tissue in ("breast", "lung"):
        refs = References(st, Scope(model_id=model.model_id, tissue=tissue))
        where = refs.where
        hits = search(refs, queries, k=50)
        rows = st.table("spots").search().select(["tissue"]).with_row_id(True).limit(None).to_arrow()
        tissue_of = dict(zip(rows.column("_rowid").to_pylist(), rows.column("tissue").to_pylist()))
        assert {tissue_of[r] for r in hits.indices.ravel()} == {tissue}
        # exact top-k: same neighbours as brute force over the filtered rows
        all_rows = st.table("spots").search().where(where).select(["expression_embedding"]).with_row_id(True).limit(None).to_arrow()
        keys = np.stack(all_rows.column("expression_embedding").to_numpy(zero_copy_only=False))
        best = np.argsort(-(queries @ keys.T), axis=1)[:, :50]
        brute = np.asarray(all_rows.column("_rowid").to_pylist())[best]
        found = hits.indices
        overlap = np.mean([len(set(a) & set(b)) / 50 for a, b in zip(found, brute)])
        assert overlap > 0.99


def test_selective_filter_is_applied_before_the_search(store, sections, tmp_path):
    """Prefiltering: a filter matching 10 rows with k=50 returns exactly those 10 rows, so every
    prediction is a weighted mean of them (a post-filter would return almost nothing)."""
    run("ingest", sections.other_h5ad, "--tissue", "lung", "--platform", "visium", "--dataset", "lung-set", "--db", store)
    where = "spot_id LIKE '%spot0000_'"
    out = tmp_path / "lung.parquet"
    run(
        "query", sections.heldout_tif, "--tissue", "lung", "--where", where, "--k", "50", "--smooth", "0", "--spots", sections.heldout_h5ad, "--out", out,
        "--db", store,
    )  # fmt: skip
    st = Store(store)
    matching = st.table("spots").search().where(f"tissue = 'lung' AND ({where})").select(["expression"]).limit(None).to_arrow()
    assert matching.num_rows == 10
    rows = np.stack(matching.column("expression").to_numpy(zero_copy_only=False)).astype(np.float64)
    genes = list(st.model().cfg.genes)
    predicted = pl.read_parquet(out).select(genes).to_numpy().astype(np.float64)
    # each prediction is a convex combination of exactly those 10 profiles (similarity weights; one
    # dataset, so z imputation maps back onto its own scale): solve for the weights, summing to one
    system = np.vstack([rows.T, np.ones((1, len(rows)))])
    for p in predicted:
        weights, *_ = np.linalg.lstsq(system, np.r_[p, 1.0], rcond=None)
        np.testing.assert_allclose(weights @ rows, p, atol=1e-4)
        assert weights.min() > -1e-4 and weights.sum() == pytest.approx(1.0, abs=1e-4)
    stored = st.table("predictions").to_arrow()
    assert set(stored.column("k").to_pylist()) == {10}


def test_unknown_tissue_lists_the_tissues_present(store, sections):
    run("ingest", sections.other_h5ad, "--tissue", "lung", "--platform", "visium", "--dataset", "lung-set", "--db", store)
    before = Store(store).versions()
    result = run("query", sections.heldout_tif, "--tissue", "liver", "--db", store, ok=False)
    assert result.exit_code == 1
    assert "Error: no reference spots with tissue 'liver'" in result.output
    assert "tissue values present: breast, lung" in result.output
    assert Store(store).versions() == before


def test_bad_where_clause_is_a_clear_error(store, sections):
    result = run("query", sections.heldout_tif, "--tissue", "breast", "--where", "no_such_column = 1", "--db", store, ok=False)
    assert result.exit_code == 1
    error_line(result, "Error: cannot apply filter")


@pytest.mark.parametrize(
    "where",
    [
        "tissue = $$breast$$",
        "tissue = $t$breast$t$",
        "spot_id = $$($$) OR true OR (spot_id = $$)$$",  # balanced to a quote-blind count, not to Lance's parser
        "tissue = $1",
    ],
)
def test_a_where_with_dollar_quoting_is_refused(where):
    with pytest.raises(InputError, match=r"'\$' outside a quoted string is not allowed"):
        check_where(where)


def test_a_where_with_a_dollar_quoted_string_is_a_clear_error(store, sections):
    before = Store(store).versions()
    result = run("query", sections.heldout_tif, "--tissue", "breast", "--where", "tissue = $$breast$$", "--db", store, ok=False)
    assert result.exit_code == 1
    assert result.output.startswith("Error: --where 'tissue = $$breast$$': '$' outside a quoted string is not allowed"), result.output
    assert len(result.output.strip().splitlines()) == 1
    assert Store(store).versions() == before
    # '$' inside a quoted string is data
    assert check_where("dataset = 'a$$b'") == "dataset = 'a$$b'"
