"""Across patients on HER2ST (issue 21): which recipe changes move the accuracy on a new patient?

    .venv/bin/python benchmarks/her2st_patients_explore.py features --h5ad DIR --work DIR
    .venv/bin/python benchmarks/her2st_patients_explore.py run --h5ad DIR --work DIR --cache DIR \
        [--protocols patients,c_loo,mixed] [--variants a,b] [--seeds 0]

``--h5ad``: the sections as ``examples/her2st_to_h5ad.py`` writes them (B4, C2-C5);
``--cache``: the frozen Lite0 features of the default recipe's Macenko patches, as
``histoindex evaluate --cache`` keeps them (``benchmarks/her2st_patients.sh`` fills it), so that the
"default" variant reproduces the product's figures; ``features`` adds to ``--work`` what the variants
need beyond them: the features of a 3x larger field of view around each spot (672 µm read into 224 px,
Macenko as the spot patch) and of HED-jittered copies of the spot patches (Tellez et al.: each stain
channel scaled by 1±0.05 and shifted by ±0.05, skimage's HED space).

Protocols (outer folds, as ``histoindex evaluate``): patients = C2-C5 → B4 and B4 → each of C2-C5
(one model); c_loo = one C section held out; mixed = B4 + three C → the fourth. Truth and scores as
the product: log1p CP10k over the 785-gene panel, per-gene Pearson r, HEG-50 / HVG-50 of the
held-out truth.

Every choice a variant makes is made inside the outer training sections only: the inner groups are
the training sections held out in turn (with one training section: 4 spatial stripes of it), and a
variant whose inner score does not beat the default recipe's on the same inner groups is not chosen
("nested" rows); the "forced" rows apply it regardless, to show what it would have done.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from histoindex.api import read_reference  # noqa: E402
from histoindex.baselines import _ridge_path, ridge_cv, spatial_blocks  # noqa: E402
from histoindex.evaluate import peak_rss_mb, total_counts  # noqa: E402
from histoindex.graph import knn_indices  # noqa: E402
from histoindex.impute import ProfileMatrix  # noqa: E402
from histoindex.methods import get_method  # noqa: E402
from histoindex.metrics import gene_sets, score  # noqa: E402
from histoindex.models import create_model  # noqa: E402
from histoindex.models.layers import ProjectionHead  # noqa: E402
from histoindex.recipe import TrainOptions, answer_spots, model_config  # noqa: E402
from histoindex.train import TrainSection, seed_everything  # noqa: E402

SECTIONS = ("B4", "C2", "C3", "C4", "C5")
PATIENT = {"B4": "B", "C2": "C", "C3": "C", "C4": "C", "C5": "C"}
CONTEXT_UM = 672.0  # 3x the 224 µm spot patch


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# =============================================================================================
# Sections and features
# =============================================================================================
@dataclass
class Section:
    name: str
    ref: object
    expr: np.ndarray  # (n, G) log1p CP10k over the fold's genes (set per fold)
    depth: np.ndarray  # (n,) total counts
    xy_um: np.ndarray
    feats: dict = field(default_factory=dict)  # "spot" / "context" / "hed": (n, 8, F)

    @property
    def n(self) -> int:
        return len(self.depth)

    def subset(self, mask: np.ndarray, name: str) -> Section:
        return Section(name, self.ref, self.expr[mask], self.depth[mask], self.xy_um[mask], {k: v[mask] for k, v in self.feats.items()})


def read_sections(h5ad: Path) -> dict[str, object]:
    return {name: read_reference(h5ad / f"{name}.h5ad", platform="st") for name in SECTIONS}


def default_options(panel: Path) -> TrainOptions:
    return TrainOptions(genes_file=str(panel))


def hed_jitter(patches: np.ndarray, rng: np.random.Generator, sigma: float = 0.05) -> np.ndarray:
    """Tellez et al.'s HED augmentation, one draw per patch: each of the H, E, D channels scaled by
    U(1-σ, 1+σ) and shifted by U(-σ, σ) in skimage's HED space."""
    from skimage.color import hed2rgb, rgb2hed

    out = np.empty_like(patches)
    for i, patch in enumerate(patches):
        hed = rgb2hed(patch)
        hed = hed * rng.uniform(1 - sigma, 1 + sigma, 3) + rng.uniform(-sigma, sigma, 3)
        out[i] = np.clip(hed2rgb(hed) * 255, 0, 255).astype(np.uint8)
    return out


