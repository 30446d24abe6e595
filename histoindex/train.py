"""Training machinery shared by the methods: seeding, the contrastive epoch loop (distributed when
launched under torchrun), per-sample augmentation, and :class:`TrainSection`, the form in which a
reference reaches a method's ``fit``. Which loss and which parameters is the method's business
(:mod:`histoindex.methods`); :func:`histoindex.recipe.train_model` puts the two together."""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import distributed
from .errors import HistoindexWarning
from .models import ModelConfig
from .models.bleep import bleep_loss


@dataclass
class TrainingResult:
    model: nn.Module
    cfg: ModelConfig
    metrics: dict = field(default_factory=dict)


@dataclass
class TrainSection:
    """One reference section as a method trains on it: ``expression`` (n, genes) over the model's
    genes, ``xy_um`` (n, 2) spot centres in micrometres, and either ``features`` (n, views, F) of
    the frozen backbone or ``patches`` (n, H, W, 3) uint8 for end-to-end training. For embedding
    references, ``features`` may be (n, F) (views already averaged)."""

    name: str
    expression: np.ndarray
    xy_um: np.ndarray
    features: np.ndarray | None = None
    patches: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.expression)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def augment(images: torch.Tensor, generator: torch.Generator | None = None, *, views: torch.Tensor | None = None) -> torch.Tensor:
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


def batches(n: int, batch_size: int, generator: torch.Generator):
    """Shuffled index batches; the ragged last batch is dropped (a contrastive loss over one or
    two spots is meaningless)."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


def fit_contrastive(step, modules, optimizer, n: int, cfg, generator, progress) -> list[float]:
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
        for idx in batches(n, batch_size, generator):
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


def prepare_distributed(model: nn.Module, cfg: ModelConfig, device: torch.device) -> nn.Module:
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
