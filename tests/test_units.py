"""Small pure functions: schemas, metrics, gene selection, the loss, Otsu, the registry."""

from __future__ import annotations

import warnings
from fractions import Fraction
from pathlib import Path

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
from histoindex.models.bleep import bleep_loss, dihedral
from histoindex.patch import otsu_threshold, tissue_mask
from histoindex.train import augment as _augment


def test_layouts_come_from_the_schema_files():
    spots = schemas.schema("spots")
    assert spots.field("image_embedding").type == pa.list_(pa.float32(), 256)
    assert spots.field("expression").type == pa.list_(pa.float32())
    assert schemas.embedding_dim() == 256
    assert spots.metadata[b"histoindex.schema_version"] == b"3"
    # the key in column order (Lance matches concurrent inserts only in primary-key field order),
    # each key column marked as such for Lance
    assert schemas.layout("spots").key == ("spot_id", "dataset", "model_id")
    for name in spots.names:
        marked = (spots.field(name).metadata or {}).get(b"lance-schema:unenforced-primary-key") == b"true"
        assert marked == (name in {"spot_id", "dataset", "model_id"}), name
    with pytest.raises(SchemaMismatch, match="lack column"):
        schemas.conform("models", pa.table({"model_id": ["x"]}))


def test_pearson_constant_prediction_scores_zero_not_nan():
    truth = np.random.default_rng(0).normal(size=(50, 3))
    r = pearson_per_gene(truth, np.ones((50, 3)))
    assert np.array_equal(r, np.zeros(3))
    assert np.allclose(pearson_per_gene(truth, 2 * truth + 1), 1.0)


def _spots(X, genes):
    n = X.shape[0]
    return SpotSet(
        name="t",
        X=X,
        obs_names=np.array([f"s{i}" for i in range(n)]),
        var_names=np.array(genes),
        xy=np.zeros((n, 2)),
        mpp=1.0,
        image=ImageRef(array=np.zeros((4, 4, 3), np.uint8)),
        is_counts=True,
    )


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


HER2ST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "her2st"


def _scanpy_hvg(refs, n_top):
    """scanpy's own selection (flavor="seurat") on the matrix our function sees: the references'
    log1p(CP10k) expression, float32 as SpotSet.normalized gives it, concatenated."""
    sc = pytest.importorskip("scanpy")
    import anndata

    from histoindex.genes import shared_genes

    genes = shared_genes(refs)
    adata = anndata.AnnData(np.concatenate([r.normalized(genes) for r in refs]))
    adata.var_names = genes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=n_top, inplace=False)
    chosen = df[df["highly_variable"].to_numpy()]
    norm = chosen["dispersions_norm"].to_numpy()
    return list(np.asarray(genes)[df["highly_variable"].to_numpy()][np.argsort(-norm, kind="stable")])


def _check_hvg_like_scanpy(refs, n_top):
    want = _scanpy_hvg(refs, n_top)
    got = highly_variable_genes(refs, n_top)
    assert set(got) == set(want), f"n_top {n_top}: {len(set(got) ^ set(want))} genes differ from scanpy"
    assert got == want  # highest normalised dispersion first, ties in gene order


@pytest.mark.parametrize("n_top", [50, 256, 1000])
def test_hvg_matches_scanpy_on_sparse_counts(n_top):
    pytest.importorskip("scanpy")
    rng = np.random.default_rng(7)
    n_spots, n_genes = 300, 2000
    # negative binomial counts: means spread over four orders of magnitude, overdispersion varying
    means = np.exp(rng.uniform(np.log(0.002), np.log(40.0), n_genes))
    shape = rng.uniform(0.3, 5.0, n_genes)
    X = rng.negative_binomial(shape, shape / (shape + means), size=(n_spots, n_genes)).astype(np.float32)
    X[:, rng.choice(n_genes, 300, replace=False)] = 0  # genes never seen
    rare = rng.choice(n_genes, 200, replace=False)  # genes seen in one or two spots only
    X[:, rare] = 0
    X[rng.integers(0, n_spots, (2, 200)), rare] = rng.integers(1, 4, (2, 200))
    X[:, :50] += 30  # a few strongly expressed genes stretch the range of mean expression
    genes = [f"G{i}" for i in range(n_genes)]
    assert (X.sum(0) == 0).sum() >= 300 and ((X > 0).sum(0) <= 2).sum() >= 400
    _check_hvg_like_scanpy([_spots(X, genes)], n_top)


