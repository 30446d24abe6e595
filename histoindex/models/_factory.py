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
from .pretrained import PretrainedSource, get_pretrained, is_pretrained


def create_model(cfg: ModelConfig, *, weights: str | Path | None = None) -> nn.Module:
    """Build the model ``cfg.method`` describes. ``weights`` is a registered pretrained name
    (:func:`list_pretrained`, e.g. "lite0-imagenet"; it wins over a file of the same name), a local
    backbone weights file, or "timm" for timm's own pretrained weights (needs network)."""
    if not cfg.genes:
        raise InputError("a model needs at least one gene")
    source = get_pretrained(str(weights)) if weights and is_pretrained(str(weights)) else None
    if source is not None:
        check_pretrained_fits(source, cfg)
    model = model_entrypoint(cfg.method)(cfg, pretrained=weights == "timm")
    if source is not None:
        state = source.loader(model.image_encoder)
        load_backbone_weights(model.image_encoder, state, source=f"{source.name!r}")
    elif weights not in (None, "", "timm"):
        load_backbone_weights(model.image_encoder, weights)
    return model


def check_pretrained_fits(source: PretrainedSource, cfg: ModelConfig) -> None:
    """Registered weights fit one backbone and expect one input normalisation."""
    if cfg.backbone != source.backbone:
        raise InputError(
            f"weights {source.name!r} are for backbone {source.backbone}, not {cfg.backbone}; use --backbone {source.backbone} (or leave --backbone out)"
        )
    if tuple(cfg.mean) != tuple(source.mean) or tuple(cfg.std) != tuple(source.std):
        raise InputError(
            f"weights {source.name!r} expect input mean {source.mean} and std {source.std}, "
            f"but the model config has mean {tuple(cfg.mean)} and std {tuple(cfg.std)}"
        )


def state_digest(model: nn.Module, cfg: ModelConfig) -> str:
    """A content id: sha256 over the config and every tensor, so equal models share an id."""
    digest = hashlib.sha256(cfg.to_json().encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def weights_bytes(model: nn.Module, cfg: ModelConfig) -> bytes:
    """The model's state_dict as safetensors bytes (the config in its metadata), as the store keeps it."""
    from safetensors.torch import save

    return save(_cpu_state(model), metadata={"histoindex.config": cfg.to_json()})


def save_weights(model: nn.Module, path: str | Path, cfg: ModelConfig) -> Path:
    """Write :func:`weights_bytes` to a local safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(_cpu_state(model), str(path), metadata={"histoindex.config": cfg.to_json()})
    return path


def load_model(cfg: ModelConfig, weights: bytes | str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a saved model from safetensors bytes (as :meth:`Store.model_weights` returns them) or
    a local safetensors file. No network: the weights are all there is to load."""
    from safetensors.torch import load, load_file

    if isinstance(weights, (bytes, bytearray, memoryview)):
        state = load(bytes(weights))
    else:
        state = load_file(str(weights))
    model = model_entrypoint(cfg.method)(cfg, pretrained=False)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