def compute_features(args) -> None:
    """The feature sets the variants need beyond the product's cache."""
    from histoindex.embed import backbone_features, batched, resolve_precision
    from histoindex.patch import spot_patches, spot_stain
    from histoindex.stain import normalised

    refs = read_sections(args.h5ad)
    cfg = model_config(list(refs.values()), default_options(args.panel))
    device = torch.device("cpu")
    precision = resolve_precision("auto", device)
    seed_everything(cfg.seed)
    frozen = create_model(cfg.replace(genes=cfg.genes[:1]), weights=cfg.weights or None)
    args.work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, ref in refs.items():
        stain = spot_stain(ref, stain=cfg.stain, patch_um=cfg.patch_um, patch_px=cfg.patch_px)
        started = time.perf_counter()
        path = args.work / f"{name}-context.npy"
        if not path.exists():
            patches = next(normalised([spot_patches(ref, patch_um=CONTEXT_UM, patch_px=cfg.patch_px)], stain))
            np.save(path, backbone_features(frozen, batched(patches, 64), device=device, views=8, precision=precision))
        path = args.work / f"{name}-hed.npy"
        if not path.exists():
            patches = next(normalised([spot_patches(ref, patch_um=cfg.patch_um, patch_px=cfg.patch_px)], stain))
            np.save(path, backbone_features(frozen, batched(hed_jitter(patches, rng), 64), device=device, views=8, precision=precision))
        log(f"{name}: {ref.n_obs} spots, context + HED features in {time.perf_counter() - started:.0f} s")


def load_sections(args) -> dict[str, Section]:
    refs = read_sections(args.h5ad)
    sections = {}
    for name, ref in refs.items():
        (spot,) = sorted(args.cache.glob(f"{name}-*.npy"))  # the product's cache: one file per section
        feats = {"spot": np.load(spot)}
        for kind in ("context", "hed"):
            path = args.work / f"{name}-{kind}.npy"
            if path.exists():
                feats[kind] = np.load(path)
        sections[name] = Section(name, ref, np.zeros((ref.n_obs, 0), np.float32), total_counts(ref), ref.xy * ref.mpp, feats)
    return sections


# =============================================================================================
# The recipe's pieces, on cached features
# =============================================================================================
@dataclass
class Fold:
    cfg: object
    genes: list
    train: list  # Sections
    tests: list
    views: int = 4


def neighbour_mean(feats: np.ndarray, xy_um: np.ndarray, k: int = 6) -> np.ndarray:
    """Each spot's features averaged over its k nearest spots (itself excluded), view by view."""
    idx = knn_indices(xy_um, k=k)
    idx = np.where(idx >= 0, idx, np.arange(len(idx))[:, None])  # a missing neighbour (-1): the spot itself
    return feats[idx].mean(axis=1)


def image_input(section: Section, kind: str) -> np.ndarray:
    """(n, 8, F) image features a variant's heads see."""
    spot = section.feats["spot"]
    if kind == "spot":
        return spot
    if kind == "context":
        return np.concatenate([spot, section.feats["context"]], axis=2)
    if kind == "neighbours":
        return np.concatenate([spot, neighbour_mean(spot, section.xy_um)], axis=2)
    raise ValueError(kind)


