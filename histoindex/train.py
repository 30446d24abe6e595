"""Training a BLEEP model on reference spot sets."""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import distributed
from .data import SpotSet
from .errors import HistoindexWarning, InputError
from .models import ModelConfig, create_model
from .models.bleep import bleep_loss
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


def _augment(images: torch.Tensor, generator: torch.Generator | None = None, *, views: torch.Tensor | None = None) -> torch.Tensor:
    """Random flips and 90° rotations (H&E has no canonical orientation), each sample its own:
    sample i gets dihedral view ``views[i]`` (0..7, as ``models.bleep.dihedral``), drawn from
    ``generator`` when not given. Square NHWC patches (uint8); a new tensor, the input untouched.
    Cheap: one rotation/flip per distinct view drawn (at most 8), applied to its samples at once."""
    from .models.bleep import dihedral

    if views is None:
        views = torch.randint(0, 8, (len(images),), generator=generator)
    views = torch.as_tensor(views, dtype=torch.int64)
    if views.shape != (len(images),):
        raise ValueError(f"{len(views)} views for {len(images)} images")
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"per-sample rotations need square patches, got {tuple(images.shape[1:3])}")
    out = torch.empty_like(images, memory_format=torch.contiguous_format)
    for view in torch.unique(views).tolist():
        rows = torch.nonzero(views == view).squeeze(1)
        out[rows] = dihedral(images[rows], view)
    return out


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

    def step(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # one view per spot, drawn for the global batch: the draws do not depend on the slice
        views = torch.randint(0, 8, (len(idx),), generator=generator)
        idx, views = distributed.local_rows(idx), distributed.local_rows(views)
        images = _augment(images_all[idx], views=views).to(device)
        return model.encode_image(images), model.encode_expression(expression_all[idx].to(device))

    return _fit(step, [model], optimizer, len(images_all), cfg, generator, progress)


def _fit(step, modules, optimizer, n: int, cfg, generator, progress) -> list[float]:
    """The epoch loop shared by both ways of training: ``step(global batch indices)`` returns the
    (image, expression) embeddings of this process's slice of the batch; the loss is computed on
    the embeddings of the whole batch, gathered from every process, and the gradients averaged
    over processes, so that distributed training takes the same steps as one process."""
    batch_size = min(cfg.batch_size, n)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    history = []
    for epoch in range(cfg.epochs):
        for module in modules:
            module.train()
        losses = []
        for idx in _batches(n, batch_size, generator):
            image_emb, expr_emb = step(idx)
            loss = bleep_loss(distributed.gather_cat(image_emb), distributed.gather_cat(expr_emb), cfg.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # each rank's gradients hold world_size × its slice's share of the full-batch gradient
            # (all_gather's backward sums over ranks): their mean is the full-batch gradient
            distributed.average_gradients(params)
            optimizer.step()
            losses.append(loss.item())
        history.append(float(np.mean(losses)) if losses else float("nan"))
        if progress:
            progress(epoch + 1, cfg.epochs, history[-1])
    return history


def _train_heads(model, patches, expression_all, cfg, generator, device, progress, features=None, precision="fp32") -> list[float]:
    """Frozen backbone: its features are computed once for all 8 dihedral views of every patch
    (or given); each step sees one random view per spot (augmentation at the cost of a lookup)."""
    from .embed import backbone_features, batched

    model.eval()
    for p in model.image_encoder.parameters():
        p.requires_grad_(False)
    if features is None:
        features = backbone_features(model, batched(patches, 64), device=device, views=8, precision=precision)
    features = torch.from_numpy(features)
    heads = [p for n, p in model.named_parameters() if not n.startswith("image_encoder.")]
    optimizer = torch.optim.AdamW(heads, lr=cfg.head_lr, weight_decay=cfg.weight_decay)

    def step(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        view = torch.randint(0, features.shape[1], (len(idx),), generator=generator)  # for the global batch
        idx, view = distributed.local_rows(idx), distributed.local_rows(view)
        feats = features[idx, view].to(device)
        return model.image_projection(feats), model.encode_expression(expression_all[idx].to(device))

    history = _fit(step, [model.image_projection, model.expression_projection], optimizer, len(features), cfg, generator, progress)
    for p in model.image_encoder.parameters():
        p.requires_grad_(True)
    return history


def _prepare_distributed(model: nn.Module, cfg: ModelConfig, device: torch.device) -> nn.Module:
    """Start every process from rank 0's model; share batch-norm statistics across processes
    when fine-tuning on GPUs (PyTorch cannot on CPUs: there they are per process)."""
    distributed.broadcast_module(model)
    torch.manual_seed(cfg.seed + distributed.rank())  # dropout: not the same masks on every process's rows
    has_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_batch_norm and not cfg.freeze_backbone:
        if device.type == "cuda":
            from ._compat import import_timm

            model = import_timm().layers.convert_sync_batchnorm(model)
        else:
            warnings.warn(
                "batch norm statistics are per process when training on CPUs: the result depends on the number of processes",
                HistoindexWarning,
                stacklevel=3,
            )
    return model


def train_model(
    references: Sequence[SpotSet],
    cfg: ModelConfig,
    *,
    weights: str | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
    features: np.ndarray | None = None,
    precision: str = "fp32",
) -> TrainingResult:
    """Train ``cfg`` on the references' spots (patches of ``cfg.patch_um`` µm around each spot,
    expression over ``cfg.genes``). Deterministic for a given ``cfg.seed`` on one device.

    ``progress(epoch, epochs, loss)`` is called after each epoch. ``features`` (n_spots, 8,
    n_features): precomputed frozen-backbone features of the 8 dihedral views of every spot, in
    reference order (only with ``cfg.freeze_backbone``; saves recomputing them across runs).
    ``precision``: of the frozen backbone's features (``bf16`` where queries embed in bf16, so that
    the heads learn on the features they will be given).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) this joins the process group (see
    :func:`histoindex.distributed.init_from_env`) and trains data-parallel: each process embeds
    its slice of every batch of ``cfg.batch_size`` spots (which must divide evenly among the
    processes) and the loss is computed on the embeddings gathered from all of them, so the loss
    and the model are those of one process, up to float rounding, but for dropout (other masks,
    alike in distribution) and for batch norm on CPUs (synchronised on GPUs, per process on
    CPUs). Every process returns the same model; ``progress`` is called on rank 0 only.
    """
    device = torch.device(device)
    started = time.perf_counter()
    distributed.init_from_env("nccl" if device.type == "cuda" else "gloo")
    world = distributed.world_size()
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # this process's GPU (LOCAL_RANK)
    generator = seed_everything(cfg.seed)
    if features is not None and not cfg.freeze_backbone:
        raise ValueError("precomputed features only apply to a frozen backbone")
    n_spots = len(features) if features is not None else sum(ref.n_obs for ref in references)
    if min(cfg.batch_size, n_spots) % world:
        raise InputError(
            f"batch size {min(cfg.batch_size, n_spots)} cannot be split evenly over {world} processes; "
            f"choose a batch size divisible by {world}"
        )
    patches = None if features is not None else np.concatenate([spot_patches(ref, patch_um=cfg.patch_um, patch_px=cfg.patch_px) for ref in references])
    expression = np.concatenate([ref.normalized(list(cfg.genes)) for ref in references])
    read_seconds = time.perf_counter() - started

    model = create_model(cfg, weights=weights).to(device).to(memory_format=torch.channels_last)
    if world > 1:
        model = _prepare_distributed(model, cfg, device)
        if distributed.rank() != 0:
            progress = None
    expression_all = torch.from_numpy(expression)
    if cfg.freeze_backbone:
        history = _train_heads(model, patches, expression_all, cfg, generator, device, progress, features, precision)
    else:
        history = _train_end_to_end(model, torch.from_numpy(patches), expression_all, cfg, generator, device, progress)
    if world > 1:
        distributed.broadcast_module(model)  # identical already, but for per-process (CPU) batch-norm statistics
    model.eval()
    metrics = {
        "train_loss": history,
        "n_spots": int(len(expression)),
        "n_genes": len(cfg.genes),
        "datasets": {ref.name: {"spots": ref.n_obs, "source_values": ref.source_values, "values_from": ref.values_source, "mpp": ref.mpp, "mpp_source": ref.mpp_source} for ref in references},
        "patch_read_seconds": round(read_seconds, 2),
        "train_seconds": round(time.perf_counter() - started - read_seconds, 2),
        "device": str(device),
        "feature_precision": precision if cfg.freeze_backbone else "fp32",
    }
    if world > 1:
        metrics["world_size"] = world
    return TrainingResult(model=model.cpu(), cfg=cfg, metrics=metrics)
