"""Foundation encoders by config (``--backbone hf-hub:ORG/NAME`` or ``local-dir:PATH``): the
architecture, model args, input normalisation, input size and native µm per pixel come from the
model's own timm config.json, never from a table of names. Tested offline on a tiny random ViT
saved in timm's local-dir format, through the real CLI."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from histoindex.errors import HistoindexWarning
from histoindex.models import load_model
from histoindex.store import Store

from .conftest import error_line, run

ARCH = "vit_tiny_patch16_224"
#: a tiny ViT: 32 px input (2 x 2 patches of 16 px), one block
MODEL_ARGS = {"img_size": 32, "depth": 1, "num_classes": 0}
MEAN, STD = (0.6, 0.5, 0.7), (0.2, 0.25, 0.3)
MPP = 1.5  # µm per pixel the (pretend) model was trained at: 32 px = 48 µm
FAST = ["--epochs", "1", "--n-genes", "20", "--batch-size", "16", "--views", "1", "--stain", "none", "--no-inner-check"]


def write_encoder(directory: Path, *, mpp: float | None = MPP, weights: bool = True, seed: int = 7, **extra_args) -> dict[str, torch.Tensor]:
    """A tiny random ViT in timm's local-dir layout: config.json (architecture, model_args,
    pretrained_cfg, and histoindex's ``mpp``) and, with ``weights``, model.safetensors. Returns its
    state dict."""
    from safetensors.torch import save_file

    from histoindex._compat import import_timm

    torch.manual_seed(seed)
    model_args = {**MODEL_ARGS, **extra_args}
    model = import_timm().create_model(ARCH, pretrained=False, **model_args)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    pretrained_cfg = {"input_size": [3, 32, 32], "mean": list(MEAN), "std": list(STD), "num_classes": 0, "classifier": "head", "crop_pct": 1.0}
    config = {"architecture": ARCH, "model_args": model_args, "pretrained_cfg": pretrained_cfg}
    if mpp is not None:  # top level: timm's pretrained_cfg refuses keys it does not know
        config["mpp"] = mpp
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if weights:
        save_file(state, str(directory / "model.safetensors"))
    return state


def backbone_out(db: Path, patches: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The stored model's backbone features of ``patches`` (uint8 NHWC), and its backbone tensors."""
    record = Store(db).model()
    model = load_model(record.cfg, record.weights())
    with torch.no_grad():
        features = model.image_encoder(model.normalize(patches))
    return features, model.image_encoder.state_dict()


def test_local_dir_encoder_takes_stats_size_and_magnification_from_its_config(sections, tmp_path):
    directory = tmp_path / "encoder"
    state = write_encoder(directory)
    db = tmp_path / "db"
    run("train", sections.train_h5ad, "--db", db, "--backbone", f"local-dir:{directory}", *FAST)
    cfg = Store(db).model().cfg
    assert cfg.backbone == ARCH and cfg.backbone_args == MODEL_ARGS  # the model rebuilds without the folder
    assert cfg.weights == f"local-dir:{directory}"
    assert cfg.mean == pytest.approx(MEAN) and cfg.std == pytest.approx(STD)
    assert cfg.patch_px == 32 and cfg.patch_um == pytest.approx(MPP * 32)
    shutil.rmtree(directory)  # the store holds everything a query needs
    patches = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    _, stored = backbone_out(db, patches)
    for key, tensor in state.items():  # the frozen backbone is the checkpoint's, not a random init
        assert torch.equal(stored[key], tensor), key


def test_weights_file_loads_into_the_configured_architecture_like_local_dir(sections, tmp_path):
    state = write_encoder(tmp_path / "full")
    write_encoder(tmp_path / "config-only", mpp=None, weights=False)  # the architecture alone, no stated magnification
    checkpoint = tmp_path / "encoder.pth"
    torch.save({"state_dict": state}, checkpoint)
    run("train", sections.train_h5ad, "--db", tmp_path / "a", "--backbone", f"local-dir:{tmp_path / 'full'}", *FAST)
    run("train", sections.train_h5ad, "--db", tmp_path / "b", "--backbone", f"local-dir:{tmp_path / 'config-only'}", "--weights", checkpoint, *FAST)
    cfg = Store(tmp_path / "b").model().cfg
    assert cfg.weights == str(checkpoint) and cfg.backbone == ARCH
    assert cfg.patch_px == 32 and cfg.patch_um == pytest.approx(0.5 * 32)  # the documented default, 0.5 µm/px
    patches = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    from_dir, _ = backbone_out(tmp_path / "a", patches)
    from_file, _ = backbone_out(tmp_path / "b", patches)
    assert from_dir.shape == (4, 192)
    torch.testing.assert_close(from_file, from_dir, rtol=0, atol=0)
    # and not by accident: another random ViT gives other features
    run("train", sections.train_h5ad, "--db", tmp_path / "c", "--backbone", f"local-dir:{tmp_path / 'config-only'}", "--weights", "none", *FAST)
    random_init, _ = backbone_out(tmp_path / "c", patches)
    assert not torch.allclose(random_init, from_dir)


def test_explicit_patch_size_contradicting_the_config_wins_with_one_warning(sections, tmp_path):
    directory = tmp_path / "encoder"
    write_encoder(directory, dynamic_img_size=True)  # as UNI's: other input sizes are possible
    with pytest.warns(HistoindexWarning) as caught:
        run("train", sections.train_h5ad, "--db", tmp_path / "db", "--backbone", f"local-dir:{directory}", "--patch-px", "64", *FAST)
    said = [str(w.message) for w in caught if issubclass(w.category, HistoindexWarning) and "patch" in str(w.message)]
    assert len(said) == 1 and "\n" not in said[0], said
    assert "--patch-px 64" in said[0] and "32" in said[0], said[0]
    cfg = Store(tmp_path / "db").model().cfg
    assert cfg.patch_px == 64 and cfg.patch_um == pytest.approx(MPP * 64)  # the model's magnification kept
    # agreeing with the config says nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error", HistoindexWarning)
        run("train", sections.train_h5ad, "--db", tmp_path / "db2", "--backbone", f"local-dir:{directory}", "--patch-px", "32", "--patch-um", "48", *FAST)


def test_unreachable_hub_encoder_is_one_line_naming_local_dir(sections, tmp_path):
    result = run("train", sections.train_h5ad, "--db", tmp_path / "db", "--backbone", "hf-hub:MahmoodLab/UNI", *FAST, ok=False)
    error_line(result, "hf-hub:MahmoodLab/UNI", "local-dir:")
    assert not (tmp_path / "db").exists()
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    error_line(run("train", sections.train_h5ad, "--db", tmp_path / "db", "--backbone", f"local-dir:{bad}", *FAST, ok=False), "config.json")


def test_patch_size_a_fixed_size_encoder_cannot_take_is_one_line(sections, tmp_path):
    directory = tmp_path / "encoder"
    write_encoder(directory)  # a timm ViT without dynamic_img_size: 32 px inputs only
    result = run("train", sections.train_h5ad, "--db", tmp_path / "db", "--backbone", f"local-dir:{directory}", "--patch-px", "64", *FAST, ok=False)
    error_line(result, "32 px inputs only", "dynamic_img_size")
    assert not (tmp_path / "db").exists()
