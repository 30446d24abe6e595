"""`histoindex demo`: the README's quick-start job, end to end on the built-in synthetic data."""

from __future__ import annotations

import json

from .conftest import run


def test_demo_runs_and_beats_a_constant_predictor(tmp_path):
    workdir = tmp_path / "demo"
    result = run("demo", "--workdir", workdir)
    assert "mean per-gene Pearson r" in result.stdout
    # no silent stretch: the libraries' loading, the synthetic sections and training are announced or counted
    for text in ("loading the libraries", "synthetic sections: 2/2", "estimated time on", "epochs: 12/12", "loading model bleep-"):
        assert text in result.stderr, (text, result.stderr)
    summary = json.loads((workdir / "demo_result.json").read_text())
    assert summary["heldout_r"] > 0.3 and summary["heldout_r_markers"] > 0.6
    assert summary["mse_model"] < 0.5 * summary["mse_constant"]
    assert summary["n_tiles"] > 100 and summary["sql_result"]
    for name in ("synthetic-train.tif", "synthetic-heldout.h5ad", "heldout_predictions.parquet", "slide_predictions.h5ad"):
        assert (workdir / name).exists(), name


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    result = run("demo", "--workdir", tmp_path / "mine", ok=False)
    assert result.exit_code == 1
    assert "is not a histoindex demo folder" in result.output
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep"
