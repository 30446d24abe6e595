"""Batched inference: patches and expression vectors → L2-normalised embeddings."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | None) -> torch.device:
    return default_device() if name in (None, "", "auto") else torch.device(name)


def _to_device(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device).eval()
    return model.to(memory_format=torch.channels_last)


@torch.inference_mode()
def embed_images(model: nn.Module, batches: Iterable[np.ndarray], *, device: torch.device) -> np.ndarray:
    """Image embeddings (n, d), unit length, for uint8 NHWC patch batches."""
    model = _to_device(model, device)
    views = getattr(model.cfg, "views", 1)
    out = [F.normalize(model.encode_image(torch.from_numpy(b).to(device), views), dim=-1).float().cpu() for b in batches]
    return torch.cat(out).numpy() if out else np.zeros((0, model.cfg.embed_dim), np.float32)


@torch.inference_mode()
def embed_expression(model: nn.Module, expression: np.ndarray, *, device: torch.device, batch_size: int = 1024) -> np.ndarray:
    """Expression embeddings (n, d), unit length, for normalised expression rows (n, n_genes)."""
    model = _to_device(model, device)
    out = []
    for start in range(0, len(expression), batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(expression[start : start + batch_size])).to(device)
        out.append(F.normalize(model.encode_expression(chunk), dim=-1).float().cpu())
    return torch.cat(out).numpy()


@torch.inference_mode()
def backbone_features(model: nn.Module, batches: Iterable[np.ndarray], *, device: torch.device, views: int = 1) -> np.ndarray:
    """Pooled backbone features per view: (n, views, n_features) float32."""
    from .models.bleep import dihedral

    model = _to_device(model, device)
    out = []
    for b in batches:
        images = torch.from_numpy(b).to(device)
        per_view = [model.image_encoder(model.normalize(dihedral(images, v))).float().cpu() for v in range(views)]
        out.append(torch.stack(per_view, dim=1))
    return torch.cat(out).numpy()


def batched(array: np.ndarray, batch_size: int) -> Iterable[np.ndarray]:
    for start in range(0, len(array), batch_size):
        yield array[start : start + batch_size]
