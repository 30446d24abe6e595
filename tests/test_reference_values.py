"""What a reference's expression values are, and its pixel size: raw counts are found wherever the
file keeps them, non-integer X is accepted only when it is log1p(CP10k), and the pixel size comes
from the spot pitch (Visium 100 µm, ST 200 µm), not from 55 µm / spot_diameter_fullres."""

from __future__ import annotations

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
from PIL import Image

from histoindex import api
from histoindex.errors import InputError
from histoindex.io.pixelsize import array_positions_um, reference_pixel_size


def _counts(n_obs=60, n_vars=40, seed=0):
    return np.random.default_rng(seed).poisson(5.0, (n_obs, n_vars)).astype(np.float32) + 1


def _log1p_cp10k(counts):
    return np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)


def visium_grid(n_rows=6, n_cols=10, *, px_per_um=1 / 0.73, angle=0.3, flip=False):
    """A Visium hexagonal array (even rows on even columns), scanned rotated (and flipped)."""
    rows, cols = [], []
    for r in range(n_rows):
        for c in range(r % 2, 2 * n_cols, 2):
            rows.append(r)
            cols.append(c)
    rows, cols = np.array(rows), np.array(cols)
    um = array_positions_um(rows, cols, "visium")
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    if flip:
        rot = rot @ np.diag([1, -1])
    xy = um @ rot.T * px_per_um + 500.0
    return rows, cols, xy


def write_reference(path, X, *, xy=None, layers=None, raw=None, obs=None, image=None):
    n_obs, n_vars = X.shape
    if xy is None:
        _, _, xy = visium_grid()
        xy = xy[:n_obs]
    adata = anndata.AnnData(X=X)
    adata.obs_names = [f"s{i}" for i in range(n_obs)]
    adata.var_names = [f"g{j}" for j in range(n_vars)]
    for key, value in (layers or {}).items():
        adata.layers[key] = value
    if raw is not None:
        adata.raw = raw
    for key, value in (obs or {}).items():
        adata.obs[key] = value
    adata.obsm["spatial"] = np.asarray(xy, np.float64)
    if image is None:
        image = path.parent / "he.jpg"
        Image.new("RGB", (1400, 1400), (200, 150, 190)).save(image)
    adata.uns["spatial"] = {"lib": {"scalefactors": {"spot_diameter_fullres": 89.0, "tissue_hires_scalef": 1.0}, "metadata": {"source_image_path": str(image)}}}
    adata.write_h5ad(path)
    return path


# ---- expression values ----------------------------------------------------------------------
def test_integer_x_is_counts(tmp_path):
    counts = _counts()
    ref = api.read_reference(write_reference(tmp_path / "a.h5ad", counts))
    assert ref.is_counts and ref.values_source == "X"
    np.testing.assert_allclose(ref.normalized(), _log1p_cp10k(counts), rtol=1e-5)


@pytest.mark.parametrize("where", ["layers", "raw"])
def test_raw_counts_beside_normalised_x_are_preferred(tmp_path, where):
    counts = _counts()
    X = _log1p_cp10k(counts)[:, :25]  # scanpy's usual file: HVG-subset, log-normalised X
    if where == "layers":
        path = write_reference(tmp_path / "a.h5ad", _log1p_cp10k(counts), layers={"counts": sp.csr_matrix(counts)})
        expected_source, n_vars = "layers['counts']", counts.shape[1]
    else:
        full = anndata.AnnData(X=sp.csr_matrix(counts))
        full.obs_names = [f"s{i}" for i in range(len(counts))]
        full.var_names = [f"g{j}" for j in range(counts.shape[1])]
        path = write_reference(tmp_path / "a.h5ad", X, raw=full)
        expected_source, n_vars = ".raw", counts.shape[1]
    ref = api.read_reference(path)
    assert ref.is_counts and ref.values_source == expected_source and ref.n_vars == n_vars
    np.testing.assert_allclose(ref.normalized(), _log1p_cp10k(counts), rtol=1e-5)


def test_log1p_cp10k_over_all_genes_is_accepted(tmp_path):
    X = _log1p_cp10k(_counts())
    ref = api.read_reference(write_reference(tmp_path / "a.h5ad", X))
    assert not ref.is_counts and ref.values_source == "X (log1p CP10k)"
    np.testing.assert_array_equal(ref.normalized(), X)


