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

from .conftest import TRAIN_ARGS, error_line, run


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
    assert set(scores) == {"histoindex", "neighbour-mean", "mean", "colour-retrieval", "frozen-retrieval", "frozen-retrieval+", "frozen-ridge", "depth-only"}
    assert report["config"]["context_only"] == ["depth-only"]  # it reads the truth's depth: context, not a competitor
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
    normalisation, fitted on the same sample of each section's patches either way). The two paths
    are compared, not the model: a tiny random-init backbone, frozen."""
    frozen = [
        "--stain",
        "macenko",
        "--backbone",
        "test_resnet",
        "--weights",
        "none",
        "--freeze-backbone",
        "--views",
        "2",
        "--patch-px",
        "32",
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
    lacks cannot be scored there, so it is not chosen (it used to stop the run: "genes missing").
    The panel is under test here, not the model: the FAST heads."""
    import anndata as ad

    train_refs = [api.read_reference(p) for p in (sections.train_h5ad, sections.other_h5ad)]
    top = highly_variable_genes(train_refs, 48)[0]
    heldout = ad.read_h5ad(sections.heldout_h5ad)
    cut = tmp_path / "syn-heldout.h5ad"  # the section name comes from the file name
    heldout[:, heldout.var_names != top].copy().write_h5ad(cut)

    out = tmp_path / "heldout.parquet"
    result = run("evaluate", sections.train_h5ad, sections.other_h5ad, cut, "--holdout", "syn-heldout", "--no-baselines", "--out", out, "--json", *FAST)
    (fold,) = json.loads(result.stdout)["folds"]
    genes = [c for c in pl.read_parquet(out).columns if c not in ("section", "system", "spot")]
    assert top not in genes and fold["n_genes"] == len(genes) >= 48
    common = [g for g in train_refs[0].var_names if g != top]
    assert genes == highly_variable_genes(train_refs, 48, among=common)


# ---- across patients (issue 21) -------------------------------------------------------------
PATIENTS = ["--patient", "syn-train=P1", "--patient", "syn-other=P1", "--patient", "syn-heldout=P2"]
#: the protocol is under test here, not the model: heads on a frozen random backbone's small patches
FAST = [
    *["--backbone", "test_resnet", "--weights", "none"],
    "--freeze-backbone",
    "--no-inner-check",
    "--views",
    "1",
    "--patch-px",
    "32",
    "--patch-um",
    "110",
    "--epochs",
    "2",
    "--n-genes",
    "48",
    "--stain",
    "none",
]


def test_patient_protocol_holds_out_every_section_of_a_patient(sections, tmp_path):
    """--protocol patient: all sections of the held-out patient leave together; model, gene panel
    and baselines are fitted on the other patients' sections only; every baseline, the ridge
    probe's inner-CV penalty and the context-only depth predictor are reported per fold."""
    out = tmp_path / "patients.parquet"
    result = run(
        "evaluate", sections.train_h5ad, sections.other_h5ad, sections.heldout_h5ad,
        "--protocol", "patient", *PATIENTS, "--out", out, "--json", *FAST,
    )  # fmt: skip
    report = json.loads(result.stdout)
    assert report["config"]["protocol"] == "patient"
    folds = {f["holdout"]: f for f in report["folds"]}
    assert list(folds) == ["syn-train", "syn-other", "syn-heldout"]
    # patient P1's two sections are held out together: neither trains the model that answers them
    assert folds["syn-train"]["train_sections"] == folds["syn-other"]["train_sections"] == ["syn-heldout"]
    assert folds["syn-train"]["patient"] == folds["syn-other"]["patient"] == "P1"
    assert folds["syn-heldout"]["train_sections"] == ["syn-train", "syn-other"] and folds["syn-heldout"]["patient"] == "P2"

    # the panel of P1's folds comes from P2's section alone (among genes both P1 sections measure)
    frame = pl.read_parquet(out)
    refs = {
        name: api.read_reference(p)
        for name, p in (("syn-train", sections.train_h5ad), ("syn-other", sections.other_h5ad), ("syn-heldout", sections.heldout_h5ad))
    }
    for section, train in (("syn-train", ["syn-heldout"]), ("syn-heldout", ["syn-train", "syn-other"])):
        rows = frame.filter((pl.col("section") == section) & (pl.col("system") == "truth"))
        genes = [c for c in rows.columns if c not in ("section", "system", "spot") and rows[c].null_count() == 0]
        assert set(genes) == set(highly_variable_genes([refs[n] for n in train], 48))
    assert highly_variable_genes([refs["syn-heldout"]], 48) != highly_variable_genes([refs["syn-train"], refs["syn-other"]], 48)

    for fold in folds.values():
        assert {"frozen-ridge", "depth-only", "mean", "frozen-retrieval", "frozen-retrieval+"} <= set(fold["scores"])
        assert fold["ridge"]["alpha"] in fold["ridge"]["alphas"] and len(fold["ridge"]["inner_r"]) == len(fold["ridge"]["alphas"])
        assert fold["peak_rss_mb"] > 0 and fold["train_seconds"] >= 0
    # the ridge penalty is chosen across training patients where there are two; else within the one
    assert folds["syn-heldout"]["ridge"]["groups"] == "sections" and folds["syn-train"]["ridge"]["groups"] == "spatial blocks"
    assert report["config"]["context_only"] == ["depth-only"]


