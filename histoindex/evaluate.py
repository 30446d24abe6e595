"""Held-out evaluation: leave sections out, train on the rest, score predictions on the held-out
spots against the truth, next to baselines computed in the same run on the same genes.

Everything fitted (the gene panel when it is chosen by variability, the model, the baselines'
standardisation/PCA/ridge, the mean-expression baseline) sees the training sections only.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .baselines import mean_colour, retrieval_mean, ridge_on_features  # noqa: F401  (also importable from here)
from .data import SpotSet
from .errors import InputError
from .metrics import gene_sets, mse, pearson_per_gene, score  # noqa: F401  (gene_sets, score: also importable from here)

#: default marker genes for breast tissue (HER2ST-style MG-8)
BREAST_MARKERS = ("FASN", "SCD", "KRT8", "CD74", "MGP", "IGKC", "VIM", "MUC1")
BASELINES = ("neighbour-mean", "mean", "colour-retrieval", "frozen-retrieval", "frozen-retrieval+", "frozen-ridge")
#: the retrieval baselines' k (BLEEP's); "frozen-retrieval+" uses the model's retrieval settings instead
BASELINE_K = 50


def _cache_path(cache: str | Path | None, ref: SpotSet, cfg, precision: str) -> Path | None:
    if cache is None:
        return None
    key = hashlib.sha256()
    for part in (ref.source, ref.name, cfg.backbone, cfg.weights, cfg.patch_um, cfg.patch_px, precision, ref.mpp, cfg.stain):
        key.update(str(part).encode())
    key.update(np.ascontiguousarray(ref.xy, np.float64).tobytes())
    return Path(cache) / f"{ref.name}-{key.hexdigest()[:16]}.npy"


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
    epochs: int = 0
    inner_check: dict | None = None  # what training's inner check found (recipe.inner_check)
    method: str = ""  # the method of the model scored (frozen when training fell back)


@dataclass
class Evaluation:
    folds: list[FoldResult]
    config: dict

    def summary(self) -> dict[str, dict[str, float]]:
        """Mean over folds of every score, per system."""
        systems = self.folds[0].scores.keys()
        return {s: {m: float(np.mean([f.scores[s][m] for f in self.folds])) for m in self.folds[0].scores[s]} for s in systems}

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
                {
                    k: getattr(f, k)
                    for k in (
                        "holdout",
                        "train_sections",
                        "n_train_spots",
                        "n_test_spots",
                        "n_genes",
                        "scores",
                        "train_seconds",
                        "epochs",
                        "inner_check",
                        "method",
                    )
                }
                for f in self.folds
            ],
        }


def evaluate(
    references: Sequence[SpotSet],
    *,
    holdouts: Sequence[str] | None = None,
    options=None,
    markers: Sequence[str] = BREAST_MARKERS,
    k: int | None = None,
    baselines: bool = True,
    device: str | None = None,
    precision: str = "auto",
    cache: str | Path | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> Evaluation:
    """Leave each of ``holdouts`` (default: every section) out in turn: train on the others with
    ``options`` (:class:`~histoindex.recipe.TrainOptions`, any method), predict the held-out spots
    by retrieval exactly as ``ingest`` + ``query --spots`` do, and score model and baselines on the
    same genes. ``k`` overrides the model's retrieval k (its settings: the recipe's ``retrieval``).
    Baselines: the training mean; colour, frozen-feature and ridge on frozen features (BLEEP's
    plain top-50 mean); "frozen-retrieval+", frozen features answered with the model's retrieval
    settings (what the retrieval settings alone give, without training); "neighbour-mean", the
    model's predictions averaged over each held-out spot's graph neighbourhood. ``cache``: a folder where the frozen backbone's features of each section are kept
    between runs (keyed by the section's spots, the backbone, its weights, the patch geometry and
    the precision), so that comparing recipes does not recompute them."""
    from .baselines import graph_smoothed
    from .embed import backbone_features, batched, iter_image_features, resolve_device, resolve_precision
    from .methods import get_method
    from .models import create_model
    from .patch import spot_patches, spot_stain
    from .recipe import TrainOptions, answer_held_out, answer_spots, describe_inner_check, model_config, train_model, unit_rows
    from .stain import normalised
    from .train import TrainSection, seed_everything

    options = options or TrainOptions()
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

    # Per-section work that does not depend on the fold is done once: patches, and the frozen
    # backbone's features for all 8 views (used by the frozen baselines, and to train when the
    # backbone is frozen). The backbone as loaded is the same in every fold.
    probe = model_config(references[:1], options)
    seed_everything(probe.seed)  # a randomly initialised backbone is then the one train_model builds
    frozen = create_model(probe.replace(genes=probe.genes[:1]), weights=probe.weights or None)
    patches: dict[str, np.ndarray] = {}
    features: dict[str, np.ndarray] = {}
    for ref in references:
        # the section's pixels as the model sees them: stain-normalised as ingest and query do
        stain = spot_stain(ref, stain=probe.stain, patch_um=probe.patch_um, patch_px=probe.patch_px)
        patches[ref.name] = next(normalised([spot_patches(ref, patch_um=probe.patch_um, patch_px=probe.patch_px)], stain))
        if baselines or probe.freeze_backbone:
            path = _cache_path(cache, ref, probe, precision)
            if path is not None and path.exists():
                features[ref.name] = np.load(path)
                log(f"features of {ref.name} from {path}")
                continue
            features[ref.name] = backbone_features(frozen, batched(patches[ref.name], 64), device=torch_device, views=8, precision=precision)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path.with_suffix(".tmp.npy"), features[ref.name])
                os.replace(path.with_suffix(".tmp.npy"), path)
    del frozen
    folds = []
    for holdout in holdouts:
        test = references[names.index(holdout)]
        train = [r for r in references if r.name != holdout]
        started = time.perf_counter()
        # genes chosen on the training sections only, among those the held-out section measures
        cfg = model_config(train, options, genes_among=list(test.var_names))
        genes = list(cfg.genes)
        method = get_method(cfg.method)
        log(f"fold {holdout}: training {cfg.method} on {', '.join(r.name for r in train)} ({sum(r.n_obs for r in train)} spots, {len(genes)} genes)")
        cached = [features[r.name] for r in train] if cfg.freeze_backbone else None
        result = train_model(
            train, cfg, weights=cfg.weights or None, device=torch_device, features=cached, precision=precision, check=options.inner_check,
            fallback=options.fallback,
        )  # fmt: skip
        train_seconds = time.perf_counter() - started - result.metrics.get("inner_check", {}).get("seconds", 0.0)
        if "inner_check" in result.metrics:
            log(f"fold {holdout}: {describe_inner_check(result.metrics['inner_check'], fallback='fallback' in result.metrics)}")
        cfg, method = result.cfg, get_method(result.cfg.method)  # the frozen-retrieval model when training fell back
        model = result.model.to(torch_device).eval()
        views = max(cfg.views, 1)
        if cfg.freeze_backbone:  # what ingest and query compute: features averaged over the model's views
            view_features = {name: cached[:, :views].mean(axis=1) for name, cached in features.items()}
        else:
            view_features = {
                r.name: np.concatenate(list(iter_image_features(model, batched(patches[r.name], 64), device=torch_device, precision=precision)))
                for r in (*train, test)
            }

        # exactly ingest → query --spots: each training section embedded as a reference (its own
        # graph for a graph method), the held-out spots as queries, exact top-k, mean profile
        refs = [TrainSection(r.name, r.normalized(genes), r.xy * r.mpp, features=view_features[r.name]) for r in train]
        train_expr = np.concatenate([r.expression for r in refs])
        truth = test.normalized(genes)
        test_xy_um = test.xy * test.mpp
        retrieval = cfg.retrieval_settings.replace(k=k)
        held = TrainSection(test.name, truth, test_xy_um, features=view_features[holdout])
        predicted, profiles = answer_held_out(method, model, refs, held, retrieval, device=torch_device)
        predictions = {"histoindex": predicted}

        if baselines:
            train_patches = np.concatenate([patches[r.name] for r in train])
            predictions["neighbour-mean"] = graph_smoothed(predictions["histoindex"], test.xy * test.mpp)
            predictions["mean"] = np.broadcast_to(train_expr.mean(axis=0), truth.shape).copy()
            predictions["colour-retrieval"] = retrieval_mean(
                mean_colour(patches[holdout]), mean_colour(train_patches), train_expr, BASELINE_K, metric="euclidean"
            )
            f_train = np.concatenate([features[r.name][:, :views].mean(axis=1) for r in train])
            f_test = features[holdout][:, :views].mean(axis=1)
            predictions["frozen-retrieval"] = retrieval_mean(f_test, f_train, train_expr, BASELINE_K)
            predictions["frozen-retrieval+"] = answer_spots(unit_rows(f_test), unit_rows(f_train), profiles, retrieval, test_xy_um)
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
                epochs=len(result.metrics["train_loss"]),
                inner_check=result.metrics.get("inner_check"),
                method=cfg.method,
            )
        )
        log(f"fold {holdout}: " + "; ".join(f"{s} HEG {v['HEG-50']:.3f} HVG {v['HVG-50']:.3f}" for s, v in scores.items()))
    config = {
        "options": {k2: getattr(options, k2) for k2 in options.__dataclass_fields__},
        "k": k,
        "retrieval": cfg.retrieval_settings.replace(k=k).to_dict() if folds else None,
        "baseline_k": BASELINE_K,
        "markers": list(markers),
        "device": str(torch_device),
        "precision": precision,
    }
    return Evaluation(folds=folds, config=config)
