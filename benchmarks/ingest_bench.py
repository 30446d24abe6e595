"""Ingest benchmark: spots/s written to the store with embeddings precomputed (the store's part of
`histoindex ingest`: Arrow rows in the schemas/spots.json layout → one LanceDB commit), and ANN
index build times, at 100k and 1M rows.

    python benchmarks/ingest_bench.py --sizes 100000 1000000 --workdir /tmp/ingest-bench

Per size, in a fresh store: a new dataset (append), the same dataset again (replace: merge_insert
that updates, inserts and deletes), then `histoindex index` with IVF_PQ and with IVF_HNSW_SQ.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

N_GENES = 256


def make_rows(n: int, model_id: str, seed: int = 0):
    from histoindex.store import spot_rows

    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, 256)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    image = rng.normal(size=(n, 256)).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    expression = rng.gamma(1.0, 1.0, (n, N_GENES)).astype(np.float32)
    t = time.perf_counter()
    rows = spot_rows(
        spot_ids=np.arange(n),
        dataset="bench",
        tissue="breast",
        platform="visium",
        species="human",
        xy=rng.random((n, 2)) * 1e4,
        mpp=0.5,
        image_embedding=image,
        expression_embedding=emb,
        expression=expression,
        source_values="raw_counts",
        model_id=model_id,
    )
    return rows, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--workdir", default="/tmp/ingest-bench")
    args = ap.parse_args()
    from histoindex import api
    from histoindex.store import Store

    print("| rows | step | seconds | spots/s |\n|---|---|---|---|")
    for n in args.sizes:
        db = Path(args.workdir) / f"db-{n}"
        shutil.rmtree(db, ignore_errors=True)
        store = Store(db, create=True)
        rows, build = make_rows(n, "bleep-bench")
        print(f"| {n:,} | build Arrow rows from arrays (spot_rows) | {build:.2f} | {n / build:,.0f} |", flush=True)
        t = time.perf_counter()
        store.write_dataset(rows, model_id="bleep-bench", dataset="bench")
        seconds = time.perf_counter() - t
        print(f"| {n:,} | write a new dataset (merge_insert, one commit) | {seconds:.2f} | {n / seconds:,.0f} |", flush=True)
        rows2, _ = make_rows(n, "bleep-bench", seed=1)
        t = time.perf_counter()
        store.write_dataset(rows2, model_id="bleep-bench", dataset="bench")
        seconds = time.perf_counter() - t
        print(f"| {n:,} | replace the dataset (merge_insert, one commit) | {seconds:.2f} | {n / seconds:,.0f} |", flush=True)
        assert store.table("spots").count_rows() == n
        del rows, rows2
        for index_type in ("IVF_PQ", "IVF_HNSW_SQ"):
            t = time.perf_counter()
            api.create_index(db=db, index_type=index_type)
            print(f"| {n:,} | `histoindex index --type {index_type}` (default partitions) | {time.perf_counter() - t:.1f} | |", flush=True)
        shutil.rmtree(db, ignore_errors=True)


if __name__ == "__main__":
    main()
