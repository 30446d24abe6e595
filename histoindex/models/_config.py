"""ModelConfig lives in :mod:`histoindex.config` (importable without torch); re-exported here."""

from __future__ import annotations

from ..config import ModelConfig

__all__ = ["ModelConfig"]
