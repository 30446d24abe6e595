"""Training a BLEEP model on reference spot sets."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .data import SpotSet
from .models import ModelConfig, create_model
from .patch import spot_patches


@dataclass
class TrainingResult:
    model: nn.Module
    cfg: ModelConfig
    metrics: dict = field(default_factory=dict)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and 90° rotations (H&E has no canonical orientation); NHWC uint8."""
    k = int(torch.randint(0, 4, (1,), generator=generator))
    if k:
        images = torch.rot90(images, k, dims=(1, 2))
    if torch.rand(1, generator=generator).item() < 0.5:
        images = images.flip(2)
    return images.contiguous()


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Shuffled index batches; the ragged last batch is dropped (a contrastive loss over one or
    two spots is meaningless)."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


def _train_end_to_end(model, images_all, expression_all, cfg, generator, device, progress) -> list[float]:
    head_params = [p for n, p in model.named_parameters() if not n.startswith("image_encoder.")]
    optimizer = torch.optim.AdamW(
        [{"params": model.image_encoder.parameters(), "lr": cfg.lr}, {"params": head_params, "lr": cfg.head_lr}],
        weight_decay=cfg.weight_decay,
    )

    def step(idx: torch.Tensor) -> torch.Tensor:
        images = _augment(images_all[idx], generator).to(device)
        return model(images, expression_all[idx].to(device))

    return _fit(step, [model], optimizer, len(images_all), cfg, generator, progress)


def _fit(step, modules, optimizer, n: int, cfg, generator, progress) -> list[float]:
    """The epoch loop shared by both ways of training: ``step(batch indices)`` returns the loss."""
    batch_size = min(cfg.batch_size, n)
    history = []
    for epoch in range(cfg.epochs):
        for module in modules:
            module.train()
        losses = []
        for idx in _batches(n, batch_size, generator):
            loss = step(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        history.append(float(np.mean(losses)) if losses else float("nan"))
        if progress:
            progress(epoch + 1, cfg.epochs, history[-1])
    return history


def _train_heads(model, patches, expression_all, cfg, generator, device, progress, features=None) -> list[float]:
    """Frozen backbone: its features are computed once for all 8 dihedral views of every patch
    (or given); each step sees one random view per spot (augmentation at the cost of a lookup)."""
    from .embed import backbone_features, batched
    from .models.bleep import bleep_loss

    model.eval()
    for p in model.image_encoder.parameters():
        p.requires_grad_(False)
    if features is None:
        features = backbone_features(model, batched(patches, 64), device=device, views=8)
    features = torch.from_numpy(features)
    heads = [p for n, p in model.named_parameters() if not n.startswith("image_encoder.")]
    optimizer = torch.optim.AdamW(heads, lr=cfg.head_lr, weight_decay=cfg.weight_decay)

    def step(idx: torch.Tensor) -> torch.Tensor:
        view = torch.randint(0, features.shape[1], (len(idx),), generator=generator)
        feats = features[idx, view].to(device)
        return bleep_loss(model.image_projection(feats), model.encode_expression(expression_all[idx].to(device)), cfg.temperature)

    history = _fit(step, [model.image_projection, model.expression_projection], optimizer, len(features), cfg, generator, progress)
    for p in model.image_encoder.parameters():
        p.requires_grad_(True)
    return history


def train_model(
    references: Sequence[SpotSet],
    cfg: ModelConfig,
    *,
    weights: str | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
    features: np.ndarray | None = None,
) -> TrainingResult:
    """Train ``cfg`` on the references' spots (patches of ``cfg.patch_um`` µm around each spot,
    expression over ``cfg.genes``). Deterministic for a given ``cfg.seed`` on one device.

    ``progress(epoch, epochs, loss)`` is called after each epoch. ``features`` (n_spots, 8,
    n_features): precomputed frozen-backbone features of the 8 dihedral views of every spot, in
    reference order (only with ``cfg.freeze_backbone``; saves recomputing them across runs).
    """
    device = torch.device(device)
    started = time.perf_counter()
    generator = seed_everything(cfg.seed)
    if features is not None and not cfg.freeze_backbone:
        raise ValueError("precomputed features only apply to a frozen backbone")
    patches = None if features is not None else np.concatenate([spot_patches(ref, patch_um=cfg.patch_um, patch_px=cfg.patch_px) for ref in references])
    expression = np.concatenate([ref.normalized(list(cfg.genes)) for ref in references])
    read_seconds = time.perf_counter() - started

    model = create_model(cfg, weights=weights).to(device).to(memory_format=torch.channels_last)
    expression_all = torch.from_numpy(expression)
    if cfg.freeze_backbone:
        history = _train_heads(model, patches, expression_all, cfg, generator, device, progress, features)
    else:
        history = _train_end_to_end(model, torch.from_numpy(patches), expression_all, cfg, generator, device, progress)
    model.eval()
    metrics = {
        "train_loss": history,
        "n_spots": int(len(expression)),
        "n_genes": len(cfg.genes),
        "datasets": {ref.name: {"spots": ref.n_obs, "source_values": ref.source_values, "mpp": ref.mpp} for ref in references},
        "patch_read_seconds": round(read_seconds, 2),
        "train_seconds": round(time.perf_counter() - started - read_seconds, 2),
        "device": str(device),
    }
    return TrainingResult(model=model.cpu(), cfg=cfg, metrics=metrics)