@pytest.mark.parametrize("n_top", [50, 256, 1000])
def test_hvg_matches_scanpy_on_her2st(n_top):
    pytest.importorskip("scanpy")
    if not HER2ST.exists():
        pytest.skip(f"no HER2ST data at {HER2ST}")
    from histoindex.io.st import read_st

    ref = read_st(HER2ST / "counts" / "C2.tsv.gz", spots=HER2ST / "spots" / "C2_selection.tsv", image=HER2ST / "images" / "C2.jpg")
    _check_hvg_like_scanpy([ref], n_top)


def test_spotset_checks_alignment():
    with pytest.raises(InputError, match="spot positions have shape"):
        SpotSet(
            name="t",
            X=np.zeros((3, 2)),
            obs_names=np.array(["a", "b", "c"]),
            var_names=np.array(["g", "h"]),
            xy=np.zeros((2, 2)),
            mpp=1.0,
            image=ImageRef(array=np.zeros((4, 4, 3), np.uint8)),
            is_counts=True,
        )


def test_normalisation_is_log1p_cp10k():
    X = np.array([[1, 3], [0, 0]], np.float32)
    out = _spots(X, ["a", "b"]).normalized(["b", "a"])
    np.testing.assert_allclose(out[0], np.log1p([7500.0, 2500.0]), rtol=1e-6)
    np.testing.assert_allclose(out[1], [0.0, 0.0])
    with pytest.raises(InputError, match=r"lacks 1 of the model.s 2 genes \(c\)"):  # some of the genes absent
        _spots(X, ["a", "b"]).normalized(["a", "c"])
    with pytest.raises(InputError, match="none of the model's 1 genes"):  # no overlap at all: says what each side uses
        _spots(X, ["a", "b"]).normalized(["c"])


def test_bleep_loss_prefers_aligned_pairs():
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(16, 32), dim=-1) * 4
    aligned = bleep_loss(x, x)
    shuffled = bleep_loss(x, x[torch.randperm(16)])
    assert aligned < shuffled


def _reference_bleep_loss(image_emb, spot_emb, temperature):
    """BLEEP's CLIPModel.forward (bowang-lab/BLEEP models.py), written out plainly."""
    logits = spot_emb @ image_emb.T / temperature
    images_similarity = image_emb @ image_emb.T
    spots_similarity = spot_emb @ spot_emb.T
    targets = torch.softmax(((images_similarity + spots_similarity) / 2) / temperature, dim=-1)

    def cross_entropy(preds, targets):
        return (-targets * torch.log_softmax(preds, dim=-1)).sum(1)

    spots_loss = cross_entropy(logits, targets)
    images_loss = cross_entropy(logits.T, targets.T)
    return ((images_loss + spots_loss) / 2.0).mean()


@pytest.mark.parametrize("temperature", [0.07, 1.0, 2.5])
def test_bleep_loss_matches_the_reference_formula(temperature):
    gen = torch.Generator().manual_seed(3)
    image = torch.randn(24, 16, generator=gen, dtype=torch.float64)
    spot = torch.randn(24, 16, generator=gen, dtype=torch.float64)
    want = _reference_bleep_loss(image, spot, temperature)
    got = bleep_loss(image, spot, temperature)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # unit-length embeddings as well (the similarities then lie in [-1, 1])
    image, spot = torch.nn.functional.normalize(image, dim=-1), torch.nn.functional.normalize(spot, dim=-1)
    torch.testing.assert_close(bleep_loss(image, spot, temperature), _reference_bleep_loss(image, spot, temperature), rtol=1e-6, atol=1e-6)


def _view_of(original, augmented):
    """The dihedral views of ``original`` equal to ``augmented``."""
    return [v for v in range(8) if torch.equal(dihedral(original[None], v)[0], augmented)]


def test_augment_draws_one_view_per_sample():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 6, 6, 3), generator=gen, dtype=torch.uint8)
    for i in range(len(images)):  # every image distinct from all its own other views
        assert len(_view_of(images[i], images[i])) == 1
    before = images.clone()
    out = _augment(images, torch.Generator().manual_seed(1))
    assert torch.equal(images, before) and out.shape == images.shape and out.is_contiguous()
    views = []
    for i in range(len(images)):
        matches = _view_of(images[i], out[i])
        assert len(matches) == 1, f"sample {i} is no dihedral view of its input"
        views.append(matches[0])
    assert len(set(views)) >= 5, views  # 32 draws from 8 views: not one view for the whole batch
    again = _augment(images, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)  # the same seed, the same views
    other = _augment(images, torch.Generator().manual_seed(2))
    assert not torch.equal(out, other)
    # given views are applied as given
    given = torch.arange(32) % 8
    out = _augment(images, views=given)
    assert [_view_of(images[i], out[i]) for i in range(32)] == [[int(v)] for v in given]


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


