"""Image backbones: any timm model by name, with weights from timm's hub or from a local file;
and encoders described by their own timm config (``hf-hub:ORG/NAME``, ``local-dir:PATH``), such as
the pathology foundation models, whose architecture, model args, input normalisation, input size and
native µm per pixel are read from that config (:func:`backbone_spec`), never from a table of names."""

from __future__ import annotations

import copy
import json
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._compat import import_timm
from ..errors import InputError, UnknownModel, one_line

#: backbones named by where their timm config lives (config.json: architecture, model_args, pretrained_cfg)
CONFIG_SOURCES = ("hf-hub:", "local-dir:")
#: config.json's top-level key for the µm per pixel the encoder was trained at (timm's own
#: ``pretrained_cfg`` refuses keys it does not know, so it sits beside it)
MPP_KEY = "mpp"
#: µm per pixel assumed when a config states none: most pathology foundation encoders were trained on
#: 20x tiles, about 0.5 µm/px (224 px = 112 µm)
DEFAULT_INPUT_MPP = 0.5
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def is_config_backbone(name: str | None) -> bool:
    """Whether ``name`` is an ``hf-hub:`` or ``local-dir:`` encoder, described by its own config."""
    return bool(name) and str(name).startswith(CONFIG_SOURCES)


@dataclass(frozen=True)
class BackboneSpec:
    """What an encoder's own timm config says: the ``architecture`` (a timm model name) and its
    model ``args`` (JSON, as config.json has them), the input ``mean``/``std``, the input size
    ``input_px`` and the ``mpp`` (µm per pixel) it was trained at; None where the config is silent."""

    source: str
    architecture: str
    args: dict
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_px: int | None
    mpp: float | None
    #: the model takes ``input_px`` inputs only (a ViT without ``dynamic_img_size``)
    fixed_input: bool = False


def backbone_spec(name: str) -> BackboneSpec:
    """Read the config of an ``hf-hub:ORG/NAME`` (the hub, or the Hugging Face cache offline) or
    ``local-dir:PATH`` encoder, without building it."""
    if not is_config_backbone(name):
        raise InputError(f"{name!r} is not an hf-hub: or local-dir: backbone")
    timm = import_timm()
    from timm.models._hub import _parse_model_cfg

    kind, _, where = name.partition(":")
    try:
        if kind == "hf-hub":
            from timm.models._hub import download_from_hf

            path = Path(download_from_hf(where, "config.json"))
        else:
            path = Path(where).expanduser() / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"no config.json in {Path(where).expanduser()}")
        raw = json.loads(path.read_text())
        pretrained_cfg, architecture, args = _parse_model_cfg(copy.deepcopy(raw), {})  # it pops keys
    except Exception as exc:
        fix = (
            "offline or without access (gated models need `huggingface-cli login` and the licence accepted on the model's page), "
            "save the model with timm (config.json + model.safetensors) and pass --backbone local-dir:PATH"
            if kind == "hf-hub"
            else "a local-dir: backbone is a folder with timm's config.json (architecture, model_args, pretrained_cfg) and, unless --weights is given, model.safetensors or pytorch_model.bin"
        )
        raise InputError(f"cannot read the config of backbone {name!r} ({one_line(exc).rstrip('.')}); {fix}") from None
    if not timm.is_model(architecture):
        raise UnknownModel(f"backbone {name!r}: its config names architecture {architecture!r}, which timm {timm.__version__} does not know (a newer timm may)")
    args = dict(args or {})
    try:
        json.dumps(args)
    except TypeError as exc:
        raise InputError(f"backbone {name!r}: model_args must be JSON values ({exc})") from None
    mean = tuple(float(v) for v in pretrained_cfg.get("mean") or IMAGENET_STATS[0])
    std = tuple(float(v) for v in pretrained_cfg.get("std") or IMAGENET_STATS[1])
    size = pretrained_cfg.get("input_size")
    input_px = int(size[-1]) if size else None
    mpp = raw.get(MPP_KEY)
    if mpp is not None and not (isinstance(mpp, (int, float)) and mpp > 0):
        raise InputError(f"backbone {name!r}: config.json's {MPP_KEY!r} must be a positive number of µm per pixel, got {mpp!r}")
    if args.get("dynamic_img_size"):
        fixed = False
    elif "fixed_input_size" in pretrained_cfg:
        fixed = bool(pretrained_cfg["fixed_input_size"])
    else:  # the architecture's own default (True for timm's ViTs)
        fixed = bool(getattr(timm.get_pretrained_cfg(architecture), "fixed_input_size", False))
    return BackboneSpec(name, architecture, args, mean, std, input_px, float(mpp) if mpp is not None else None, fixed)


def _layer_args(args: Mapping, timm) -> dict:
    """Model args as timm's constructors take them: a ``*_layer`` value naming a class of
    ``timm.layers`` (e.g. ``"mlp_layer": "SwiGLUPacked"``) becomes that class; other names (e.g.
    ``"act_layer": "silu"``) timm resolves itself."""
    out = dict(args)
    for key, value in args.items():
        if key.endswith("_layer") and isinstance(value, str) and isinstance(getattr(timm.layers, value, None), type):
            out[key] = getattr(timm.layers, value)
    return out


def _pooled(model: nn.Module) -> nn.Module:
    """A config that keeps every token (``global_pool: ""``) pools on the class token, as the
    foundation models' cards do (the mean of the tokens without one)."""
    if getattr(model, "global_pool", None) == "" and hasattr(model, "reset_classifier"):
        model.reset_classifier(0, global_pool="token" if getattr(model, "has_class_token", False) else "avg")
    return model


def create_backbone(name: str, *, pretrained: bool | str = False, args: Mapping | None = None) -> nn.Module:
    """A timm model with its classifier removed and global average pooling, so ``forward`` returns
    pooled features of size ``num_features``. ``hf-hub:org/name`` names work for users online.

    ``args``: the model args of an encoder described by its config (:func:`backbone_spec`); then
    ``name`` is its architecture, its own pooling is kept, and ``pretrained`` may be the
    ``hf-hub:``/``local-dir:`` source whose weights timm loads (strictly)."""
    timm = import_timm()
    if args is not None:
        kwargs = {**_layer_args(args, timm), "num_classes": 0}
        source = pretrained if isinstance(pretrained, str) else name
        try:
            return _pooled(timm.create_model(source, pretrained=bool(pretrained), **kwargs))
        except Exception as exc:
            if pretrained:
                raise InputError(
                    f"could not load the weights of backbone {source!r} ({one_line(exc).rstrip('.')}); offline, pass --weights FILE instead"
                ) from exc
            raise
    if isinstance(pretrained, str):
        raise InputError(f"weights {pretrained!r} carry their own architecture: pass them as --backbone {pretrained}")
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
