"""Held-out evaluation: leave sections out, train on the rest, score predictions on the held-out
spots against the truth, next to baselines computed in the same run on the same genes.

Everything fitted (the gene panel when it is chosen by variability, the model, the baselines'
standardisation/PCA/ridge, the mean-expression baseline) sees the training sections only.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .baselines import depth_only, mean_colour, retrieval_mean, ridge_cv, ridge_on_features, spatial_blocks  # noqa: F401  (also importable from here)
from .data import SpotSet
from .errors import InputError
from .metrics import gene_sets, mse, pearson_per_gene, score  # noqa: F401  (gene_sets, score: also importable from here)

#: default marker genes for breast tissue (HER2ST-style MG-8)
BREAST_MARKERS = ("FASN", "SCD", "KRT8", "CD74", "MGP", "IGKC", "VIM", "MUC1")
BASELINES = ("neighbour-mean", "mean", "colour-retrieval", "frozen-retrieval", "frozen-retrieval+", "frozen-ridge", "depth-only")
#: systems reported for context only, never competitors: "depth-only" reads each held-out spot's
#: total counts, which only the truth knows
CONTEXT_ONLY = ("depth-only",)
PROTOCOLS = ("section", "patient")
#: the retrieval baselines' k (BLEEP's); "frozen-retrieval+" uses the model's retrieval settings instead
BASELINE_K = 50


def _cache_path(cache: str | Path | None, ref: SpotSet, cfg, precision: str) -> Path | None:
    if cache is None:
        return None
    key = hashlib.sha256()
    for part in (ref.source, ref.name, cfg.backbone, cfg.weights, cfg.patch_um, cfg.patch_px, precision, ref.mpp, cfg.stain):
        key.update(str(part).encode())
    if getattr(cfg, "backbone_args", None) is not None:  # an encoder configured by its own config.json
        key.update(json.dumps(cfg.backbone_args, sort_keys=True).encode())
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
    patient: str | None = None  # the held-out section's patient, when known
    ridge: dict | None = None  # the ridge probe's penalty, chosen by inner CV (baselines.ridge_cv)
    answer_seconds: float = 0.0  # embedding, answering and scoring this section (training apart)
    peak_rss_mb: float = 0.0  # the process's peak resident memory when the fold ended


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
                        "patient",
                        "ridge",
                        "answer_seconds",
                        "peak_rss_mb",
                    )
                }
                for f in self.folds
            ],
        }


def held_out_groups(
    names: Sequence[str], *, protocol: str = "section", patients: Mapping[str, str] | None = None, holdouts: Sequence[str] | None = None
) -> list[tuple[str | None, list[str]]]:
    """The folds' held-out groups, each ``(patient, [sections])``: one section at a time under the
    section protocol (``holdouts``: section names), every section of one patient together under
    the patient protocol (``holdouts``: patient names; default each patient in turn). Patients are
    never guessed: the patient protocol needs one for every section."""
    if protocol not in PROTOCOLS:
        raise InputError(f"--protocol {protocol}: expected one of {', '.join(PROTOCOLS)}")
    patients = dict(patients or {})
    unknown = [s for s in patients if s not in names]
    if unknown:
        raise InputError(f"--patient {', '.join(f'{s}={patients[s]}' for s in unknown)}: no such section; the sections are {', '.join(names)}")
    if protocol == "section":
        holdouts = list(holdouts) if holdouts else list(names)
        missing = [h for h in holdouts if h not in names]
        if missing:
            raise InputError(f"--holdout {', '.join(missing)} is not among the sections: {', '.join(names)}")
        return [(patients.get(h), [h]) for h in holdouts]
    if not patients:
        raise InputError("--protocol patient needs each section's patient: --patient SECTION=PATIENT (repeatable) or --patient-column KEY")
    missing = [n for n in names if n not in patients]
    if missing:
        raise InputError(f"--protocol patient: no patient for section(s) {', '.join(missing)}; add --patient {missing[0]}=PATIENT")
    order = list(dict.fromkeys(patients[n] for n in names))
    if len(order) < 2:
        raise InputError(f"--protocol patient needs sections of at least two patients; every section is patient {order[0]}")
    holdouts = list(holdouts) if holdouts else order
    wrong = [h for h in holdouts if h not in order]
    if wrong:
        said = [f"{h} (a section of patient {patients[h]})" if h in patients else h for h in wrong]
        raise InputError(f"--holdout under --protocol patient names patients ({', '.join(order)}), not {', '.join(said)}")
    return [(p, [n for n in names if patients[n] == p]) for p in holdouts]


def parse_patients(pairs: Sequence[str]) -> dict[str, str]:
    """``SECTION=PATIENT`` pairs (``--patient``) as a mapping; a section given twice must agree."""
    patients: dict[str, str] = {}
    for pair in pairs:
        section, sep, patient = (part.strip() for part in pair.partition("="))
        if not (sep and section and patient):
            raise InputError(f"--patient {pair}: expected SECTION=PATIENT, e.g. --patient C2=C")
        if patients.get(section, patient) != patient:
            raise InputError(f"--patient gives section {section} two patients: {patients[section]} and {patient}")
        patients[section] = patient
    return patients


def read_patient(path: str | Path, key: str, *, section: str) -> str:
    """The patient a reference file names under ``key``: an obs column holding one value for every
    spot, or a uns entry (.h5ad files only)."""
    import anndata as ad

    path = Path(path)
    if path.suffix != ".h5ad":
        raise InputError(f"--patient-column reads .h5ad files' obs or uns; give {section}'s patient with --patient {section}=PATIENT ({path})")
    adata = ad.read_h5ad(path, backed="r")
    try:
        if key in adata.obs.columns:
            values = sorted(set(map(str, adata.obs[key].dropna())))
            if len(values) != 1:
                raise InputError(
                    f"--patient-column {key}: {path} holds {len(values)} patients in obs[{key!r}] ({', '.join(values[:5])}); one section, one patient"
                )
            return values[0]
        if key in adata.uns:
            value = adata.uns[key]
            return str(value.item() if hasattr(value, "item") else value)
    finally:
        adata.file.close()
    raise InputError(f"--patient-column {key}: section {section} ({path}) has no obs column or uns entry {key!r}")


def total_counts(ref: SpotSet) -> np.ndarray | None:
    """Each spot's total counts (its sequencing depth), when the section holds raw counts."""
    if not ref.is_counts:
        return None
    return np.asarray(ref.X.sum(axis=1), np.float64).ravel()


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def evaluate(
    references: Sequence[SpotSet],
    *,
    holdouts: Sequence[str] | None = None,
    protocol: str = "section",
    patients: Mapping[str, str] | None = None,
    options=None,
    markers: Sequence[str] = BREAST_MARKERS,
    k: int | None = None,
    baselines: bool = True,
    device: str | None = None,
    precision: str = "auto",
    cache: str | Path | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> Evaluation:
    """Hold sections out in turn: train on the others with ``options``
    (:class:`~histoindex.recipe.TrainOptions`, any method), predict the held-out spots by retrieval
    exactly as ``ingest`` + ``query --spots`` do, and score model and baselines on the same genes.
    ``protocol``: "section" holds out each of ``holdouts`` (default: every section) alone;
    "patient" holds out every section of one patient together (``patients``: section name →
    patient; ``holdouts``: patient names, default each in turn): the model, the gene panel and
    every baseline are fitted on the other patients' sections only, and each held-out section is
    scored as its own fold. ``k`` overrides the model's retrieval k (its settings: the recipe's
    ``retrieval``). Baselines: the training mean; colour, frozen-feature retrieval (BLEEP's plain
    top-50 mean); "frozen-retrieval+", frozen features answered with the model's retrieval
    settings (what the retrieval settings alone give, without training); "frozen-ridge", the
    HEST-Benchmark ridge probe on frozen features with its penalty chosen by inner CV across
    training patients (else sections, else spatial blocks of the one section); "neighbour-mean",
    the model's predictions averaged over each held-out spot's graph neighbourhood; and, for
    context only (:data:`CONTEXT_ONLY`: it reads the truth's depth), "depth-only": each held-out
    spot's log total counts regressed to the genes on the training spots. ``cache``: a folder where the frozen backbone's features of each section are kept
    between runs (keyed by the section's spots, the backbone, its weights, the patch geometry and
    the precision), so that comparing recipes does not recompute them."""
    from .embed import resolve_device, resolve_precision
    from .recipe import TrainOptions, model_config

    options = options or TrainOptions()
    names = [r.name for r in references]
    if len(set(names)) != len(names):
        raise InputError(f"section names repeat: {', '.join(names)}")
    groups = held_out_groups(names, protocol=protocol, patients=patients, holdouts=holdouts)
    if len(references) < 2:
        raise InputError("evaluation needs at least two sections: one to hold out, one to train on")
    depths = {r.name: total_counts(r) for r in references}
    with_depth = baselines and all(d is not None for d in depths.values())
    if baselines and not with_depth:
        log("depth-only baseline skipped: some sections hold log-normalised values, not raw counts")
    torch_device = resolve_device(device)
    run = _Run(
        options=options, protocol=protocol, patients=dict(patients or {}), markers=list(markers), k=k, baselines=baselines, depths=depths,
        with_depth=with_depth, device=torch_device, precision=resolve_precision(precision, torch_device), log=log,
    )  # fmt: skip
    probe = model_config(references[:1], options)
    patches, features = _section_inputs(run, references, probe, cache=cache)
    folds, cfg = [], probe
    for patient, held_names in groups:
        fold_results, cfg = _fold(run, references, patches, features, patient=patient, held_names=held_names)
        folds += fold_results
    config = {
        "protocol": protocol,
        "patients": run.patients or None,
        "options": {k2: getattr(options, k2) for k2 in options.__dataclass_fields__},
        "k": k,
        "retrieval": cfg.retrieval_settings.replace(k=k).to_dict() if folds else None,
        "baseline_k": BASELINE_K,
        "context_only": [s for s in CONTEXT_ONLY if with_depth],
        "markers": list(markers),
        "device": str(torch_device),
        "precision": run.precision,
    }
    return Evaluation(folds=folds, config=config)


@dataclass(frozen=True)
class _Run:
    """What every fold of one evaluation shares."""

    options: object
    protocol: str
    patients: dict
    markers: list
    k: int | None
    baselines: bool
    depths: dict
    with_depth: bool
    device: object
    precision: str
    log: Callable[[str], None]


def _section_inputs(run: _Run, references: Sequence[SpotSet], probe, *, cache) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-section work that does not depend on the fold, done once: the patches, and the frozen
    backbone's features for all 8 views (used by the frozen baselines, and to train when the
    backbone is frozen). The backbone as loaded is the same in every fold."""
    from .embed import backbone_features, batched
    from .models import create_model
    from .patch import spot_patches, spot_stain
    from .stain import normalised
    from .train import seed_everything

    seed_everything(probe.seed)  # a randomly initialised backbone is then the one train_model builds
    frozen = create_model(probe.replace(genes=probe.genes[:1]), weights=probe.weights or None)
    patches: dict[str, np.ndarray] = {}
    features: dict[str, np.ndarray] = {}
    for ref in references:
        # the section's pixels as the model sees them: stain-normalised as ingest and query do
        stain = spot_stain(ref, stain=probe.stain, patch_um=probe.patch_um, patch_px=probe.patch_px)
        patches[ref.name] = next(normalised([spot_patches(ref, patch_um=probe.patch_um, patch_px=probe.patch_px)], stain))
        if run.baselines or probe.freeze_backbone:
            path = _cache_path(cache, ref, probe, run.precision)
            if path is not None and path.exists():
                features[ref.name] = np.load(path)
                run.log(f"features of {ref.name} from {path}")
                continue
            features[ref.name] = backbone_features(frozen, batched(patches[ref.name], 64), device=run.device, views=8, precision=run.precision)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path.with_suffix(".tmp.npy"), features[ref.name])
                os.replace(path.with_suffix(".tmp.npy"), path)
    del frozen
    return patches, features


def _fold(run: _Run, references: Sequence[SpotSet], patches: dict, features: dict, *, patient, held_names: Sequence[str]):
    """One fold: train on the sections not held out, then answer and score each held-out section
    (the model exactly as ingest → query --spots, and the baselines). Returns its results and config."""
    from .embed import batched, iter_image_features
    from .methods import get_method
    from .recipe import answer_held_out, describe_inner_check, model_config, train_model
    from .train import TrainSection

    options, log = run.options, run.log
    tests = [r for name in held_names for r in references if r.name == name]
    train = [r for r in references if r.name not in held_names]
    started = time.perf_counter()
    # genes chosen on the training sections only, among those every held-out section measures
    measured = set.intersection(*(set(map(str, t.var_names)) for t in tests))
    cfg = model_config(train, options, genes_among=[g for g in map(str, tests[0].var_names) if g in measured])
    genes = list(cfg.genes)
    what = f"patient {patient} ({', '.join(held_names)})" if run.protocol == "patient" else held_names[0]
    log(f"fold {what}: training {cfg.method} on {', '.join(r.name for r in train)} ({sum(r.n_obs for r in train)} spots, {len(genes)} genes)")
    cached = [features[r.name] for r in train] if cfg.freeze_backbone else None
    result = train_model(
        train, cfg, weights=cfg.weights or None, device=run.device, features=cached, precision=run.precision, check=options.inner_check,
        fallback=options.fallback,
    )  # fmt: skip
    train_seconds = time.perf_counter() - started - result.metrics.get("inner_check", {}).get("seconds", 0.0)
    if "inner_check" in result.metrics:
        log(f"fold {what}: {describe_inner_check(result.metrics['inner_check'], fallback='fallback' in result.metrics)}")
    cfg, method = result.cfg, get_method(result.cfg.method)  # the frozen-retrieval model when training fell back
    model = result.model.to(run.device).eval()
    views = max(cfg.views, 1)
    if cfg.freeze_backbone:  # what ingest and query compute: features averaged over the model's views
        view_features = {name: cached[:, :views].mean(axis=1) for name, cached in features.items()}
    else:
        view_features = {
            r.name: np.concatenate(list(iter_image_features(model, batched(patches[r.name], 64), device=run.device, precision=run.precision)))
            for r in (*train, *tests)
        }

    # exactly ingest → query --spots: each training section embedded as a reference (its own
    # graph for a graph method), the held-out spots as queries, exact top-k, mean profile
    refs = [TrainSection(r.name, r.normalized(genes), r.xy * r.mpp, features=view_features[r.name]) for r in train]
    train_expr = np.concatenate([r.expression for r in refs])
    retrieval = cfg.retrieval_settings.replace(k=run.k)
    fitted = _fit_baselines(run, train, tests, patches, features, train_expr, views) if run.baselines else {}
    folds = []
    for t_index, test in enumerate(tests):
        answer_started = time.perf_counter()
        truth = test.normalized(genes)
        test_xy_um = test.xy * test.mpp
        held = TrainSection(test.name, truth, test_xy_um, features=view_features[test.name])
        predicted, profiles = answer_held_out(method, model, refs, held, retrieval, device=run.device)
        predictions = {"histoindex": predicted}
        if run.baselines:
            predictions.update(_baseline_predictions(run, fitted, test, t_index, predicted, patches, profiles, retrieval, train_expr))
        sets = gene_sets(truth, genes, run.markers)
        scores = {system: score(truth, pred, sets) for system, pred in predictions.items()}
        folds.append(
            FoldResult(
                holdout=test.name,
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
                patient=patient,
                ridge=fitted.get("ridge"),
                answer_seconds=round(time.perf_counter() - answer_started, 1),
                peak_rss_mb=peak_rss_mb(),
            )
        )
        log(f"fold {test.name}: " + "; ".join(f"{s} HEG {v['HEG-50']:.3f} HVG {v['HVG-50']:.3f}" for s, v in scores.items()))
    return folds, cfg


def _fit_baselines(run: _Run, train, tests, patches: dict, features: dict, train_expr: np.ndarray, views: int) -> dict:
    """The baselines fitted once per training set, answered for each held-out section."""
    fitted: dict = {}
    train_patches = np.concatenate([patches[r.name] for r in train])
    fitted["f_train"] = np.concatenate([features[r.name][:, :views].mean(axis=1) for r in train])
    fitted["colour"] = mean_colour(train_patches)
    # the ridge penalty's inner CV: across training patients where there are two, else
    # across training sections, else across spatial blocks of the one section
    train_patients = [run.patients.get(r.name) for r in train]
    if None not in train_patients and len(set(train_patients)) > 1:
        fitted["groups"], labels = "patients", np.repeat(train_patients, [r.n_obs for r in train])
    elif len(train) > 1:
        fitted["groups"], labels = "sections", np.repeat([r.name for r in train], [r.n_obs for r in train])
    else:
        fitted["groups"], labels = "spatial blocks", spatial_blocks(train[0].xy)
    fitted["f_tests"] = f_tests = [features[t.name][:, :views].mean(axis=1) for t in tests]
    ridge_all, fitted["ridge"] = ridge_cv(fitted["f_train"], train_expr, np.concatenate(f_tests), labels)
    fitted["ridge"]["groups"] = fitted["groups"]
    fitted["ridge_predictions"] = np.split(ridge_all, np.cumsum([len(f) for f in f_tests])[:-1])
    if run.with_depth:
        fitted["depths"] = np.concatenate([run.depths[r.name] for r in train])
    return fitted


def _baseline_predictions(run: _Run, fitted: dict, test, t_index: int, predicted, patches: dict, profiles, retrieval, train_expr) -> dict:
    """Every baseline's answer for held-out section ``test`` (the ``t_index``-th of its fold)."""
    from .baselines import graph_smoothed
    from .recipe import answer_spots, unit_rows

    test_xy_um = test.xy * test.mpp
    f_test, f_train = fitted["f_tests"][t_index], fitted["f_train"]
    predictions = {
        "neighbour-mean": graph_smoothed(predicted, test_xy_um),
        "mean": np.broadcast_to(train_expr.mean(axis=0), predicted.shape).copy(),
        "colour-retrieval": retrieval_mean(mean_colour(patches[test.name]), fitted["colour"], train_expr, BASELINE_K, metric="euclidean"),
        "frozen-retrieval": retrieval_mean(f_test, f_train, train_expr, BASELINE_K),
        "frozen-retrieval+": answer_spots(unit_rows(f_test), unit_rows(f_train), profiles, retrieval, test_xy_um),
        "frozen-ridge": fitted["ridge_predictions"][t_index],
    }
    if run.with_depth:
        predictions["depth-only"] = depth_only(fitted["depths"], train_expr, run.depths[test.name])
    return predictions