def fit_heads(fold: Fold, train: list, *, kind: str = "spot", targets: str = "expr", hed: bool = False, seed: int = 0):
    """The product's BLEEP heads (model_config's settings, 60 epochs) trained on ``train``."""
    cfg = fold.cfg.replace(seed=seed)
    generator = seed_everything(cfg.seed)
    model = create_model(cfg, weights=cfg.weights or None)
    feats = [image_input(s, kind) for s in train]
    if feats[0].shape[2] != model.image_encoder.num_features:
        model.image_projection = ProjectionHead(feats[0].shape[2], cfg.embed_dim, cfg.dropout)
    if hed:  # each step draws one of 16 views: the 8 dihedral views, plain or HED-jittered
        feats = [np.concatenate([f, s.feats["hed"]], axis=1) for f, s in zip(feats, train, strict=True)]
    sections = [TrainSection(s.name, target_values(s, targets), s.xy_um, features=f) for s, f in zip(train, feats, strict=True)]
    get_method(cfg.method).fit(model, sections, cfg, generator=generator, device=torch.device("cpu"))
    return model.eval()


def target_values(section: Section, targets: str) -> np.ndarray:
    if targets == "expr":
        return section.expr
    if targets == "relative":
        return section.extra_relative
    raise ValueError(targets)


def retrieve(fold: Fold, model, refs: list, test: Section, *, kind: str = "spot", values=None, settings=None) -> np.ndarray:
    """ingest → query --spots in memory (answer_held_out), with the retrieved ``values`` optionally
    other than the keys' expression."""
    method = get_method(fold.cfg.method)
    views = fold.views
    keyed = [TrainSection(r.name, r.expr, r.xy_um, features=image_input(r, kind)[:, :views].mean(axis=1)) for r in refs]
    keys = np.concatenate([method.embed_references(model, r, device="cpu")[1] for r in keyed])
    queries = np.concatenate(list(method.query_encoder(model, test.xy_um, device="cpu")([image_input(test, kind)[:, :views].mean(axis=1)])))
    values = np.concatenate([r.expr for r in refs]) if values is None else values
    profiles = ProfileMatrix(values, np.repeat([r.name for r in refs], [r.n for r in refs]))
    return answer_spots(queries, keys, profiles, settings or fold.cfg.retrieval_settings, test.xy_um)


def inner_groups(train: list) -> list[tuple[list, Section]]:
    """(inner training sections, inner held-out section) pairs: each training section held out in
    turn, or with one training section its 4 spatial stripes."""
    if len(train) > 1:
        return [([s for s in train if s is not held], held) for held in train]
    (only,) = train
    blocks = spatial_blocks(only.xy_um)
    return [([only.subset(blocks != b, f"{only.name}~{b}")], only.subset(blocks == b, f"{only.name}:{b}")) for b in np.unique(blocks)]


def inner_score(truth_pred: list[tuple[np.ndarray, np.ndarray]], genes) -> float:
    """Mean of HEG-50 and HVG-50 r over inner held-out groups (the product's inner criterion)."""
    out = []
    for truth, pred in truth_pred:
        s = score(truth, pred, gene_sets(truth, genes, []))
        out.append((s["HEG-50"] + s["HVG-50"]) / 2)
    return float(np.mean(out))


def section_centred(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    out = values.astype(np.float64, copy=True)
    for label in np.unique(labels):
        out[labels == label] -= out[labels == label].mean(axis=0)
    return out


# =============================================================================================
# Variants: each returns {test name: predictions} and what it chose
# =============================================================================================
def pred_default(fold: Fold, train: list, tests: list, seed: int = 0, **kw) -> dict:
    model = fit_heads(fold, train, seed=seed, **kw)
    kind = kw.get("kind", "spot")
    return {t.name: retrieve(fold, model, train, t, kind=kind) for t in tests}


def pred_ridge(fold: Fold, train: list, tests: list, kind: str = "spot") -> dict:
    x = np.concatenate([image_input(s, kind)[:, : fold.views].mean(axis=1) for s in train])
    y = np.concatenate([s.expr for s in train])
    groups = np.repeat([s.name for s in train], [s.n for s in train]) if len(train) > 1 else spatial_blocks(train[0].xy_um)
    tx = [image_input(t, kind)[:, : fold.views].mean(axis=1) for t in tests]
    pred, _ = ridge_cv(x, y, np.concatenate(tx), groups)
    return dict(zip([t.name for t in tests], np.split(pred, np.cumsum([len(f) for f in tx])[:-1]), strict=True))


STACK_ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3)


