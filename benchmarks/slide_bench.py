"""Slide benchmark: end-to-end `query` throughput (read → embed → search → impute → write) against
embed-only throughput of the same model, and peak memory, on synthetic pyramidal TIFFs of
20k × 20k px and 4× that area, plus a ≥100k-tile run for the memory target. "streaming" time is
from the first tile read to the last prediction written (setup — tissue detection, model and
reference loading — excluded); "total" is the whole `api.query` call.

    python benchmarks/slide_bench.py --workdir /tmp/slide-bench

Each measurement runs in its own process (peak RSS = that process's VmHWM). Slides are
written once into the workdir (a periodic synthetic H&E texture, JPEG tiles, 0.5 µm/px) and the
reference store holds 50k synthetic spots under one registered model.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MPP = 0.5
N_GENES = 256
N_REFERENCES = 50_000
#: model name → (method, backbone, weights, patch µm, patch px): "main" reads 224 px at level 0
#: (112 µm); "graph" is the same backbone and tiles under ST-GCHB (each tile's embedding from its
#: kNN neighbourhood, streamed in blocks); "many" has small tiles (40 µm → 64 px) so the 41k-px
#: slide has > 100k of them on tissue.
MODELS = {
    "main": ("bleep", "tf_efficientnet_lite0", "lite0-imagenet", 112.0, 224),
    "graph": ("stgchb", "tf_efficientnet_lite0", "lite0-imagenet", 112.0, 224),
    "many": ("bleep", "resnet10t", "", 40.0, 64),
}


def write_slide(path: Path, side: int, *, texture_px: int = 4096, tile: int = 256) -> Path:
    """A side × side px pyramidal TIFF tiled from a synthetic section texture, streamed tile by
    tile (the full image is never in memory)."""
    import tifffile
    from PIL import Image

    from histoindex.synthetic import make_section

    texture = make_section(seed=11, size_px=texture_px, mpp=MPP).image
    levels = []
    level_side, level_tex = side, texture
    while True:
        levels.append((level_side, level_tex))
        if level_side <= tile:
            break
        level_side = (level_side + 1) // 2
        t = level_tex.shape[0]
        level_tex = np.asarray(Image.fromarray(level_tex).resize((max(1, t // 2), max(1, t // 2)), Image.BILINEAR))

    def tiles(level_side: int, tex: np.ndarray):
        period = tex.shape[0]
        for y in range(0, level_side, tile):
            rows = np.arange(y, y + tile) % period
            band = tex[rows]
            for x in range(0, level_side, tile):
                yield band[:, np.arange(x, x + tile) % period]

    res = 1e4 / MPP
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level, (level_side, tex) in enumerate(levels):
            tif.write(
                tiles(level_side, tex),
                shape=(level_side, level_side, 3),
                dtype=np.uint8,
                photometric="rgb",
                tile=(tile, tile),
                compression="jpeg",
                compressionargs={"level": 90},
                resolution=(res / 2**level, res / 2**level),
                resolutionunit="CENTIMETER",
                subfiletype=0 if level == 0 else 1,
                metadata=None,
            )
    return path


def build_store(db: Path) -> dict[str, str]:
    """Register one model per MODELS entry (random heads: speed does not depend on training) and
    ingest 50k synthetic reference spots for each."""
    from histoindex.config import ModelConfig
    from histoindex.methods import get_method
    from histoindex.models import backbone_input_stats, create_model, get_pretrained
    from histoindex.store import Store, spot_rows

    store = Store(db, create=True)
    rng = np.random.default_rng(0)
    genes = tuple(f"GENE{i}" for i in range(N_GENES))
    ids = {}
    for name, (method, backbone, weights, patch_um, patch_px) in MODELS.items():
        mean, std = (get_pretrained(weights).mean, get_pretrained(weights).std) if weights else backbone_input_stats(backbone)
        params = get_method(method).default_params()
        cfg = ModelConfig(
            method=method,
            method_params=params,
            backbone=backbone,
            weights=weights,
            patch_um=patch_um,
            patch_px=patch_px,
            mean=mean,
            std=std,
            genes=genes,
            views=1,
        )
        model = create_model(cfg, weights=weights or None)
        ids[name], _ = store.add_model(model, cfg, metrics={}, train_datasets=[f"bench-{name}"])
        emb = rng.normal(size=(N_REFERENCES, 256)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        rows = spot_rows(
            spot_ids=np.arange(N_REFERENCES),
            dataset=f"bench-{name}",
            tissue="breast",
            platform="visium",
            species="human",
            xy=rng.random((N_REFERENCES, 2)) * 1e4,
            mpp=MPP,
            image_embedding=emb,
            expression_embedding=emb,
            expression=rng.gamma(1.0, 1.0, (N_REFERENCES, N_GENES)).astype(np.float32),
            source_values="raw_counts",
            model_id=ids[name],
        )
        store.write_dataset(rows, model_id=ids[name], dataset=f"bench-{name}")
    return ids


def peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the
    parent across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_one(args) -> dict:
    """One measurement in this process: an end-to-end query, or embed-only on in-memory tiles."""
    from histoindex import api

    started = time.perf_counter()
    if args.embed_only:
        import torch

        from histoindex.embed import iter_image_embeddings, resolve_device, resolve_precision
        from histoindex.models import load_model
        from histoindex.store import Store

        record = Store(args.db).model(args.model_id)
        device = resolve_device(None)
        precision = resolve_precision("auto", device)
        model = load_model(record.cfg, record.weights(), device=device)
        px = record.cfg.patch_px
        batch = np.random.default_rng(0).integers(0, 255, (args.batch_size, px, px, 3), dtype=np.uint8)
        list(iter_image_embeddings(model, [batch] * 2, device=device, precision=precision))  # warm-up
        n_batches = max(1, args.embed_only // args.batch_size)
        t = time.perf_counter()
        list(iter_image_embeddings(model, (batch for _ in range(n_batches)), device=device, precision=precision))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        n = n_batches * args.batch_size
        out = {"tiles": n, "seconds": seconds, "precision": precision}
    else:
        result = api.query(
            args.slide,
            db=args.db,
            model_id=args.model_id,
            out=Path(args.db).parent / "bench.parquet",
            batch_size=args.batch_size,
            keep_predictions=False,
            workers=args.workers,
        )
        n, seconds = result.n_tiles, result.seconds
        out = {"tiles": n, "seconds": seconds, "stream_seconds": result.stream_seconds}
    out["tiles_per_s"] = out["tiles"] / out["seconds"]
    out["peak_rss_gb"] = peak_rss_gb()
    out["wall_s"] = time.perf_counter() - started
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/slide-bench")
    ap.add_argument("--side", type=int, default=20480, help="side of the base slide, px (the large one is 2× the side = 4× the area)")
    ap.add_argument("--embed-tiles", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--only", choices=sorted(MODELS), help="measure one model's runs only")
    ap.add_argument("--prepare-only", action="store_true", help="write the slides and the store, measure nothing")
    # internal: one measurement in a child process
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    ap.add_argument("--slide", help=argparse.SUPPRESS)
    ap.add_argument("--model-id", help=argparse.SUPPRESS)
    ap.add_argument("--embed-only", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    slides = {}
    for label, side in (("base", args.side), ("4x", 2 * args.side)):
        path = work / f"slide_{side}.tif"
        if not path.exists():
            t = time.perf_counter()
            write_slide(path, side)
            print(f"wrote {path} ({side}×{side} px, {path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.0f} s", flush=True)
        slides[label] = path
    db = work / "db"
    ids_file = work / "model_ids.json"
    if not ids_file.exists() or set(json.loads(ids_file.read_text())) != set(MODELS):
        import shutil

        shutil.rmtree(db, ignore_errors=True)
        ids_file.write_text(json.dumps(build_store(db)))
    ids = json.loads(ids_file.read_text())
    if args.prepare_only:
        return

    def child(*extra: str) -> dict:
        cmd = [sys.executable, __file__, "--one", "--db", str(db), "--batch-size", str(args.batch_size), *extra]
        if args.workers is not None:
            cmd += ["--workers", str(args.workers)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    runs = []
    if args.only in (None, "main"):
        runs += [("main", "embed-only (in-memory tiles)", ["--model-id", ids["main"], "--embed-only", str(args.embed_tiles)])]
        runs += [("main", f"end-to-end, {label} slide", ["--model-id", ids["main"], "--slide", str(slides[label])]) for label in ("base", "4x")]
    if args.only in (None, "graph"):
        runs += [("graph", f"end-to-end, {label} slide", ["--model-id", ids["graph"], "--slide", str(slides[label])]) for label in ("base", "4x")]
    if args.only in (None, "many"):
        runs += [("many", "embed-only (in-memory tiles)", ["--model-id", ids["many"], "--embed-only", str(4 * args.embed_tiles)])]
        runs += [("many", "end-to-end, 4x slide", ["--model-id", ids["many"], "--slide", str(slides["4x"])])]
    print("\n| model | run | tiles | total s | tiles/s (total) | streaming s | tiles/s (streaming) | peak RSS (GB) |\n|---|---|---|---|---|---|---|---|")
    for name, label, extra in runs:
        r = child(*extra)
        method, backbone, _, patch_um, patch_px = MODELS[name]
        stream = f"{r['stream_seconds']:.1f} | {r['tiles'] / r['stream_seconds']:,.1f}" if "stream_seconds" in r else "– | –"
        print(
            f"| {method}, {backbone} {patch_um:g} µm/{patch_px} px | {label} | {r['tiles']:,} | {r['seconds']:.1f} | {r['tiles_per_s']:,.1f} | {stream} | {r['peak_rss_gb']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
