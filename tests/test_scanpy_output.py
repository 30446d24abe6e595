"""`query --out x.h5ad` works with `scanpy.pl.spatial` as it is (Space Ranger's `uns['spatial']`
layout: hires/lowres images cut from the slide, their scale factors, the diameter to draw)."""

from __future__ import annotations

import anndata
import numpy as np
import pytest

from histoindex.io import open_slide
from histoindex.store import Store

from .conftest import run


@pytest.fixture(scope="module")
def scanpy():
    sc = pytest.importorskip("scanpy", reason="scanpy is a test extra")
    import matplotlib

    matplotlib.use("Agg")
    return sc


@pytest.mark.parametrize("where", ["tiles", "spots"])
def test_scanpy_draws_the_predictions_over_the_slide(scanpy, store, sections, tmp_path, where):
    out = tmp_path / f"{where}.h5ad"
    extra = ["--spots", sections.heldout_h5ad] if where == "spots" else []
    run("query", sections.heldout_tif, "--tissue", "breast", *extra, "--out", out, "--db", store)
    adata = anndata.read_h5ad(out)
    (library,) = adata.uns["spatial"]
    entry = adata.uns["spatial"][library]
    slide = open_slide(sections.heldout_tif)
    for name, longest in (("hires", 2000), ("lowres", 600)):
        image = entry["images"][name]
        assert image.dtype == np.uint8 and max(image.shape[:2]) <= longest
        # the scale factor maps level-0 pixels onto the image
        assert entry["scalefactors"][f"tissue_{name}_scalef"] == pytest.approx(image.shape[1] / slide.width)
        np.testing.assert_allclose(image.shape[0] / entry["scalefactors"][f"tissue_{name}_scalef"], slide.height, rtol=0.02)
    cfg = Store(store).model().cfg
    diameter = entry["scalefactors"]["spot_diameter_fullres"]
    if where == "tiles":  # the grid's cell: its stride (the Visium references' 100 µm spot pitch), not the 110 µm window
        assert diameter == pytest.approx(adata.uns["histoindex"]["stride_um"] / slide.mpp) == pytest.approx(100.0 / slide.mpp)
    else:
        assert 0 < diameter < cfg.patch_um / slide.mpp

    gene = cfg.genes[0]
    picture = tmp_path / f"{where}.png"
    axes = scanpy.pl.spatial(adata, color=gene, img_key="hires", library_id=library, show=False)
    figure = axes[0].figure
    figure.savefig(picture, dpi=60)
    assert axes[0].images, "the slide image is drawn"
    assert picture.stat().st_size > 5_000
    # the spots land on the image: their scaled positions fall inside it
    hires, scale = entry["images"]["hires"], entry["scalefactors"]["tissue_hires_scalef"]
    scaled = adata.obsm["spatial"] * scale
    assert (scaled >= 0).all() and (scaled[:, 0] <= hires.shape[1]).all() and (scaled[:, 1] <= hires.shape[0]).all()
