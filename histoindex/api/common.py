"""What every verb of the API shares: the log and progress callbacks the CLI draws with."""

from __future__ import annotations

import os
from collections.abc import Callable

Log = Callable[[str], None]
#: ``progress(step, done, total)``: called as a long step advances (the CLI draws rich progress bars)
Progress = Callable[[str, int, int], None]


def quiet(_: str) -> None:
    """The default log: says nothing."""


_quiet = quiet  # the name the modules above used


def default_read_workers() -> int:
    """Background slide readers: one core is left to the embedding on small machines."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))
