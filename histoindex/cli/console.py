"""What the command line shows: progress bars (or plain lines in a log), log lines, a library's
error as one line, and tables on stdout. Also ``api``, the library reached lazily."""

from __future__ import annotations

import functools
import json
import threading
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from ..config import rate_text
from ..errors import HistoindexError


class _Api:
    """``histoindex.api``, imported when a command first uses it: `--help` and usage errors must
    not wait for LanceDB, DuckDB, anndata and torch to load."""

    def __getattr__(self, name: str):
        import importlib

        return getattr(importlib.import_module("histoindex.api"), name)


api = _Api()


console = Console(stderr=True, highlight=False)


def _log(message: str) -> None:
    console.print(message, markup=False, soft_wrap=True)  # one line per message, also in logs


class _RateColumn(ProgressColumn):
    """Items per second since the step began (steadier than rich's windowed speed)."""

    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        if not task.fields.get("rate", True) or elapsed <= 0:
            return Text("")
        return Text(rate_text(task.completed / elapsed, task.fields.get("unit", "it")), style="progress.data.speed")


class ProgressBars:
    """The API's ``progress(step, done, total)`` callback drawn as rich progress bars on stderr,
    one bar per step (tiles, spots, epochs), each with its rate. When stderr is not a terminal (a
    log file, CI, a scheduler) the bars become plain lines, by the clock: a step that has not said
    how far it is for ``LOG_EVERY_S`` seconds gets a line (also between two of the API's calls: a
    background thread asks every second, so a slow batch still shows the step is alive), and each
    step a line when it completes. ``clock`` (seconds, monotonic) and ``write`` (one line) are for
    tests; ``tick()`` is what the thread calls."""

    LOG_EVERY_S = 10.0

    def __init__(self, *, plain: bool | None = None, clock=time.monotonic, write=None) -> None:
        self._plain = not console.is_terminal if plain is None else plain
        self._clock = clock
        self._write = write or _log
        self._lock = threading.Lock()
        self._steps: dict[str, list] = {}  # step → [started, last line, done, total]: unfinished steps
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> ProgressBars:
        if self._plain:
            self._ticker = threading.Thread(target=self._tick_every_second, name="histoindex-progress", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._ticker is not None:
            self._stop.set()
            self._ticker.join()
        if self._tasks:
            self._progress.stop()

    def __call__(self, step: str, done: int, total: int) -> None:
        if self._plain:
            self._line(step, done, total)
            return
        if not self._tasks:  # drawn from the first step on, so a command that fails early prints nothing extra
            self._progress.start()
        if step not in self._tasks:
            # an epoch's rate says little (the first one also pays for reading patches)
            self._tasks[step] = self._progress.add_task(step, total=total, unit=step.split()[-1], rate=step != "epochs")
        self._progress.update(self._tasks[step], completed=done, total=total)

    def _line(self, step: str, done: int, total: int) -> None:
        with self._lock:
            now = self._clock()
            state = self._steps.get(step)
            if state is None or state[3] != total or done < state[2]:  # a new round of this step (the next slide's tiles)
                state = self._steps[step] = [now, now, done, total]
            state[2] = done
            if done >= total:
                self._say(step, state, now)
                del self._steps[step]
            elif now - state[1] >= self.LOG_EVERY_S:
                self._say(step, state, now)

    def tick(self) -> None:
        """A line for each unfinished step that has said nothing for ``LOG_EVERY_S`` seconds."""
        with self._lock:
            now = self._clock()
            for step, state in self._steps.items():
                if now - state[1] >= self.LOG_EVERY_S:
                    self._say(step, state, now)

    def _tick_every_second(self) -> None:
        while not self._stop.wait(1.0):
            self.tick()

    def _say(self, step: str, state: list, now: float) -> None:
        started, _, done, total = state
        line = f"{step}: {done:,}/{total:,}"
        if step != "epochs" and now > started and done > 0:
            line += f" ({rate_text(done / (now - started), step.split()[-1])})"
        self._write(line)
        state[1] = now


#: libraries whose RuntimeError / OSError (or own error classes) reach the user as one line: the store,
#: SQL and the readers fail that way on a damaged or vanished file, a full disk, a lost permission.
#: The same errors raised by histoindex's own code (or torch's) keep their traceback: those are bugs.
_LIBRARIES = {
    "lance": "Lance", "lancedb": "LanceDB", "duckdb": "DuckDB", "pyarrow": "Arrow", "polars": "Polars",
    "tifffile": "tifffile", "openslide": "OpenSlide", "PIL": "Pillow", "h5py": "h5py", "anndata": "anndata",
    "zarr": "zarr", "imagecodecs": "imagecodecs", "pandas": "pandas", "fsspec": "fsspec",
}  # fmt: skip


def _library_error(exc: BaseException) -> str | None:
    """``exc`` in one line (``DuckDB: IO Error: …``) when a library raised it on a file or store it
    could not read or write; None for anything else (a histoindex bug keeps its traceback)."""
    from ..errors import one_line

    roots = [type(exc).__module__.split(".")[0]]
    tb = exc.__traceback__
    while tb is not None:
        roots.append(str(tb.tb_frame.f_globals.get("__name__", "")).split(".")[0])
        tb = tb.tb_next
    if roots[0] == "duckdb":  # DuckDB's own error classes (duckdb.IOException, …)
        library = _LIBRARIES["duckdb"]
    else:
        library = _LIBRARIES.get(roots[-1]) if isinstance(exc, (RuntimeError, OSError)) else None
    if library is not None:
        return f"{library}: {one_line(exc)}"
    if isinstance(exc, OSError):  # the file system's own error (no space, permission, a file gone)
        return one_line(exc)
    return None


def handle_errors(fn):
    """Turn library errors into click errors (one place, one shape): a HistoindexError as it says,
    a library's error on a file or store as one line naming the library (see ``_library_error``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HistoindexError as exc:
            raise click.ClickException(str(exc)) from exc
        except click.ClickException:
            raise
        except Exception as exc:
            line = _library_error(exc)
            if line is None:
                raise
            raise click.ClickException(line) from exc

    return wrapper


def _render(table, fmt: str, out: str | None = None) -> None:
    if out is not None:
        _write_result(table, fmt, Path(out))
        return
    if fmt == "json":
        click.echo(json.dumps(table.to_pylist(), default=str, indent=1))
        return
    if fmt == "csv":
        click.echo(_csv_text(table), nl=False)
        return
    names = table.column_names
    rows, shortened = [], False
    for row in table.to_pylist():
        cells = [_cell(v) for v in row.values()]
        shortened |= any(cut for _, cut in cells)
        rows.append([text for text, _ in cells])
    screen = Console()
    natural = sum(max([len(n), *(len(r[i]) for r in rows)]) for i, n in enumerate(names)) + 3 * len(names) + 1
    if screen.is_terminal and natural > screen.width and rows:  # too wide for the terminal: one block per row, psql's \x
        key = max(len(n) for n in names)
        for number, row in enumerate(rows, 1):
            click.echo(f"── row {number} " + "─" * max(0, min(screen.width, 60) - 8 - len(str(number))))
            for name, text in zip(names, row):
                click.echo(f"{name.ljust(key)} │ {text}")
    else:
        out_table = Table(show_lines=False)
        for name in names:
            out_table.add_column(name, overflow="fold")
        for row in rows:
            out_table.add_row(*map(Text, row))  # as they are: a value like [x] is not rich markup
        if not screen.is_terminal:  # a pipe or a log: as wide as the rows need, so nothing is folded
            screen = Console(width=max(80, natural))
        screen.print(out_table)
    if shortened:
        console.print(
            f"(long values are shortened to {CELL_CHARS} characters: --format csv or json prints them whole; "
            "--out FILE.parquet|.csv|.json writes them to a file)",
            markup=False,
            soft_wrap=True,
        )


#: the most characters a value takes in `sql`'s table; longer ones are shortened with …
CELL_CHARS = 40


def _csv_text(table) -> str:
    import polars as pl
    import pyarrow as pa

    flat = table
    for i, field in enumerate(table.schema):  # CSV has no nested types: write them as JSON text
        if pa.types.is_nested(field.type):
            flat = flat.set_column(i, field.name, pa.array([json.dumps(v, default=str) for v in table.column(i).to_pylist()]))
        elif pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            flat = flat.set_column(i, field.name, pa.array([None if v is None else v.hex() for v in table.column(i).to_pylist()]))
    return pl.from_arrow(flat).write_csv()


def _write_result(table, fmt: str, out: Path) -> None:
    """``sql --out``: the whole result, every value in full, as Parquet, CSV or JSON."""
    kind = fmt if fmt != "table" else {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".json": "json"}.get(out.suffix.lower())
    if kind is None:
        raise click.BadParameter(f"{out.name}: end it in .parquet, .csv or .json, or give --format", param_hint="--out")
    if kind == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, out)
    elif kind == "csv":
        out.write_text(_csv_text(table))
    else:
        out.write_text(json.dumps(table.to_pylist(), default=str, indent=1))
    click.echo(f"{table.num_rows} rows × {table.num_columns} columns → {out} ({kind})")


def _cell(value) -> tuple[str, bool]:
    """A value as ``sql``'s table shows it, and whether it was shortened: lists as their first
    values and their length (``[0.12, -0.3, … 256 values]``), bytes as their size, long text
    (JSON, ...) cut at :data:`CELL_CHARS` characters with …"""
    if value is None:
        return "", False
    if isinstance(value, float):
        return f"{value:.6g}", False
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value):,} bytes>", len(value) > 0
    if isinstance(value, (list, tuple)):
        full = "[" + ", ".join(_short(v) for v in value) + "]"
        if len(full) <= CELL_CHARS:
            return full, False
        shown = ", ".join(_short(v) for v in value[:2])
        return f"[{shown}, … {len(value):,} values]", True
    text = json.dumps(value, default=str) if isinstance(value, dict) else str(value)
    text = " ".join(text.split()) if "\n" in text else text
    if len(text) > CELL_CHARS:
        return text[: CELL_CHARS - 1] + "…", True
    return text, False


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple, dict)):
        return "[…]" if isinstance(value, (list, tuple)) else "{…}"
    return str(value)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _stdout_console(*tables: Table) -> Console:
    """A console on stdout: the terminal's width, or (a pipe, a log) as wide as ``tables`` need, so
    nothing (a model id) is cut short with an ellipsis where a script reads it."""
    out = Console()
    if out.is_terminal or not tables:
        return out
    unbounded = Console(width=100_000)
    return Console(width=max(80, *(unbounded.measure(t).maximum for t in tables)))
