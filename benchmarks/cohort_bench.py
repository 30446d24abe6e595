"""Cohort benchmark (issue 12): N synthetic slides predicted three ways, each from a cold process —
one `histoindex query` per slide (the shell loop), one cohort command, and the cohort on a local Ray
instance (`--ray local`) — plus the cost of committing predictions one slide per commit vs a batch
of slides per commit.

    python benchmarks/cohort_bench.py --workdir /tmp/bench/cohort

The store and model are slide_bench's "main" (EfficientNet-Lite0 ImageNet, 112 µm / 224 px, one
view, 50k synthetic references, 256 genes); slides are pyramidal TIFFs of the same synthetic H&E.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from slide_bench import build_store, write_slide  # noqa: E402


def cli(*args: str) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "histoindex.cli", *args], check=True, capture_output=True, text=True)
    return time.perf_counter() - started, done.stdout + done.stderr


def tiles_of(out_dir: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in out_dir.glob("*.parquet"))


def commit_bench(work: Path, *, slides: int, rows_per_slide: int, genes: int, batch: int) -> dict:
    """Append `slides` slides' prediction rows to a fresh predictions table, `batch` slides per
    commit; then time the reads a cohort run and an analysis do (is slide X done? per-slide means)."""
    import shutil
    from datetime import datetime, timezone

    from histoindex.store import Store, prediction_rows

    db = work / f"commit-{batch}"
    shutil.rmtree(db, ignore_errors=True)
    store = Store(db, create=True)
    rng = np.random.default_rng(0)
    values = rng.random((rows_per_slide, genes), dtype=np.float32)
    xy = rng.random((rows_per_slide, 2)) * 1e5
    ids = np.array([f"r{i // 200}_c{i % 200}" for i in range(rows_per_slide)])
    seconds = []
    pending = []
    for s in range(slides):
        pending.append(
            prediction_rows(
                run_id=f"run{s}",
                slide=f"slide{s}.svs",
                ids=ids,
                xy=xy,
                mpp=0.25,
                values=values,
                model_id="m",
                spots_version=1,
                predicate="",
                k=50,
                created_at=datetime.now(timezone.utc),
            )  # fmt: skip
        )
        if len(pending) == batch or s == slides - 1:
            import pyarrow as pa

            t = time.perf_counter()
            store.add_predictions(pa.concat_tables(pending))
            seconds.append(time.perf_counter() - t)
            pending = []
    t = time.perf_counter()
    assert len(store.predicted_slides(model_id="m", spots_version=1)) == slides
    lookup = time.perf_counter() - t
    t = time.perf_counter()
    tbl = store.table("predictions")
    n = tbl.count_rows()
    count = time.perf_counter() - t
    fragments = len(tbl.to_lance().get_fragments())
    return {
        "batch": batch,
        "commits": len(seconds),
        "commit_s_mean": float(np.mean(seconds)),
        "commit_s_last": seconds[-1],
        "per_slide_s": sum(seconds) / slides,
        "fragments": fragments,
        "lookup_s": lookup,
        "count_s": count,
        "rows": n,
    }


def read_rate(slide: Path, *, tiles: int = 600) -> list[tuple[int, float]]:
    """Tiles/s one thread reads from `slide` as 224 px patches, for 224, 448 and 896 px level-0
    squares (a 112 µm tile at 0.5, 0.25 and 0.125 µm/px)."""
    from histoindex.io.slides import open_slide

    opened = open_slide(slide)
    out = []
    for size in (224, 448, 896):
        positions = [(x, y) for y in range(0, opened.height - size, size) for x in range(0, opened.width - size, size)][:tiles]
        started = time.perf_counter()
        for x, y in positions:
            opened.read_region(x, y, size, 224)
        out.append((size, len(positions) / (time.perf_counter() - started)))
    opened.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/bench/cohort")
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--side", type=int, default=8192, help="slide side, px (0.5 µm/px)")
    ap.add_argument("--only", choices=["predict", "read", "commit"])
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    if args.only in (None, "predict"):
        db = work / "db"
        ids_file = work / "model_ids.json"
        if not ids_file.exists():
            ids_file.write_text(json.dumps(build_store(db)))
        model = json.loads(ids_file.read_text())["main"]
        slide_dir = work / "slides"
        slide_dir.mkdir(exist_ok=True)
        template = slide_dir / "s00.tif"
        if not template.exists():
            write_slide(template, args.side)
        slides = [template] + [slide_dir / f"s{i:02d}.tif" for i in range(1, args.slides)]
        for s in slides[1:]:
            if not s.exists():
                s.hardlink_to(template)
        common = ["--model", model, "--db", str(db), "--redo"]
        rows = []
        serial_dir = work / "serial"
        serial_dir.mkdir(exist_ok=True)
        total = 0.0
        for s in slides:
            seconds, _ = cli("query", str(s), "--out", str(serial_dir / f"{s.stem}.parquet"), *common)
            total += seconds
        rows.append(("one `histoindex query` per slide (shell loop)", total, tiles_of(serial_dir)))
        seconds, _ = cli("query", *map(str, slides), "--out", str(work / "cohort") + "/", *common)
        rows.append(("one cohort command", seconds, tiles_of(work / "cohort")))
        seconds, log = cli("query", *map(str, slides), "--out", str(work / "ray") + "/", "--ray", "local", *common)
        rows.append(("cohort, `--ray local` (starts Ray)", seconds, tiles_of(work / "ray")))
        print(f"\n{len(slides)} slides of {args.side}² px, {rows[0][2] // len(slides)} tissue tiles each\n")
        print("| run | wall s | tiles | tiles/s |\n|---|---|---|---|")
        for label, seconds, tiles in rows:
            print(f"| {label} | {seconds:.1f} | {tiles:,} | {tiles / seconds:.1f} |")
        saved = (rows[0][1] - rows[1][1]) / len(slides)
        print(f"\nstart-up saved per slide by loading the model and references once: {saved:.1f} s", flush=True)

    if args.only in (None, "read"):
        slide = work / "slides" / "s00.tif"
        if not slide.exists():
            slide.parent.mkdir(parents=True, exist_ok=True)
            write_slide(slide, args.side)
        for size, rate in read_rate(slide):
            print(f"reading {size} px level-0 squares as 224 px patches: {rate:,.0f} tiles/s on one thread", flush=True)

    if args.only in (None, "commit"):
        print(
            "\n| slides per commit | commits | s per commit | commit s per slide | fragments | which slides are done? s | count_rows s |\n|---|---|---|---|---|---|---|"
        )
        for batch in (1, 10):
            r = commit_bench(work, slides=200, rows_per_slide=15_000, genes=50, batch=batch)
            print(
                f"| {batch} | {r['commits']} | {r['commit_s_mean']:.3f} | {r['per_slide_s']:.3f} | {r['fragments']} | {r['lookup_s']:.4f} | {r['count_s']:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
