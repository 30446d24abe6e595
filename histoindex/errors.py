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


class PixelSizeWarning(HistoindexWarning):
    """A section's pixel-size sources disagree by more than 10 %: which one was used, and why."""


def one_line(exc: BaseException) -> str:
    """A library's message in one line: its first non-empty line, without the Rust source location
    Lance appends (``…, /path/src/local.rs:273:40``); the exception's type when it says nothing."""
    import re

    text = str(exc)
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        text = str(exc.args[0])
    text = re.sub(r",?\s*(?:at )?/\S+\.rs:\d+(?::\d+)?", "", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
