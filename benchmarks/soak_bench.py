"""Soak benchmark: N cycles of ingest / query / versions / compact through the real CLI (in this
process, as tests/test_soak.py does) on a small store with a tiny synthetic model. Prints one line
per cycle (seconds, spots rows, predictions rows, spots versions kept, open files, RSS) and a
summary: cycles, seconds per cycle, peak RSS, open files and RSS growth from cycle 2 to the last.

    python benchmarks/soak_bench.py --cycles 20 --workdir /tmp/soak
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from histoindex.cli import cli  # noqa: E402
from histoindex.store import Store  # noqa: E402
from histoindex.synthetic import make_section, write_section  # noqa: E402

#: the tests' fast model (tests/conftest.py TRAIN_ARGS)
TINY_MODEL = "--backbone resnet10t --weights none --fine-tune --views 1 --batch-size 64 --patch-px 64 --patch-um 110 --epochs 8 --n-genes 48 --lr 1e-3 --seed 0 --stain none"


def histoindex(*args) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if result.exit_code != 0:
        raise SystemExit(f"histoindex {' '.join(map(str, args))} exited {result.exit_code}:\n{result.output}")
    return result.stdout


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--keep-versions", type=int, default=2, help="compact --keep-versions each cycle")
    ap.add_argument("--workdir", type=Path, default=Path("soak-bench"))
    args = ap.parse_args()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    db = work / "db"

    train_h5ad, _ = write_section(make_section(seed=1, size_px=2600), work, name="train")
    query_h5ad, query_tif = write_section(make_section(seed=2, size_px=2600), work, name="query")
    soak = make_section(seed=4, size_px=1000)
    soak_h5ad, _ = write_section(soak, work, name="soak")
    rng = np.random.default_rng(0)
    positions = work / "positions.csv"
    pl.DataFrame({"spot": [f"p{i}" for i in range(20)], "x": rng.uniform(300, 2300, 20), "y": rng.uniform(300, 2300, 20)}).write_csv(positions)
    started = time.perf_counter()
    histoindex("train", train_h5ad, "--db", db, *TINY_MODEL.split())
    histoindex("ingest", train_h5ad, "--tissue", "breast", "--dataset", "train", "--db", db)
    print(f"setup (train + first ingest): {time.perf_counter() - started:.1f} s; soak dataset {soak.spots.n_obs} spots, 20 query positions")

    print("| cycle | s | spots rows | predictions rows | spots versions | open files | RSS MB |\n|---|---|---|---|---|---|---|")
    fds, rss, seconds = [], [], []
    for cycle in range(1, args.cycles + 1):
        t = time.perf_counter()
        histoindex("ingest", soak_h5ad, "--tissue", "breast", "--dataset", "soak", "--db", db)
        histoindex("query", query_tif, "--tissue", "breast", "--spots", positions, "--k", "5", "--out", work / "predictions.parquet", "--db", db)
        histoindex("versions", "--db", db)
        histoindex("compact", "--keep-versions", args.keep_versions, "--db", db)
        seconds.append(time.perf_counter() - t)
        store = Store(db)
        rows = (store.table("spots").count_rows(), store.table("predictions").count_rows(), len(store.versions()["spots"]))
        del store
        gc.collect()
        fds.append(open_files())
        rss.append(rss_mb())
        print(f"| {cycle} | {seconds[-1]:.1f} | {rows[0]} | {rows[1]} | {rows[2]} | {fds[-1]} | {rss[-1]:.0f} |", flush=True)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size = sum(p.stat().st_size for p in db.rglob("*") if p.is_file()) / 2**20
    second = 1 if len(rss) > 1 else 0
    print(
        f"\ncycles {args.cycles}; {np.mean(seconds):.1f} s per cycle (median {np.median(seconds):.1f}); peak RSS {peak:.0f} MB; "
        f"open files {fds[second]} → {fds[-1]}; RSS {rss[second]:.0f} → {rss[-1]:.0f} MB from cycle {second + 1} to {len(rss)}; store {size:.1f} MB on disk"
    )


if __name__ == "__main__":
    main()
