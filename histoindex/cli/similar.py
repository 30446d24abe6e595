"""``similar``: search by example."""

from __future__ import annotations

from pathlib import Path

import click

from .console import _log, _render, api, handle_errors
from .options import db_option, device_option, precision_option


def _position(ctx, param, value):
    if value is None:
        return None
    parts = value.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise click.BadParameter(f"{value!r}: give X_UM,Y_UM (two numbers in µm, e.g. 1200,850)") from None


@click.command()
@click.option("--slide", help="An indexed slide (its name as query stored it, or its file): the slide of --at, or of --tile TILE_ID.")
@click.option("--at", callback=_position, metavar="X_UM,Y_UM", help="A position on --slide, in µm: the indexed tile nearest it is the example.")
@click.option("--tile", metavar="SLIDE:TILE_ID", help="An indexed tile as the example (TILE_ID alone with --slide).")
@click.option(
    "--image",
    type=click.Path(dir_okay=False),
    help="An image patch as the example: its central square taken as one tile of the model's patch size, embedded by the model.",
)
@click.option("--k", type=click.IntRange(1), default=10, show_default=True, help="Results to return.")
@click.option("--model", "model_id", help="The model whose embeddings to compare (default: the example's, or the one model with indexed slides).")
@click.option(
    "--slide-where", help="SQL on the slides: slide, slide_path, slide_hash, mpp, created_at, and the manifest's columns stored with each (patient = 'P1')."
)
@click.option(
    "--where",
    help="SQL on each tile's predicted expression, genes as columns (FASN > 2): the model's latest query of the tiles searched (same file contents and embedding settings).",
)
@click.option(
    "--references",
    is_flag=True,
    help="Also search the reference spots, by their image embeddings (the image tower the tiles were embedded with; the query's own search compares tiles with the spots' expression embeddings instead).",
)
@click.option(
    "--search",
    "search_mode",
    type=click.Choice(["auto", "exact", "ann"]),
    default="auto",
    show_default=True,
    help="auto: exact up to 2M tiles, else the vector index (histoindex index --table tiles).",
)
@click.option("--out", type=click.Path(dir_okay=False), help="Write the hits to .parquet or .csv (or, ending in .png, draw the contact sheet).")
@click.option("--sheet", type=click.Path(dir_okay=False), help="Draw the top hits, read from their slides, into this .png (captions: slide, tile, similarity).")
@db_option
@device_option
@precision_option
@handle_errors
def similar(slide, at, tile, image, k, model_id, slide_where, where, references, search_mode, out, sheet, db, device, precision):
    """Find the tiles most like an example across every slide `histoindex query` indexed.

    The example is a position on an indexed slide (--slide with --at), a tile (--tile), or an image
    patch (--image). Tiles are compared by cosine similarity of the model's query-space embeddings,
    among slides indexed by the same model with the same embedding settings; distance_um is the
    distance from the example on its own slide (empty on other slides).

    Examples:

    \b
        histoindex similar --slide tumour.svs --at 1200,850 --k 20
        histoindex similar --tile tumour.svs:r12_c40 --slide-where "patient <> 'P1'" --where "FASN > 2"
        histoindex similar --image patch.png --out hits.parquet --sheet hits.png
    """
    table_out = None
    if out is not None:
        suffix = Path(out).suffix.lower()
        if suffix == ".png":
            if sheet is not None:
                raise click.UsageError("--out x.png draws the contact sheet, and so does --sheet: give one")
            sheet = out
        elif suffix in (".parquet", ".csv"):
            table_out = out
        else:
            raise click.BadParameter(f"{Path(out).name}: end it in .parquet, .csv or .png", param_hint="--out")
    if sheet is not None and Path(sheet).suffix.lower() != ".png":
        raise click.BadParameter(f"{Path(sheet).name}: the contact sheet is a .png", param_hint="--sheet")
    if tile is not None and slide is not None and ":" not in tile:
        pass  # --slide S --tile TILE_ID
    elif tile is not None and slide is not None:
        raise click.UsageError("--tile SLIDE:TILE_ID names its slide: leave out --slide (or give --slide S --tile TILE_ID)")
    options = api.SimilarOptions(
        k=k, model_id=model_id, slide_where=slide_where, where=where, references=references, search_mode=search_mode, device=device, precision=precision
    )
    result = api.similar(db=db, slide=slide, at=at, tile=tile, image=image, options=options, sheet=sheet, log=_log)
    _render(result.table, "table", table_out)
    if result.sheet is not None:
        click.echo(f"contact sheet → {result.sheet}")
