"""One rule for every reader: whatever a file holds, a reader returns its result or raises one of
histoindex's own errors, naming the file (the libraries underneath raise anything at all)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

from ..errors import HistoindexError, InputError

F = TypeVar("F", bound=Callable)


def reader(what: str) -> Callable[[F], F]:
    """Decorate a reader whose first argument is the path: an exception that is not a
    :class:`HistoindexError` becomes ``InputError("cannot read PATH as WHAT: ...")`` (first line of
    the library's message)."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def guarded(path, *args, **kwargs):
            try:
                return fn(path, *args, **kwargs)
            except HistoindexError:
                raise
            except Exception as exc:
                detail = (str(exc).strip().splitlines() or [""])[0]
                raise InputError(f"cannot read {path} as {what}: {type(exc).__name__}{': ' + detail if detail else ''}") from exc

        return guarded  # type: ignore[return-value]

    return wrap
