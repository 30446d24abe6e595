"""The method interface and its registry."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import UnknownModel
from ..models import ModelConfig
from ..train import TrainSection

#: feature chunks of consecutive tiles in → unit-length query embeddings of the same tiles out
QueryEncoder = Callable[[Iterable[np.ndarray]], Iterator[np.ndarray]]


class Method:
    """Base class of a method; subclasses set ``name`` and implement the three hooks."""

    name: ClassVar[str] = ""
    #: the method trains on cached frozen-backbone features only (no end-to-end fine-tuning)
    frozen_backbone_only: ClassVar[bool] = False
    #: the method trains data-parallel under torchrun
    distributed: ClassVar[bool] = False

    def default_params(self) -> dict:
        """The method's hyper-parameters, recorded in ``ModelConfig.method_params``."""
        return {}

    def fit(
        self, model: nn.Module, sections: Sequence[TrainSection], cfg: ModelConfig, *, generator: torch.Generator, device: torch.device, progress=None
    ) -> list[float]:
        raise NotImplementedError

    def embed_references(self, model: nn.Module, section: TrainSection, *, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def query_encoder(self, model: nn.Module, xy_um: np.ndarray, *, device: torch.device) -> QueryEncoder:
        raise NotImplementedError


_methods: dict[str, Method] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Register a :class:`Method` subclass under its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _methods[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    if name not in _methods:
        raise UnknownModel(f"unknown method {name!r}; known: {', '.join(sorted(_methods))}")
    return _methods[name]


def list_methods() -> list[str]:
    return sorted(_methods)