def fit_stack(r: np.ndarray, p: np.ndarray, y: np.ndarray, labels: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Per gene, y ≈ a·r + b·p on section-centred values (r is scale-free within a section), ridge
    towards (a, b) = (1, 0): the retrieved profile, corrected by the ridge probe where it helps."""
    rc, pc, yc = (section_centred(v, labels) for v in (r, p, y))
    srr, spp, srp = (rc * rc).sum(0), (pc * pc).sum(0), (rc * pc).sum(0)
    sry, spy = (rc * yc).sum(0), (pc * yc).sum(0)
    # minimise |y - a r - b p|² + alpha·n·((a-1)² + b²), per gene (2x2 solve)
    lam = alpha * len(y) * 1e-3
    a11, a22, a12 = srr + lam, spp + lam, srp
    b1, b2 = sry + lam, spy
    det = a11 * a22 - a12 * a12
    return (a22 * b1 - a12 * b2) / det, (a11 * b2 - a12 * b1) / det


def pred_correct(fold: Fold, train: list, tests: list, seed: int = 0, mode: str = "stack") -> tuple[dict, dict]:
    """Retrieve, then correct (CHRep-style): out-of-fold retrieved profiles and ridge-probe answers
    of the training spots (each inner group answered by models fitted without it) → per-gene stack
    or a ridge on [retrieved profiles, PCA features]; its penalty by grouped CV over the inner
    groups; applied to the outer model's retrieval and ridge answers."""
    r_oof, p_oof, y_oof, f_oof, labels = [], [], [], [], []
    for inner_train, held in inner_groups(train):
        r_oof.append(pred_default(fold, inner_train, [held], seed=seed)[held.name])
        p_oof.append(pred_ridge(fold, inner_train, [held])[held.name])
        y_oof.append(held.expr)
        f_oof.append(held.feats["spot"][:, : fold.views].mean(axis=1))
        labels.append(np.full(held.n, held.name))
    r, p, y, f, labels = (np.concatenate(v) for v in (r_oof, p_oof, y_oof, f_oof, labels))
    raw_inner = inner_score([(y[labels == g], r[labels == g]) for g in np.unique(labels)], fold.genes)
    outer_r = pred_default(fold, train, tests, seed=seed)
    outer_p = pred_ridge(fold, train, tests)
    if mode == "stack":
        cv = {}
        for alpha in STACK_ALPHAS:
            pairs = []
            for g in np.unique(labels):
                a, b = fit_stack(r[labels != g], p[labels != g], y[labels != g], labels[labels != g], alpha)
                pairs.append((y[labels == g], a * r[labels == g] + b * p[labels == g]))
            cv[alpha] = inner_score(pairs, fold.genes)
        alpha = max(cv, key=cv.get)
        a, b = fit_stack(r, p, y, labels, alpha)
        preds = {t.name: (a * outer_r[t.name] + b * outer_p[t.name]).astype(np.float32) for t in tests}
        return preds, {"alpha": alpha, "inner": cv[alpha], "inner_default": raw_inner, "a_median": float(np.median(a)), "b_median": float(np.median(b))}
    if mode == "blend":  # one weight for all genes: (1-w)·z(retrieved) + w·z(ridge probe), z within a section

        def z(v):
            return (v - v.mean(0)) / (v.std(0) + 1e-6)

        cv = {}
        for w in (0.0, 0.25, 0.5, 0.75):
            cv[w] = inner_score([(y[labels == g], (1 - w) * z(r[labels == g]) + w * z(p[labels == g])) for g in np.unique(labels)], fold.genes)
        w = max(cv, key=cv.get)
        preds = {t.name: ((1 - w) * z(outer_r[t.name]) + w * z(outer_p[t.name])).astype(np.float32) for t in tests}
        return preds, {"w": w, "inner": cv[w], "inner_default": raw_inner}
    if mode == "residual":  # retrieved profile + a ridge of the image features on its residual (section-centred)
        rc, yc = section_centred(r, labels), section_centred(y, labels)
        alphas = tuple(10.0 ** np.arange(2, 10))
        cv = {}
        for g in np.unique(labels):
            fit = labels != g
            for alpha, corr in zip(alphas, _ridge_path(f[fit], (yc - rc)[fit], f[~fit], alphas, 256), strict=True):
                cv.setdefault(alpha, []).append((y[~fit], r[~fit] + corr))
        scores = {alpha: inner_score(pairs, fold.genes) for alpha, pairs in cv.items()}
        alpha = max(scores, key=scores.get)
        tests_f = [t.feats["spot"][:, : fold.views].mean(axis=1) for t in tests]
        (corr,) = _ridge_path(f, yc - rc, np.concatenate(tests_f), [alpha], 256)
        split = np.split(corr, np.cumsum([len(v) for v in tests_f])[:-1])
        preds = {t.name: outer_r[t.name] + c for t, c in zip(tests, split, strict=True)}
        return preds, {"alpha": alpha, "inner": scores[alpha], "inner_default": raw_inner}
    # mode "ridge": y ~ ridge([retrieved profile (all genes), PCA of features]) on section-centred rows
    x = np.concatenate([section_centred(r, labels), f], axis=1)
    yc = section_centred(y, labels)
    cv = {}
    alphas = tuple(10.0 ** np.arange(0, 7))
    for g in np.unique(labels):
        fit = labels != g
        for alpha, pred in zip(alphas, _ridge_path(x[fit], yc[fit], x[~fit], alphas, 256), strict=True):
            cv.setdefault(alpha, []).append((yc[~fit], pred))
    scores = {alpha: inner_score(pairs, fold.genes) for alpha, pairs in cv.items()}
    alpha = max(scores, key=scores.get)
    tests_x = [np.concatenate([outer_r[t.name] - outer_r[t.name].mean(0), t.feats["spot"][:, : fold.views].mean(axis=1)], axis=1) for t in tests]
    (pred,) = _ridge_path(x, yc, np.concatenate(tests_x), [alpha], 256)
    split = np.split(pred, np.cumsum([len(v) for v in tests_x])[:-1])
    return {t.name: s for t, s in zip(tests, split, strict=True)}, {"alpha": alpha, "inner": scores[alpha], "inner_default": raw_inner}


def depth_slopes(train: list) -> np.ndarray:
    """Per gene, the slope of expression on log depth within sections (pooled, section-centred)."""
    x = np.concatenate([np.log(s.depth) - np.log(s.depth).mean() for s in train])
    y = np.concatenate([s.expr - s.expr.mean(0) for s in train])
    return (x @ y) / (x @ x)


def pred_depth(fold: Fold, train: list, tests: list, seed: int = 0, heads_on: str = "expr") -> dict:
    """Relative expression and depth apart, then recombined: references' profiles with their
    within-section log-depth effect removed (per-gene slope), retrieved as usual; each query spot's
    relative log depth predicted from its image (ridge probe, inner CV); prediction = retrieved
    relative profile + slope × predicted relative log depth."""
    slope = depth_slopes(train)
    for s in train:
        s.extra_relative = (s.expr - np.outer(np.log(s.depth) - np.log(s.depth).mean(), slope)).astype(np.float32)
    model = fit_heads(fold, train, seed=seed, targets=heads_on)
    values = np.concatenate([s.extra_relative for s in train])
    x = np.concatenate([s.feats["spot"][:, : fold.views].mean(axis=1) for s in train])
    d = np.concatenate([np.log(s.depth) - np.log(s.depth).mean() for s in train])[:, None]
    groups = np.repeat([s.name for s in train], [s.n for s in train]) if len(train) > 1 else spatial_blocks(train[0].xy_um)
    out = {}
    for t in tests:
        d_hat, _ = ridge_cv(x, d, t.feats["spot"][:, : fold.views].mean(axis=1), groups)
        out[t.name] = retrieve(fold, model, train, t, values=values) + d_hat * slope[None, :].astype(np.float32)
    return out


# =============================================================================================
# Running
# =============================================================================================
def protocol_folds(protocol: str) -> list[tuple[list[str], list[str]]]:
    c = ["C2", "C3", "C4", "C5"]
    if protocol == "patients":
        return [(c, ["B4"]), (["B4"], c)]
    if protocol == "c_loo":
        return [([x for x in c if x != h], [h]) for h in c]
    if protocol == "mixed":
        return [(["B4", *[x for x in c if x != h]], [h]) for h in c]
    raise ValueError(protocol)


def make_fold(sections: dict, train_names, test_names, panel: Path) -> Fold:
    train_refs = [sections[n].ref for n in train_names]
    tests = [sections[n] for n in test_names]
    measured = set.intersection(*(set(map(str, t.ref.var_names)) for t in tests))
    cfg = model_config(train_refs, default_options(panel), genes_among=[g for g in map(str, tests[0].ref.var_names) if g in measured])
    genes = list(cfg.genes)
    for s in sections.values():
        s.expr = s.ref.normalized(genes)
    return Fold(cfg=cfg, genes=genes, train=[sections[n] for n in train_names], tests=tests, views=max(cfg.views, 1))


VARIANTS = {
    "default": lambda fold, seed: (pred_default(fold, fold.train, fold.tests, seed=seed), {}),
    "ridge-probe": lambda fold, seed: (pred_ridge(fold, fold.train, fold.tests), {}),
    "correct-stack": lambda fold, seed: pred_correct(fold, fold.train, fold.tests, seed=seed, mode="stack"),
    "correct-ridge": lambda fold, seed: pred_correct(fold, fold.train, fold.tests, seed=seed, mode="ridge"),
    "correct-blend": lambda fold, seed: pred_correct(fold, fold.train, fold.tests, seed=seed, mode="blend"),
    "correct-residual": lambda fold, seed: pred_correct(fold, fold.train, fold.tests, seed=seed, mode="residual"),
    "depth": lambda fold, seed: (pred_depth(fold, fold.train, fold.tests, seed=seed), {}),
    "depth-heads": lambda fold, seed: (pred_depth(fold, fold.train, fold.tests, seed=seed, heads_on="relative"), {}),
    "context": lambda fold, seed: (pred_default(fold, fold.train, fold.tests, seed=seed, kind="context"), {}),
    "neighbours": lambda fold, seed: (pred_default(fold, fold.train, fold.tests, seed=seed, kind="neighbours"), {}),
    "context-ridge": lambda fold, seed: (pred_ridge(fold, fold.train, fold.tests, kind="context"), {}),
    "hed": lambda fold, seed: (pred_default(fold, fold.train, fold.tests, seed=seed, hed=True), {}),
}

#: variants chosen by inner validation against the default recipe (the rest are reported forced)
NESTED = {"depth", "depth-heads", "context", "neighbours", "hed"}


def nested_choice(fold: Fold, variant: str, seed: int) -> dict:
    """Inner score of ``variant`` and of the default on the same inner groups (training only)."""
    out = {}
    for name in ("default", variant):
        key = (name, tuple(s.name for s in fold.train), seed)
        if key in _INNER:  # the default's inner score is the same for every variant of a fold
            out[name] = _INNER[key]
            continue
        pairs = []
        for inner_train, held in inner_groups(fold.train):
            inner_fold = Fold(fold.cfg, fold.genes, inner_train, [held], fold.views)
            preds, _ = VARIANTS[name](inner_fold, seed)
            pairs.append((held.expr, preds[held.name]))
        out[name] = _INNER[key] = inner_score(pairs, fold.genes)
    return out


_INNER: dict = {}


def run(args) -> None:
    sections = load_sections(args)
    results = []
    for protocol in args.protocols.split(","):
        for train_names, test_names in protocol_folds(protocol):
            fold = make_fold(sections, train_names, test_names, args.panel)
            for seed in [int(s) for s in args.seeds.split(",")]:
                for variant in args.variants.split(","):
                    started = time.perf_counter()
                    preds, info = VARIANTS[variant](fold, seed)
                    seconds = time.perf_counter() - started
                    if args.nested and variant in NESTED:
                        info["inner"] = nested_choice(fold, variant, seed)
                    for t in fold.tests:
                        s = score(t.expr, preds[t.name], gene_sets(t.expr, fold.genes, []))
                        row = {"protocol": protocol, "train": "+".join(train_names), "test": t.name, "variant": variant, "seed": seed,
                               "HEG-50": s["HEG-50"], "HVG-50": s["HVG-50"], "MSE": s["MSE"], "seconds": round(seconds, 1),
                               "peak_rss_mb": peak_rss_mb(), "info": info}  # fmt: skip
                        results.append(row)
                        log(
                            f"{protocol} {row['train']} → {t.name} {variant} s{seed}: {s['HEG-50']:.3f} / {s['HVG-50']:.3f} ({seconds:.0f} s) {json.dumps(info, default=str)[:200]}"
                        )
                    with open(args.out, "w") as fh:
                        json.dump(results, fh, default=str)


def chosen(row: dict) -> bool | None:
    """Did inner validation (training sections only) pick the variant over the default recipe?"""
    info, margin = row["info"], 1e-4  # a tie (e.g. a correction weight of 0) is no choice
    if isinstance(info.get("inner"), dict):
        return info["inner"][row["variant"]] > info["inner"]["default"] + margin
    if "inner_default" in info:
        return info["inner"] > info["inner_default"] + margin
    return None


def table(args) -> None:
    """Markdown: per variant, HEG-50 / HVG-50 forced and as nested validation would have it."""
    rows = []
    for path in args.results:
        rows += json.load(open(path))
    default = {(r["protocol"], r["train"], r["test"], r["seed"]): r for r in rows if r["variant"] == "default"}
    cols = [("C→B4", lambda r: r["protocol"] == "patients" and r["test"] == "B4"), ("B→C (4)", lambda r: r["protocol"] == "patients" and r["train"] == "B4"),
            ("within C (4)", lambda r: r["protocol"] == "c_loo"), ("mixed (4)", lambda r: r["protocol"] == "mixed")]  # fmt: skip
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    print(
        "| variant | "
        + " | ".join(c for c, _ in cols)
        + " | chosen inside training (held-out sections) | as chosen: C→B4 | as chosen: B→C | s per fold | peak RSS MB |"
    )
    print("|---|" + "---|" * (len(cols) + 5))
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]
        cells = []
        for _, keep in cols:
            sel = [r for r in mine if keep(r)]
            cells.append(f"{np.mean([r['HEG-50'] for r in sel]):.3f} / {np.mean([r['HVG-50'] for r in sel]):.3f}" if sel else "–")
        picks = [chosen(r) for r in mine]
        picked = "–" if all(p is None for p in picks) else f"{sum(bool(p) for p in picks)}/{sum(p is not None for p in picks)}"
        nested = []
        for keep in (cols[0][1], cols[1][1]):
            sel = [r for r in mine if keep(r)]
            if not sel or chosen(sel[0]) is None:
                nested.append("–")
                continue
            use = [r if chosen(r) else default[(r["protocol"], r["train"], r["test"], r["seed"])] for r in sel]
            nested.append(f"{np.mean([r['HEG-50'] for r in use]):.3f} / {np.mean([r['HVG-50'] for r in use]):.3f}")
        secs = np.mean([r["seconds"] for r in mine])
        print(f"| {v} | " + " | ".join(cells) + f" | {picked} | {nested[0]} | {nested[1]} | {secs:.0f} | {max(r['peak_rss_mb'] for r in mine):.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["features", "run", "table"])
    parser.add_argument("results", nargs="*", type=Path, help="table: results files of runs")
    parser.add_argument("--h5ad", type=Path, default=Path("/tmp/h21-eval/h5ad"))
    parser.add_argument("--panel", type=Path, default=HERE.parent.parent / "shared" / "data" / "her2st" / "gene_panel_785.txt")
    parser.add_argument("--work", type=Path, default=Path("/tmp/h21-explore"))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/h21-eval/features"))
    parser.add_argument("--protocols", default="patients")
    parser.add_argument("--variants", default="default,ridge-probe")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--nested", action="store_true", help="also score each variant against the default inside the training sections")
    parser.add_argument("--out", type=Path, default=Path("/tmp/h21-explore/results.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.what == "features":
        compute_features(args)
    elif args.what == "table":
        table(args)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        run(args)


if __name__ == "__main__":
    main()
