"""Search benchmark: the planner's exact path vs LanceDB (exact flat scan, IVF_PQ, IVF_HNSW_SQ) and a
numpy baseline, on synthetic clustered reference embeddings with tissue/platform filters keeping
~3 %, ~30 % and 100 % of rows; one batch of queries per path.

    python benchmarks/search_bench.py --rows 1000000 --queries 10000 --out /tmp/search-bench

Reports queries/s and recall@k against exact search for every path and setting, and index build
times, in one run (a markdown table on stdout).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import pyarrow as pa

from histoindex.search import ANN_BATCH, exact_topk


def make_table(rows: int, dim: int, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    """Unit vectors around 64 centres (clustered, as real embeddings are), with a tissue column
    (3 % 'rare', ~30 % 'common', the rest 'other') and a platform column."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, dim)).astype(np.float32)
    x = np.empty((rows, dim), np.float32)
    for start in range(0, rows, 100_000):  # bounded temporaries
        n = min(100_000, rows - start)
        block = centres[rng.integers(0, 64, n)] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
        x[start : start + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
    u = rng.random(rows)
    tissue = np.where(u < 0.03, "rare", np.where(u < 0.33, "common", "other"))
    platform = np.where(rng.random(rows) < 0.5, "visium", "st")
    table = pa.table(
        {
            "id": np.arange(rows),
            "tissue": tissue,
            "platform": platform,
            "expression_embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim),
        }
    )
    return table, x


def recall(found_ids: list[set], truth: list[set], k: int) -> float:
    return float(np.mean([len(f & t) / k for f, t in zip(found_ids, truth)]))


def lance_search(tbl, queries: np.ndarray, where: str | None, k: int, batch: int = ANN_BATCH, **params):
    """LanceDB batched searches of ``batch`` queries each (as `query --search ann` sends them: a
    batch of 10k at once exhausts file handles); returns (seconds, list of id sets per query)."""
    found = [set() for _ in range(len(queries))]
    seconds = 0.0
    for start in range(0, len(queries), batch):
        t = time.perf_counter()
        s = tbl.search(queries[start : start + batch], vector_column_name="expression_embedding").distance_type("cosine").limit(k)
        for name, value in params.items():
            s = getattr(s, name)() if value is True else getattr(s, name)(value)
        if where:
            s = s.where(where, prefilter=True)
        res = s.select(["id", "_distance"]).to_arrow()
        seconds += time.perf_counter() - t
        qi = res.column("query_index").to_numpy() if "query_index" in res.column_names else np.zeros(res.num_rows, int)
        for a, b in zip(qi, res.column("id").to_numpy()):
            found[start + a].add(int(b))
    return seconds, found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--lance-exact-queries", type=int, default=20, help="LanceDB's exact scan is slow: time this many queries")
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--out", default=None, help="folder for the LanceDB tables (default: a temporary one)")
    ap.add_argument("--reuse", action="store_true", help="reuse the tables (and indexes) a previous run left in --out")
    args = ap.parse_args()
    import lancedb
    from lancedb.index import Bitmap, HnswSq, IvfPq

    k = args.k
    table, x = make_table(args.rows, 256)
    rng = np.random.default_rng(1)
    queries = x[rng.integers(0, args.rows, args.queries)] + 0.3 * rng.normal(size=(args.queries, 256)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    db = lancedb.connect(args.out or tempfile.mkdtemp())
    tables = {}
    builds = {}
    if args.reuse and {"flat", "pq", "hnsw"} <= set(db.list_tables().tables):  # same seed ⇒ same data
        tables = {name: db.open_table(name) for name in ("flat", "pq", "hnsw")}
        assert all(t.count_rows() == args.rows for t in tables.values())
    else:
        for name in ("flat", "pq", "hnsw"):
            tables[name] = db.create_table(name, data=table, mode="overwrite")
            tables[name].create_index("tissue", config=Bitmap())
        t = time.perf_counter()
        tables["pq"].create_index("expression_embedding", config=IvfPq(distance_type="cosine", num_partitions=int(np.sqrt(args.rows)), num_sub_vectors=32))
        builds["IVF_PQ (√n partitions, 32 sub-vectors)"] = time.perf_counter() - t
        t = time.perf_counter()
        tables["hnsw"].create_index("expression_embedding", config=HnswSq(distance_type="cosine", num_partitions=max(1, args.rows // 100_000)))
        builds["IVF_HNSW_SQ (n/100k partitions, m 20, ef_construction 300)"] = time.perf_counter() - t
    exact_topk(queries[:8], x[:1000], k)  # warm torch up (thread pool, first-call allocations)
    print(f"rows {args.rows:,}, dim 256, k {k}, queries {args.queries:,} per batch")
    for name, seconds in builds.items():
        print(f"index build {name}: {seconds:.1f} s", flush=True)

    tissues = table.column("tissue").to_numpy(zero_copy_only=False)
    filters = {"~3% (tissue = 'rare')": "rare", "~30% (tissue = 'common')": "common", "100% (no filter)": None}
    ann_settings = [
        ("pq", "IVF_PQ nprobes 20, refine 5", {"nprobes": 20, "refine_factor": 5}),
        ("pq", "IVF_PQ nprobes 50, refine 10", {"nprobes": 50, "refine_factor": 10}),
        ("hnsw", "IVF_HNSW_SQ nprobes 3, ef 150", {"nprobes": 3, "ef": 150}),
        ("hnsw", "IVF_HNSW_SQ nprobes 5, ef 300, refine 2", {"nprobes": 5, "ef": 300, "refine_factor": 2}),
    ]
    print("\n| filter | path | queries/s | recall@50 | × LanceDB exact |\n|---|---|---|---|---|")
    for label, value in filters.items():
        where = None if value is None else f"tissue = '{value}'"
        mask = np.ones(args.rows, bool) if value is None else tissues == value
        ids = np.flatnonzero(mask)
        rows_out = []
        # LanceDB exact flat scan (prefiltered), on a subset of the queries
        n = args.lance_exact_queries
        seconds, lance_exact_found = lance_search(tables["flat"], queries[:n], where, k, bypass_vector_index=True)
        lance_exact_qps = n / seconds
        # the planner's exact path: filtered Lance scan into memory, then chunked torch top-k
        t = time.perf_counter()
        q = tables["flat"].search().select(["id", "expression_embedding"]).limit(None)
        if where:
            q = q.where(where)
        block = q.to_arrow()
        keys = block.column("expression_embedding").combine_chunks().flatten().to_numpy().reshape(block.num_rows, -1)
        scan = time.perf_counter() - t
        idx, _ = exact_topk(queries, keys, k)
        exact_ids = block.column("id").to_numpy()[idx]
        elapsed = time.perf_counter() - t
        truth = [set(map(int, r)) for r in exact_ids]
        rows_out.append(("planner exact (filtered scan + torch top-k)", args.queries / elapsed, 1.0, f"(scan {scan:.1f} s of {elapsed:.1f} s)"))
        # numpy brute force on vectors already in memory (chunked: 10k × 1M similarities would be 40 GB)
        t = time.perf_counter()
        sub = x[ids]
        found = []
        for start in range(0, args.queries, 256):
            sims = queries[start : start + 256] @ sub.T
            top = np.argpartition(-sims, k, axis=1)[:, :k]
            found.extend(set(map(int, ids[r])) for r in top)
        rows_out.append(("numpy in memory (matmul + argpartition)", args.queries / (time.perf_counter() - t), recall(found, truth, k), ""))
        for table_name, name, params in ann_settings:
            seconds, found = lance_search(tables[table_name], queries, where, k, **params)
            rows_out.append((f"LanceDB {name}", args.queries / seconds, recall(found, truth, k), ""))
        rows_out.append((f"LanceDB exact (bypass_vector_index; {n} queries)", lance_exact_qps, recall(lance_exact_found, truth[:n], k), ""))
        for path, qps, rec, note in rows_out:
            print(f"| {label} | {path} {note} | {qps:,.1f} | {rec:.3f} | {qps / lance_exact_qps:,.1f} |", flush=True)


if __name__ == "__main__":
    main()