def test_patient_protocol_needs_patients(sections):
    base = ("evaluate", sections.train_h5ad, sections.other_h5ad, sections.heldout_h5ad)
    line = error_line(run(*base, "--protocol", "patient", *TRAIN_ARGS, ok=False), "--protocol patient", "--patient")
    assert "SECTION=PATIENT" in line
    line = error_line(run(*base, "--protocol", "patient", "--patient", "syn-train=P1", "--patient", "syn-other=P1", *TRAIN_ARGS, ok=False))
    assert "syn-heldout" in line  # the section without a patient is named
    line = error_line(run(*base, "--protocol", "patient", *PATIENTS, "--patient", "nope=P3", *TRAIN_ARGS, ok=False), "nope")
    line = error_line(run(*base, "--protocol", "patient", *PATIENTS[:4], "--patient", "syn-heldout=P1", *TRAIN_ARGS, ok=False), "two patients")
    line = error_line(run(*base, "--protocol", "patient", *PATIENTS, "--holdout", "syn-train", *TRAIN_ARGS, ok=False), "syn-train", "P1")
    line = error_line(run(*base, "--patient", "syn-train", *TRAIN_ARGS, ok=False), "SECTION=PATIENT")


def test_patient_column_reads_each_files_patient(sections, tmp_path):
    import anndata as ad

    paths = []
    for path, patient in ((sections.train_h5ad, "P1"), (sections.other_h5ad, "P1"), (sections.heldout_h5ad, "P2")):
        adata = ad.read_h5ad(path)
        adata.obs["donor"] = patient
        paths.append(tmp_path / path.name)
        adata.write_h5ad(paths[-1])
    result = run("evaluate", *paths, "--protocol", "patient", "--patient-column", "donor", "--holdout", "P2", "--no-baselines", "--json", *FAST)
    (fold,) = json.loads(result.stdout)["folds"]
    assert fold["holdout"] == "syn-heldout" and fold["train_sections"] == ["syn-train", "syn-other"] and fold["patient"] == "P2"
    error_line(run("evaluate", *paths, "--protocol", "patient", "--patient-column", "nope", *TRAIN_ARGS, ok=False), "nope", "syn-train")


def test_ridge_penalty_is_chosen_by_inner_cross_validation():
    """The probe's penalty comes from its grid, by grouped inner CV: small where the features
    carry the signal, large where the targets are noise it would otherwise fit."""
    from histoindex.baselines import RIDGE_ALPHAS, ridge_cv

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 40)).astype(np.float32)
    groups = np.repeat([0, 1, 2], 100)
    clean = (x @ rng.normal(size=(40, 6))).astype(np.float32)
    pred, clean_fit = ridge_cv(x[:240], clean[:240], x[240:], groups[:240], n_components=40)
    assert pearson_per_gene(clean[240:], pred).min() > 0.99
    few = rng.normal(size=(45, 40)).astype(np.float32)  # fewer spots than features, signal weak
    noisy = (few[:, :1] * 0.3 + rng.normal(size=(45, 6))).astype(np.float32)
    _, noisy_fit = ridge_cv(few, noisy, few[:5], np.repeat([0, 1, 2], 15), n_components=40)
    for fit in (clean_fit, noisy_fit):
        assert fit["alpha"] in RIDGE_ALPHAS and fit["alpha"] == fit["alphas"][int(np.argmax(fit["inner_r"]))]
    assert noisy_fit["alpha"] > clean_fit["alpha"]


def test_depth_only_is_a_per_gene_regression_on_log_total_counts():
    from histoindex.baselines import depth_only

    train_totals = np.array([100.0, 400.0, 900.0, 2500.0, 50.0])
    train_y = np.array([[0.1, 2.0], [0.5, 1.7], [0.9, 1.1], [1.6, 0.2], [0.0, 2.2]], np.float32)
    test_totals = np.array([300.0, 5000.0])
    pred = depth_only(train_totals, train_y, test_totals)
    for j in range(2):
        slope, intercept = np.polyfit(np.log(train_totals), train_y[:, j], 1)
        np.testing.assert_allclose(pred[:, j], intercept + slope * np.log(test_totals), rtol=1e-5)