@pytest.mark.parametrize(
    "values, message",
    [
        (lambda c: (c / c.sum(1, keepdims=True) * 1e4).astype(np.float32), "counts per 10,000 without log1p"),
        (lambda c: np.log1p(c / c.sum(1, keepdims=True) * 1e6).astype(np.float32), "log1p of counts per million"),
        (lambda c: _log1p_cp10k(c)[:, :20], r"not log1p\(counts per 10,000\) over all genes"),
        (lambda c: ((_log1p_cp10k(c) - 1.0) / 2.0).clip(0, None), r"not log1p\(counts per 10,000\) over all genes"),
    ],
    ids=["cp10k-no-log", "log1p-cpm", "hvg-subset", "scaled"],
)
def test_other_normalisations_are_refused_with_the_layer_to_use(tmp_path, values, message):
    path = write_reference(tmp_path / "a.h5ad", values(_counts()))
    with pytest.raises(InputError, match=message) as info:
        api.read_reference(path)
    assert str(path) in str(info.value)
    assert "layers['counts']" in str(info.value) and "--log-normalised" in str(info.value)


def test_a_gene_subset_is_accepted_when_the_user_asserts_it(tmp_path):
    X = _log1p_cp10k(_counts())[:, :20]
    ref = api.read_reference(write_reference(tmp_path / "a.h5ad", X), log_normalised=True)
    assert not ref.is_counts and "--log-normalised" in ref.values_source
    np.testing.assert_array_equal(ref.normalized(), X)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0])
def test_nan_infinite_or_negative_values_are_errors(tmp_path, bad):
    X = _counts()
    X[3, 4] = bad
    path = write_reference(tmp_path / "a.h5ad", X)
    with pytest.raises(InputError, match="NaN or infinite|negative") as info:
        api.read_reference(path)
    assert str(path) in str(info.value)


# ---- pixel size -------------------------------------------------------------------------------
@pytest.mark.parametrize("angle, flip", [(0.0, False), (0.3, False), (-1.2, True)])
def test_visium_pixel_size_from_array_coordinates_rotated_or_flipped(tmp_path, angle, flip):
    rows, cols, xy = visium_grid(px_per_um=1 / 0.73, angle=angle, flip=flip)
    counts = _counts(n_obs=len(rows))
    path = write_reference(tmp_path / "a.h5ad", counts, xy=xy, obs={"array_row": rows, "array_col": cols})
    ref = api.read_reference(path, platform="visium")
    assert ref.mpp == pytest.approx(0.73, rel=1e-6)
    assert ref.mpp_source == "visium spot pitch 100 µm (array coordinates)"


def test_visium_pixel_size_from_spacing_without_array_coordinates(tmp_path):
    rows, cols, xy = visium_grid(px_per_um=1 / 0.73, angle=0.5)
    keep = np.random.default_rng(1).random(len(rows)) > 0.2  # some spots off tissue
    path = write_reference(tmp_path / "a.h5ad", _counts(n_obs=int(keep.sum())), xy=xy[keep])
    ref = api.read_reference(path, platform="visium")
    assert ref.mpp == pytest.approx(0.73, rel=1e-6)
    assert ref.mpp_source == "visium spot pitch 100 µm (nearest-neighbour spacing)"
    assert ref.mpp != pytest.approx(55.0 / 89.0, rel=0.05), "not 55 µm / spot_diameter_fullres"


def test_pixel_size_sources_in_order(tmp_path):
    _, _, xy = visium_grid(px_per_um=2.0)
    common = dict(image_path=None, image_scale=1.0, xy_px=xy, where="x", spot_diameter_px=130.0)
    assert reference_pixel_size(mpp=0.25, platform="visium", **common).source == "--mpp"
    assert reference_pixel_size(mpp=None, platform="visium", **common).mpp == pytest.approx(0.5)
    lone = dict(common, xy_px=xy[:2])  # too few spots to measure spacing: 65 µm / diameter
    size = reference_pixel_size(mpp=None, platform="visium", **lone)
    assert size.mpp == pytest.approx(65.0 / 130.0) and "65 µm" in size.source
    with pytest.raises(InputError, match="pass --mpp"):
        reference_pixel_size(mpp=None, platform="xenium", **common)


def test_models_record_where_each_pixel_size_came_from(tmp_path):
    """The model's metrics say, per training dataset, which source gave its pixel size."""
    rows, cols, xy = visium_grid(n_rows=8, n_cols=8, px_per_um=1 / 0.73)
    image = tmp_path / "he.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(60, 230, (1400, 1400, 3), dtype=np.uint8)).save(image)
    path = write_reference(tmp_path / "a.h5ad", _counts(n_obs=len(rows)), xy=xy, obs={"array_row": rows, "array_col": cols}, image=image)
    ref = api.read_reference(path, platform="visium")
    options = api.TrainOptions(backbone="resnet10t", weights="", patch_um=60, patch_px=16, epochs=1, n_genes=10, batch_size=16, freeze_backbone=False, views=1)
    result = api.train([ref], db=tmp_path / "db", options=options)
    recorded = result.metrics["datasets"]["a"]
    assert recorded["mpp"] == pytest.approx(0.73) and recorded["mpp_source"] == "visium spot pitch 100 µm (array coordinates)"
