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
        raise InputError(f"{len(missing)} requested gene(s) are not in every reference (e.g. {', '.join(missing[:5])})")
    return list(genes)


def highly_variable_genes(references: Sequence[SpotSet], n_genes: int, *, n_bins: int = 20, among: Sequence[str] | None = None) -> list[str]:
    """Highly variable genes as scanpy's default, ``sc.pp.highly_variable_genes(adata,
    flavor="seurat", n_top_genes=n_genes, n_bins=n_bins)`` on the log1p(CP10k) expression of the
    given references only (concatenated), reimplemented with numpy alone and step by step as
    scanpy 1.11 does it, so that the same genes come out:

    * per gene, the mean and variance of expm1 of the normalised values (computed in the matrix's
      float32, accumulated in float64, variance as E[x²] − E[x]² times n/(n − 1)); a zero mean is
      set to 1e-12; dispersion = variance / mean, 0 → NaN, then its log;
    * equal-width bins of log1p(mean) over ALL genes, unexpressed ones included (``pd.cut`` into
      ``n_bins``: the lowest edge lowered by 0.1% of the range, intervals closed on the right);
    * per bin, the mean and the sample standard deviation of the log-dispersions, NaN skipped; the
      normalised dispersion is (log-dispersion − bin mean) / bin std; where the std is undefined
      (a single gene with a dispersion in the bin) the gene scores log-dispersion / itself = 1;
    * the genes whose normalised dispersion is at least the ``n_genes``-th highest one (NaN never
      chosen), so that genes tied at the cut-off are all kept: the list may run longer than
      ``n_genes`` then, or shorter where fewer genes have a dispersion at all.

    ``among``: choose only from these genes (evaluation passes the held-out section's genes, so
    that every chosen gene can be scored there; only names are used, never its values).

    Returned highest normalised dispersion first, ties in the references' gene order."""
    genes = shared_genes(references)
    if among is not None:
        allowed = set(among)
        genes = [g for g in genes if g in allowed]
    if not genes:
        raise InputError("the references share no genes")
    if n_genes <= 0:
        raise InputError(f"--n-genes must be positive, got {n_genes}")
    # float32, as SpotSet.normalized gives it (and as an AnnData of it would hold it)
    X = np.concatenate([ref.normalized(genes) for ref in references])
    counts_scale = np.expm1(X)
    n = len(X)
    mean = counts_scale.mean(axis=0, dtype=np.float64)
    var = (counts_scale * counts_scale).mean(axis=0, dtype=np.float64) - mean**2
    if n != 1:
        var *= n / (n - 1)
    mean[mean == 0] = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = var / mean
        dispersion[dispersion == 0] = np.nan
        dispersion = np.log(dispersion)  # a (rounding-)negative variance gives NaN too
    log_mean = np.log1p(mean)
    if not np.isfinite(dispersion).any():
        raise InputError("no gene is expressed (with any variation) in the references")

    # pd.cut(log_mean, bins=n_bins): equal-width edges over the whole range, right-closed
    lo, hi = log_mean.min(), log_mean.max()
    if lo == hi:
        lo -= 0.001 * abs(lo) if lo != 0 else 0.001
        hi += 0.001 * abs(hi) if hi != 0 else 0.001
        edges = np.linspace(lo, hi, n_bins + 1)
    else:
        edges = np.linspace(lo, hi, n_bins + 1)
        edges[0] -= (hi - lo) * 0.001
    bins = np.searchsorted(edges, log_mean, side="left") - 1

    score = np.full(len(genes), np.nan)
    for b in np.unique(bins):
        members = bins == b
        d = dispersion[members]
        valid = d[~np.isnan(d)]
        avg = valid.mean() if len(valid) else np.nan
        dev = valid.std(ddof=1) if len(valid) > 1 else np.nan
        if np.isnan(dev):  # scanpy: a bin with one gene (or none) with a dispersion
            avg, dev = 0.0, avg
        with np.errstate(divide="ignore", invalid="ignore"):
            score[members] = (d - avg) / dev

    ranked = score[~np.isnan(score)]
    if not len(ranked):
        raise InputError("no gene has a normalised dispersion in the references")
    cutoff = np.sort(ranked)[::-1][min(n_genes, len(genes), len(ranked)) - 1]
    chosen = np.flatnonzero(np.nan_to_num(score, nan=-np.inf) >= cutoff)
    order = chosen[np.argsort(-score[chosen], kind="stable")]
    return [genes[i] for i in order]
