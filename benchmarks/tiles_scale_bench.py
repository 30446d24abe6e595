"""Scale of the ``tiles`` table (issue 22): a synthetic cohort of indexed slides written through
``Store.add_tiles`` (the real layout, ``schemas/tiles.json``), then disk per 10⁴ tiles, ANN index
build time (the index ``histoindex index`` builds: ``vector_index_config``, cosine), recall@k of
search by example (a tile's own embedding as the query) against exact search, single-query latency
(ANN and exact), and the recall of exact search over bf16- and int8-rounded embeddings.

    python benchmarks/tiles_scale_bench.py --slides 1000 --tiles-per-slide 1000 --out /tmp/tiles-bench

The embeddings are L2-normalised 256-d float32 with a low intrinsic dimension, as real ones have:
``--states`` tissue states (random unit centres), each with its own ``--state-dim``-dimensional
subspace of variation; every slide mixes a few states and carries a slide offset (a batch effect),
plus a little isotropic noise. The ground truth is a numpy brute force over every vector.
Prints a markdown report on stdout; peak RSS is this process's (it holds every vector for the truth).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa

from histoindex.api.indexing import embedding_key
from histoindex.store import Store, tile_rows
from histoindex.store.indexes import vector_index_config

DIM = 256


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def du_bytes(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


class Cohort:
    """The synthetic embedding generator (deterministic per seed)."""

    def __init__(self, seed: int, states: int, state_dim: int, noise: float, offset: float):
        rng = np.random.default_rng(seed)
        centres = rng.normal(size=(states, DIM)).astype(np.float32)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        # each state's own directions of variation (orthonormal), spread 0.35 per direction
        self.bases = np.stack([np.linalg.qr(rng.normal(size=(DIM, state_dim)))[0].T for _ in range(states)]).astype(np.float32)
        self.rng = rng
        self.noise = noise
        self.offset = offset

    def slide(self, n: int) -> np.ndarray:
        rng = self.rng
        mine = rng.choice(len(self.centres), size=4, replace=False)
        weights = rng.dirichlet(np.ones(4))
        state = mine[rng.choice(4, size=n, p=weights)]
        z = rng.normal(scale=0.35, size=(n, self.bases.shape[1])).astype(np.float32)
        x = self.centres[state] + np.einsum("nd,ndk->nk", z, self.bases[state])
        x += rng.normal(scale=self.offset / np.sqrt(DIM), size=DIM).astype(np.float32)  # the slide's batch effect
        x += rng.normal(scale=self.noise, size=(n, DIM)).astype(np.float32)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_cohort(store: Store, cohort: Cohort, *, slides: int, per_slide: int, per_commit: int) -> tuple[np.ndarray, float]:
    """Every slide's tiles as ``query`` writes them (realistic identity columns); returns all vectors."""
    cfg = SimpleNamespace(views=8, stain="macenko", patch_um=224.0, patch_px=224)
    key = embedding_key(cfg, stride_um=100.0, spots_digest=None, mpp=None, precision="bf16")
    side = int(np.ceil(np.sqrt(per_slide)))
    rows, cols = np.divmod(np.arange(per_slide), side)
    ids = np.asarray([f"r{r}_c{c}" for r, c in zip(rows, cols)])
    xy = np.stack([cols * 200.0 + 100.0, rows * 200.0 + 100.0], axis=1)  # 100 µm pitch at 0.5 µm/px
    vectors = np.empty((slides * per_slide, DIM), np.float32)
    seconds, pending = 0.0, []
    now = datetime.now(timezone.utc)
    for s in range(slides):
        emb = cohort.slide(per_slide)
        vectors[s * per_slide : (s + 1) * per_slide] = emb
        name = f"TCGA-{s // 100:02d}-{s:04d}-01Z-00-DX1"
        slide = {
            "name": f"{name}.svs",
            "path": f"/data/cohort/slides/{name}.{s:08x}-4c1e-9f0b-2a7d5e3c1b90.svs",
            "hash": f"{s:064x}",
            "bytes": 1_500_000_000 + s,
            "mtime_ns": 1_700_000_000_000_000_000 + s,
            "metadata": {"patient": f"P{s // 2:04d}", "site": f"S{s % 7}", "cohort": "synthetic"},
        }
        pending.append(
            tile_rows(
                slide=slide, ids=ids, index=np.arange(per_slide), xy=xy, mpp=0.5, model_id="bench-model", embedding_key=key, embeddings=emb, created_at=now
            )
        )
        if len(pending) == per_commit or s == slides - 1:
            t = time.perf_counter()
            store.add_tiles(pa.concat_tables(pending))
            seconds += time.perf_counter() - t
            pending = []
    return vectors, seconds


def exact_truth(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    sims = queries @ vectors.T
    top = np.argpartition(-sims, k, axis=1)[:, :k]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1), axis=1)


def recall(found: list[np.ndarray], truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(map(int, f)) & set(map(int, t))) / k for f, t in zip(found, truth)]))


