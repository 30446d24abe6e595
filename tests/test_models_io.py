"""Model construction, local weights, determinism, and references that only have a hires image."""

from __future__ import annotations

import anndata
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from histoindex import api
from histoindex.errors import InputError, LowResolutionImageWarning
from histoindex.models import create_backbone, load_backbone_weights
from histoindex.patch import spot_patches
from histoindex.store import Store

from .conftest import run

TINY = ["--backbone", "test_resnet", "--fine-tune", "--views", "1", "--patch-px", "32", "--epochs", "2", "--n-genes", "16", "--batch-size", "32"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_backbone_weights_are_loaded(tmp_path, suffix):
    torch.manual_seed(1)
    source = create_backbone("test_resnet")
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)  # wrapped, as many checkpoints are
    torch.manual_seed(2)
    target = create_backbone("test_resnet")
    load_backbone_weights(target, path)
    for k, v in source.state_dict().items():
        assert torch.equal(v, target.state_dict()[k]), k


def test_wrong_weights_file_is_rejected(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in create_backbone("resnet10t").state_dict().items()}, str(path))
    with pytest.raises(InputError, match="do not fit this backbone"):
        load_backbone_weights(create_backbone("test_resnet"), path)


def test_train_with_weights_records_them_and_is_deterministic(sections, tmp_path):
    weights = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in create_backbone("test_resnet").state_dict().items()}, str(weights))
    ids = []
    for name in ("a", "b"):
        result = run("train", sections.train_h5ad, "--db", tmp_path / name, "--weights", weights, "--seed", "3", *TINY)
        ids.append(result.stdout.strip().splitlines()[-1])
    assert ids[0] == ids[1]  # the model id hashes every weight: same seed, same model
    other = run("train", sections.train_h5ad, "--db", tmp_path / "c", "--weights", weights, "--seed", "4", *TINY)
    assert other.stdout.strip().splitlines()[-1] != ids[0]
    record = Store(tmp_path / "a").model()
    assert record.cfg.weights == str(weights) and record.cfg.seed == 3
    assert record.metrics["datasets"]["syn-train"]["source_values"] == "raw_counts"


def test_hires_only_reference_warns_and_uses_the_scale_factor(sections, tmp_path):
    adata = anndata.read_h5ad(sections.train_h5ad)
    lib = next(iter(adata.uns["spatial"]))
    full = np.asarray(Image.open(sections.train_tif))
    hires = np.asarray(Image.fromarray(full).resize((full.shape[1] // 2, full.shape[0] // 2), Image.BILINEAR))
    adata.uns["spatial"][lib]["images"] = {"hires": hires}
    adata.uns["spatial"][lib]["scalefactors"]["tissue_hires_scalef"] = 0.5
    adata.uns["spatial"][lib]["metadata"]["source_image_path"] = str(tmp_path / "not-here.tif")
    path = tmp_path / "hires.h5ad"
    adata.write_h5ad(path)
    with pytest.warns(LowResolutionImageWarning, match="using the hires image"):
        hires_ref = api.read_reference(path)
    full_ref = api.read_reference(sections.train_h5ad)
    assert hires_ref.mpp == pytest.approx(full_ref.mpp)  # from the spot diameter: same physical scale
    a = spot_patches(hires_ref, patch_um=110, patch_px=32).astype(float)
    b = spot_patches(full_ref, patch_um=110, patch_px=32).astype(float)
    same_place = np.abs(a - b).mean()
    assert same_place < 12  # same place on the tissue, only blurrier
    assert np.abs(np.roll(a, 7, axis=0) - b).mean() > 1.5 * same_place  # other spots differ more


def test_log_normalised_reference_is_recorded(trained_store, sections, tmp_path):
    adata = anndata.read_h5ad(sections.other_h5ad)
    adata.X = np.log1p(adata.X / adata.X.sum(axis=1, keepdims=True) * 1e4)
    path = tmp_path / "lognorm.h5ad"
    adata.write_h5ad(path)
    ref = api.read_reference(path)
    assert not ref.is_counts and ref.source_values == "log_normalised"
    np.testing.assert_allclose(ref.normalized(["FASN"]), api.read_reference(sections.other_h5ad).normalized(["FASN"]), rtol=1e-5)
