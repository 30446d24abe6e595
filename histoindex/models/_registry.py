"""A name → entrypoint registry for model families, filled on import (as timm does)."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable

from ..errors import UnknownModel

_entrypoints: dict[str, Callable] = {}


def register_model(fn: Callable) -> Callable:
    """Register ``fn`` under its own name as a model-family entrypoint."""
    name = fn.__name__
    if name in _entrypoints:
        warnings.warn(f"model family {name!r} registered twice; the later one wins", stacklevel=2)
    _entrypoints[name] = fn
    return fn


def is_model(name: str) -> bool:
    return name in _entrypoints


def model_entrypoint(name: str) -> Callable:
    if name not in _entrypoints:
        raise UnknownModel(f"unknown method {name!r}; known: {', '.join(sorted(_entrypoints))}")
    return _entrypoints[name]


def list_models(pattern: str = "*") -> list[str]:
    return sorted(n for n in _entrypoints if fnmatch.fnmatch(n, pattern))
