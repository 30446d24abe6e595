"""Issue 20: what the imputation panel costs. Bytes per reference spot of the per-spot profiles
(every gene the reference measured, sparse: int32 gene positions + float32 log1p(CP10k) values) for
an 18k-gene Visium-like reference and a 300-gene targeted panel, on disk (Lance) and in Arrow; and
the retrieval + imputation time of one 2,048-tile search chunk (k = 50) predicting the 256 training
genes (the ``expression`` column) vs 18k genes (the profiles) vs 10 genes outside the panel.

Synthetic counts shaped like Visium: gene means log-normal, Poisson counts at ~15k UMI per spot
(~4-5k genes detected per spot). The backbone never runs: the model row only names the panel.

    .venv/bin/python benchmarks/any_gene_bench.py --spots 4000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp


def reference(n: int, n_genes: int, umi: float, rng) -> sp.csr_matrix:
    means = rng.lognormal(0.0, 2.0, n_genes)
    means *= umi / means.sum()
    return sp.csr_matrix(rng.poisson(means, size=(n, n_genes)).astype(np.float32))


def main() -> None:
    from histoindex.config import ModelConfig, RetrievalSettings
    from histoindex.data import ImageRef, SpotSet
    from histoindex.impute import impute_measured
    from histoindex.models import create_model
    from histoindex.search import References, Scope, search
    from histoindex.store import Store, spot_rows

    parser = argparse.ArgumentParser()
    parser.add_argument("--spots", type=int, default=4000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp())
    for label, n_genes, umi in (("visium-like 18k genes", 18000, 15000.0), ("300-gene panel", 300, 600.0)):
        X = reference(args.spots, n_genes, umi, rng)
        genes = np.array([f"G{i:05d}" for i in range(n_genes)])
        spots = SpotSet(name="ref", X=X, obs_names=np.arange(args.spots).astype(str), var_names=genes, xy=rng.uniform(0, 1e4, (args.spots, 2)),
                        mpp=1.0, image=ImageRef(array=np.zeros((2, 2, 3), np.uint8)), is_counts=True)  # fmt: skip
        panel = list(genes[:256])
        emb = rng.normal(size=(args.spots, 256)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        sizes = {}
        for with_profile in (False, True):
            store = Store(work / f"{n_genes}-{with_profile}", create=True)
            cfg = ModelConfig(backbone="test_resnet", weights="", genes=tuple(panel), patch_px=32)
            model_id, _ = store.add_model(create_model(cfg), cfg, metrics={}, train_datasets=["ref"])
            rows = spot_rows(spot_ids=spots.obs_names, dataset="ref", tissue="t", platform="visium", species="human", xy=spots.xy, mpp=1.0,
                             image_embedding=emb, expression_embedding=emb, expression=spots.normalized(panel), source_values="raw_counts",
                             model_id=model_id, profile=spots.profiles() if with_profile else None,
                             dataset_genes=list(genes) if with_profile else None)  # fmt: skip
            store.write_datasets(rows, model_id=model_id, datasets=["ref"])
            sizes[with_profile] = store.versions()["spots"][-1]["bytes"]
            arrow = sum(rows.column(c).nbytes for c in ("profile_index", "profile_values")) if with_profile else 0
        nnz = spots.profiles().nnz / args.spots
        print(f"{label}: {nnz:,.0f} non-zero genes per spot; profiles {(sizes[True] - sizes[False]) / args.spots:,.0f} B/spot on disk "
              f"({arrow / args.spots:,.0f} B in Arrow); the whole row {sizes[True] / args.spots:,.0f} B/spot (without profiles {sizes[False] / args.spots:,.0f})")  # fmt: skip
        if n_genes < 18000:
            continue
        queries = rng.normal(size=(2048, 256)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        settings = RetrievalSettings(k=50, impute="log")
        for asked, what in ((None, "256 training genes"), (tuple(genes[-10:]), "10 genes outside the panel"), (("all",), "all 18k genes")):
            started = time.perf_counter()
            refs = References(store, Scope(model_id=model_id), mode="exact", genes=asked)
            opened = time.perf_counter() - started
            started = time.perf_counter()
            values, _ = impute_measured(search(refs, queries, k=50), refs, settings)
            print(f"  {what}: open {opened:.2f} s, search + impute of 2,048 tiles {time.perf_counter() - started:.2f} s -> {values.shape}")


if __name__ == "__main__":
    main()