def quantised_recall(vectors: np.ndarray, queries_idx: np.ndarray, truth: np.ndarray, k: int, kind: str) -> float:
    """Recall@k of exact search over stored vectors rounded to bf16 or int8 (the queries too: they are stored tiles)."""
    if kind == "bf16":
        bits = vectors.view(np.uint32)
        stored = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).view(np.float32)  # round to nearest even
    else:  # int8: symmetric, one scale for the table (unit vectors: |component| ≤ 1)
        scale = np.abs(vectors).max() / 127.0
        stored = np.round(vectors / scale).astype(np.int8).astype(np.float32) * scale
    found = []
    for start in range(0, len(queries_idx), 25):  # 25 × 10⁶ similarities per block
        found.extend(exact_truth(stored, stored[queries_idx[start : start + 25]], k))
    return recall(found, truth, k)


def spectrum(x: np.ndarray) -> str:
    """How many principal components hold 50 / 90 / 99 % of the variance (the intrinsic dimension, roughly)."""
    x = x - x.mean(axis=0)
    var = np.linalg.svd(x[:20_000], compute_uv=False) ** 2
    cum = np.cumsum(var) / var.sum()
    return " / ".join(str(int(np.searchsorted(cum, f)) + 1) for f in (0.5, 0.9, 0.99))


def lance_hits(res: pa.Table, per_slide: int) -> np.ndarray:
    slide_no = np.asarray([int(h, 16) for h in res.column("slide_hash").to_pylist()])
    return slide_no * per_slide + res.column("tile_index").to_numpy()


