"""Query cost of dihedral views and of the retrieval settings (issue 13).

    .venv/bin/python benchmarks/views_bench.py [--workdir /tmp/bench/slide] [--tiles 512]

Uses the slide benchmark's store and 20k² slide (built by ``benchmarks/slide_bench.py
--prepare-only`` when missing): the Lite0 (ImageNet) BLEEP model at 112 µm / 224 px, 50k reference
spots. Part 1: ``query --views V`` for V = 1, 2, 4, 8 on the first ``--tiles`` tissue tiles (given as
``--spots``), in-process ``api.query`` with the model and references loaded once; tiles/s from the
first tile read to the last row written. Part 2: the whole slide at 1 view, with BLEEP's plain top-50
mean against the default recipe's retrieval (k 100, softmax tau 0.03, z imputation, smoothing 0.5):
what the new retrieval settings cost per tile. Accuracy per view count comes from
``benchmarks/her2st_explore.py`` (BENCHMARKS.md), not from here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/bench/slide")
    ap.add_argument("--tiles", type=int, default=512)
    args = ap.parse_args()
    work = Path(args.workdir)
    slide = work / "slide_20480.tif"
    if not (work / "model_ids.json").exists() or not slide.exists():
        subprocess.run([sys.executable, str(HERE / "slide_bench.py"), "--workdir", str(work), "--prepare-only"], check=True)
    model_id = json.loads((work / "model_ids.json").read_text())["main"]

    from dataclasses import replace

    from histoindex import api
    from histoindex.config import RetrievalSettings
    from histoindex.io.slides import open_slide
    from histoindex.patch import tile_grid

    db = work / "db"
    opened = open_slide(slide)
    try:
        grid = tile_grid(opened, tile_um=112.0, stride_um=112.0)
    finally:
        opened.close()
    spots = work / f"views-{args.tiles}.csv"
    xy = grid.xy[: args.tiles]
    spots.write_text("spot,x,y\n" + "".join(f"t{i},{x:.1f},{y:.1f}\n" for i, (x, y) in enumerate(xy)))
    warm = work / "views-warm-up.csv"
    warm.write_text("spot,x,y\n" + "".join(f"t{i},{x:.1f},{y:.1f}\n" for i, (x, y) in enumerate(xy[:64])))

    rows = []
    for views in (1, 2, 4, 8):
        session = api.open_query(db, model_id=model_id, views=views)
        session.answer(slide, spots=warm, keep_predictions=False, commit=False)  # warm-up: first batches, caches
        started = time.perf_counter()
        result = session.answer(slide, spots=spots, keep_predictions=False, commit=False)
        seconds = time.perf_counter() - started
        rows.append((views, result.n_tiles, seconds))
        print(f"views {views}: {result.n_tiles} tiles in {seconds:.1f} s = {result.n_tiles / seconds:.1f} tiles/s", flush=True)

    plain = RetrievalSettings()
    recipe = RetrievalSettings(k=100, tau=0.03, impute="z", smooth=0.5)
    base = api.open_query(db, model_id=model_id, views=1)
    timings = {}
    for name, settings in (("plain top-50 mean", plain), ("default recipe's retrieval", recipe)):
        session = replace(base, retrieval=settings, k=settings.k)
        started = time.perf_counter()
        result = session.answer(slide, keep_predictions=False, commit=False)
        timings[name] = (result.n_tiles, time.perf_counter() - started)
        n, seconds = timings[name]
        print(f"{name}: {n} tiles in {seconds:.1f} s = {n / seconds:.1f} tiles/s", flush=True)

    print("\n| views | tiles | seconds | tiles/s | relative to 8 views |\n|---|---|---|---|---|")
    eight = next(r for r in rows if r[0] == 8)
    for views, n, seconds in rows:
        print(f"| {views} | {n} | {seconds:.1f} | {n / seconds:.1f} | {(n / seconds) / (eight[1] / eight[2]):.1f}× |")
    print("\n| retrieval (1 view, whole 20k² slide) | tiles | seconds | tiles/s |\n|---|---|---|---|")
    for name, (n, seconds) in timings.items():
        print(f"| {name} | {n} | {seconds:.1f} | {n / seconds:.1f} |")


if __name__ == "__main__":
    main()