def _brute_force_otsu(values):
    """The threshold t (class 0: values <= t) maximising the between-class variance
    w0·w1·(μ0 − μ1)², in exact arithmetic, trying every t; the lowest t of a tie."""
    values = [int(v) for v in np.ravel(values)]
    best, best_t = Fraction(-1), None
    for t in range(256):
        low = [v for v in values if v <= t]
        high = [v for v in values if v > t]
        if not low or not high:
            continue
        mu0, mu1 = Fraction(sum(low), len(low)), Fraction(sum(high), len(high))
        between = Fraction(len(low) * len(high), len(values) ** 2) * (mu0 - mu1) ** 2
        if between > best:
            best, best_t = between, t
    return best_t


def test_otsu_threshold_values():
    # two grey levels: the two classes are split at the top of the lower one (as skimage's
    # threshold_otsu: class 0 is values <= t)
    assert otsu_threshold(np.array([10] * 50 + [200] * 50)) == 10
    # a bimodal image, grey levels 60 and 200 with noise: the threshold separates them exactly
    rng = np.random.default_rng(0)
    dark = np.clip(rng.normal(60, 8, 3000), 0, 255).astype(np.uint8)
    bright = np.clip(rng.normal(200, 8, 7000), 0, 255).astype(np.uint8)
    image = rng.permutation(np.concatenate([dark, bright])).reshape(100, 100)
    t = otsu_threshold(image)
    assert dark.max() <= t < bright.min()
    assert (image > t).sum() == len(bright) and (image <= t).sum() == len(dark)
    # small known histograms: exactly the brute-force optimum, on consecutive grey levels and on
    # levels with gaps between them (where the lowest threshold of the gap is taken)
    for counts in ([1, 3, 7, 12, 8, 3, 2, 6, 9, 4], [5, 1, 1, 1, 1, 1, 1, 1, 1, 20], [2, 9, 4, 1, 1, 3, 8, 8, 2, 7, 1, 1]):
        for levels in (np.arange(len(counts)) + 100, np.arange(len(counts)) * 7 + 3):
            values = np.repeat(levels, counts).astype(np.uint8)
            assert otsu_threshold(values) == _brute_force_otsu(values), (counts, levels)
    # worked by hand as the least within-class variance (the same criterion): t = 104 leaves 5.279
    # of the total variance between the classes, t = 105 5.377, t = 106 5.174
    assert otsu_threshold(np.repeat(np.arange(100, 110), [1, 3, 7, 12, 8, 3, 2, 6, 9, 4])) == 105
    noisy = np.clip(rng.normal(120, 40, 400), 0, 255).astype(np.uint8)
    assert otsu_threshold(noisy) == _brute_force_otsu(noisy)
    try:
        from skimage.filters import threshold_otsu
    except ImportError:
        return
    for values in (image, noisy):
        assert otsu_threshold(values) == threshold_otsu(values)


def test_pillow_bomb_guard_is_lifted_only_while_a_slide_is_read(tmp_path):
    """Importing histoindex and reading an image leave Pillow's decompression-bomb guard as the
    process had it (it used to be switched off for the whole process on import)."""
    from PIL import Image

    import histoindex.io.slides as slides

    before = Image.MAX_IMAGE_PIXELS
    assert before is not None
    path = tmp_path / "small.png"
    Image.fromarray(np.full((64, 80, 3), 200, np.uint8)).save(path)
    slide = slides.open_slide(path, mpp=0.5)
    assert slide.read_region(0, 0, 32, 16).shape == (16, 16, 3)
    slide.close()
    assert Image.MAX_IMAGE_PIXELS == before


@pytest.mark.parametrize("freeze_backbone", [False, True])
def test_the_training_estimate_leaves_the_model_as_it_was(freeze_backbone):
    from histoindex.recipe import estimate_training

    cfg = ModelConfig(backbone="test_resnet", patch_px=32, genes=("a", "b", "c"), freeze_backbone=freeze_backbone, epochs=3)
    model = create_model(cfg)  # in training mode, as train_model builds it: batch norm would update its running statistics
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    estimate = estimate_training(model, cfg, 100, device="cpu", precision="fp32", embed_spots=50, probe=4)
    assert estimate.seconds > 0 and "patches/s" in estimate.how
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    assert all(p.grad is None for p in model.parameters())