def timed_searches(tbl, queries: np.ndarray, k: int, per_slide: int, **params) -> tuple[np.ndarray, list[np.ndarray]]:
    """One LanceDB search per query (as `similar` answers one example); seconds per query and the hits."""
    times, found = [], []
    for q in queries:
        t = time.perf_counter()
        s = tbl.search(q, vector_column_name="embedding").distance_type("cosine").limit(k)
        for name, value in params.items():
            s = getattr(s, name)() if value is True else getattr(s, name)(value)
        res = s.select(["slide_hash", "tile_index", "_distance"]).to_arrow()
        times.append(time.perf_counter() - t)
        found.append(lance_hits(res, per_slide))
    return np.asarray(times), found


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", type=int, default=1000)
    ap.add_argument("--tiles-per-slide", type=int, default=1000)
    ap.add_argument("--slides-per-commit", type=int, default=50, help="a cohort commits one slide per commit; fewer commits here only to write faster")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--lance-exact-queries", type=int, default=10)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--states", type=int, default=64)
    ap.add_argument("--state-dim", type=int, default=12)
    ap.add_argument("--noise", type=float, default=0.01, help="isotropic noise per dimension")
    ap.add_argument("--offset", type=float, default=0.2, help="norm of each slide's offset")
    ap.add_argument("--index", default="IVF_PQ", help="comma-separated: IVF_PQ, IVF_HNSW_SQ")
    ap.add_argument(
        "--real-tiles", default=None, help="a store whose tiles table holds real slides' embeddings, to compare their spectrum with the synthetic one"
    )
    ap.add_argument("--out", default=None, help="folder for the store (recreated; default: a temporary one)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="tiles-bench-"))
    if out.exists():
        shutil.rmtree(out)
    k, per_slide = args.k, args.tiles_per_slide
    n = args.slides * per_slide
    report: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        report.append(line)

    t0 = time.perf_counter()
    store = Store(out / "histoindex.db", create=True)
    cohort = Cohort(0, args.states, args.state_dim, args.noise, args.offset)
    vectors, write_s = write_cohort(store, cohort, slides=args.slides, per_slide=per_slide, per_commit=args.slides_per_commit)
    tbl = store.table("tiles")
    assert tbl.count_rows() == n
    say(f"rows {n:,} ({args.slides:,} slides × {per_slide:,} tiles), dim {DIM}, k {k}, {args.queries} queries (stored tiles: search by example)")
    say(
        f"generate + write {time.perf_counter() - t0:.0f} s (of which add_tiles commits {write_s:.0f} s, {-(-args.slides // args.slides_per_commit)} commits); peak RSS {peak_rss_gb():.1f} GB"
    )
    lance_dir = out / "histoindex.db" / "tiles.lance"
    data_bytes = du_bytes(lance_dir)
    # the same rows without the embedding: what the identity/position columns cost
    sample = tbl.to_lance().to_table(limit=100_000)
    side_db = Store(out / "side.db", create=True)
    side_db.db.create_table("no_embedding", data=sample.drop_columns(["embedding"]))
    side_db.db.create_table("embedding_only", data=sample.select(["embedding"]))
    rest = du_bytes(out / "side.db" / "no_embedding.lance") / sample.num_rows * 1e4
    emb = du_bytes(out / "side.db" / "embedding_only.lance") / sample.num_rows * 1e4
    say(
        f"disk: {data_bytes / 2**30:.2f} GiB for {n:,} tiles = {data_bytes / n * 1e4 / 2**20:.1f} MiB per 10⁴ tiles "
        f"(embedding column alone {emb / 2**20:.1f} MiB, every other column {rest / 2**20:.2f} MiB, per 10⁴, from a 10⁵-row sample)"
    )

    say(
        "principal components holding 50 / 90 / 99 % of the variance: synthetic, 20k tiles of 20 slides "
        f"{spectrum(vectors)}; one synthetic slide {spectrum(vectors[:per_slide])}"
    )
    if args.real_tiles:
        real = Store(args.real_tiles).table("tiles").to_lance().to_table(columns=["embedding"]).column("embedding")
        real = real.combine_chunks().flatten().to_numpy().reshape(len(real), -1)
        say(f"principal components holding 50 / 90 / 99 % of the variance: real tiles ({len(real):,}, {args.real_tiles}) {spectrum(real)}")
    rng = np.random.default_rng(1)
    qidx = rng.choice(n, size=args.queries, replace=False)
    queries = vectors[qidx]
    t = time.perf_counter()
    truth = np.concatenate([exact_truth(vectors, queries[i : i + 25], k) for i in range(0, len(queries), 25)])
    numpy_batch_s = time.perf_counter() - t
    self_first = np.mean(truth[:, 0] == qidx)
    say(
        f"exact truth (numpy, in memory, batches of 25): {numpy_batch_s / len(queries) * 1e3:.0f} ms per query; the query tile itself first in {self_first:.0%}"
    )
    # how hard the neighbourhoods are: the 10th neighbour's similarity vs the 100th's
    sims = queries[:20] @ vectors.T
    part = -np.sort(-sims, axis=1)[:, [1, k - 1, 99, 999]]
    say(f"median cosine similarity of the query's 2nd / {k}th / 100th / 1000th neighbour: " + " / ".join(f"{v:.3f}" for v in np.median(part, axis=0)))
    del sims

    t = time.perf_counter()
    single = []
    for q in queries[:20]:
        t1 = time.perf_counter()
        exact_truth(vectors, q[None], k)
        single.append(time.perf_counter() - t1)
    say(f"exact, numpy in memory, one query at a time: p50 {np.median(single) * 1e3:.0f} ms, p95 {np.percentile(single, 95) * 1e3:.0f} ms")

    for kind in ("bf16", "int8"):
        t = time.perf_counter()
        say(f"exact over {kind}-rounded embeddings: recall@{k} {quantised_recall(vectors, qidx, truth, k, kind):.3f} ({time.perf_counter() - t:.0f} s)")

    # the planner's exact path: scan the embeddings into memory once (what a query without an index does)
    t = time.perf_counter()
    scanned = tbl.to_lance().to_table(columns=["embedding"])
    scan_s = time.perf_counter() - t
    say(f"exact, planner path: scanning the {n:,} embeddings into memory {scan_s:.1f} s (paid per `similar` call without an index)")
    del scanned

    times, found = timed_searches(tbl, queries[: args.lance_exact_queries], k, per_slide, bypass_vector_index=True)
    say(
        f"exact, LanceDB flat scan (bypass_vector_index, {len(times)} queries): p50 {np.median(times):.2f} s, p95 {np.percentile(times, 95):.2f} s, "
        f"recall@{k} {recall(found, truth[: len(times)], k):.3f}; peak RSS {peak_rss_gb():.1f} GB"
    )

    settings = {
        "IVF_PQ": [{"nprobes": 20, "refine_factor": 5}, {"nprobes": 50, "refine_factor": 10}, {"nprobes": 100, "refine_factor": 20}],
        "IVF_HNSW_SQ": [{"nprobes": 3, "ef": 150}, {"nprobes": 5, "ef": 300, "refine_factor": 2}],
    }
    table_rows = []
    for kind in [s.strip().upper() for s in args.index.split(",") if s.strip()]:
        config = vector_index_config(kind, n)
        before = du_bytes(lance_dir)
        t = time.perf_counter()
        tbl.create_index("embedding", config=config, replace=True)
        build_s = time.perf_counter() - t
        index_bytes = du_bytes(lance_dir) - before
        say(
            f"{kind} build ({config}): {build_s:.0f} s; index on disk {index_bytes / 2**20:.0f} MiB "
            f"({index_bytes / n * 1e4 / 2**20:.2f} MiB per 10⁴ tiles); peak RSS {peak_rss_gb():.1f} GB"
        )
        for params in settings[kind]:
            timed_searches(tbl, queries[:3], k, per_slide, **params)  # warm the index cache
            times, found = timed_searches(tbl, queries, k, per_slide, **params)
            label = ", ".join(f"{a} {b}" for a, b in params.items())
            table_rows.append(f"| {kind} {label} | {np.median(times) * 1e3:.0f} | {np.percentile(times, 95) * 1e3:.0f} | {recall(found, truth, k):.3f} |")
    say(f"\n| search (one query at a time) | p50 ms | p95 ms | recall@{k} |\n|---|---|---|---|")
    for row in table_rows:
        say(row)
    say(f"\ntotal {time.perf_counter() - t0:.0f} s; peak RSS {peak_rss_gb():.1f} GB; store {du_bytes(lance_dir) / 2**30:.2f} GiB")
    (out / "report.md").write_text("\n".join(report) + "\n")
    (out / "args.json").write_text(json.dumps(vars(args)))


if __name__ == "__main__":
    main()
