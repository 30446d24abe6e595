"""`histoindex demo`: the README's quick-start job, end to end on the built-in synthetic data, with
the default recipe (only the data shrunk)."""

from __future__ import annotations

import json
import tempfile

from .conftest import run


def test_demo_runs_the_default_recipe_in_a_temporary_folder_and_beats_a_constant_predictor(tmp_path, monkeypatch):
    here, temporary = tmp_path / "cwd", tmp_path / "tmp"
    here.mkdir()
    temporary.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    result = run("demo")
    assert list(here.iterdir()) == []  # nothing written where it was run (the repo, from the README)
    (workdir,) = temporary.glob("histoindex-demo-*")  # (torch keeps its compile cache there too)
    assert str(workdir) in result.stdout
    assert "mean per-gene Pearson r" in result.stdout
    # the recipe users get, said; no silent stretch: libraries, synthetic sections, training announced or counted
    for text in ("the default recipe", "tf_efficientnet_lite0", "loading the libraries", "synthetic sections: 2/2", "estimated time on", "epochs: 60/60"):
        assert text in result.stderr, (text, result.stderr)
    # the SQL result as a table: a header line and a rule, not Python dicts
    assert "slide" in result.stderr and "mean_FASN" in result.stderr and "{'slide'" not in result.stderr
    summary = json.loads((workdir / "demo_result.json").read_text())
    # measured at 0.21 / 0.40 / 0.85 x (122 training spots): the frozen ImageNet recipe on tiny sections
    assert summary["heldout_r"] > 0.1 and summary["heldout_r_markers"] > 0.25
    assert summary["mse_model"] < 0.95 * summary["mse_constant"]
    assert summary["n_tiles"] > 50 and summary["sql_result"]
    for name in ("synthetic-train.tif", "synthetic-heldout.h5ad", "heldout_predictions.parquet", "slide_predictions.h5ad"):
        assert (workdir / name).exists(), name


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    result = run("demo", "--workdir", tmp_path / "mine", ok=False)
    assert result.exit_code == 1
    assert "is not a histoindex demo folder" in result.output
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep"
