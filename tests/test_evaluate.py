"""`histoindex evaluate`: leave-one-section-out scoring of the model next to baselines."""

from __future__ import annotations

import json

import numpy as np
import polars as pl

from histoindex import api
from histoindex.evaluate import gene_sets, ridge_on_features, score
from histoindex.genes import highly_variable_genes
from histoindex.metrics import pearson_per_gene
from histoindex.store import Store

from .conftest import TRAIN_ARGS, run


def test_evaluate_cli_scores_model_and_baselines_and_writes_rescorable_predictions(sections, tmp_path):
    out = tmp_path / "heldout.parquet"
    result = run(
        "evaluate",
        sections.train_h5ad,
        sections.other_h5ad,
        sections.heldout_h5ad,
        "--holdout",
        "syn-heldout",
        "--markers",
        "FASN,CD74,VIM,NOT_IN_PANEL",
        "--out",
        out,
        "--json",
        *TRAIN_ARGS,
    )
    report = json.loads(result.stdout)
    (fold,) = report["folds"]
    assert fold["holdout"] == "syn-heldout" and fold["train_sections"] == ["syn-train", "syn-other"]
    scores = fold["scores"]
    assert set(scores) == {"histoindex", "neighbour-mean", "mean", "colour-retrieval", "frozen-retrieval", "frozen-retrieval+", "frozen-ridge"}
    assert scores["mean"]["all"] == 0.0  # a constant prediction scores 0, not NaN
    assert scores["histoindex"]["all"] > 0.25
    assert scores["histoindex"]["MSE"] < scores["mean"]["MSE"]
    assert "MG-3" in scores["histoindex"]  # the marker missing from the panel is not scored

    # the panel was chosen on the training sections only
    train_refs = [api.read_reference(p) for p in (sections.train_h5ad, sections.other_h5ad)]
    frame = pl.read_parquet(out)
    genes = [c for c in frame.columns if c not in ("section", "system", "spot")]
    assert genes == highly_variable_genes(train_refs, 48)

    # anyone can re-score the written predictions and get the reported numbers
    truth = frame.filter(pl.col("system") == "truth")
    model = frame.filter(pl.col("system") == "histoindex")
    assert truth["spot"].to_list() == model["spot"].to_list()
    t, p = truth.select(genes).to_numpy(), model.select(genes).to_numpy()
    rescored = score(t, p, gene_sets(t, genes, ["FASN", "CD74", "VIM"]))
    for metric, value in scores["histoindex"].items():
        assert abs(rescored[metric] - value) < 1e-5, metric


def test_evaluate_rejects_unknown_holdout(sections):
    result = run("evaluate", sections.train_h5ad, sections.other_h5ad, "--holdout", "nope", *TRAIN_ARGS, ok=False)
    assert result.exit_code == 1
    assert "Error: --holdout nope is not among the sections: syn-train, syn-other" in result.output


def test_ridge_recovers_a_linear_map():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 30)).astype(np.float32)
    w = rng.normal(size=(30, 5))
    y = (x @ w).astype(np.float32)
    pred = ridge_on_features(x[:300], y[:300], x[300:], n_components=30)
    assert pearson_per_gene(y[300:], pred).min() > 0.99


def test_gene_sets_are_defined_on_truth():
    truth = np.zeros((10, 60), np.float32)
    truth[:, 5] = 9.0  # highest mean, no variance
    truth[:, 7] = np.arange(10)  # most variable
    sets = gene_sets(truth, [f"g{i}" for i in range(60)], ["g7", "zz"], n=1)
    assert list(sets["HEG-1"]) == [5] and list(sets["HVG-1"]) == [7] and list(sets["MG-1"]) == [7]


def test_evaluate_gives_what_the_cli_chain_gives(sections, tmp_path):
    """A fold of `evaluate` runs the code users run: train on the training sections, ingest them,
    query the held-out slide at its spots — the same predictions, to float rounding (with stain
    normalisation, fitted on the same sample of each section's patches either way)."""
    frozen = [
        "--stain",
        "macenko",
        "--backbone",
        "resnet10t",
        "--weights",
        "none",
        "--freeze-backbone",
        "--views",
        "2",
        "--patch-px",
        "64",
        "--patch-um",
        "110",
        "--epochs",
        "4",
        "--n-genes",
        "48",
        "--seed",
        "3",
    ]
    out = tmp_path / "fold.parquet"
    report = run(
        "evaluate",
        sections.train_h5ad,
        sections.other_h5ad,
        sections.heldout_h5ad,
        "--holdout",
        "syn-heldout",
        "--no-baselines",
        "--out",
        out,
        "--json",
        *frozen,
    )
    evaluated = pl.read_parquet(out).filter(pl.col("system") == "histoindex")
    (fold,) = json.loads(report.stdout)["folds"]

    db, queried = tmp_path / "db", tmp_path / "query.parquet"
    run("train", sections.train_h5ad, sections.other_h5ad, "--db", db, *frozen)
    for h5ad, name in ((sections.train_h5ad, "syn-train"), (sections.other_h5ad, "syn-other")):
        run("ingest", h5ad, "--tissue", "breast", "--dataset", name, "--db", db)
    run("query", sections.heldout_tif, "--spots", sections.heldout_h5ad, "--out", queried, "--db", db)
    # the same model either way: trained, or frozen retrieval when the inner check fell back
    assert Store(db).model().cfg.method == fold["method"]
    cli = pl.read_parquet(queried)
    genes = [c for c in evaluated.columns if c not in ("section", "system", "spot")]
    assert cli["spot"].to_list() == evaluated["spot"].to_list()
    np.testing.assert_allclose(cli.select(genes).to_numpy(), evaluated.select(genes).to_numpy(), rtol=1e-4, atol=1e-4)


def test_variable_genes_are_chosen_among_those_the_heldout_section_measures(sections, tmp_path):
    """Without --genes, the panel comes from the training sections; a gene the held-out section
    lacks cannot be scored there, so it is not chosen (it used to stop the run: "genes missing")."""
    import anndata as ad

    train_refs = [api.read_reference(p) for p in (sections.train_h5ad, sections.other_h5ad)]
    top = highly_variable_genes(train_refs, 48)[0]
    heldout = ad.read_h5ad(sections.heldout_h5ad)
    cut = tmp_path / "syn-heldout.h5ad"  # the section name comes from the file name
    heldout[:, heldout.var_names != top].copy().write_h5ad(cut)

    out = tmp_path / "heldout.parquet"
    result = run("evaluate", sections.train_h5ad, sections.other_h5ad, cut, "--holdout", "syn-heldout", "--no-baselines", "--out", out, "--json", *TRAIN_ARGS)
    (fold,) = json.loads(result.stdout)["folds"]
    genes = [c for c in pl.read_parquet(out).columns if c not in ("section", "system", "spot")]
    assert top not in genes and fold["n_genes"] == len(genes) >= 48
    common = [g for g in train_refs[0].var_names if g != top]
    assert genes == highly_variable_genes(train_refs, 48, among=common)
