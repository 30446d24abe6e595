"""The data model: spots with expression and positions, grids of tiles, search hits.

Readers turn files into these types and writers turn them back into files; nothing here does I/O
beyond what the types point to. Alignment (one row per spot in every per-spot array) is checked
when an object is built, so a bad reader fails at the file it read, not three stages later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import scipy.sparse as sp

from .errors import InputError

#: physical (capture) spot diameter per platform, micrometres: what pictures draw. The pixel size of
#: a reference comes from the spot pitch instead (:mod:`histoindex.io.pixelsize`).
SPOT_DIAMETER_UM = {"visium": 55.0, "st": 100.0}

NORMALISATION = "log1p_cp10k"  # per-spot total-count normalisation to 1e4, then log1p


@dataclass(frozen=True)
class ImageRef:
    """Where a spot set's H&E lives and how its coordinates map onto it.

    ``scale`` maps full-resolution pixel coordinates to this image's pixels (1.0 for the full
    resolution image, ``tissue_hires_scalef`` for a Space Ranger hires image). ``array`` holds an
    in-memory image (e.g. the hires image stored in an h5ad) when there is no file.
    """

    path: Path | None = None
    scale: float = 1.0
    array: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.path is None and self.array is None:
            raise InputError("an ImageRef needs a path or an array")


@dataclass(frozen=True)
class SpotSet:
    """Spots (obs) × genes (var) with positions on one H&E image.

    Attributes
    ----------
    name: dataset name.
    X: expression, n_obs × n_vars (dense or scipy sparse); raw counts when ``is_counts``, else
        already log-normalised values.
    obs_names, var_names: spot ids and gene symbols.
    xy: spot centres in full-resolution image pixels, n_obs × 2 (x, y).
    mpp: micrometres per full-resolution pixel.
    image: the H&E image the positions refer to.
    spot_diameter_px: ``spot_diameter_fullres`` in full-resolution pixels, if known.
    mpp_source: where ``mpp`` came from (``--mpp``, image metadata, spot pitch, spot diameter).
    platform: the platform the spot layout was read as (``visium``, ``st``; see
        :mod:`histoindex.io.pixelsize`), if known.
    values_source: where ``X`` came from in the file (``X``, ``layers['counts']``, ``.raw``, ...).
    gene_aliases: a second name per gene, when the file has one (Space Ranger's Ensembl ids beside
        the symbols, or the symbols beside Ensembl-id var_names): a model's genes match either.
    """

    name: str
    X: np.ndarray | sp.spmatrix = field(repr=False)
    obs_names: np.ndarray = field(repr=False)
    var_names: np.ndarray = field(repr=False)
    xy: np.ndarray = field(repr=False)
    mpp: float
    image: ImageRef
    is_counts: bool
    spot_diameter_px: float | None = None
    source: str = ""
    mpp_source: str = ""
    values_source: str = "X"
    gene_aliases: np.ndarray | None = field(default=None, repr=False)
    platform: str | None = None

    def __post_init__(self) -> None:
        n_obs, n_vars = self.X.shape
        where = f" in {self.source}" if self.source else ""
        if len(self.obs_names) != n_obs:
            raise InputError(f"{len(self.obs_names)} spot ids for {n_obs} expression rows{where}")
        if len(self.var_names) != n_vars:
            raise InputError(f"{len(self.var_names)} gene names for {n_vars} expression columns{where}")
        if self.xy.shape != (n_obs, 2):
            raise InputError(f"spot positions have shape {self.xy.shape}, expected ({n_obs}, 2){where}")
        if not np.isfinite(self.xy).all():
            raise InputError(f"spot positions contain NaN or infinite values{where}")
        if not (np.isfinite(self.mpp) and self.mpp > 0):
            raise InputError(f"pixel size must be a positive number of micrometres, got {self.mpp}{where}")
        if len(set(self.obs_names)) != n_obs:
            raise InputError(f"spot ids repeat{where} (e.g. {', '.join(map(str, _repeated(self.obs_names)[:5]))}); make them unique first")
        if len(set(self.var_names)) != n_vars:
            raise InputError(f"gene names repeat{where} (e.g. {', '.join(map(str, _repeated(self.var_names)[:5]))}); make them unique first")
        if n_obs == 0:
            raise InputError(f"no spots{where}")
        if self.gene_aliases is not None and len(self.gene_aliases) != n_vars:
            raise InputError(f"{len(self.gene_aliases)} gene aliases for {n_vars} expression columns{where}")

    def gene_index(self) -> dict[str, int]:
        """Gene name → column: every var name, and every alias (Ensembl id or symbol) that names
        one column only and is not another column's var name."""
        index = {str(g): i for i, g in enumerate(self.var_names)}
        if self.gene_aliases is not None:
            aliases = [str(a) for a in self.gene_aliases]
            counts: dict[str, int] = {}
            for a in aliases:
                counts[a] = counts.get(a, 0) + 1
            for i, a in enumerate(aliases):
                if a and a not in index and counts[a] == 1:
                    index[a] = i
        return index

    @property
    def source_values(self) -> str:
        """What X holds: ``raw_counts`` (normalised on use) or ``log_normalised`` (used as is)."""
        return "raw_counts" if self.is_counts else "log_normalised"

    @property
    def n_obs(self) -> int:
        return self.X.shape[0]

    @property
    def n_vars(self) -> int:
        return self.X.shape[1]

    def normalized(self, genes: list[str] | None = None) -> np.ndarray:
        """Expression as float32 log1p(counts per 1e4) (or as stored if already normalised),
        restricted to ``genes`` in that order (genes absent here are an error)."""
        import scipy.sparse as sp  # on use: importing histoindex stays fast

        X = self.X
        if self.is_counts:
            totals = np.asarray(X.sum(axis=1)).ravel().astype(np.float64)
            totals[totals == 0] = 1.0
            X = sp.diags(1e4 / totals) @ X if sp.issparse(X) else X * (1e4 / totals)[:, None]
        if genes is not None:
            index = self.gene_index()
            check_genes_present(genes, index, where=self.source or self.name, aliases=self.gene_aliases)
            X = X[:, [index[g] for g in genes]]
        X = X.toarray() if sp.issparse(X) else np.asarray(X)
        X = X.astype(np.float32)
        return np.log1p(X) if self.is_counts else X

    def profiles(self):
        """Every gene's expression as :meth:`normalized` computes it (the same float32 numbers),
        as a scipy CSR matrix holding only the non-zero values: a reference's imputation panel."""
        import scipy.sparse as sp

        X = self.X
        if self.is_counts:
            totals = np.asarray(X.sum(axis=1)).ravel().astype(np.float64)
            totals[totals == 0] = 1.0
            X = sp.diags(1e4 / totals) @ X if sp.issparse(X) else X * (1e4 / totals)[:, None]
        X = sp.csr_matrix(X).astype(np.float32)
        if self.is_counts:
            X.data = np.log1p(X.data)
        X.eliminate_zeros()
        return X


