"""The ``histoindex`` command line: a thin shell over :mod:`histoindex.api`.

Each command parses its options, makes one API call and renders the result; every
``HistoindexError`` becomes ``Error: ...`` with exit code 1.

Here: the group ``cli`` and the entry point ``main``. The commands live in ``training`` (train,
evaluate), ``ingestion`` (ingest), ``querying`` (query, plot), ``similar`` (search by example),
``analysis`` (sql), ``upkeep`` (index, versions, info, restore, delete, compact) and ``demo``; the options they share in
``options``; what they print (progress, log lines, errors, tables) in ``console``. Importing them
loads no heavy library: each command imports what it needs when it runs.
"""

from __future__ import annotations

import warnings

import click

from .. import __version__
from ..errors import HistoindexWarning
from . import analysis, demo, ingestion, querying, similar, training, upkeep
from .console import ProgressBars

__all__ = ["ProgressBars", "cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="histoindex")
@click.option("-v", "--verbose", is_flag=True, help="Also show the libraries' own notices (Ray's start-up messages and warnings).")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Predict spatial gene expression from H&E slides with a versioned embedding index."""
    ctx.meta["histoindex.verbose"] = verbose


for command in (
    training.train, training.evaluate, ingestion.ingest, querying.query, querying.plot, similar.similar, analysis.sql, upkeep.index, upkeep.versions, upkeep.info,
    upkeep.restore, upkeep.delete, upkeep.compact, demo.demo,
):  # fmt: skip
    cli.add_command(command)


def main() -> None:
    """The ``histoindex`` entry point. Errors are click's (``Error: …`` with exit code 1 for a
    HistoindexError, usage errors with 2); Ctrl-C (SIGINT) ends the command with one line on stderr
    and exit code 130 (128 + SIGINT, as shells report it). Every write to the store is one commit,
    so an interrupted command leaves each table at a version it had or at one it wrote whole."""
    import sys

    interrupted = "Interrupted: nothing is half-written (each write to the store commits whole or not at all; `histoindex versions` lists what was committed)"
    original = warnings.formatwarning

    def fmt(message, category, filename, lineno, line=None):
        if issubclass(category, HistoindexWarning):
            return f"Warning: {message}\n"
        return original(message, category, filename, lineno, line)

    warnings.formatwarning = fmt
    try:
        code = cli.main(prog_name="histoindex", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:
        if not isinstance(exc.__cause__, KeyboardInterrupt):  # e.g. end of input at a prompt: click's own message
            click.echo("Aborted!", err=True)
            sys.exit(1)
        click.echo(interrupted, err=True)  # click has already ended the terminal's "^C" line
        sys.exit(130)
    except KeyboardInterrupt:  # one that arrived outside the command itself
        click.echo(err=True)
        click.echo(interrupted, err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) and not isinstance(code, bool) else 0)
