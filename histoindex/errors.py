"""Errors and warnings raised by histoindex. The CLI turns every HistoindexError into `Error: ...`."""

from __future__ import annotations


class HistoindexError(Exception):
    """Base class for every error histoindex raises on purpose."""


class InputError(HistoindexError, ValueError):
    """An input file is missing, unreadable or lacks something histoindex needs."""


class MissingPixelSize(InputError):
    """A slide has no pixel size in its metadata and none was given."""


class StoreError(HistoindexError, RuntimeError):
    """The store is missing, empty, or inconsistent with the request."""


class UnknownValue(HistoindexError, KeyError):
    """A filter value (tissue, platform, model id, version) that the store does not contain."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class UnknownModel(UnknownValue):
    """A backbone or model name that no registry knows."""


class SchemaMismatch(HistoindexError, ValueError):
    """Rows or a table do not match the layout in schemas/."""


class HistoindexWarning(UserWarning):
    """Base class for histoindex warnings."""


class LowResolutionImageWarning(HistoindexWarning):
    """Only a downscaled (hires) image was available; patches are upsampled from it."""
