"""Held-out evaluation: leave sections out, train on the rest, score predictions on the held-out
spots against the truth, next to baselines computed in the same run on the same genes.

Everything fitted (the gene panel when it is chosen by variability, the model, the baselines'
standardisation/PCA/ridge, the mean-expression baseline) sees the training sections only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .data import SpotSet
from .errors import InputError
from .metrics import mse, pearson_per_gene

#: default marker genes for breast tissue (HER2ST-style MG-8)
BREAST_MARKERS = ("FASN", "SCD", "KRT8", "CD74", "MGP", "IGKC", "VIM", "MUC1")
BASELINES = ("mean", "colour-retrieval", "frozen-retrieval", "frozen-ridge")


def gene_sets(truth: np.ndarray, genes: Sequence[str], markers: Sequence[str], n: int = 50) -> dict[str, np.ndarray]:
    """Indices of the scored gene sets, defined on the held-out truth: HEG-n (highest mean),
    HVG-n (highest variance), MG (the markers in the panel), all."""
    sets = {
        f"HEG-{n}": np.argsort(-truth.mean(axis=0), kind="stable")[:n],
        f"HVG-{n}": np.argsort(-truth.var(axis=0), kind="stable")[:n],
    }
    index = {g: i for i, g in enumerate(genes)}
    present = [index[g] for g in markers if g in index]
    if present:
        sets[f"MG-{len(present)}"] = np.asarray(present)
    sets["all"] = np.arange(len(genes))
    return sets


def score(truth: np.ndarray, predicted: np.ndarray, sets: dict[str, np.ndarray]) -> dict[str, float]:
    r = pearson_per_gene(truth, predicted)
    out = {name: float(r[idx].mean()) for name, idx in sets.items()}
    out["MSE"] = mse(truth, predicted)
    return out


# ---- baselines ----------------------------------------------------------------------------
def mean_colour(patches: np.ndarray) -> np.ndarray:
    return patches.reshape(len(patches), -1, 3).mean(axis=1).astype(np.float32)


def retrieval_mean(query: np.ndarray, keys: np.ndarray, values: np.ndarray, k: int, *, metric: str = "cosine") -> np.ndarray:
    """Mean of the k nearest keys' values: cosine (unit-normalised) or euclidean distance."""
    from .search import exact_topk

    if metric == "cosine":
        q = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
        kk = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
        idx, _ = exact_topk(q, kk, k)
    else:  # euclidean: -|q-k|² = 2 q·k - |k|² - |q|², rank by 2 q·k - |k|²
        aug_q = np.concatenate([2 * query, -np.ones((len(query), 1), np.float32)], axis=1)
        aug_k = np.concatenate([keys, (keys**2).sum(axis=1, keepdims=True)], axis=1)
        idx, _ = exact_topk(aug_q, aug_k, k)
    from .impute import average_rows

    return average_rows(idx, values)


def ridge_on_features(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, *, n_components: int = 256) -> np.ndarray:
    """HEST-Benchmark style: standardise, PCA to 256, ridge (alpha = 100 / (n_features·n_targets)),
    all fitted on training spots only."""
    mu, sd = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    _, _, vt = np.linalg.svd(a, full_matrices=False)
    basis = vt[: min(n_components, vt.shape[0])].T
    a, b = a @ basis, b @ basis
    alpha = 100.0 / (a.shape[1] * train_y.shape[1])
    y_mean = train_y.mean(axis=0)
    a_mean = a.mean(axis=0)
    ac = a - a_mean
    w = np.linalg.solve(ac.T @ ac + alpha * np.eye(ac.shape[1]), ac.T @ (train_y - y_mean))
    return ((b - a_mean) @ w + y_mean).astype(np.float32)


# ---- the run ------------------------------------------------------------------------------
@dataclass
class FoldResult:
    holdout: str
    train_sections: list[str]
    n_train_spots: int
    n_test_spots: int
    n_genes: int
    scores: dict[str, dict[str, float]]
    spot_ids: np.ndarray = field(repr=False)
    genes: list[str] = field(repr=False)
    truth: np.ndarray = field(repr=False)
    predictions: dict[str, np.ndarray] = field(repr=False)
    train_seconds: float = 0.0


@dataclass
class Evaluation:
    folds: list[FoldResult]
    config: dict

    def summary(self) -> dict[str, dict[str, float]]:
        """Mean over folds of every score, per system."""
        systems = self.folds[0].scores.keys()
        return {
            s: {m: float(np.mean([f.scores[s][m] for f in self.folds])) for m in self.folds[0].scores[s]}
            for s in systems
        }

    def predictions_table(self):
        """Held-out predictions and truth, one row per (section, system, spot), one column per
        gene: enough for anyone to re-score them."""
        import pyarrow as pa

        tables = []
        for f in self.folds:
            for system, values in {"truth": f.truth, **f.predictions}.items():
                columns = {
                    "section": pa.array([f.holdout] * len(f.spot_ids)),
                    "system": pa.array([system] * len(f.spot_ids)),
                    "spot": pa.array(np.asarray(f.spot_ids, dtype=str)),
                }
                columns.update({g: pa.array(np.ascontiguousarray(values[:, j], np.float32)) for j, g in enumerate(f.genes)})
                tables.append(pa.table(columns))
        return pa.concat_tables(tables, promote_options="default")

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "summary": self.summary(),
            "folds": [
                {k: getattr(f, k) for k in ("holdout", "train_sections", "n_train_spots", "n_test_spots", "n_genes", "scores", "train_seconds")}
                for f in self.folds
            ],
        }


