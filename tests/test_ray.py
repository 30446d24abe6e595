"""A cohort on a real local Ray instance (`query --ray`): the same predictions, slide by slide, as
without Ray; a Ray worker killed mid-slide is restarted, the slide re-run, and nothing is written
twice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import polars as pl
import pytest

from histoindex.store import Store

from .conftest import run

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'histoindex[ray]')")
psutil = pytest.importorskip("psutil", reason="psutil (a Ray dependency) is not installed")


@pytest.fixture(scope="module")
def local_ray():
    """One Ray instance for the module, as `--ray local` starts it (2 CPUs: CI's machine)."""
    from histoindex import cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster.connect("local", num_cpus=2)
    yield
    ray.shutdown()


def test_ray_starts_quietly_unless_verbose():
    """`--ray local` without `histoindex -v` says nothing of Ray's own: no token-authentication notice,
    no fork-safety warnings with their source lines (raised in Ray's forked children, so only the
    process's stderr shows them: a process of its own)."""
    script = (
        "import lancedb, polars\n"  # loaded before Ray forks, as in a query
        "from histoindex import cluster\n"
        "ray = cluster.connect('local', num_cpus=1)\n"
        "print('connected', flush=True)\n"
        "ray.shutdown()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "connected" in done.stdout, done.stderr
    assert "Token authentication" not in done.stderr and "fork" not in done.stderr, done.stderr


def _cohort(sections, tmp_path, n: int) -> list:
    folder = tmp_path / "slides"
    folder.mkdir()
    sources = [sections.heldout_tif, sections.other_tif, sections.train_tif]
    return [shutil.copy(sources[i % len(sources)], folder / f"s{i}.tif") for i in range(n)]


def _runs(store) -> pl.DataFrame:
    rows = pl.from_arrow(Store(store).table("predictions").to_arrow().select(["slide", "run_id", "tile_id"]))
    return rows.group_by("slide").agg(pl.col("run_id").n_unique().alias("runs"), pl.len().alias("rows"), pl.col("tile_id").n_unique().alias("tiles"))


def test_ray_gives_the_predictions_of_the_local_cohort(local_ray, store, sections, tmp_path):
    slides = _cohort(sections, tmp_path, 3)
    manifest = tmp_path / "cohort.csv"
    pl.DataFrame({"slide": [str(s) for s in slides], "patient": ["P1", "P2", "P2"], "stage": [2, 3, 1]}).write_csv(manifest)
    before, tiles_before = Store(store).table("predictions").version, Store(store).table("tiles").version
    with_ray = run("query", "--slides", manifest, "--tissue", "breast", "--out", tmp_path / "ray", "--db", store, "--ray", "local")
    assert "3 slides predicted" in with_ray.output and "0 failed" in with_ray.output
    # the driver commits each slide as it comes back (slides that finish together share a commit)
    assert before < Store(store).table("predictions").version <= before + 3
    # ... its tiles too (the workers embed, the driver commits): one row per predicted tile
    assert tiles_before < Store(store).table("tiles").version <= tiles_before + 3
    indexed = pl.from_arrow(Store(store).table("tiles").to_arrow().select(["slide", "tile_id", "metadata"]))
    predicted = pl.from_arrow(Store(store).table("predictions").to_arrow().select(["slide", "tile_id"]))
    assert indexed.select(["slide", "tile_id"]).sort(["slide", "tile_id"]).equals(predicted.sort(["slide", "tile_id"]))
    metadata = json.loads(indexed.filter(pl.col("slide") == "s0.tif")["metadata"][0])  # the manifest's columns, as locally
    assert metadata["patient"] == "P1" and "stage" in metadata
    tiles_version = Store(store).table("tiles").version
    local = run("query", "--slides", manifest, "--tissue", "breast", "--out", tmp_path / "local", "--redo", "--db", store)
    assert "3 slides predicted" in local.output
    assert Store(store).table("tiles").version == tiles_version, "the local run answered from the tiles the Ray run indexed"
    genes = list(Store(store).model().cfg.genes)
    for slide in slides:
        name = f"{slide.stem}.parquet"
        a, b = pl.read_parquet(tmp_path / "ray" / name), pl.read_parquet(tmp_path / "local" / name)
        assert a["tile_id"].to_list() == b["tile_id"].to_list() and len(a) > 0
        np.testing.assert_allclose(a.select(genes).to_numpy(), b.select(genes).to_numpy(), rtol=1e-5, atol=1e-6)
        # the manifest's other columns are kept with each slide's predictions
        assert a["patient"].unique().to_list() == b["patient"].unique().to_list() and a["stage"].dtype == pl.Int64
    # the store holds two runs of each slide (with and without Ray), each whole
    runs = _runs(store)
    assert sorted(runs["slide"].to_list()) == ["s0.tif", "s1.tif", "s2.tif"]
    assert runs["runs"].to_list() == [2, 2, 2] and (runs["rows"] == 2 * runs["tiles"]).all()
    # resumable with Ray as without: nothing left to do
    again = run("query", "--slides", manifest, "--tissue", "breast", "--out", tmp_path / "ray", "--db", store, "--ray", "local")
    assert "0 slides predicted (0 tiles), 3 skipped" in again.output


def _predicting_workers() -> list:
    """Ray worker processes running a slide (Ray names them after the actor method they run)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if "SlidePredictor.predict" in cmdline:
            found.append(proc)
    return found


def test_a_ray_worker_killed_mid_slide_is_retried_and_nothing_is_written_twice(local_ray, store, sections, tmp_path):
    slides = _cohort(sections, tmp_path, 3)
    killed: list[int] = []

    def kill_one_worker():  # as a node loss or the OOM killer would
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for proc in _predicting_workers():
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(proc.pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    before = Store(store).table("predictions").version
    result = run("query", *slides, "--tissue", "breast", "--out", tmp_path / "preds", "--db", store, "--ray", "local", "--ray-actors", "1")
    killer.join()
    assert killed, "no Ray worker was seen predicting a slide"
    assert "3 slides predicted" in result.output and "0 failed" in result.output
    assert before < Store(store).table("predictions").version <= before + 3
    runs = _runs(store)
    assert runs["runs"].to_list() == [1, 1, 1] and (runs["rows"] == runs["tiles"]).all()
    assert sorted(p.name for p in (tmp_path / "preds").iterdir()) == ["s0.parquet", "s1.parquet", "s2.parquet"]


def test_ray_errors(store, sections, tmp_path):
    result = run("query", sections.heldout_tif, "--db", store, "--ray-actors", "2", ok=False)
    assert result.exit_code == 2 and "--ray-actors needs --ray" in result.output


def _spots(db, datasets) -> pl.DataFrame:
    rows = Store(db).table("spots").to_arrow().select(["dataset", "spot_id", "image_embedding", "expression_embedding"])
    return pl.from_arrow(rows).filter(pl.col("dataset").is_in(datasets)).sort(["dataset", "spot_id"])


def test_bulk_ingest_on_ray_is_one_commit_and_embeds_as_locally(local_ray, trained_store, sections, tmp_path):
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    shutil.copytree(trained_store, local)
    shutil.copytree(trained_store, on_ray)
    refs = [sections.heldout_h5ad, sections.other_h5ad]
    datasets = [p.stem for p in refs]
    before = Store(on_ray).table("spots").version
    result = run("ingest", *refs, "--tissue", "breast", "--db", on_ray, "--ray", "local")
    assert all(f"{d}: " in result.output for d in datasets)
    assert Store(on_ray).table("spots").version == before + 1  # both references, one commit
    run("ingest", *refs, "--tissue", "breast", "--db", local)
    assert Store(local).table("spots").version == before + 1
    a, b = _spots(on_ray, datasets), _spots(local, datasets)
    assert a["spot_id"].to_list() == b["spot_id"].to_list() and a["dataset"].unique().sort().to_list() == sorted(datasets)
    for column in ("image_embedding", "expression_embedding"):
        np.testing.assert_allclose(np.stack(a[column].to_numpy()), np.stack(b[column].to_numpy()), rtol=1e-4, atol=1e-5)
    versions = run("versions", "--db", on_ray)
    assert f"ingest of {datasets[0]}, {datasets[1]}" in versions.output


def test_bulk_ingest_errors_leave_the_store_as_it_was(store, sections, tmp_path):
    before = Store(store).table("spots").version
    many = run("ingest", sections.heldout_h5ad, sections.other_h5ad, "--tissue", "breast", "--dataset", "x", "--db", store, ok=False)
    assert many.exit_code == 2 and "--dataset describe(s) one reference" in many.output
    twin = tmp_path / sections.heldout_h5ad.name
    shutil.copy(sections.heldout_h5ad, twin)
    repeated = run("ingest", sections.heldout_h5ad, twin, "--tissue", "breast", "--db", store, ok=False)
    assert repeated.exit_code == 1 and "dataset names repeat" in repeated.output
    assert Store(store).table("spots").version == before
