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


def train_model(
    references: Sequence[SpotSet],
    cfg: ModelConfig,
    *,
    weights: str | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainingResult:
    """Train ``cfg`` on the references' spots (patches of ``cfg.patch_um`` µm around each spot,
    expression over ``cfg.genes``). Deterministic for a given ``cfg.seed`` on one device.

    ``progress(epoch, epochs, loss)`` is called after each epoch.
    """
    device = torch.device(device)
    started = time.perf_counter()
    generator = seed_everything(cfg.seed)
    patches = np.concatenate([spot_patches(ref, patch_um=cfg.patch_um, patch_px=cfg.patch_px) for ref in references])
    expression = np.concatenate([ref.normalized(list(cfg.genes)) for ref in references])
    read_seconds = time.perf_counter() - started

    model = create_model(cfg, weights=weights).to(device).to(memory_format=torch.channels_last)
    head_params = [p for n, p in model.named_parameters() if not n.startswith("image_encoder.")]
    optimizer = torch.optim.AdamW(
        [
            {"params": model.image_encoder.parameters(), "lr": cfg.lr},
            {"params": head_params, "lr": cfg.head_lr},
        ],
        weight_decay=cfg.weight_decay,
    )
    images_all = torch.from_numpy(patches)
    expression_all = torch.from_numpy(expression)
    n = len(images_all)
    batch_size = min(cfg.batch_size, n)
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(n, generator=generator)
        total, batches = 0.0, 0
        # drop the ragged last batch: the contrastive loss of a batch of 1-2 spots is meaningless
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            images = _augment(images_all[idx], generator).to(device)
            loss = model(images, expression_all[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            batches += 1
        history.append(total / max(batches, 1))
        if progress:
            progress(epoch + 1, cfg.epochs, history[-1])
    model.eval()
    metrics = {
        "train_loss": history,
        "n_spots": int(n),
        "n_genes": len(cfg.genes),
        "datasets": {ref.name: {"spots": ref.n_obs, "source_values": ref.source_values, "mpp": ref.mpp} for ref in references},
        "patch_read_seconds": round(read_seconds, 2),
        "train_seconds": round(time.perf_counter() - started - read_seconds, 2),
        "device": str(device),
    }
    return TrainingResult(model=model.cpu(), cfg=cfg, metrics=metrics)
