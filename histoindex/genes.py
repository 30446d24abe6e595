"""Choosing the gene panel: a user list, or highly variable genes over the training references."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .data import SpotSet
from .errors import InputError


def read_gene_list(path: str | Path) -> list[str]:
    """One gene symbol per line; blank lines and ``#`` comments ignored; duplicates are an error."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"gene list not found: {path}")
    genes = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    genes = [g for g in genes if g]
    if not genes:
        raise InputError(f"gene list {path} is empty")
    dupes = sorted({g for g in genes if genes.count(g) > 1})
    if dupes:
        raise InputError(f"gene list {path} repeats {', '.join(dupes[:5])}")
    return genes


def shared_genes(references: Sequence[SpotSet]) -> list[str]:
    """Genes present in every reference, in the first reference's order."""
    common = set(references[0].var_names)
    for ref in references[1:]:
        common &= set(ref.var_names)
    return [g for g in references[0].var_names if g in common]


def check_genes(references: Sequence[SpotSet], genes: Sequence[str]) -> list[str]:
    available = set(shared_genes(references))
    missing = [g for g in genes if g not in available]
    if missing:
        raise InputError(
            f"{len(missing)} requested gene(s) are not in every reference (e.g. {', '.join(missing[:5])})"
        )
    return list(genes)


def highly_variable_genes(references: Sequence[SpotSet], n_genes: int, *, n_bins: int = 20) -> list[str]:
    """Top ``n_genes`` by normalised dispersion (Seurat flavour, as scanpy's default), computed on
    the log1p(CP10k) expression of the given references only."""
    genes = shared_genes(references)
    if not genes:
        raise InputError("the references share no genes")
    if n_genes <= 0:
        raise InputError(f"--n-genes must be positive, got {n_genes}")
    X = np.concatenate([ref.normalized(genes) for ref in references]).astype(np.float64)
    counts_scale = np.expm1(X)
    mean = counts_scale.mean(axis=0)
    var = counts_scale.var(axis=0, ddof=1) if len(X) > 1 else np.zeros_like(mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = np.log(np.where(mean > 0, var / np.where(mean > 0, mean, 1), np.nan))
    log_mean = np.log1p(mean)
    expressed = np.isfinite(dispersion)
    if expressed.sum() == 0:
        raise InputError("no gene is expressed in the references")
    # equal-width bins of mean expression, as scanpy's seurat flavour (pd.cut into n_bins)
    lo, hi = log_mean[expressed].min(), log_mean[expressed].max()
    bins = np.digitize(log_mean, np.linspace(lo, hi, n_bins + 1)[1:-1])
    score = np.full(len(genes), -np.inf)
    for b in np.unique(bins[expressed]):
        members = expressed & (bins == b)
        d = dispersion[members]
        sd = d.std(ddof=1) if members.sum() > 1 else 0.0
        # a gene alone in its bin has nothing to be compared with: scanpy scores it 1
        score[members] = (d - d.mean()) / sd if sd > 0 else 1.0
    order = np.argsort(-score, kind="stable")
    chosen = [genes[i] for i in order[: min(n_genes, int(expressed.sum()))]]
    return chosen
