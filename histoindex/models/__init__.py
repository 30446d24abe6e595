"""Model families, their registry and factory. Importing this package registers every family."""

from __future__ import annotations

from . import (
    bleep,  # noqa: F401  (registers the family)
    frozen,  # noqa: F401  (registers the family)
    stgchb,  # noqa: F401  (registers the family; torch_geometric is imported only when one is built)
)
from ._config import ModelConfig
from ._factory import create_model, load_model, save_weights, state_digest, weights_bytes
from ._registry import is_model, list_models, register_model
from .backbones import BackboneSpec, backbone_input_stats, backbone_spec, create_backbone, is_config_backbone, load_backbone_weights
from .pretrained import PretrainedSource, get_pretrained, is_pretrained, list_pretrained, register_pretrained

__all__ = [
    "ModelConfig",
    "create_model",
    "load_model",
    "save_weights",
    "state_digest",
    "weights_bytes",
    "is_model",
    "list_models",
    "register_model",
    "BackboneSpec",
    "backbone_input_stats",
    "backbone_spec",
    "is_config_backbone",
    "create_backbone",
    "load_backbone_weights",
    "PretrainedSource",
    "get_pretrained",
    "is_pretrained",
    "list_pretrained",
    "register_pretrained",
]
