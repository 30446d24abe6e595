"""Multi-process training helpers (``torchrun``, one process per GPU or CPU worker).

Every rank draws the same global batches from the same seed, embeds its contiguous slice of each
one, and the contrastive loss is computed on the embeddings gathered from all ranks: the loss,
its gradients and so the trained model do not depend on the number of processes (up to float
rounding, dropout masks and, on CPUs, batch-norm statistics). With a single process every helper
here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1,
    ``MASTER_ADDR``/``MASTER_PORT``, ``RANK``) with ``backend``: by default nccl when CUDA is
    present, each process on the GPU ``LOCAL_RANK``, else gloo. Does nothing outside torchrun or
    when already initialised. Returns whether training is distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return is_distributed()


def is_distributed() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def launch_rank() -> int:
    """This process's rank as torchrun launched it (``RANK``), whether or not it has joined the
    process group yet; 0 outside torchrun."""
    return rank() if is_distributed() else int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def world_size() -> int:
    """The number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rows(batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (rows ``[r·b/W, (r+1)·b/W)``); the batch
    itself with one process. The batch size must be divisible by the world size."""
    if not is_distributed():
        return batch
    size, world = len(batch), world_size()
    if size % world:
        raise ValueError(f"a batch of {size} cannot be split evenly over {world} processes")
    per_rank = size // world
    return batch[rank() * per_rank : (rank() + 1) * per_rank]


class _GatherRows(torch.autograd.Function):
    """All-gather along rows whose backward hands each rank the sum over ranks of the gradients
    of its own rows (what ``torch.distributed.nn.functional.all_gather``, deprecated, does)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        ctx.rows = len(local)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # reduced in place
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_cat(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``local`` rows (equal counts) in rank order, keeping gradients:
    the backward pass sends each rank the sum over ranks of the gradients of its own rows."""
    return _GatherRows.apply(local) if is_distributed() else local


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """All-reduce the gradients to their mean over ranks (one collective for all of them)."""
    if not is_distributed():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (a safeguard: the same seed already
    gives every rank the same initial model)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor, src=0)
