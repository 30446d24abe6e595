"""Retrieval settings (issue 13): similarity weights, per-dataset z-score imputation, spatial
smoothing of predictions; recorded in a model's config, the same in evaluate and query."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histoindex.baselines import graph_smoothed
from histoindex.config import ModelConfig, RetrievalSettings
from histoindex.data import DatasetStats, Hits
from histoindex.errors import InputError
from histoindex.impute import ProfileMatrix, impute, smoothed

from .conftest import error_line, run

#: a tiny random-init backbone, frozen: training is the heads' on cached features
FROZEN_TINY = [
    "--backbone",
    "test_resnet",
    "--weights",
    "none",
    "--freeze-backbone",
    "--views",
    "1",
    "--patch-px",
    "32",
    "--patch-um",
    "110",
    "--n-genes",
    "20",
]


def _hits(rng, n_query: int, n_ref: int, k: int) -> Hits:
    idx = np.stack([rng.choice(n_ref, size=k, replace=False) for _ in range(n_query)])
    sims = np.sort(rng.uniform(0.2, 0.9, size=(n_query, k)).astype(np.float32), axis=1)[:, ::-1].copy()
    return Hits(indices=idx, similarities=sims, spots_version=1)


def test_similarity_weights_are_a_softmax_over_the_neighbours():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(40, 7)).astype(np.float32)
    hits = _hits(rng, 5, 40, 6)
    tau = 0.05
    got = impute(hits, values, RetrievalSettings(k=6, tau=tau))
    w = np.exp(hits.similarities / tau)
    w /= w.sum(axis=1, keepdims=True)
    expected = np.einsum("qk,qkg->qg", w, values[hits.indices])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # tau = 0: BLEEP's plain mean
    np.testing.assert_allclose(impute(hits, values, RetrievalSettings(k=6)), values[hits.indices].mean(axis=1), rtol=1e-5, atol=1e-6)


def test_z_imputation_is_the_pooled_map_of_per_dataset_z_scores():
    rng = np.random.default_rng(1)
    values = rng.normal(2.0, 1.0, size=(60, 5))
    datasets = np.array(["a"] * 25 + ["b"] * 35)
    values[datasets == "b"] = values[datasets == "b"] * 0.3 + 4.0  # a shallower, shifted batch
    hits = _hits(rng, 8, 60, 10)
    got = impute(hits, ProfileMatrix(values, datasets), RetrievalSettings(k=10, impute="z"))
    # by hand: z-scores within each dataset (population sd), averaged, mapped back with the pooled mean/sd
    z = np.empty_like(values)
    for name in ("a", "b"):
        rows = datasets == name
        z[rows] = (values[rows] - values[rows].mean(axis=0)) / values[rows].std(axis=0)
    expected = z[hits.indices].mean(axis=1) * values.std(axis=0) + values.mean(axis=0)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

    # a dataset's own per-gene offset and scale (depth, batch) no longer move the average
    moved = values.copy()
    moved[datasets == "b"] = moved[datasets == "b"] * 2.5 - 1.0
    stats = DatasetStats.of(moved, (datasets == "b").astype(np.int64))
    again = impute(hits, ProfileMatrix(moved, datasets), RetrievalSettings(k=10, impute="z"))
    np.testing.assert_allclose((again - stats.pooled_mean) / stats.pooled_sd, z[hits.indices].mean(axis=1), rtol=1e-4, atol=1e-4)
    # whereas the log-space mean does move
    assert not np.allclose(impute(hits, moved), impute(hits, values))


def test_a_gene_constant_in_a_dataset_contributes_its_pooled_mean():
    values = np.array([[1.0, 5.0], [3.0, 5.0], [10.0, 0.0], [12.0, 2.0]])
    hits = Hits(indices=np.array([[0, 1]]), similarities=np.ones((1, 2), np.float32), spots_version=1)
    got = impute(hits, ProfileMatrix(values, ["a", "a", "b", "b"]), RetrievalSettings(k=2, impute="z"))
    assert np.isfinite(got).all()
    assert got[0, 1] == pytest.approx(values[:, 1].mean())  # z = 0 where a dataset's sd is 0


def test_smoothing_streams_exactly_the_whole_slide_blend():
    # a row-major tile grid with holes (background), as a slide query streams it
    ys, xs = np.mgrid[0:23, 0:31]
    keep = np.random.default_rng(2).uniform(size=xs.shape) > 0.2
    xy = np.stack([xs[keep], ys[keep]], axis=1).astype(np.float64) * 100.0
    values = np.random.default_rng(3).normal(size=(len(xy), 9)).astype(np.float32)
    full = graph_smoothed(values, xy)  # the neighbourhood mean (self included)
    for strength in (0.5, 1.0):
        expected = (1 - strength) * values + strength * full
        for chunk in (1, 37, 500, len(xy)):
            parts = [values[i : i + chunk] for i in range(0, len(values), chunk)]
            got = np.concatenate(list(smoothed(iter(parts), xy, strength)))
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # 0: untouched
    assert np.array_equal(np.concatenate(list(smoothed([values], xy, 0.0))), values)


def test_settings_are_checked_and_models_from_before_keep_bleeps_answer():
    with pytest.raises(InputError, match="impute must be one of log, z"):
        RetrievalSettings(impute="mean")
    with pytest.raises(InputError, match="smooth must be between 0"):
        RetrievalSettings.parse({"smooth": "2"})
    with pytest.raises(InputError, match="unknown retrieval setting"):
        RetrievalSettings.parse({"kk": "3"})
    # a config saved before retrieval settings existed: the plain top-50 mean, unsmoothed
    old = json.loads(ModelConfig(genes=("A",)).to_json())
    assert "retrieval" not in old
    assert ModelConfig.from_json(json.dumps(old)).retrieval_settings == RetrievalSettings(k=50, tau=0.0, impute="log", smooth=0.0)


def test_reference_statistics_from_the_store_match_the_profiles(store, sections, monkeypatch):
    """z imputation against a real store: per-dataset statistics read with the profiles in memory
    and by a streaming scan agree with the profiles themselves; query --k / --smooth are recorded."""
    import lancedb

    from histoindex import search
    from histoindex.search import References, Scope
    from histoindex.store import Store

    run("ingest", sections.other_h5ad, "--tissue", "breast", "--dataset", "other", "--db", store)
    table = lancedb.connect(str(store)).open_table("spots")
    spots = table.search().select(["model_id", "dataset", "expression"]).with_row_id(True).limit(None).to_arrow()
    model_id = spots.column("model_id")[0].as_py()
    rows = spots.column("dataset").to_numpy(zero_copy_only=False)
    row_ids = spots.column("_rowid").to_numpy()
    values = np.stack(spots.column("expression").to_numpy(zero_copy_only=False)).astype(np.float64)
    truth = ProfileMatrix(values, rows).dataset_stats()
    names = sorted(set(rows))

    scope = Scope(model_id=model_id, tissue="breast")
    cached = References(Store(store), scope, mode="exact")
    monkeypatch.setattr(search, "EXPRESSION_CACHE_BYTES", 0)  # now the profiles stay in the store
    scanned = References(Store(store), scope, mode="exact")
    for refs in (cached, scanned):
        stats = refs.dataset_stats()
        np.testing.assert_allclose(stats.mean, truth.mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats.sd, truth.sd, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stats.pooled_sd, truth.pooled_sd, rtol=1e-4, atol=1e-5)
        some = [0, 5, len(row_ids) - 1, 7]
        assert [names[c] for c in refs.dataset_codes(row_ids[some])] == list(rows[some])

    result = run("query", sections.heldout_tif, "--tissue", "breast", "--k", "20", "--smooth", "0", "--db", store, "--out", store.parent / "p.parquet")
    assert "top-20" in result.output
    import pyarrow.parquet as pq

    provenance = json.loads(pq.read_schema(store.parent / "p.parquet").metadata[b"histoindex"])
    assert provenance["retrieval"] == {"k": 20, "tau": 0.03, "impute": "z", "smooth": 0.0, "smooth_k": 6}
    bad = run("query", sections.heldout_tif, "--tissue", "breast", "--smooth", "1.5", "--db", store, ok=False)
    assert "--smooth" in bad.output and bad.exit_code != 0


def test_a_bad_retrieval_option_is_refused_before_training(sections, tmp_path):
    result = run("train", sections.train_h5ad, "--db", tmp_path / "db", "--retrieval", "impute=median", ok=False)
    line = error_line(result, "impute", "median")
    assert "log, z" in line
    assert not (tmp_path / "db").exists() or not any((tmp_path / "db").iterdir())


def test_training_checks_inside_its_sections_that_training_pays(sections, tmp_path):
    """Two references, frozen backbone: each is held out in turn, the model fitted on the other, and
    the trained model's answer compared with frozen-feature retrieval's; recorded and said."""
    from histoindex.recipe import describe_inner_check
    from histoindex.store import Store

    frozen = [*FROZEN_TINY, "--epochs", "3"]
    db = tmp_path / "db"
    result = run("train", sections.train_h5ad, sections.other_h5ad, "--db", db, *frozen)
    check = Store(db).model().metrics["inner_check"]
    assert [f["holdout"] for f in check["folds"]] == ["syn-train", "syn-other"]
    assert check["trained"] == pytest.approx(np.mean([f["trained"] for f in check["folds"]]), abs=1e-4)
    assert check["verdict"] == ("trained" if check["trained"] > check["frozen"] else "frozen")
    assert describe_inner_check(check).split(" — ")[0].split("inner check: ")[1] in result.output
    # off on request; and a single reference has nothing to hold out
    run("train", sections.train_h5ad, sections.other_h5ad, "--db", tmp_path / "off", "--no-inner-check", *frozen)
    assert "inner_check" not in Store(tmp_path / "off").model().metrics
    run("train", sections.train_h5ad, "--db", tmp_path / "one", *frozen)
    assert "inner_check" not in Store(tmp_path / "one").model().metrics


def test_the_inner_check_says_when_frozen_retrieval_wins():
    from histoindex.recipe import describe_inner_check

    check = {"folds": [{"holdout": "a", "trained": 0.2, "frozen": 0.3}], "trained": 0.2, "frozen": 0.3, "verdict": "frozen"}
    line = describe_inner_check(check)
    assert line.startswith("warning: inner check: trained heads 0.200 vs frozen-feature retrieval 0.300 (-0.100) on held-out training sections a")
    assert "did not beat retrieval on the frozen backbone's features" in line


def test_the_frozen_method_is_the_frozen_retrieval_baseline(sections, tmp_path):
    """--method frozen answers as evaluate's frozen-retrieval+ baseline (the same features, the same
    retrieval settings): exactly, for a backbone of at most 256 features (test_resnet: 96)."""
    result = run(
        "evaluate", sections.train_h5ad, sections.other_h5ad, sections.heldout_h5ad, "--holdout", "syn-heldout", "--method", "frozen", "--json",
        *FROZEN_TINY,
    )  # fmt: skip
    (fold,) = json.loads(result.stdout)["folds"]
    assert fold["method"] == "frozen" and fold["inner_check"] is None  # nothing trained, nothing to check
    for metric, value in fold["scores"]["frozen-retrieval+"].items():
        assert fold["scores"]["histoindex"][metric] == pytest.approx(value, abs=1e-5), metric


def test_training_that_does_not_pay_falls_back_to_frozen_retrieval(sections, tmp_path):
    """Heads that never learn (--head-lr 0) lose the inner check: the model kept is frozen-feature
    retrieval, saying why, and it serves queries like any model; --no-fallback keeps the trained one."""
    from histoindex.store import Store

    db = tmp_path / "db"
    untrained = [*FROZEN_TINY, "--epochs", "2", "--head-lr", "0"]
    result = run("train", sections.train_h5ad, sections.other_h5ad, "--db", db, *untrained)
    assert "the model kept is frozen-feature retrieval" in result.output
    record = Store(db).model()
    assert record.cfg.method == "frozen" and record.model_id.startswith("frozen-")
    assert record.metrics["fallback"]["from"] == "bleep" and "inner check" in record.metrics["fallback"]["why"]
    assert record.metrics["inner_check"]["verdict"] == "frozen"
    run("ingest", sections.train_h5ad, "--tissue", "breast", "--dataset", "train", "--db", db)
    out = tmp_path / "p.parquet"
    run("query", sections.heldout_tif, "--tissue", "breast", "--spots", sections.heldout_h5ad, "--out", out, "--db", db)
    import polars as pl

    values = pl.read_parquet(out).select(list(record.cfg.genes)).to_numpy()
    assert np.isfinite(values).all() and values.std(axis=0).max() > 0

    kept = run("train", sections.train_h5ad, sections.other_h5ad, "--db", tmp_path / "kept", "--no-fallback", *untrained)
    assert "did not beat retrieval on the frozen backbone's features" in kept.output
    assert Store(tmp_path / "kept").model().cfg.method == "bleep"
