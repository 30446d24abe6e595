"""Retrieval on the frozen backbone's features, as a model: no training. The image side is the
backbone and one linear map into the shared 256-d space, fitted to the references (the top
right-singular vectors of their view-averaged features, uncentred), so that cosine similarity in
that space approximates cosine similarity of the features themselves (exactly when the backbone
has at most 256 features). Reference spots are found by their image embeddings, not their
expression. What ``train`` falls back to when its inner check finds training does not pay."""

from __future__ import annotations

import torch
from torch import nn

from ._config import ModelConfig
from ._registry import register_model
from .backbones import create_backbone
from .bleep import Bleep
from .layers import ImageNormalize


class FrozenRetrieval(Bleep):
    def __init__(self, cfg: ModelConfig, *, pretrained: bool | str = False):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.normalize = ImageNormalize(cfg.mean, cfg.std)
        self.image_encoder = create_backbone(cfg.backbone, pretrained=pretrained, args=cfg.backbone_args)
        self.image_projection = nn.Linear(self.image_encoder.num_features, cfg.embed_dim, bias=False)
        nn.init.zeros_(self.image_projection.weight)

    def encode_expression(self, expression: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("frozen retrieval finds references by their images, not their expression")


@register_model
def frozen(cfg: ModelConfig, *, pretrained: bool | str = False) -> FrozenRetrieval:
    return FrozenRetrieval(cfg, pretrained=pretrained)
