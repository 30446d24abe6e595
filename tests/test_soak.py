"""Soak: repeated ingest / query / versions / compact cycles through the real CLI on a small store.
Row counts, versions and predictions stay exactly as expected, and open files and memory do not
creep between the second cycle and the last. Bounded to well under a minute on two cores
(benchmarks/soak_bench.py runs the same cycle for longer and prints the figures)."""

from __future__ import annotations

import ctypes
import gc
import os
import time

import numpy as np
import polars as pl

from histoindex.store import Store
from histoindex.synthetic import make_section, write_section

from .conftest import run

CYCLES = 5
BUDGET_S = 60.0
FD_SLACK = 4  # open files: a handful of late-opened library handles, never one per cycle
#: glibc's per-thread arenas grow for a while (each command's reader threads; flat with MALLOC_ARENA_MAX=2,
#: and Python's own heap is flat), so RSS is read after malloc_trim; holding a slide image per
#: cycle (20 MB here) would show above this
RSS_SLACK_MB = 60.0


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_mb() -> float:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed arena memory first (glibc only)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_soak(store, sections, tmp_path):
    section = make_section(seed=4, size_px=1000)
    h5ad, _ = write_section(section, tmp_path, name="soak")
    n_soak = section.spots.n_obs
    positions = tmp_path / "positions.csv"
    rng = np.random.default_rng(0)
    pl.DataFrame({"spot": [f"p{i}" for i in range(20)], "x": rng.uniform(300, 2300, 20), "y": rng.uniform(300, 2300, 20)}).write_csv(positions)
    n_train = Store(store).table("spots").count_rows()

    first: pl.DataFrame | None = None
    searched: list[int] = []
    fds, rss = [], []
    started = time.perf_counter()
    for cycle in range(1, CYCLES + 1):
        out = tmp_path / f"cycle{cycle}.parquet"
        ingested = run("ingest", h5ad, "--tissue", "breast", "--dataset", "soak", "--db", store).stdout
        assert f"soak: {n_soak} spots" in ingested
        queried = run("query", sections.heldout_tif, "--tissue", "breast", "--spots", positions, "--k", "5", "--out", out, "--db", store).stdout
        searched.append(int(queried.split("spots@")[1].split(",")[0]))
        listed = run("versions", "--db", store).stdout
        assert "ingest of" in listed and "compaction" in listed or cycle == 1
        run("compact", "--keep-versions", "2", "--older-than", "0", "--db", store)  # 0: nothing else runs beside it

        db = Store(store)
        assert db.table("spots").count_rows() == n_train + n_soak, "re-ingest replaces, never duplicates"
        assert db.table("predictions").count_rows() == 20 * cycle, "one query's rows per cycle, none lost"
        predictions = pl.read_parquet(out)
        first = predictions if first is None else first
        assert predictions.equals(first), f"cycle {cycle}: the same reference gives the same predictions"
        versions = db.versions()["spots"]
        assert [v["what"] for v in versions if v["version"] == searched[-1]] == ["ingest of soak"]
        numbers = [v["version"] for v in versions]
        untagged_old = [v["version"] for v in versions[:-2] if not v["tags"]]
        assert not untagged_old, f"compact left untagged old versions {untagged_old}"
        assert set(searched) <= set(numbers), "every version a stored prediction searched is kept"
        assert sorted(set(db.distinct("predictions", "spots_version"))) == sorted(set(searched))
        del db, versions
        gc.collect()
        fds.append(_open_files())
        rss.append(_rss_mb())
    elapsed = time.perf_counter() - started

    # the oldest stored prediction is still reproducible exactly
    again = tmp_path / "again.parquet"
    run("query", sections.heldout_tif, "--tissue", "breast", "--spots", positions, "--k", "5", "--as-of", searched[0], "--out", again, "--db", store)
    assert pl.read_parquet(again).equals(first)

    assert fds[-1] - fds[1] <= FD_SLACK, f"open files per cycle: {fds}"
    assert rss[-1] - rss[1] <= RSS_SLACK_MB, f"RSS (MB) per cycle: {[round(r) for r in rss]}"
    assert elapsed < BUDGET_S, f"{CYCLES} cycles took {elapsed:.0f} s"
