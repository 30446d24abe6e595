"""Small pure functions: schemas, metrics, gene selection, the loss, Otsu, the registry."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from histoindex import schemas
from histoindex.data import ImageRef, SpotSet
from histoindex.errors import InputError, SchemaMismatch, UnknownModel
from histoindex.genes import highly_variable_genes
from histoindex.metrics import pearson_per_gene
from histoindex.models import ModelConfig, create_model, list_models
from histoindex.models.bleep import bleep_loss
from histoindex.patch import otsu_threshold, tissue_mask


def test_layouts_come_from_the_schema_files():
    spots = schemas.schema("spots")
    assert spots.field("image_embedding").type == pa.list_(pa.float32(), 256)
    assert spots.field("expression").type == pa.list_(pa.float32())
    assert schemas.embedding_dim() == 256
    assert spots.metadata[b"histoindex.schema_version"] == b"1"
    assert set(schemas.layout("spots").key) == {"dataset", "spot_id"}
    with pytest.raises(SchemaMismatch, match="lack column"):
        schemas.conform("models", pa.table({"model_id": ["x"]}))


def test_pearson_constant_prediction_scores_zero_not_nan():
    truth = np.random.default_rng(0).normal(size=(50, 3))
    r = pearson_per_gene(truth, np.ones((50, 3)))
    assert np.array_equal(r, np.zeros(3))
    assert np.allclose(pearson_per_gene(truth, 2 * truth + 1), 1.0)


def _spots(X, genes):
    n = X.shape[0]
    return SpotSet(name="t", X=X, obs_names=np.array([f"s{i}" for i in range(n)]), var_names=np.array(genes),
                   xy=np.zeros((n, 2)), mpp=1.0, image=ImageRef(array=np.zeros((4, 4, 3), np.uint8)), is_counts=True)


def test_hvg_picks_the_overdispersed_genes():
    rng = np.random.default_rng(0)
    means = rng.uniform(1, 50, size=400)
    X = rng.poisson(means, size=(500, 400)).astype(np.float32)
    noisy = [11, 222, 333]  # same mean, far more variance (on in half the spots, off in the rest)
    for g in noisy:
        means[g] = 25.0
        X[:, g] = rng.poisson(means[g] * rng.choice([0.0, 2.0], size=500))
    genes = [f"G{i}" for i in range(400)]
    assert set(highly_variable_genes([_spots(X, genes)], 3)) == {f"G{g}" for g in noisy}


def test_spotset_checks_alignment():
    with pytest.raises(InputError, match="spot positions have shape"):
        SpotSet(name="t", X=np.zeros((3, 2)), obs_names=np.array(["a", "b", "c"]), var_names=np.array(["g", "h"]),
                xy=np.zeros((2, 2)), mpp=1.0, image=ImageRef(array=np.zeros((4, 4, 3), np.uint8)), is_counts=True)


def test_normalisation_is_log1p_cp10k():
    X = np.array([[1, 3], [0, 0]], np.float32)
    out = _spots(X, ["a", "b"]).normalized(["b", "a"])
    np.testing.assert_allclose(out[0], np.log1p([7500.0, 2500.0]), rtol=1e-6)
    np.testing.assert_allclose(out[1], [0.0, 0.0])
    with pytest.raises(InputError, match="missing"):
        _spots(X, ["a", "b"]).normalized(["c"])


def test_bleep_loss_prefers_aligned_pairs():
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(16, 32), dim=-1) * 4
    aligned = bleep_loss(x, x)
    shuffled = bleep_loss(x, x[torch.randperm(16)])
    assert aligned < shuffled


def test_projection_head_and_model_shapes():
    cfg = ModelConfig(backbone="test_resnet", patch_px=32, genes=("a", "b", "c"))
    model = create_model(cfg).eval()
    img = model.encode_image(torch.zeros(2, 32, 32, 3, dtype=torch.uint8))
    expr = model.encode_expression(torch.zeros(2, 3))
    assert img.shape == expr.shape == (2, 256)
    assert "bleep" in list_models()
    with pytest.raises(UnknownModel):
        create_model(cfg.replace(method="nope"))


def test_otsu_separates_tissue_from_glass():
    rng = np.random.default_rng(0)
    img = np.full((100, 100, 3), 242, np.uint8)
    img[20:60, 30:80] = np.array([200, 120, 180]) + rng.integers(-10, 10, (40, 50, 3))
    mask = tissue_mask(img)
    assert mask[20:60, 30:80].mean() > 0.99 and mask[:20].mean() == 0
    assert 0 < otsu_threshold(np.array([10] * 50 + [200] * 50)) < 200
