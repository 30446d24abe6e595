"""One way to build a model: ``create_model(cfg)``; one way to save and load one."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError, StoreError
from ._config import ModelConfig
from ._registry import model_entrypoint
from .backbones import is_config_backbone, load_backbone_weights
from .pretrained import PretrainedSource, get_pretrained, is_pretrained


def create_model(cfg: ModelConfig, *, weights: str | Path | None = None) -> nn.Module:
    """Build the model ``cfg.method`` describes. ``weights`` is a registered pretrained name
    (:func:`list_pretrained`, e.g. "lite0-imagenet"; it wins over a file of the same name), a local
    backbone weights file, "timm" for timm's own pretrained weights (needs network), or the
    ``hf-hub:``/``local-dir:`` encoder ``cfg`` was configured from (its own weights, loaded by timm)."""
    if not cfg.genes:
        raise InputError("a model needs at least one gene")
    source = get_pretrained(str(weights)) if weights and is_pretrained(str(weights)) else None
    if source is not None:
        check_pretrained_fits(source, cfg)
    encoder = str(weights) if is_config_backbone(str(weights)) else None
    model = model_entrypoint(cfg.method)(cfg, pretrained=encoder or weights == "timm")
    if source is not None:
        state = source.loader(model.image_encoder)
        load_backbone_weights(model.image_encoder, state, source=f"{source.name!r}")
    elif weights not in (None, "", "timm") and encoder is None:
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
    from safetensors.torch import load

    try:
        raw = bytes(weights) if isinstance(weights, (bytes, bytearray, memoryview)) else Path(weights).read_bytes()
        state = load(raw)
    except Exception as exc:
        raise StoreError(f"the model's weights are not readable safetensors: {exc}") from exc
    saved = _saved_config(raw)
    if saved is not None:  # the config written inside the weights when they were saved
        current = ModelConfig.from_json(cfg.to_json())  # compared as stored (JSON types)
        changed = [key for key in CONFIG_KEYS if getattr(saved, key) != getattr(current, key)]
        if changed:
            shown = "; ".join(f"{key}: {_short(getattr(current, key))} vs {_short(getattr(saved, key))}" for key in changed)
            raise StoreError(
                f"the model's config does not match the config saved with its weights ({shown}; config vs weights): "
                "the models row was edited or written by other code; refusing to use it"
            )
    model = model_entrypoint(cfg.method)(cfg, pretrained=False)
    problems = state_mismatch(model.state_dict(), state)
    if problems:
        raise StoreError(
            f"the model's weights do not fit its config (method {cfg.method}, backbone {cfg.backbone}): {problems}; "
            "the models row was edited or written by other code; refusing to use it"
        )
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


#: the config fields that decide what a model computes and what it is fed: a stored model whose
#: config disagrees with the one saved inside its weights on any of them is refused
CONFIG_KEYS = (
    "method",
    "backbone",
    "backbone_args",
    "patch_px",
    "patch_um",
    "mean",
    "std",
    "embed_dim",
    "genes",
    "normalisation",
    "views",
    "stain",
    "method_params",
)


def _saved_config(raw: bytes) -> ModelConfig | None:
    """The ``histoindex.config`` metadata of safetensors bytes (header: 8-byte length, then JSON)."""
    import json

    try:
        size = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + size])
        text = (header.get("__metadata__") or {}).get("histoindex.config")
        return ModelConfig.from_json(text) if text else None
    except Exception:
        return None


def _short(value) -> str:
    text = str(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def state_mismatch(own: dict, state: dict) -> str:
    """How ``state`` fails to fit a module whose state dict is ``own`` ('' when it fits): missing,
    unexpected and wrong-shape keys, a few of each named."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in state if k in own and tuple(own[k].shape) != tuple(state[k].shape)]
    parts = []
    for kind, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            parts.append(f"{len(keys)} {kind} (e.g. {', '.join(keys[:3])})")
    return "; ".join(parts)