def evaluate(
    references: Sequence[SpotSet],
    *,
    holdouts: Sequence[str] | None = None,
    options=None,
    markers: Sequence[str] = BREAST_MARKERS,
    k: int = 50,
    baselines: bool = True,
    device: str | None = None,
    precision: str = "auto",
    log: Callable[[str], None] = lambda _: None,
) -> Evaluation:
    """Leave each of ``holdouts`` (default: every section) out in turn: train on the others with
    ``options`` (api.TrainOptions), predict the held-out spots by retrieval exactly as ``query``
    does, and score model and baselines on the same genes."""
    from . import api
    from .embed import backbone_features, batched, embed_expression, embed_images, resolve_device, resolve_precision
    from .impute import average_rows
    from .models import create_model
    from .patch import spot_patches
    from .search import exact_topk
    from .train import train_model

    options = options or api.TrainOptions()
    names = [r.name for r in references]
    if len(set(names)) != len(names):
        raise InputError(f"section names repeat: {', '.join(names)}")
    holdouts = list(holdouts) if holdouts else names
    unknown = [h for h in holdouts if h not in names]
    if unknown:
        raise InputError(f"--holdout {', '.join(unknown)} is not among the sections: {', '.join(names)}")
    if len(references) < 2:
        raise InputError("evaluation needs at least two sections: one to hold out, one to train on")
    torch_device = resolve_device(device)
    precision = resolve_precision(precision, torch_device)  # what train, ingest and query use here
    import torch.nn.functional as F_
    import torch

    # Per-section work that does not depend on the fold is done once: patches, and the frozen
    # backbone's features for all 8 views (used by the frozen baselines, and to train the heads
    # when the backbone is frozen). The backbone as loaded is the same in every fold.
    probe = api._model_config(references[:1], options)
    frozen = create_model(probe.replace(genes=probe.genes[:1]), weights=probe.weights or None)
    patches: dict[str, np.ndarray] = {}
    features: dict[str, np.ndarray] = {}
    for ref in references:
        patches[ref.name] = spot_patches(ref, patch_um=probe.patch_um, patch_px=probe.patch_px)
        if baselines or probe.freeze_backbone:
            features[ref.name] = backbone_features(frozen, batched(patches[ref.name], 64), device=torch_device, views=8, precision=precision)
    folds = []
    for holdout in holdouts:
        test = references[names.index(holdout)]
        train = [r for r in references if r.name != holdout]
        started = time.perf_counter()
        cfg = api._model_config(train, options)  # genes from training sections only
        genes = list(cfg.genes)
        log(f"fold {holdout}: training on {', '.join(r.name for r in train)} ({sum(r.n_obs for r in train)} spots, {len(genes)} genes)")
        cached = np.concatenate([features[r.name] for r in train]) if cfg.freeze_backbone else None
        result = train_model(train, cfg, weights=cfg.weights or None, device=torch_device, features=cached, precision=precision)
        train_seconds = time.perf_counter() - started
        model = result.model.to(torch_device).eval()
        train_expr = np.concatenate([r.normalized(genes) for r in train])
        truth = test.normalized(genes)
        if cfg.freeze_backbone:  # = embed_images with cfg.views, from the cached view features
            with torch.inference_mode():
                view_mean = torch.from_numpy(features[holdout][:, : max(cfg.views, 1)].mean(axis=1)).to(torch_device)
                queries = F_.normalize(model.image_projection(view_mean), dim=-1).float().cpu().numpy()
        else:
            queries = embed_images(model, batched(patches[holdout], 64), device=torch_device, precision=precision)
        keys = embed_expression(model, train_expr, device=torch_device)
        idx, _ = exact_topk(queries, keys, k)
        predictions = {"histoindex": average_rows(idx, train_expr)}

        if baselines:
            views = max(cfg.views, 1)
            train_patches = np.concatenate([patches[r.name] for r in train])
            predictions["mean"] = np.broadcast_to(train_expr.mean(axis=0), truth.shape).copy()
            predictions["colour-retrieval"] = retrieval_mean(mean_colour(patches[holdout]), mean_colour(train_patches), train_expr, k, metric="euclidean")
            f_train = np.concatenate([features[r.name][:, :views].mean(axis=1) for r in train])
            f_test = features[holdout][:, :views].mean(axis=1)
            predictions["frozen-retrieval"] = retrieval_mean(f_test, f_train, train_expr, k)
            predictions["frozen-ridge"] = ridge_on_features(f_train, train_expr, f_test)

        sets = gene_sets(truth, genes, markers)
        scores = {system: score(truth, pred, sets) for system, pred in predictions.items()}
        folds.append(
            FoldResult(
                holdout=holdout,
                train_sections=[r.name for r in train],
                n_train_spots=len(train_expr),
                n_test_spots=test.n_obs,
                n_genes=len(genes),
                scores=scores,
                spot_ids=test.obs_names,
                genes=genes,
                truth=truth,
                predictions=predictions,
                train_seconds=round(train_seconds, 1),
            )
        )
        log(f"fold {holdout}: " + "; ".join(f"{s} HEG {v[f'HEG-50']:.3f} HVG {v['HVG-50']:.3f}" for s, v in scores.items()))
    config = {"options": {k2: getattr(options, k2) for k2 in options.__dataclass_fields__}, "k": k, "markers": list(markers), "device": str(torch_device), "precision": precision}
    return Evaluation(folds=folds, config=config)
