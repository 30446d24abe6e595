"""BLEEP (Xie et al., NeurIPS 2023): each spot alone. Projection heads on the image features and the
expression vector, aligned by the soft-target contrastive loss; trained on cached frozen-backbone
features (one random dihedral view per spot per step) or end to end with random flips/rotations.
Data-parallel under torchrun (see :func:`histoindex.train.fit_contrastive`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import distributed
from ..errors import InputError
from ..train import TrainSection, augment, fit_contrastive
from ._registry import Method, QueryEncoder, register_method


@register_method
class Bleep(Method):
    name = "bleep"
    distributed = True

    def fit(self, model, sections: Sequence[TrainSection], cfg, *, generator, device, progress=None) -> list[float]:
        expression = torch.from_numpy(np.concatenate([s.expression for s in sections]).astype(np.float32))
        n = len(expression)
        world = distributed.world_size()
        if min(cfg.batch_size, n) % world:
            raise InputError(f"batch size {min(cfg.batch_size, n)} cannot be split evenly over {world} processes; choose a batch size divisible by {world}")
        if all(s.features is not None for s in sections):
            features = torch.from_numpy(np.concatenate([s.features for s in sections]).astype(np.float32, copy=False))
            return _train_heads(model, features, expression, cfg, generator, device, progress)
        if any(s.patches is None for s in sections):
            raise InputError("end-to-end training needs the patches of every section")
        patches = torch.from_numpy(np.concatenate([s.patches for s in sections]))
        return _train_end_to_end(model, patches, expression, cfg, generator, device, progress)

    @torch.inference_mode()
    def embed_references(self, model, section: TrainSection, *, device) -> tuple[np.ndarray, np.ndarray]:
        model = model.to(device).eval()
        image = _project(model.image_projection, section.features, device)
        expression = _project(model.expression_projection, section.expression, device)
        return image, expression

    def query_encoder(self, model, xy_um: np.ndarray, *, device) -> QueryEncoder:
        model = model.to(device).eval()

        def encode(chunks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
            for features in chunks:
                with torch.inference_mode():
                    yield _project(model.image_projection, features, device)

        return encode


def _project(head, values: np.ndarray, device, batch_size: int = 4096) -> np.ndarray:
    """Unit-length head(values) in fp32, batch by batch: (n, embed_dim). ``head``: a projection
    head, or any module mapping (n, F) to (n, d) (a Linear: the frozen method's)."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(values), batch_size):
            chunk = torch.from_numpy(np.require(values[start : start + batch_size], np.float32, ["C", "W"])).to(device)
            out.append(F.normalize(head(chunk).float(), dim=-1).cpu())
    if out:
        return torch.cat(out).numpy()
    dim = head.out_features if isinstance(head, torch.nn.Linear) else head.layer_norm.normalized_shape[0]
    return np.zeros((0, dim), np.float32)


def _train_heads(model, features: torch.Tensor, expression: torch.Tensor, cfg, generator, device, progress) -> list[float]:
    """Frozen backbone: the heads train on the cached features of the 8 dihedral views of every
    spot; each step sees one random view per spot (augmentation at the cost of a lookup)."""
    model.eval()
    for p in model.image_encoder.parameters():
        p.requires_grad_(False)
    heads = [p for n, p in model.named_parameters() if not n.startswith("image_encoder.")]
    optimizer = torch.optim.AdamW(heads, lr=cfg.head_lr, weight_decay=cfg.weight_decay)

    def step(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        view = torch.randint(0, features.shape[1], (len(idx),), generator=generator)  # for the global batch
        idx, view = distributed.local_rows(idx), distributed.local_rows(view)
        feats = features[idx, view].to(device)
        return model.image_projection(feats), model.encode_expression(expression[idx].to(device))

    try:
        return fit_contrastive(step, [model.image_projection, model.expression_projection], optimizer, len(features), cfg, generator, progress)
    finally:
        for p in model.image_encoder.parameters():
            p.requires_grad_(True)


def _train_end_to_end(model, images_all: torch.Tensor, expression: torch.Tensor, cfg, generator, device, progress) -> list[float]:
    head_params = [p for n, p in model.named_parameters() if not n.startswith("image_encoder.")]
    optimizer = torch.optim.AdamW(
        [{"params": model.image_encoder.parameters(), "lr": cfg.lr}, {"params": head_params, "lr": cfg.head_lr}],
        weight_decay=cfg.weight_decay,
    )

    def step(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # one view per spot, drawn for the global batch: the draws do not depend on the slice
        views = torch.randint(0, 8, (len(idx),), generator=generator)
        idx, views = distributed.local_rows(idx), distributed.local_rows(views)
        images = augment(images_all[idx], views=views).to(device)
        return model.encode_image(images), model.encode_expression(expression[idx].to(device))

    return fit_contrastive(step, [model], optimizer, len(images_all), cfg, generator, progress)
