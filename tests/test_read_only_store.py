"""Issue 20.3: a shared reference store that most people only read. A query on a store it cannot
write says so before any work; --no-store writes --out only; --results-db keeps predictions,
provenance and resume state in the user's own store, pointing at the reference store's version.

Read-only is real here: the store's files lose their write bits and, as root (CI), the query runs
without the capabilities that let root write through them (setpriv)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from histoindex.store import Store


def _read_only(tree: Path, *, writable: bool = False) -> None:
    for folder, _, files in os.walk(tree):
        for name in files:
            os.chmod(Path(folder) / name, 0o644 if writable else 0o444)
        os.chmod(folder, 0o755 if writable else 0o555)


#: as root, the query runs without the capabilities that let root write through permission bits
DROP_PRIVILEGE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"] if os.geteuid() == 0 else []


@pytest.fixture
def shared(trained_store, sections, tmp_path):
    """A copy of the store whose files are read-only, the slide, and a folder the query may write."""
    if DROP_PRIVILEGE and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv (util-linux): a read-only store cannot be made")
    store, slide, home = tmp_path / "refs.db", tmp_path / "slide.tif", tmp_path / "home"
    shutil.copytree(trained_store, store)
    shutil.copy(sections.heldout_tif, slide)
    home.mkdir()
    _read_only(store)
    yield store, slide, home
    _read_only(store, writable=True)


def _histoindex(home: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HISTOINDEX_DB", None)
    return subprocess.run(
        [*DROP_PRIVILEGE, sys.executable, "-c", "from histoindex.cli import main; main()", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=home,
        timeout=600,
    )


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_a_read_only_store_is_said_before_any_work(shared):
    store, slide, home = shared
    before = _files(store)
    done = _histoindex(home, "query", slide, "--tissue", "breast", "--out", home / "p.parquet", "--db", store)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr + done.stdout
    error = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error: ")]
    assert len(error) == 1 and "read-only" in error[0] and "--no-store" in error[0] and "--results-db" in error[0], done.stdout + done.stderr
    assert "tissue tiles" not in done.stdout + done.stderr  # nothing was embedded
    assert not (home / "p.parquet").exists()
    assert _files(store) == before


def test_no_store_writes_the_file_only(shared):
    store, slide, home = shared
    before = _files(store)
    out = home / "p.parquet"
    done = _histoindex(home, "query", slide, "--tissue", "breast", "--no-store", "--out", out, "--db", store)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "not stored (--no-store)" in done.stdout
    frame = pl.read_parquet(out)
    assert frame.height > 0
    assert _files(store) == before
    without_out = _histoindex(home, "query", slide, "--tissue", "breast", "--no-store", "--db", store)
    assert without_out.returncode != 0 and "give --out" in without_out.stdout + without_out.stderr


def test_results_db_holds_predictions_and_resume_state(shared):
    store, slide, home = shared
    before = _files(store)
    mine = home / "mine.db"
    out = home / "preds"
    first = _histoindex(home, "query", slide, "--tissue", "breast", "--out", f"{out}/", "--results-db", mine, "--db", store)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "1 slides predicted" in first.stdout
    assert _files(store) == before
    rows = Store(mine).table("predictions").to_arrow()
    assert rows.num_rows > 0 and set(rows.column("slide").to_pylist()) == {"slide.tif"}
    assert all(str(store) in s for s in rows.column("settings").to_pylist())  # which reference store answered
    spots_version = Store(store).table("spots").version
    assert set(rows.column("spots_version").to_pylist()) == {spots_version}
    again = _histoindex(home, "query", slide, "--tissue", "breast", "--out", f"{out}/", "--results-db", mine, "--db", store)
    assert again.returncode == 0 and "0 slides predicted (0 tiles), 1 skipped" in again.stdout, again.stdout + again.stderr
    both = _histoindex(home, "query", slide, "--no-store", "--results-db", mine, "--out", home / "x.parquet", "--db", store)
    assert both.returncode != 0 and "give one or the other" in both.stdout + both.stderr
    assert stat.S_IMODE(os.stat(store).st_mode) & 0o222 == 0  # still read-only: nothing had to be opened up
