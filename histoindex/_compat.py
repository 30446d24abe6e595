"""Import shims that must run before timm is imported.

The only torchvision wheel that matches torch 2.13 on PyPI is a CUDA build. Its Python code
registers fake kernels for ``torchvision::nms``/``qnms``, which fails on a CPU-only torch whose
op library was never loaded ("operator torchvision::nms does not exist"), and that failure takes
``import timm`` with it. Declaring the two op schemas first, only when they are missing, lets the
import succeed; histoindex never calls these ops.
"""

from __future__ import annotations

import torch

_TORCHVISION_OPS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library: torch.library.Library | None = None


def ensure_torchvision_ops() -> None:
    """Define the torchvision op schemas timm's import needs when torchvision's C++ ops are absent."""
    global _library
    missing = [name for name in _TORCHVISION_OPS if not torch._C._jit_get_schemas_for_operator(f"torchvision::{name}")]
    if not missing:
        return
    if _library is None:
        _library = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        _library.define(_TORCHVISION_OPS[name])


def import_timm():
    """Import timm safely (see module docstring)."""
    ensure_torchvision_ops()
    import timm

    return timm
