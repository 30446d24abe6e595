"""BLEEP (Xie et al., NeurIPS 2023): a timm image encoder and an expression vector, each projected
into a shared space and aligned with a soft-target contrastive loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._config import ModelConfig
from ._registry import register_model
from .backbones import create_backbone
from .layers import ImageNormalize, ProjectionHead


class Bleep(nn.Module):
    def __init__(self, cfg: ModelConfig, *, pretrained: bool | str = False):
        super().__init__()
        self.cfg = cfg
        self.normalize = ImageNormalize(cfg.mean, cfg.std)
        self.image_encoder = create_backbone(cfg.backbone, pretrained=pretrained, args=cfg.backbone_args)
        self.image_projection = ProjectionHead(self.image_encoder.num_features, cfg.embed_dim, cfg.dropout)
        self.expression_projection = ProjectionHead(len(cfg.genes), cfg.embed_dim, cfg.dropout)

    def image_features(self, images: torch.Tensor, views: int = 1) -> torch.Tensor:
        """uint8 NHWC patches → pooled backbone features, averaged over the first ``views``
        dihedral views (rotations/flips: deterministic test-time averaging)."""
        feats = [self.image_encoder(self.normalize(dihedral(images, v))).float() for v in range(views)]
        return torch.stack(feats).mean(0) if views > 1 else feats[0]

    def encode_image(self, images: torch.Tensor, views: int = 1) -> torch.Tensor:
        """uint8 NHWC patches → image embeddings (not normalised)."""
        return self.image_projection(self.image_features(images, views))

    def encode_expression(self, expression: torch.Tensor) -> torch.Tensor:
        return self.expression_projection(expression)

    def forward(self, images: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        return bleep_loss(self.encode_image(images), self.encode_expression(expression), self.cfg.temperature)


def dihedral(images: torch.Tensor, view: int) -> torch.Tensor:
    """View 0..7 of the dihedral group on NHWC images: 4 rotations × optional horizontal flip."""
    if view % 4:
        images = torch.rot90(images, view % 4, dims=(1, 2))
    if view >= 4:
        images = images.flip(2)
    return images


def bleep_loss(image_emb: torch.Tensor, expr_emb: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """BLEEP's loss: cross-entropy of expression·imageᵀ logits against soft targets, the softmax of
    the mean of the image–image and expression–expression similarities; symmetric. Both the logits
    and the similarities are divided by ``temperature``, as in BLEEP's code (CLIPModel.forward)."""
    logits = expr_emb @ image_emb.T / temperature
    # as in BLEEP's code (after the OpenAI-CLIP tutorial it follows): targets are not detached
    similarity = (image_emb @ image_emb.T + expr_emb @ expr_emb.T) / 2
    targets = F.softmax(similarity / temperature, dim=-1)
    expr_loss = -(targets * F.log_softmax(logits, dim=-1)).sum(1)
    image_loss = -(targets.T * F.log_softmax(logits.T, dim=-1)).sum(1)
    return ((expr_loss + image_loss) / 2).mean()


@register_model
def bleep(cfg: ModelConfig, *, pretrained: bool | str = False) -> Bleep:
    return Bleep(cfg, pretrained=pretrained)
