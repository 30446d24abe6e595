"""A synthetic H&E-like section whose spot expression is caused by its morphology.

Four tissue "cell types" (tumour, stroma, immune, adipose) each have their own look (background
stain, nucleus size, density and darkness) and their own gene programme. A section mixes them in
smooth regions; at each spot the expression is drawn from the programmes weighted by the fraction
of the spot covered by each type, plus a per-spot library size and Poisson noise. Programmes are
fixed by ``programme_seed`` and shared by every section; layout and noise come from ``seed``, so
sections with different seeds are independent held-out data for the same biology.

Pixels are rendered from haematoxylin and eosin amounts through the Beer–Lambert law (Ruifrok and
Johnston's stain optical densities), as light through a stained section, so that stain
normalisation (Macenko) treats the image as it treats real H&E.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from .data import ImageRef, SpotSet

CELL_TYPES = ("tumour", "stroma", "immune", "adipose")
# per type: background (H, E) and nucleus (H, E) stain amounts (optical density along the unit stain
# vectors), nuclei per 1000 µm², nucleus radius µm
_LOOK = {
    "tumour": ((0.31, 0.26), (1.95, 0.76), 9.0, 4.5),
    "stroma": ((0.22, 0.40), (1.33, 0.70), 2.5, 2.5),
    "immune": ((0.39, 0.27), (2.68, 0.64), 22.0, 2.5),
    "adipose": ((0.055, 0.041), (0.86, 0.45), 0.6, 3.0),
}
#: optical densities of haematoxylin and eosin per RGB channel (Ruifrok & Johnston 2001), unit length
_STAINS = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]], np.float32)
_STAINS /= np.linalg.norm(_STAINS, axis=1, keepdims=True)
_GLASS = (0.08, 0.0)
_SIGNATURES = {
    "tumour": ["FASN", "KRT8", "KRT18", "ERBB2", "MUC1", "SCD", "EPCAM", "CDH1"],
    "stroma": ["COL1A1", "COL1A2", "COL3A1", "VIM", "MGP", "DCN", "LUM", "FN1"],
    "immune": ["CD74", "PTPRC", "IGKC", "CD3E", "MS4A1", "HLA-DRA", "LYZ", "CD52"],
    "adipose": ["ADIPOQ", "PLIN1", "FABP4", "LPL", "CIDEA", "LEP", "PPARG", "CFD"],
}
HOUSEKEEPING = ["ACTB", "GAPDH", "B2M", "RPLP0", "EEF1A1", "TPT1", "RPS27A", "UBC"]


@dataclass(frozen=True)
class SyntheticSection:
    image: np.ndarray  # RGB uint8
    spots: SpotSet  # raw counts; image path unset until written
    composition: np.ndarray  # n_obs × n_types, fraction of each spot covered by each type
    mpp: float


def gene_names(n_noise: int = 24) -> list[str]:
    genes = [g for t in CELL_TYPES for g in _SIGNATURES[t]] + HOUSEKEEPING
    return genes + [f"NOISE{i:02d}" for i in range(n_noise)]


def programmes(programme_seed: int = 7, n_noise: int = 24) -> np.ndarray:
    """types × genes expression rates (relative), fixed by ``programme_seed``."""
    rng = np.random.default_rng(programme_seed)
    genes = gene_names(n_noise)
    rates = rng.gamma(1.0, 0.5, size=(len(CELL_TYPES), len(genes)))  # background for every gene
    for t, cell_type in enumerate(CELL_TYPES):
        for g in _SIGNATURES[cell_type]:
            rates[t, genes.index(g)] += rng.uniform(15, 40)
    for g in HOUSEKEEPING:
        rates[:, genes.index(g)] = rng.uniform(40, 80)
    for i in range(n_noise):  # genes unrelated to morphology: same rate in every type
        rates[:, genes.index(f"NOISE{i:02d}")] = rng.uniform(2, 10)
    return rates


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Gaussian-smoothed white noise, standardised; computed small and upsampled for speed."""
    factor = max(1, int(sigma_px // 3))
    small = rng.standard_normal((shape[0] // factor + 2, shape[1] // factor + 2)).astype(np.float32)
    small = ndimage.gaussian_filter(small, sigma_px / factor, mode="wrap")
    small = (small - small.mean()) / (small.std() + 1e-9)
    return ndimage.zoom(small, factor, order=1)[: shape[0], : shape[1]]


def make_section(
    seed: int = 0,
    *,
    size_px: int = 3200,
    mpp: float = 1.0,
    spot_spacing_um: float = 100.0,
    spot_diameter_um: float = 55.0,
    programme_seed: int = 7,
    name: str | None = None,
    lattice: str = "hexagonal",
) -> SyntheticSection:
    """Render one section and its spots inside the tissue: a hexagonal Visium-like grid, or with
    ``lattice="square"`` a square one as legacy ST's (use ``spot_spacing_um=200``, ``spot_diameter_um=100``)."""
    if lattice not in ("hexagonal", "square"):
        raise ValueError(f"lattice must be hexagonal or square, got {lattice!r}")
    rng = np.random.default_rng(seed)
    shape = (size_px, size_px)
    region_sigma = 250.0 / mpp  # regions a few hundred µm across
    logits = np.stack([_smooth_field(rng, shape, region_sigma) for _ in CELL_TYPES]) * 2.5
    # fine-scale cell mixing: each pixel's type drawn from the local proportions
    fine = np.stack([_smooth_field(rng, shape, 6.0 / mpp) for _ in CELL_TYPES]) * 1.2
    labels = np.argmax(logits + fine, axis=0).astype(np.uint8)

    tissue = _smooth_field(rng, shape, 500.0 / mpp)
    yy, xx = np.mgrid[0:size_px, 0:size_px] / size_px - 0.5
    tissue = (tissue * 0.3 - (xx**2 + yy**2) * 4.5 + 0.6) > 0  # one irregular blob

    stain = np.zeros(shape + (2,), np.float32)  # haematoxylin and eosin amounts per pixel
    for t, cell_type in enumerate(CELL_TYPES):
        background, nucleus, density, radius = _LOOK[cell_type]
        mask = labels == t
        stain[mask] = background
        n_nuclei = rng.poisson(density * mask.sum() * mpp**2 / 1000.0)
        ys = rng.integers(0, size_px, n_nuclei)
        xs = rng.integers(0, size_px, n_nuclei)
        keep = mask[ys, xs]
        points = np.zeros(shape, np.float32)
        points[ys[keep], xs[keep]] = 1.0
        r_px = max(radius / mpp, 0.8)
        blob = ndimage.gaussian_filter(points, r_px / 1.5) * (2 * np.pi * (r_px / 1.5) ** 2)
        alpha = np.clip(blob * 1.6, 0, 1)[..., None] * mask[..., None]
        stain = stain * (1 - alpha) + np.asarray(nucleus, np.float32) * alpha
    stain *= rng.lognormal(0, 0.08, shape + (2,)).astype(np.float32)  # uneven staining
    stain = np.where(tissue[..., None], stain, np.asarray(_GLASS, np.float32))
    image = 256.0 * np.exp(-(stain @ _STAINS)) - 1.0  # Beer-Lambert: transmitted light
    image += rng.normal(0, 2, image.shape).astype(np.float32)  # sensor noise
    image = np.clip(image, 0, 255).astype(np.uint8)

    # the spot grid, kept where the whole spot is on tissue
    step = spot_spacing_um / mpp
    square = lattice == "square"
    radius_px = spot_diameter_um / mpp / 2
    centres = []
    row = 0
    y = step
    while y < size_px - step:
        x = step + (step / 2 if row % 2 and not square else 0.0)
        while x < size_px - step:
            centres.append((x, y))
            x += step
        y += step if square else step * np.sqrt(3) / 2
        row += 1
    centres = np.asarray(centres)
    r = int(np.ceil(radius_px))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    disc = dx**2 + dy**2 <= radius_px**2
    compositions, kept = [], []
    for x, y in centres:
        xi, yi = int(round(x)), int(round(y))
        window = (slice(yi - r, yi + r + 1), slice(xi - r, xi + r + 1))
        if not tissue[window][disc].all():
            continue
        lab = labels[window][disc]
        compositions.append(np.bincount(lab, minlength=len(CELL_TYPES)) / lab.size)
        kept.append((x, y))
    composition = np.asarray(compositions)
    xy = np.asarray(kept, np.float64)

    rates = programmes(programme_seed)
    mix = composition @ rates
    mix /= mix.sum(axis=1, keepdims=True)
    library = rng.lognormal(np.log(3000), 0.35, size=len(xy))
    counts = rng.poisson(mix * library[:, None]).astype(np.float32)

    name = name or f"synthetic-{seed}"
    spots = SpotSet(
        name=name,
        X=counts,
        obs_names=np.asarray([f"{name}-spot{i:05d}" for i in range(len(xy))]),
        var_names=np.asarray(gene_names()),
        xy=xy,
        mpp=mpp,
        image=ImageRef(array=image),
        is_counts=True,
        # spot_diameter_fullres as Space Ranger defines it: a theoretical 65 µm Visium spot (not the 55 µm
        # capture area), so a reader's cross-check of pixel-size sources agrees; ST's is the spot itself
        spot_diameter_px=(65.0 if lattice == "hexagonal" else spot_diameter_um) / mpp,
        source=f"synthetic seed {seed}",
    )
    return SyntheticSection(image=image, spots=spots, composition=composition, mpp=mpp)


def write_section(section: SyntheticSection, directory: str | Path, *, name: str | None = None) -> tuple[Path, Path]:
    """Write the section as a pyramidal TIFF (a real slide file) and a Visium-layout h5ad that
    points to it. Returns (h5ad path, tiff path)."""
    from dataclasses import replace

    from .io.h5ad import write_h5ad
    from .io.slides import write_pyramidal_tiff

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = name or section.spots.name
    tiff = write_pyramidal_tiff(directory / f"{name}.tif", section.image, mpp=section.mpp)
    spots = replace(section.spots, image=ImageRef(path=tiff.resolve()), name=name)
    h5ad = write_h5ad(spots, directory / f"{name}.h5ad", library=name)
    return h5ad, tiff