def _repeated(names) -> list[str]:
    seen: set[str] = set()
    return list(dict.fromkeys(str(n) for n in names if n in seen or seen.add(n)))


def gene_naming(names) -> str:
    """What a list of gene names looks like: ``Ensembl ids`` or ``symbols`` (by the majority)."""
    names = [str(n) for n in names]
    ensembl = sum(1 for n in names if n.startswith("ENS") and any(c.isdigit() for c in n[3:8]))
    return "Ensembl ids" if names and ensembl * 2 > len(names) else "symbols"


def check_genes_present(genes, available, *, where: str, aliases=None) -> None:
    """Every one of a model's ``genes`` must be among ``available`` (names, and aliases: Ensembl ids
    or symbols): a reference spot's expression embedding (the key it is found by) and the profile
    averaged into predictions both use all of them, so a missing gene can be neither zero-filled
    (that would pull neighbours' averages and the embedding towards zero) nor skipped. The error
    names the missing genes; when none matches, it says how the model and the file name genes
    (``aliases``: the file's second names, if it has any) and what to do."""
    missing = [g for g in genes if g not in available]
    if not missing:
        return
    shown = ", ".join(missing[:10]) + (f", … ({len(missing)} in all)" if len(missing) > 10 else "")
    if len(missing) == len(genes):
        theirs = list(map(str, available))[:4]
        second = " (and no second gene-name column, such as var['gene_ids'] or var['gene_symbols'])" if aliases is None else ""
        raise InputError(
            f"none of the model's {len(genes)} genes is in {where}: the model uses {gene_naming(genes)} (e.g. {', '.join(map(str, genes[:4]))}); "
            f"the file uses {gene_naming(theirs)} (e.g. {', '.join(theirs)}){second}. Either ingest it into a new store, which trains "
            "a model on its own genes (--db NEW.db), or embed it with a model whose genes it has (--model ID; `histoindex info` lists the models)"
        )
    raise InputError(
        f"{where} lacks {len(missing)} of the model's {len(genes)} genes ({shown}); every reference spot needs all of them "
        "(they make its expression embedding and the profile averaged into predictions). Ingest it under a model trained on "
        "genes it has (histoindex train --genes FILE, then ingest --model ID)"
    )


#: the least fraction of a model's genes a reference must measure to be embedded: below it the
#: zero-filled expression embedding (the key a spot is found by) stands for too little of the spot
MIN_PANEL_OVERLAP = 0.5
#: platforms that measure the whole transcriptome: a gene left out of their matrix (a filtered
#: matrix drops genes with no counts) is a measured zero; any other platform (xenium, cosmx,
#: merscope, ...) is a targeted panel, where a gene it lacks was not measured
WHOLE_TRANSCRIPTOME = ("visium", "visium-hd", "st", "slide-seq", "stereo-seq", "synthetic")


def is_whole_transcriptome(platform: str | None) -> bool:
    return str(platform or "").strip().lower().replace(" ", "-").replace("_", "-") in WHOLE_TRANSCRIPTOME


