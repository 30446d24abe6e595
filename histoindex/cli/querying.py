"""``query`` and ``plot``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .console import ProgressBars, _log, api, handle_errors
from .options import _ray_connect, db_option, query_options


def _expand_globs(paths) -> list[str]:
    """Slide arguments with quoted patterns (``'cohort/*.svs'``, ``'**'`` too) expanded here, as
    shells cannot for very long lists; a pattern matching nothing is an error."""
    import glob

    out = []
    for path in paths:
        if glob.has_magic(path) and not Path(path).exists():
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                raise click.BadParameter(f"{path!r} matches no file", param_hint="SLIDES")
            out += matches
        else:
            out.append(path)
    return out


@click.command()
@click.argument("slides", nargs=-1, type=click.Path(dir_okay=False))
@click.option(
    "--slides",
    "manifest",
    type=click.Path(dir_okay=False),
    help="A CSV/Parquet manifest of slides: a 'slide' column (paths relative to it), optional 'mpp' and 'slide_id'; other columns are kept with the predictions.",
)
@click.option(
    "--out",
    type=click.Path(),
    help="Write predictions to .parquet, .h5ad, .geojson (QuPath: File > Import objects; genes as measurements) or .zarr (SpatialData); for several slides, a folder.",
)
@click.option(
    "--format",
    "out_format",
    type=click.Choice(["parquet", "h5ad", "geojson", "zarr"]),
    default="parquet",
    show_default=True,
    help="File type per slide when --out is a folder.",
)
@click.option("--redo", is_flag=True, help="Predict slides again that were already predicted by this model against this spots version.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary of a many-slide query as JSON.")
@click.option("--mpp", type=float, help="Micrometres per pixel, when the slide has none (or to override it).")
@click.option("--spots", "spots_file", type=click.Path(dir_okay=False), help="Predict at these positions: .h5ad, or CSV/Parquet with spot,x,y.")
@click.option(
    "--plot", "plot_genes", multiple=True, metavar="GENE", help="Also draw this gene over the slide into <out stem>.<GENE>.png (repeatable; needs --out)."
)
@click.option(
    "--ray",
    "ray_address",
    metavar="ADDRESS",
    help="Run the cohort on a Ray cluster: local (start one here), auto (the cluster this machine is in) or the head's address. Needs histoindex[ray].",
)
@click.option("--ray-actors", type=click.IntRange(1), help="Ray actors holding the model (default: one per GPU, else one per 4 CPUs).")
@db_option
@handle_errors
@query_options
def query(slides, manifest, out, out_format, redo, as_json, mpp, spots_file, plot_genes, ray_address, ray_actors, db, options):
    """Impute expression over a slide, or many, by retrieval from the reference.

    Several slides (or --slides MANIFEST, or --out ending in /) load the model and the references
    once, write one file per slide into the --out folder and commit each slide's predictions on its
    own; slides already predicted by the same model against the same spots version are skipped
    (--redo predicts them again), a slide that fails is reported and the others go on, and the exit
    code is 1 when any failed. With --ray the slides are predicted by Ray actors that each hold the
    model (one per GPU), and this process commits each slide's predictions.

    Examples:

        histoindex query slide.svs --tissue liver --out slide.parquet --db liver.db --plot FASN

        histoindex query 'cohort/*.svs' --tissue liver --out preds/ --db liver.db

        histoindex query --slides tcga_brca.csv --tissue breast --out preds/ --db s3://bucket/breast.db --ray auto
    """
    entries = [api.CohortSlide(s) for s in _expand_globs(slides)] + (api.read_slide_manifest(manifest) if manifest else [])
    if not entries:
        raise click.UsageError("give a slide (or several, or --slides MANIFEST)")
    if ray_actors is not None and ray_address is None:
        raise click.UsageError("--ray-actors needs --ray")
    folder = out is not None and (out.endswith("/") or (Path(out).is_dir() and Path(out).suffix.lower() != ".zarr"))  # x.zarr: one SpatialData store
    if options.no_store and not out:
        raise click.UsageError("--no-store keeps the predictions out of every store: give --out to keep them in a file")
    if options.workers is not None and options.workers < 0:
        raise click.BadParameter("must be 0 or more", param_hint="--workers")
    if len(entries) > 1 or manifest is not None or ray_address is not None or folder:
        if spots_file or plot_genes:
            raise click.UsageError("--spots and --plot take one slide")
        cohort = api.CohortOptions(out_dir=out, out_format=out_format, redo=redo, mpp=mpp)
        _query_cohort(entries, db=db, options=options, cohort=cohort, ray_address=ray_address, ray_actors=ray_actors, as_json=as_json)
        return
    if plot_genes and not out:
        raise click.UsageError("--plot needs --out: pictures are drawn from the predictions file")
    if spots_file and options.stride_um is not None:
        raise click.UsageError("--stride-um sets the pitch of the tile grid; --spots predicts at the given positions instead: give one or the other")
    with ProgressBars() as bars:
        result = api.query(
            entries[0].path, db=db, out=out, spots=spots_file, mpp=mpp, plot=plot_genes, keep_predictions=False, progress=bars, log=_log, options=options
        )
    target = f" → {result.out}" if result.out else ""
    where = f" in {options.results_db}" if options.results_db else ""
    kept = "not stored (--no-store)" if options.no_store else f"predictions@{result.predictions_version}{where}"
    click.echo(f"{result.n_tiles} tiles × {len(result.genes)} genes, run {result.run_id}, spots@{result.spots_version}, {kept}{target}")
    for picture in result.plots:
        click.echo(picture)


def _query_cohort(entries, *, db, options, cohort, ray_address, ray_actors, as_json) -> None:
    """Many slides, one load (here, or on Ray actors); the summary; exit code 1 when any failed."""
    _log(f"query of {len(entries)} slide(s): " + ("starting Ray, " if ray_address is not None else "") + "opening the store, loading the model…")
    with ProgressBars() as bars:
        if ray_address is not None:
            cluster = _ray_connect(ray_address)
            result = cluster.query_cohort(entries, db=db, options=options, cohort=cohort, address=ray_address, actors=ray_actors, progress=bars, log=_log)
        else:
            result = api.query_cohort(entries, db=db, options=options, cohort=cohort, progress=bars, log=_log)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        tiles = sum(r.n_tiles for r in result.predicted)
        click.echo(f"{len(result.predicted)} slides predicted ({tiles} tiles), {len(result.skipped)} skipped, {len(result.failed)} failed")
        for slide, error in result.failed:
            click.echo(f"failed: {slide}: {error}", err=True)
    if result.failed:
        click.get_current_context().exit(1)


@click.command()
@click.argument("predictions", type=click.Path(dir_okay=False))
@click.option("--gene", "genes", multiple=True, required=True, metavar="GENE", help="Gene to draw (repeatable): one row each.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Picture to write: .png (.pdf and .svg work too).")
@click.option("--slide", type=click.Path(dir_okay=False), help="Slide to draw under the predictions (default: the one the query read).")
@click.option("--truth", type=click.Path(dir_okay=False), help="Reference .h5ad of the same section: measured beside predicted, with Pearson r.")
@click.option("--max-side", type=int, default=1600, show_default=True, help="Longest side, in pixels, of the slide image behind the predictions.")
@handle_errors
def plot(predictions, genes, out, slide, truth, max_side):
    """Draw predicted expression over the slide.

    PREDICTIONS is a query --out file (.parquet or .h5ad); each --gene gets a row with its own
    colour bar. With --truth, the measured expression of a reference at the same spots (query --spots REF.h5ad)
    is drawn beside the prediction on a shared colour scale, with Pearson r.

    Example:

    \b
        histoindex plot slide.parquet --gene FASN --gene COL1A1 --out slide.png
        histoindex plot spots.h5ad --gene FASN --truth ref.h5ad --out fasn.png
    """
    click.echo(api.plot(predictions, genes=genes, out=out, slide=slide, truth=truth, max_side=max_side))
