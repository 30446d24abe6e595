"""``sql``."""

from __future__ import annotations

import click

from .console import _render, api, handle_errors
from .options import db_option


@click.command()
@click.argument("statement")
@db_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json", "parquet"]),
    default="table",
    show_default=True,
    help="table: long values shortened to fit; csv and json: every value in full; parquet: with --out.",
)
@click.option("--out", type=click.Path(dir_okay=False), help="Write the result to this file in full (.parquet, .csv or .json; or as --format says).")
@click.option(
    "--allow-files",
    "allow_files",
    multiple=True,
    type=click.Path(exists=True),
    help="A file or folder the statement may also read (repeatable); never the store or a folder holding it.",
)
@handle_errors
def sql(statement, db, fmt, out, allow_files):
    """Run one read-only SQL statement (DuckDB) over the store: tables spots, predictions, models,
    tiles (the indexed slides' tiles, without their embeddings: tiles_embeddings has them; each
    predicted tile is the tiles row of its run: predictions ASOF JOIN tiles USING (slide,
    slide_hash, model_id, embedding_key, tile_id, created_at)); views predictions_long and
    spots_long (one row per gene); and the data files the statement names.

    Allowed: one SELECT (or WITH …, VALUES, SHOW), DESCRIBE, SUMMARIZE, or EXPLAIN [ANALYZE] of a
    SELECT. Anything else (COPY, ATTACH, CREATE, INSERT, SET, INSTALL, LOAD, PRAGMA, several
    statements) is refused. DuckDB runs with external access off and its settings locked: it can
    read the store's tables, the files the statement names in quotes ending in .parquet, .csv,
    .tsv, .json, .jsonl or .ndjson (optionally .gz/.zst; a glob opens only the data files it
    matches), and the files and folders given with --allow-files; nothing inside the store by
    path, and no read_text/read_blob.

    Example:

        histoindex sql "SELECT slide, avg(value) FROM predictions_long WHERE gene = 'FASN' GROUP BY slide"

        histoindex sql "SELECT avg(FASN) FROM 'preds/*.parquet'"
    """
    if fmt == "parquet" and out is None:
        raise click.UsageError("--format parquet writes a file: give --out FILE.parquet")
    if out is not None:
        api.check_sql_output(out, db=db)
    _render(api.sql(statement, db=db, allow_files=allow_files), fmt, out)
