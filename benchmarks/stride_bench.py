"""Maps at spot resolution (issue 11): what ``query --stride-um`` costs, and whether predicting at the
spot centres instead of the nearest coarse tile changes held-out accuracy.

    python benchmarks/stride_bench.py cost --workdir /tmp/bench/stride --side 8192
    python benchmarks/stride_bench.py her2st --workdir /tmp/bench/stride-her2st

``cost``: one synthetic pyramidal TIFF of ``--side``² px (0.5 µm/px; ``slide_bench.write_slide``)
and the store of ``slide_bench.build_store`` (50k synthetic Visium references); the "main" model
(Lite0, 112 µm / 224 px, 1 view) predicts the slide at stride = patch (112 µm), 100 µm (the Visium
default) and 55 µm, each run in its own process: tiles, seconds and tiles/s.

``her2st``: a model trained on C2, C3, C4 with the tests' fast options (resnet10t from random
init, fine-tuned, 1 view, 64 px patches, 8 epochs, lr 1e-3, no stain normalisation; the default
recipe's 8-view frozen features took ~45 min to extract on the loaded 2-core machine) but the
default recipe's 224 µm patch and the 785-gene panel, and those three ingested (platform st); C5
held out and predicted (a) at its measured spot centres (``query --spots``), (b) on the coarse grid
(stride = patch, 224 µm) taking for each spot the nearest tile, (c) on the 100 µm grid, nearest
window. Per-gene Pearson r against C5's measured expression over the same genes and spots.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


# ---- cost -----------------------------------------------------------------------------------
def cost(args) -> None:
    from slide_bench import MODELS, build_store, write_slide

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    slide = work / f"slide-{args.side}.tif"
    if not slide.exists():
        write_slide(slide, args.side)
    db = work / "db"
    ids_file = work / "models.json"
    if not ids_file.exists():
        ids_file.write_text(json.dumps(build_store(db)))
    model_id = json.loads(ids_file.read_text())["main"]
    patch_um = MODELS["main"][3]
    rows = []
    for stride in (patch_um, 100.0, 55.0):
        cmd = [sys.executable, __file__, "one", "--db", str(db), "--slide", str(slide), "--model-id", model_id, "--stride-um", str(stride)]
        out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        rows.append({"stride_um": stride, **out})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.side}² px slide at 0.5 µm/px, Lite0 112 µm / 224 px, 1 view\n")
    print("| stride | tiles | × tiles at stride = patch | total s | tiles/s (total) | streaming s | tiles/s (streaming) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        label = f"{r['stride_um']:g} µm" + (" (= patch)" if r["stride_um"] == patch_um else "")
        print(
            f"| {label} | {r['tiles']:,} | {r['tiles'] / rows[0]['tiles']:.2f} | {r['seconds']:.1f} | {r['tiles'] / r['seconds']:.1f} "
            f"| {r['stream_seconds']:.1f} | {r['tiles'] / r['stream_seconds']:.1f} |"
        )


def one(args) -> None:
    """One query in this process (``cost``): JSON of tiles and seconds on the last line."""
    from histoindex import api

    result = api.query(
        args.slide,
        db=args.db,
        model_id=args.model_id,
        out=Path(args.db).parent / "bench.parquet",
        keep_predictions=False,
        stride_um=args.stride_um,
    )
    print(json.dumps({"tiles": result.n_tiles, "seconds": result.seconds, "stream_seconds": result.stream_seconds}))


# ---- HER2ST ---------------------------------------------------------------------------------
def her2st(args) -> None:
    import pyarrow.parquet as pq

    from histoindex import api
    from histoindex.evaluate import gene_sets
    from histoindex.metrics import pearson_per_gene
    from histoindex.recipe import TrainOptions

    data = Path(args.her2st)
    work = Path(args.workdir)
    h5ad = work / "h5ad"
    if not (h5ad / "C5.h5ad").exists():
        subprocess.run([sys.executable, str(HERE.parent / "examples" / "her2st_to_h5ad.py"), "--her2st", str(data), "--out", str(h5ad)], check=True)
    db = work / "db"
    log = lambda line: print(line, flush=True)  # noqa: E731
    timings = {}
    if not db.exists():
        refs = [api.read_reference(h5ad / f"{s}.h5ad", platform="st") for s in ("C2", "C3", "C4")]
        t = time.perf_counter()
        options = TrainOptions(
            genes_file=str(data / "gene_panel_785.txt"), backbone="resnet10t", weights="", freeze_backbone=False, views=1, patch_px=64,
            patch_um=224.0, epochs=8, batch_size=64, lr=1e-3, stain="none", seed=0,
        )  # fmt: skip
        api.train(refs, db=db, options=options, log=log)
        for ref in refs:
            api.ingest(ref, db=db, tissue="breast", platform="st", log=log)
        timings["train + ingest"] = time.perf_counter() - t
    held = api.read_reference(h5ad / "C5.h5ad", platform="st")
    slide = held.image.path
    common = dict(db=db, tissue="breast", mpp=held.mpp, log=log)
    runs = {
        "(a) at the spot centres (--spots)": dict(spots=h5ad / "C5.h5ad"),
        "(b) coarse grid, stride = patch (224 µm), nearest tile": dict(stride_um=224.0),
        "(c) fine grid, stride 100 µm, nearest window": dict(stride_um=100.0),
    }
    results = {}
    for name, options in runs.items():
        out = work / f"{name[1]}.parquet"
        t = time.perf_counter()
        result = api.query(slide, out=out, **common, **options)
        timings[name] = time.perf_counter() - t
        table = pq.read_table(out)
        results[name] = (result, table)
    genes = list(results[next(iter(runs))][0].genes)
    truth = held.normalized(genes)
    sets = gene_sets(truth, genes, markers=[])
    print(f"\nC5 held out: {held.n_obs} spots, {len(genes)} genes; {held.mpp:.4g} µm/px\n")
    print("| prediction | tiles | median spot → centre (µm) | max (µm) | mean r (all genes) | HEG-50 | HVG-50 | query s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (result, table) in results.items():
        values = np.column_stack([table.column(g).to_numpy() for g in genes])
        xy = np.column_stack([table.column("x").to_numpy(), table.column("y").to_numpy()])
        if "spots" in runs[name]:
            index = {s: i for i, s in enumerate(table.column("spot").to_pylist())}
            rows = np.array([index[s] for s in held.obs_names])
            distance = np.linalg.norm(xy[rows] - held.xy, axis=1)
        else:
            from scipy.spatial import cKDTree

            distance, rows = cKDTree(xy).query(held.xy, k=1)
        r = pearson_per_gene(truth, values[rows])
        cells = {k: float(np.mean(r[v])) for k, v in sets.items()}
        um = distance * held.mpp
        print(
            f"| {name} | {result.n_tiles:,} | {np.median(um):.0f} | {um.max():.0f} | {cells['all']:.3f} | {cells['HEG-50']:.3f} | {cells['HVG-50']:.3f} "
            f"| {timings[name]:.0f} |"
        )
    if "train + ingest" in timings:
        print(f"\ntrain + ingest: {timings['train + ingest']:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--workdir", default="/tmp/bench/stride")
    c.add_argument("--side", type=int, default=8192)
    o = sub.add_parser("one")
    o.add_argument("--db")
    o.add_argument("--slide")
    o.add_argument("--model-id")
    o.add_argument("--stride-um", type=float)
    h = sub.add_parser("her2st")
    h.add_argument("--workdir", default="/tmp/bench/stride-her2st")
    h.add_argument("--her2st", default=str(HERE.parent.parent / "shared" / "data" / "her2st"))
    args = ap.parse_args()
    {"cost": cost, "one": one, "her2st": her2st}[args.command](args)


if __name__ == "__main__":
    main()
