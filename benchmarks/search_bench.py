"""Search benchmark: the planner's exact path vs LanceDB (flat scan and IVF_PQ) on synthetic
reference embeddings with tissue/platform filters keeping ~3 %, ~30 % and 100 % of rows.

    python benchmarks/search_bench.py --rows 200000 --queries 2000 --out /tmp/search-bench

Reports queries/s and recall@k against exact search for every path, in one run.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import pyarrow as pa

from histoindex.search import exact_topk


def make_table(rows: int, dim: int, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, dim)).astype(np.float32)  # clustered, as real embeddings are
    x = centres[rng.integers(0, 64, rows)] + 0.6 * rng.normal(size=(rows, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    tissue = np.where(rng.random(rows) < 0.03, "rare", np.where(rng.random(rows) < 0.31, "common", "other"))
    table = pa.table({
        "id": np.arange(rows),
        "tissue": tissue,
        "platform": np.full(rows, "visium"),
        "expression_embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim),
    })
    return table, x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--lance-flat-queries", type=int, default=100)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import lancedb

    table, x = make_table(args.rows, 256)
    rng = np.random.default_rng(1)
    queries = x[rng.integers(0, args.rows, args.queries)] + 0.3 * rng.normal(size=(args.queries, 256)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    db = lancedb.connect(args.out or tempfile.mkdtemp())
    tbl = db.create_table("spots", data=table, mode="overwrite")
    tissues = table.column("tissue").to_numpy(zero_copy_only=False)
    filters = {"~3%": "tissue = 'rare'", "~30%": "tissue = 'common'", "100%": None}
    print(f"rows {args.rows}, dim 256, k {args.k}, queries {args.queries}")
    started = time.perf_counter()
    tbl.create_index(metric="cosine", vector_column_name="expression_embedding", index_type="IVF_PQ",
                     num_partitions=int(np.sqrt(args.rows)), num_sub_vectors=16)
    print(f"IVF_PQ build: {time.perf_counter() - started:.1f} s")
    print("| filter | path | queries/s | recall@k |\n|---|---|---|---|")
    for label, where in filters.items():
        mask = np.ones(args.rows, bool) if where is None else tissues == where.split("'")[1]
        ids = np.flatnonzero(mask)
        # planner exact path: filtered scan into memory, then chunked matmul top-k
        t = time.perf_counter()
        q = tbl.search().select(["id", "expression_embedding"]).limit(None)
        if where:
            q = q.where(where)
        block = q.to_arrow()
        keys = block.column("expression_embedding").combine_chunks().flatten().to_numpy().reshape(block.num_rows, -1)
        idx, _ = exact_topk(queries, keys, args.k)
        exact_ids = block.column("id").to_numpy()[idx]
        elapsed = time.perf_counter() - t
        print(f"| {label} | planner exact (scan + torch) | {args.queries / elapsed:,.0f} | 1.000 |")
        truth = [set(r) for r in exact_ids]
        # numpy brute force, in memory already
        t = time.perf_counter()
        sims = queries @ x[ids].T
        top = ids[np.argpartition(-sims, args.k, axis=1)[:, : args.k]]
        print(f"| {label} | numpy in memory | {args.queries / (time.perf_counter() - t):,.0f} | {np.mean([len(set(a) & b) / args.k for a, b in zip(top, truth)]):.3f} |")
        for name, nprobes, refine in (("IVF_PQ nprobes 20 refine 5", 20, 5), ("IVF_PQ nprobes 50 refine 10", 50, 10)):
            t = time.perf_counter()
            s = tbl.search(queries, vector_column_name="expression_embedding").distance_type("cosine").limit(args.k).nprobes(nprobes).refine_factor(refine)
            if where:
                s = s.where(where, prefilter=True)
            res = s.select(["id", "_distance"]).to_arrow()
            elapsed = time.perf_counter() - t
            qi, got = res.column("query_index").to_numpy(), res.column("id").to_numpy()
            found = [set() for _ in range(args.queries)]
            for a, b in zip(qi, got):
                found[a].add(b)
            recall = np.mean([len(f & tr) / args.k for f, tr in zip(found, truth)])
            print(f"| {label} | LanceDB {name} | {args.queries / elapsed:,.0f} | {recall:.3f} |")
        n = args.lance_flat_queries
        t = time.perf_counter()
        s = tbl.search(queries[:n], vector_column_name="expression_embedding").distance_type("cosine").limit(args.k).bypass_vector_index()
        if where:
            s = s.where(where, prefilter=True)
        s.select(["id", "_distance"]).to_arrow()
        print(f"| {label} | LanceDB exact (bypass_vector_index, {n} queries) | {n / (time.perf_counter() - t):,.1f} | 1.000 |")


if __name__ == "__main__":
    main()
