"""First query vs re-query of the same slide (issue 22): the re-query reads the slide's tile
embeddings from the ``tiles`` table instead of the image, so only the search and what follows it
run again. Each query is its own ``histoindex query`` process (as a user runs them: interpreter,
imports, store and model loading included), all in one run of this script.

    python benchmarks/requery_bench.py --db /tmp/rq/histoindex.db --tissue breast \\
        --slide ../shared/data/her2st/images/B4.jpg --mpp 0.687 --workdir /tmp/rq-bench

``--db``: a store with a model and references (e.g. the one ``histoindex.demo.run_demo`` writes:
the default recipe). Predictions and tiles go to a fresh ``--results-db`` in ``--workdir``, so the
reference store is left as it was. Runs: (1) the first query; (2) the same query again (its
predictions must equal (1)'s exactly); (3) a re-query with other answer settings (``--k``,
``--smooth``: search only); with ``--check-fresh``, (4) the settings of (3) with ``--re-embed``
(the image read again), whose predictions must equal (3)'s.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

#: bytecode as an installed package has it (pip compiles at install): each process reads cached
#: .pyc files instead of compiling torch's and timm's sources (~30 s a process with
#: PYTHONDONTWRITEBYTECODE=1, as some sandboxes set); kept outside the venv
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | {
    "HF_HUB_OFFLINE": "1",
    "PYTHONPYCACHEPREFIX": str(Path(tempfile.gettempdir()) / "histoindex-bench-pycache"),
}


def run(args: list[str], log: Path) -> float:
    t = time.perf_counter()
    with log.open("w") as fh:
        done = subprocess.run([sys.executable, "-m", "histoindex.cli", *args], stdout=fh, stderr=subprocess.STDOUT, env=ENV)
    seconds = time.perf_counter() - t
    if done.returncode:
        sys.exit(f"{' '.join(args)} failed ({done.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    return seconds


def predictions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(tile ids, gene matrix) of a predictions Parquet, in tile order."""
    table = pq.read_table(path)
    genes = [c for c in table.column_names if pa.types.is_floating(table.schema.field(c).type) and c not in ("x", "y", "x_um", "y_um")]
    ids_col = next(c for c in ("tile_id", "spot", "tile") if c in table.column_names)
    ids = np.asarray(table.column(ids_col).to_pylist())
    order = np.argsort(ids)
    return ids[order], np.stack([table.column(g).to_numpy() for g in genes], axis=1)[order]


def streamed(log: Path) -> str:
    """The query's own report of its streaming time (read, embed or tiles table, search, write)."""
    found = re.search(r"tiles .*? in ([0-9.]+) s", log.read_text())
    return f"{found.group(1)} s" if found else "?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True)
    ap.add_argument("--slide", required=True)
    ap.add_argument("--mpp", type=float, default=None)
    ap.add_argument("--tissue", default=None)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--other", default="--k 10 --smooth 0", help="the re-query's other answer settings")
    ap.add_argument("--extra", default="", help="options every query gets (e.g. --stride-um 56: a finer grid, more tiles)")
    ap.add_argument("--check-fresh", action="store_true", help="also run the other settings with --re-embed and compare")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = [str(Path(args.slide).resolve()), "--db", args.db, "--results-db", str(work / "results.db")]
    base += ["--mpp", str(args.mpp)] if args.mpp else []
    base += ["--tissue", args.tissue] if args.tissue else []
    base += args.extra.split()
    other = args.other.split()

    # compile the modules a query imports once, before anything is timed
    subprocess.run(
        [sys.executable, "-c", "import histoindex.cli, histoindex.api; from histoindex._compat import import_timm; import_timm()"], env=ENV, check=True
    )
    first = run(["query", *base, "--out", str(work / "first.parquet")], work / "first.log")
    same = run(["query", *base, "--out", str(work / "same.parquet")], work / "same.log")
    changed = run(["query", *base, *other, "--out", str(work / "other.parquet")], work / "other.log")
    for name in ("same", "other"):
        assert "search only" in (work / f"{name}.log").read_text(), f"the {name} re-query did not answer from the tiles table"
    ids1, p1 = predictions(work / "first.parquet")
    ids2, p2 = predictions(work / "same.parquet")
    ids3, p3 = predictions(work / "other.parquet")
    assert (ids1 == ids2).all() and (ids1 == ids3).all()
    print(f"slide {args.slide}: {len(ids1):,} tiles, {p1.shape[1]} genes")
    print(f"first query (reads and embeds the slide): {first:.1f} s (streaming {streamed(work / 'first.log')})")
    print(
        f"re-query, same settings (tiles table): {same:.1f} s  ({first / same:.1f}× faster); predictions identical: {np.array_equal(p1, p2)} (max |Δ| {np.abs(p1 - p2).max():.3g}); streaming {streamed(work / 'same.log')}"
    )
    print(
        f"re-query, {args.other} (tiles table): {changed:.1f} s  ({first / changed:.1f}× faster); differs from the first: {not np.array_equal(p1, p3)}; streaming {streamed(work / 'other.log')}"
    )
    if args.check_fresh:
        fresh = run(["query", *base, *other, "--re-embed", "--out", str(work / "fresh.parquet")], work / "fresh.log")
        ids4, p4 = predictions(work / "fresh.parquet")
        print(
            f"fresh query (--re-embed), {args.other}: {fresh:.1f} s; equal to the re-query: {bool((ids3 == ids4).all() and np.array_equal(p3, p4))} (max |Δ| {np.abs(p3 - p4).max():.3g})"
        )
    print(f"logs and predictions in {work}")


if __name__ == "__main__":
    main()
