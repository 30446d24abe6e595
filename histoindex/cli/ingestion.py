"""``ingest``."""

from __future__ import annotations

import click

from .console import ProgressBars, _log, api, handle_errors
from .options import (
    PLATFORM_HELP,
    _ray_connect,
    _read_reference,
    db_option,
    device_option,
    precision_option,
    reference_options,
    training_options,
)


@click.command()
@click.argument("references", nargs=-1, required=True, type=click.Path(dir_okay=True))
@click.option("--tissue", help="Tissue label, used as a query filter (required, except for a HEST folder: its samples' organ).")
@click.option("--platform", help=f"{PLATFORM_HELP} A HEST folder: its samples' st_technology.")
@click.option("--species", help="[default: human; a HEST folder: its samples' species]")
@click.option("--dataset", help="Dataset name (default: file name without extension; a HEST sample's id).")
@click.option("--model", "model_id", help="Model to embed with (default: the one the store's spots use; the newest model if there are no spots yet).")
@click.option("--id", "hest_ids", multiple=True, help="A HEST folder's sample to ingest (repeatable); each becomes a dataset named by its id.")
@click.option(
    "--hest-where",
    multiple=True,
    metavar="KEY=VALUE[,VALUE]",
    help="Choose a HEST folder's samples by their metadata (organ, species, technology, oncotree_code, patient, ...); "
    "a term matches any of its values, case-insensitively; repeated terms must all match.",
)
@click.option(
    "--ray",
    "ray_address",
    metavar="ADDRESS",
    help="Embed several references in parallel on a Ray cluster (local, auto or the head's address); one commit. Needs histoindex[ray].",
)
@db_option
@reference_options
@device_option
@precision_option
@handle_errors
@training_options
def ingest(
    references, tissue, platform, species, dataset, model_id, hest_ids, hest_where, ray_address, db, image, mpp, spot_table, log_normalised, device,
    precision, training,
):  # fmt: skip
    """Embed reference datasets' spots and write them to the store (one new version).

    Trains a model first when the store has none (on all the references given), which takes
    minutes. Re-ingesting a dataset replaces its rows. Several references (files or Space Ranger
    folders that carry their own image, or a HEST folder's samples) are all written in one commit.

    Example:

        histoindex ingest liver_visium.h5ad --tissue liver --platform visium --db liver.db

        histoindex ingest run1/outs --image run1_he.tif --tissue liver --db liver.db

        histoindex ingest C5.tsv.gz --spot-table C5_selection.tsv --image C5.jpg --platform st --tissue breast

        histoindex ingest hest_data/ --id TENX95 --id SPA145 --db breast.db

        histoindex ingest hest_data/ --hest-where organ=Breast --hest-where technology=Visium

        histoindex ingest refs/*.h5ad --tissue liver --db liver.db --ray local
    """
    from ..io.hest import is_hest_dir

    options = api.IngestOptions(model_id=model_id, train_options=training, device=device, precision=precision)
    embed_many = None
    if ray_address is not None:
        cluster = _ray_connect(ray_address)
        embed_many = cluster.ray_embedder(ray_address, db=db, device=device, precision=precision, log=_log)
    if len(references) > 1:
        given = [option for option, value in (("--image", image), ("--spot-table", spot_table), ("--dataset", dataset), ("--mpp", mpp)) if value is not None]
        if given:
            raise click.UsageError(f"{' and '.join(given)} describe(s) one reference; ingest references that need them one by one")
        if hest_ids or hest_where or any(is_hest_dir(r) for r in references):
            raise click.UsageError("a HEST folder is ingested on its own (choose its samples with --id / --hest-where)")
    reference = references[0]

    if hest_ids or hest_where or is_hest_dir(reference):  # a HEST folder: labels from each sample's metadata
        given = [option for option, value in (("--image", image), ("--spot-table", spot_table)) if value is not None]
        if given:
            raise click.UsageError(f"{' and '.join(given)}: not for a HEST folder, whose samples each have their H&E (wsis/ID.tif) and spot positions")
        with ProgressBars() as bars:
            results = api.ingest_hest(
                reference,
                db=db,
                ids=hest_ids,
                where=hest_where,
                tissue=tissue,
                platform=platform,
                species=species,
                dataset=dataset,
                mpp=mpp,
                log_normalised=log_normalised,
                options=options,
                embed_many=embed_many,
                progress=bars,
                log=_log,
            )
    else:
        if not tissue:
            raise click.UsageError("Missing option '--tissue' (the tissue label queries filter on).")
        refs = [
            _read_reference(path, image=image, platform=platform, name=dataset, mpp=mpp, spot_table=spot_table, log_normalised=log_normalised)
            for path in references
        ]
        # the platform label: the one given (which each reference's lattice confirmed), else the lattice's
        plans = [(ref, {"tissue": tissue, "platform": platform or ref.platform or "visium", "species": species or "human"}) for ref in refs]
        with ProgressBars() as bars:
            results = api.ingest_many(plans, db=db, options=options, embed_many=embed_many, progress=bars, log=_log)
    for result in results:
        if result.spots_version < 0:  # a torchrun process other than rank 0, which writes
            return
        click.echo(f"{result.dataset}: {result.n_spots} spots, spots@{result.spots_version}, model {result.model_id}")
