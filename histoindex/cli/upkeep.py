"""Looking after the store: ``index``, ``versions``, ``info``, ``restore``, ``delete``, ``compact``."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from .console import _size, _stdout_console, api, handle_errors
from .options import db_option


@click.command()
@db_option
@click.option("--type", "index_type", type=click.Choice(["IVF_PQ", "IVF_FLAT", "IVF_HNSW_SQ"], case_sensitive=False), default="IVF_PQ", show_default=True)
@click.option("--partitions", type=int, help="IVF partitions (default: about sqrt(rows)).")
@click.option("--sub-vectors", type=int, help="PQ sub-vectors (IVF_PQ; default 16).")
@click.option(
    "--table",
    type=click.Choice(["spots", "tiles"]),
    default="spots",
    show_default=True,
    help="spots: the reference expression embeddings (query's search); tiles: the indexed slides' tile embeddings (similar's search).",
)
@handle_errors
def index(db, index_type, partitions, sub_vectors, table):
    """Build the ANN index on the reference expression embeddings (for `query --search ann`) and
    refresh the scalar indexes on the filter columns. Makes new spots versions. With --table tiles,
    the index on the tile embeddings of the slides queries indexed (for `similar`) instead.

    Example:

        histoindex index --db liver.db --type IVF_PQ

        histoindex index --db liver.db --table tiles
    """
    version = api.create_index(db=db, index_type=index_type, num_partitions=partitions, num_sub_vectors=sub_vectors, table=table)
    click.echo(f"indexed {table}@{version}")


@click.command()
@db_option
@handle_errors
def versions(db):
    """List every version of every table: timestamp, rows, data size (the data files it references,
    shared between versions), what made it (created, ingest of X, index build or refresh, restore of
    N, delete of X, tiles of SLIDE, delete of tiles of SLIDE, compaction; "unknown" where the store
    does not say) and tags.

    Example:

        histoindex versions --db liver.db
    """
    for name, rows in api.versions(db=db).items():
        table = Table(title=name)
        for column in ("version", "timestamp", "rows", "data size", "what"):
            table.add_column(column)
        table.add_column("tags", overflow="fold")  # one a line, folded (never cut) in a narrow terminal
        cells = []
        for row in rows:
            size = _size(row["bytes"]) if row["bytes"] is not None else "unknown"
            cells.append((str(row["version"]), str(row["timestamp"])[:19], str(row["rows"]), size, row["what"], "\n".join(row["tags"])))
            table.add_row(*cells[-1])
        out = Console()
        if not out.is_terminal:  # a pipe or a log: as wide as the rows need, so nothing is folded
            widest = [max((len(line) for c in cells for line in c[i].splitlines()), default=0) for i in range(6)]
            out = Console(width=max(80, sum(max(w, 9) for w in widest) + 3 * 6 + 1))
        out.print(table)


@click.command()
@db_option
@handle_errors
def info(db):
    """Summarise the store: tables, versions, indexes, datasets and models.

    Example:

        histoindex info --db liver.db
    """
    summary = api.info(db=db)
    shown: list = [f"store: {summary['uri']}"]
    tables = Table(title="tables")
    for column in ("table", "version", "rows", "indexes"):
        tables.add_column(column)
    for name, t in summary["tables"].items():
        tables.add_row(name, str(t["version"]), str(t["rows"]), ", ".join(t["indexes"]))
    shown.append(tables)
    models = Table(title="models")
    for column in ("model_id", "method", "backbone", "genes", "trained_on", "created_at"):
        models.add_column(column)
    for m in summary["models"]:
        models.add_row(m["model_id"], m["method"], m["backbone"], str(m["genes"]), ", ".join(m["trained_on"]), str(m["created_at"])[:19])
    shown.append(models)
    for m in summary["models"]:  # how each answers a query, and whether training paid inside its sections
        r = m["retrieval"]
        line = f"{m['model_id']}: {m['views']} view(s) per tile, k {r['k']}, " + (f"softmax tau {r['tau']:g}" if r["tau"] else "plain mean")
        line += f", {r['impute']} imputation, smoothing {r['smooth']:g}"
        if m["inner_check"]:
            check = m["inner_check"]
            line += f"; inner check: trained {check['trained']:.3f} vs frozen retrieval {check['frozen']:.3f}"
        shown.append(line)
    for m in summary["models"]:  # the spots of each model: separate embedding spaces, searched apart
        if not m["datasets"]:
            continue
        datasets = Table(title=f"datasets embedded by {m['model_id']}")
        for column in m["datasets"][0]:
            datasets.add_column(column)
        for row in m["datasets"]:
            datasets.add_row(*map(str, row.values()))
        shown.append(datasets)
    out = _stdout_console(*[t for t in shown if isinstance(t, Table)])
    for item in shown:
        out.print(item, soft_wrap=isinstance(item, str))


@click.command()
@click.argument("version")
@click.option("--table", type=click.Choice(["spots", "predictions", "models", "tiles"]), default="spots", show_default=True)
@db_option
@handle_errors
def restore(version, table, db):
    """Make an older version of a table current again: one new version with its content, tagged
    restore-of-VERSION. Nothing is lost: the versions in between stay (see `histoindex versions`).

    VERSION is a version number or a tag.

    Example:

    \b
        histoindex restore 7 --db liver.db
        histoindex restore ingest-liver2-v5 --table spots --db liver.db
    """
    result = api.restore(version, db=db, table=table)
    tagged = f", tagged {result.tag}" if result.tag else ""
    click.echo(f"{result.table}@{result.version}: the content of {result.table}@{result.restored} ({result.rows} rows){tagged}")


@click.command()
@click.option("--dataset", help="Delete this dataset's reference spots (name matched literally).")
@click.option("--slide", help="Delete this slide's indexed tiles (its name as in predictions, matched literally); its predictions are kept.")
@click.option("--model", "model_id", help="Only this model's rows of the dataset or slide (default: every model's).")
@db_option
@handle_errors
def delete(dataset, slide, model_id, db):
    """Delete one dataset's reference spots (one new spots version) or one slide's tiles (one new
    tiles version), given by exactly one of --dataset or --slide. Older versions keep them
    (`query --as-of`, `restore`) until `compact` removes those versions.

    --slide deletes every tiles row of that slide name, whatever file bytes (hashes) they came from;
    its predictions stay (they are answers, with their own provenance, and what a cohort's resume
    reads): the next query of the slide reads and embeds the image again.

    Example:

    \b
        histoindex delete --dataset liver3 --db liver.db
        histoindex delete --slide patient7.svs --db liver.db
    """
    result = api.delete(db=db, dataset=dataset, slide=slide, model_id=model_id)
    under = f" (model {result.model_id})" if result.model_id else ""
    if slide is not None:
        click.echo(f"deleted {result.rows} tiles of {result.slide}{under}: tiles@{result.version} (its predictions are kept)")
    else:
        click.echo(f"deleted {result.rows} spots of {result.dataset}{under}: spots@{result.version}")


@click.command()
@click.option("--keep-versions", type=int, help="Keep the N newest versions of each table (the current one included).")
@click.option(
    "--older-than",
    "older_than_days",
    type=float,
    help="Remove only versions replaced more than DAYS days ago (default 7; with --keep-versions, 1 hour: "
    "a running command may still read a version it opened; 0 when nothing else uses the store).",
)
@click.option("--force", is_flag=True, help="Also remove tagged versions and spots versions that stored predictions searched (deleting their tags).")
@db_option
@handle_errors
def compact(keep_versions, older_than_days, force, db):
    """Compact the tables' data files and remove old versions. Tagged versions (ingest-…, restore-of-…)
    and spots versions that stored predictions searched (tagged pinned-by-predictions-vN) are kept
    unless --force, so `query --as-of` still reproduces every stored prediction. A version replaced
    less than an hour ago is never removed unless --older-than says less: a query or ingest running
    beside compact may still be reading it.

    Example:

    \b
        histoindex compact --keep-versions 5 --db liver.db
        histoindex compact --older-than 30 --db liver.db
        histoindex compact --keep-versions 1 --older-than 0 --db liver.db   # nothing else running
    """
    for t in api.compact(db=db, keep_versions=keep_versions, older_than_days=older_than_days, force=force):
        parts = [f"{t.table}@{t.version}: " + (f"compacted ({t.fragments_removed} → {t.fragments_added} fragments)" if t.compacted else "nothing to compact")]
        parts.append(f"removed {len(t.removed)} old version(s) ({_size(t.bytes_removed)})" if t.removed else "removed no version")
        if t.kept:
            parts.append("kept " + ", ".join(f"{n} ({why})" for n, why in t.kept.items()))
        if t.tags_dropped:
            parts.append(f"deleted tags {', '.join(t.tags_dropped)}")
        if t.unpinned:
            parts.append(f"removed version(s) {', '.join(map(str, t.unpinned))} that stored predictions searched (no longer reproducible with --as-of)")
        click.echo("; ".join(parts))
