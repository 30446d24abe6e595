"""Many slides in one `histoindex query`: one load of the model, one file and one commit per slide,
resumable (same model and spots version → skipped), failures reported while the others go on."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import polars as pl

from histoindex.store import Store

from .conftest import run


def _cohort(sections, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    slides = [shutil.copy(src, folder / name) for src, name in ((sections.heldout_tif, "a.tif"), (sections.other_tif, "b.tif"))]
    return folder, slides


def _rows_per_slide(store) -> dict[str, int]:
    frame = pl.from_arrow(Store(store).table("predictions").to_arrow().select(["slide", "run_id"]))
    return {row["slide"]: row["runs"] for row in frame.group_by("slide").agg(pl.col("run_id").n_unique().alias("runs")).to_dicts()}


def test_a_cohort_gives_what_single_queries_give_and_resumes(store, sections, tmp_path):
    folder, slides = _cohort(sections, tmp_path)
    out = tmp_path / "preds"
    versions_before = Store(store).table("predictions").version
    result = run("query", *slides, "--tissue", "breast", "--out", f"{out}/", "--db", store)
    assert "2 slides predicted" in result.output and "0 skipped, 0 failed" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["a.parquet", "b.parquet"]
    assert Store(store).table("predictions").version == versions_before + 2  # one commit per slide
    assert _rows_per_slide(store) == {"a.tif": 1, "b.tif": 1}

    single = tmp_path / "single.parquet"
    run("query", slides[1], "--tissue", "breast", "--out", single, "--db", store)
    genes = list(Store(store).model().cfg.genes)
    a, b = pl.read_parquet(out / "b.parquet"), pl.read_parquet(single)
    assert a["tile_id"].to_list() == b["tile_id"].to_list()
    np.testing.assert_allclose(a.select(genes).to_numpy(), b.select(genes).to_numpy(), rtol=1e-5, atol=1e-6)

    # run again: nothing to do; --redo predicts again
    again = run("query", *slides, "--tissue", "breast", "--out", out, "--db", store)
    assert "0 slides predicted (0 tiles), 2 skipped" in again.output
    assert "already predicted" in again.output
    redo = run("query", *slides, "--tissue", "breast", "--out", out, "--redo", "--json", "--db", store)
    summary = json.loads(redo.stdout[redo.stdout.index("{") :])
    assert [p["slide"] for p in summary["predicted"]] == ["a.tif", "b.tif"] and summary["skipped"] == []


def test_a_failing_slide_is_reported_and_the_others_go_on(store, sections, tmp_path):
    folder, slides = _cohort(sections, tmp_path)
    broken = folder / "broken.tif"
    broken.write_bytes(np.random.default_rng(0).bytes(4000))
    manifest = tmp_path / "manifest.csv"
    pl.DataFrame({"slide": ["slides/a.tif", "slides/broken.tif", "slides/b.tif"], "mpp": [None, None, None]}).write_csv(manifest)
    result = run("query", "--slides", manifest, "--tissue", "breast", "--out", tmp_path / "preds", "--db", store, ok=False)
    assert result.exit_code == 1
    assert "2 slides predicted" in result.output and "1 failed" in result.output
    assert "failed: broken.tif: cannot open slide" in result.output
    assert sorted(p.name for p in (tmp_path / "preds").iterdir()) == ["a.parquet", "b.parquet"]
    # the re-run skips what is done and tries the failed one again
    again = run("query", "--slides", manifest, "--tissue", "breast", "--out", tmp_path / "preds", "--db", store, ok=False)
    assert "0 slides predicted (0 tiles), 2 skipped, 1 failed" in again.output


def test_cohort_input_errors(store, sections, tmp_path):
    _, slides = _cohort(sections, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    twin = shutil.copy(slides[0], other / "a.tif")
    cases = [
        (["query", slides[0], twin, "--out", tmp_path / "p"], "slide names repeat (a.tif)"),
        (["query", *slides, "--spots", sections.heldout_h5ad], "--spots and --plot take one slide"),
        (["query", "--slides", tmp_path / "missing.csv"], "manifest not found"),
        (["query"], "give a slide"),
        (["query", str(tmp_path / "nowhere" / "*.svs")], "matches no file"),
    ]
    for args, message in cases:
        result = run(*args, "--db", store, ok=False)
        assert result.exit_code != 0 and message in result.output, (args, result.output)


def test_a_quoted_pattern_and_a_manifest_with_ids_and_metadata(store, sections, tmp_path):
    folder, slides = _cohort(sections, tmp_path)
    out = tmp_path / "preds"
    result = run("query", str(folder / "*.tif"), "--tissue", "breast", "--out", f"{out}/", "--db", store)
    assert "2 slides predicted" in result.output and sorted(p.name for p in out.iterdir()) == ["a.parquet", "b.parquet"]

    manifest = tmp_path / "manifest.parquet"
    pl.DataFrame({"slide": ["slides/a.tif", "slides/b.tif"], "slide_id": ["TCGA-01", "TCGA-02"], "patient": ["P1", "P2"], "age": [61, 47]}).write_parquet(
        manifest
    )
    by_id = tmp_path / "by-id"
    result = run("query", "--slides", manifest, "--tissue", "breast", "--out", by_id, "--format", "h5ad", "--db", store)
    assert "2 slides predicted" in result.output
    assert sorted(p.name for p in by_id.iterdir()) == ["TCGA-01.h5ad", "TCGA-02.h5ad"]
    import anndata

    adata = anndata.read_h5ad(by_id / "TCGA-02.h5ad")
    assert set(adata.obs["patient"]) == {"P2"} and set(adata.obs["age"]) == {47} and set(adata.obs["slide"]) == {"TCGA-02"}
    assert "TCGA-01" in _rows_per_slide(store) and "TCGA-02" in _rows_per_slide(store)  # predictions keyed by slide_id


def test_a_rerun_with_other_settings_answers_the_question_asked(store, sections, tmp_path):
    """Issue 19.3: the resume key holds everything that shapes the answer, not only model and spots version."""
    _, slides = _cohort(sections, tmp_path)
    out = tmp_path / "preds"
    run("query", *slides, "--tissue", "breast", "--out", f"{out}/", "--db", store)
    first = pl.read_parquet(out / "a.parquet")
    for changed in (["--k", "5"], ["--smooth", "0"], ["--where", "dataset IS NOT NULL"], ["--stride-um", "100"], ["--mpp", "0.5"]):
        result = run("query", *slides, "--tissue", "breast", *changed, "--out", out, "--db", store)
        assert "2 slides predicted" in result.output and "0 skipped" in result.output, changed
        assert "predicted before with other settings" in result.output, changed
        same = run("query", *slides, "--tissue", "breast", *changed, "--out", out, "--db", store)
        assert "0 slides predicted (0 tiles), 2 skipped" in same.output, changed
    said = run("query", *slides, "--tissue", "breast", "--k", "3", "--out", out, "--db", store).output
    assert "k 5 → 3" in said or "k None → 3" in said
    # the k=5 answer really is another answer, and the stored settings say which
    k5 = Store(store).table("predictions").to_lance().to_table(columns=["settings"], filter="slide = 'a.tif'").column("settings").to_pylist()
    assert any(json.loads(s)["k"] == 5 for s in k5) and any(json.loads(s)["k"] is None for s in k5)
    run("query", slides[0], "--tissue", "breast", "--k", "5", "--out", tmp_path / "k5.parquet", "--db", store)
    genes = list(Store(store).model().cfg.genes)
    assert not np.allclose(first.select(genes).to_numpy(), pl.read_parquet(tmp_path / "k5.parquet").select(genes).to_numpy())


def test_a_rerun_answers_again_a_slide_whose_file_changed_under_its_name(store, sections, tmp_path):
    """The resume key holds the slide's bytes too: a file replaced under the same name is predicted
    again (its stored runs answered other bytes), the unchanged one is skipped; runs that predate
    recorded slide hashes cannot be compared, so their slide is predicted again, said so."""
    folder, slides = _cohort(sections, tmp_path)
    out = tmp_path / "preds"
    run("query", *slides, "--tissue", "breast", "--out", f"{out}/", "--db", store)
    shutil.copy(sections.train_tif, folder / "a.tif")  # other bytes, same name
    again = run("query", *slides, "--tissue", "breast", "--out", out, "--json", "--db", store)
    summary = json.loads(again.stdout[again.stdout.index("{") :])
    assert [p["slide"] for p in summary["predicted"]] == ["a.tif"] and [s["slide"] for s in summary["skipped"]] == ["b.tif"]
    assert "a.tif: predicted before with the same settings, but its file changed since" in again.output
    runs = Store(store).table("predictions").to_lance().to_table(columns=["slide", "slide_hash", "created_at"], filter="slide = 'a.tif'")
    newest = pl.from_arrow(runs).sort("created_at")["slide_hash"].to_list()[-1]
    assert newest == hashlib.sha256((folder / "a.tif").read_bytes()).hexdigest() and len(set(runs.column("slide_hash").to_pylist())) == 2
    assert "0 slides predicted (0 tiles), 2 skipped" in run("query", *slides, "--tissue", "breast", "--out", out, "--db", store).output

    Store(store).table("predictions").update(where="slide = 'b.tif'", values_sql={"slide_hash": "NULL"})  # as rows before schema v3
    legacy = run("query", *slides, "--tissue", "breast", "--out", out, "--db", store)
    assert "1 slides predicted" in legacy.output and "1 skipped" in legacy.output
    assert "b.tif: predicted before with the same settings, but those runs predate recorded slide hashes" in legacy.output