def check_panel_overlap(genes, available, *, where: str, aliases=None) -> list[str]:
    """The model's ``genes`` that ``available`` lacks, when it has at least
    :data:`MIN_PANEL_OVERLAP` of them; below that an error naming the missing genes."""
    missing = [g for g in genes if g not in available]
    if len(genes) - len(missing) >= MIN_PANEL_OVERLAP * len(genes):
        return missing
    if len(missing) == len(genes):
        check_genes_present(genes, available, where=where, aliases=aliases)  # says how each side names genes
    shown = ", ".join(missing[:10]) + (f", … ({len(missing)} in all)" if len(missing) > 10 else "")
    raise InputError(
        f"{where} lacks {len(missing)} of the model's {len(genes)} genes ({shown}): a reference must measure at least "
        f"{MIN_PANEL_OVERLAP:.0%} of them, or its expression embedding (the key its spots are found by) stands for too little of it. "
        "Ingest it under a model trained on genes it has (histoindex train --genes FILE, then ingest --model ID)"
    )


#: the fewest image pixels a patch may span: below this a patch is upsampled noise
MIN_PATCH_PX = 8


def check_patch_pixels(patch_um: float, mpp: float, *, scale: float = 1.0, where: str) -> None:
    """A ``patch_um`` patch must span at least :data:`MIN_PATCH_PX` pixels of the image it is cut from
    (``mpp`` µm per level-0 pixel, ``scale`` image pixels per level-0 pixel)."""
    side = patch_um / mpp * scale
    if not side >= MIN_PATCH_PX:
        raise InputError(
            f"{where}: the model's {patch_um:g} µm patch spans only {side:.3g} px of the image ({mpp / scale:.3g} µm/px); "
            f"at least {MIN_PATCH_PX} px are needed: the image is too coarse for this model, or its pixel size (--mpp) is wrong"
        )


@dataclass(frozen=True)
class PatchGrid:
    """Positions at which to cut patches from a slide: ids and centres in level-0 pixels."""

    ids: np.ndarray
    xy: np.ndarray
    mpp: float

    def __post_init__(self) -> None:
        if self.xy.shape != (len(self.ids), 2):
            raise InputError(f"grid positions have shape {self.xy.shape}, expected ({len(self.ids)}, 2)")

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Hits:
    """Top-k neighbours per query: row positions into a reference block, and cosine similarities."""

    indices: np.ndarray  # n_query × k, int64 positions into the reference arrays
    similarities: np.ndarray  # n_query × k, float32
    spots_version: int

    @property
    def k(self) -> int:
        return self.indices.shape[1]


@dataclass(frozen=True)
class DatasetStats:
    """Per-dataset gene means and sds (population) of the references searched, and the pooled ones
    over all their rows: what "z" imputation maps profiles into and back out of."""

    mean: np.ndarray  # (datasets, genes)
    sd: np.ndarray  # (datasets, genes)
    pooled_mean: np.ndarray  # (genes,)
    pooled_sd: np.ndarray  # (genes,)

    @classmethod
    def from_sums(cls, count: np.ndarray, total: np.ndarray, squares: np.ndarray) -> DatasetStats:
        """From per-dataset row counts (d,) or (d, genes) (the rows that measured each gene), sums
        (d, genes) and sums of squares (d, genes). A gene a dataset did not measure (count 0) has a
        NaN mean and sd there; the pooled ones are over the rows that measured it."""
        count = np.asarray(count, np.float64)
        count = count[:, None] if count.ndim == 1 else count
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = total / count
            var = np.maximum(squares / count - mean**2, 0.0)
            pooled = count.sum(axis=0)
            pooled_mean = total.sum(axis=0) / pooled
            pooled_var = np.maximum(squares.sum(axis=0) / pooled - pooled_mean**2, 0.0)
        return cls(mean, np.sqrt(var), pooled_mean, np.sqrt(pooled_var))

    @classmethod
    def of(cls, values: np.ndarray, codes: np.ndarray) -> DatasetStats:
        """Of in-memory profiles ``values`` (NaN: not measured) whose rows belong to datasets
        ``codes`` (0..d-1)."""
        d = int(codes.max()) + 1 if len(codes) else 0
        values = np.asarray(values, np.float64)
        measured = ~np.isnan(values)
        if measured.all():
            count = np.bincount(codes, minlength=d)
        else:
            count = np.zeros((d, values.shape[1]))
            np.add.at(count, codes, measured)
            values = np.where(measured, values, 0.0)
        total = np.zeros((d, values.shape[1]))
        squares = np.zeros_like(total)
        np.add.at(total, codes, values)
        np.add.at(squares, codes, values**2)
        return cls.from_sums(count, total, squares)

    def to_z(self, values: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Profiles as z-scores of their dataset's gene means and sds; NaN (not measured) stays NaN."""
        sd = self.sd[codes]
        with np.errstate(invalid="ignore"):
            z = np.where(sd > 0, (values - self.mean[codes]) / np.where(sd > 0, sd, 1.0), 0.0)
        return np.where(np.isnan(values), np.nan, z).astype(np.float32)

    def from_z(self, z: np.ndarray) -> np.ndarray:
        """Back to the references' scale; clipped at 0, where log1p expression ends."""
        return np.maximum(z * self.pooled_sd + self.pooled_mean, 0.0).astype(np.float32)
