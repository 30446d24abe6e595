"""One way to build a model: ``create_model(cfg)``; one way to save and load one."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from ._config import ModelConfig
from ._registry import model_entrypoint
from .backbones import load_backbone_weights


def create_model(cfg: ModelConfig, *, weights: str | Path | None = None) -> nn.Module:
    """Build the model ``cfg.method`` describes. ``weights`` is a local backbone weights file,
    or "timm" for timm's own pretrained weights (needs network)."""
    if not cfg.genes:
        raise InputError("a model needs at least one gene")
    model = model_entrypoint(cfg.method)(cfg, pretrained=weights == "timm")
    if weights not in (None, "", "timm"):
        load_backbone_weights(model.image_encoder, weights)
    return model


def state_digest(model: nn.Module, cfg: ModelConfig) -> str:
    """A content id: sha256 over the config and every tensor, so equal models share an id."""
    digest = hashlib.sha256(cfg.to_json().encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_weights(model: nn.Module, path: str | Path, cfg: ModelConfig) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"histoindex.config": cfg.to_json()})
    return path


def load_model(cfg: ModelConfig, path: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a saved model (no network: weights come from the file)."""
    from safetensors.torch import load_file

    model = model_entrypoint(cfg.method)(cfg, pretrained=False)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.to(device).eval()
