"""Image backbones: any timm model by name, with weights from timm's hub or from a local file."""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .._compat import import_timm
from ..errors import InputError, UnknownModel


def create_backbone(name: str, *, pretrained: bool = False) -> nn.Module:
    """A timm model with its classifier removed and global average pooling, so ``forward`` returns
    pooled features of size ``num_features``. ``hf-hub:org/name`` names work for users online."""
    timm = import_timm()
    if not name.startswith(("hf-hub:", "local-dir:")) and not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:8]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise UnknownModel(f"unknown timm backbone {name!r}{hint}")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, global_pool="avg")
    except Exception as exc:
        if pretrained:
            raise InputError(f"could not fetch pretrained weights for {name!r} ({exc}); offline, pass --weights FILE instead") from exc
        raise


def backbone_input_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean/std timm records for this backbone's pretrained weights."""
    timm = import_timm()
    try:
        cfg = timm.get_pretrained_cfg(name.split(":")[-1]) if not name.startswith("hf-hub:") else None
    except Exception:
        cfg = None
    if cfg is None:
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return tuple(cfg.mean), tuple(cfg.std)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch checkpoint loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # never a plain unpickle: weights_only admits tensors and containers, and refuses any
            # other Python object (whose unpickling could run code)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's note on the pickle protocol
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = next((line for line in lines if line.startswith(("Trying to load", "Unsupported", "Unsupported global"))), lines[-1] if lines else "")
        raise InputError(
            f"refusing to load weights {path}: it holds Python objects other than tensors ({reason.rstrip('.')}); histoindex loads only "
            "safetensors or tensor-only torch checkpoints (torch.load(weights_only=True)), never arbitrary pickles: convert it to .safetensors"
        ) from None
    except Exception as exc:
        raise InputError(f"cannot read weights {path}: {(str(exc).strip().splitlines() or [''])[0]}") from exc
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone_weights(
    backbone: nn.Module,
    weights: str | Path | Mapping[str, torch.Tensor],
    *,
    source: str | None = None,
) -> None:
    """Load pretrained weights into a backbone: ``weights`` is a local file or an already-loaded
    state dict (``source`` names it in errors). The classifier is dropped; every other key must
    match (names and shapes), so a wrong file fails loudly instead of training from noise."""
    if isinstance(weights, Mapping):
        state = dict(weights)
        label = source or "state dict"
    else:
        state = read_state_dict(weights)
        label = source or str(weights)
    classifier = getattr(backbone, "pretrained_cfg", {}).get("classifier") or "classifier"
    heads = (classifier, "fc", "head", "classifier")
    state = {k: v for k, v in state.items() if not k.startswith(tuple(f"{h}." for h in heads))}
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or wrong_shape:
        parts = []
        for kind, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                parts.append(f"{len(keys)} {kind} (e.g. {', '.join(keys[:3])})")
        raise InputError(f"weights {label} do not fit this backbone: " + "; ".join(parts))
    backbone.load_state_dict(state, strict=True)
