"""Versions: each ingest is one new spots version; --as-of reads an old one; re-ingest replaces."""

from __future__ import annotations

import polars as pl

from histoindex.store import Store

from .conftest import run


def test_two_ingests_two_versions_and_as_of(store, sections, tmp_path):
    spots = Store(store).table("spots")
    first = spots.version
    run("ingest", sections.other_h5ad, "--tissue", "breast", "--platform", "visium", "--dataset", "other", "--db", store)
    second = Store(store).table("spots").version
    assert second == first + 1
    assert Store(store).table("spots").count_rows() > spots.count_rows()

    a, b, c = (tmp_path / f"{n}.parquet" for n in "abc")
    run("query", sections.heldout_tif, "--tissue", "breast", "--spots", sections.heldout_h5ad, "--k", "5", "--as-of", first, "--out", a, "--db", store)
    run("query", sections.heldout_tif, "--tissue", "breast", "--spots", sections.heldout_h5ad, "--k", "5", "--out", b, "--db", store)
    # the first version's answers, recomputed from a store that holds only the first ingest
    fresh = tmp_path / "only-first"
    import shutil

    shutil.copytree(store, fresh)
    Store(fresh).table("spots").restore(first)
    run("query", sections.heldout_tif, "--tissue", "breast", "--spots", sections.heldout_h5ad, "--k", "5", "--out", c, "--db", fresh)
    fa, fb, fc = (pl.read_parquet(p) for p in (a, b, c))
    genes = [g for g in fa.columns if g not in ("slide", "spot", "x", "y", "x_um", "y_um")]
    assert fa.select(genes).equals(fc.select(genes))
    assert not fa.select(genes).equals(fb.select(genes))  # the second dataset changed neighbours
    provenance = Store(store).table("predictions").to_arrow().column("spots_version").unique().to_pylist()
    assert sorted(provenance) == [first, second]


def test_reingest_replaces_rows_in_one_version(store, sections):
    before = Store(store).table("spots")
    n_rows, version = before.count_rows(), before.version
    result = run("ingest", sections.train_h5ad, "--tissue", "breast", "--platform", "visium", "--dataset", "train", "--db", store)
    after = Store(store).table("spots")
    assert after.count_rows() == n_rows
    assert after.version == version + 1
    assert f"spots@{version + 1}" in result.stdout
    ids = after.to_arrow().column("spot_id").to_pylist()
    assert len(ids) == len(set(ids))


def test_unknown_version_is_a_clear_error(store, sections):
    result = run("query", sections.heldout_tif, "--tissue", "breast", "--as-of", "999", "--db", store, ok=False)
    assert result.exit_code == 1
    assert "Error: table 'spots' has no version 999; versions are 1.." in result.output
