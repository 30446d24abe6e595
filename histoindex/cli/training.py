"""``train`` and ``evaluate``."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from .console import ProgressBars, _log, api, handle_errors
from .options import PLATFORM_HELP, _read_reference, db_option, device_option, reference_options, training_options


@click.command()
@click.argument("references", nargs=-1, required=True, type=click.Path(dir_okay=True))
@db_option
@click.option("--platform", help=PLATFORM_HELP)
@reference_options
@device_option
@handle_errors
@training_options
def train(references, db, platform, image, mpp, spot_table, log_normalised, device, training):
    """Train a BLEEP model on reference datasets and register it in the store.

    Example:

        histoindex train liver1.h5ad liver2.h5ad --n-genes 500 --epochs 20 --db liver.db
    """
    if image and len(references) > 1:
        raise click.UsageError("--image applies to a single reference")
    if spot_table and len(references) > 1:
        raise click.UsageError("--spot-table applies to a single reference")
    refs = [_read_reference(r, image=image, platform=platform, mpp=mpp, spot_table=spot_table, log_normalised=log_normalised) for r in references]
    with ProgressBars() as bars:
        result = api.train(refs, db=db, options=training, device=device, progress=bars, log=_log)
    click.echo(result.model_id)


@click.command()
@click.argument("references", nargs=-1, required=True, type=click.Path(dir_okay=True))
@click.option(
    "--holdout",
    "holdouts",
    multiple=True,
    help="Section(s) to hold out, by name (file stem); with --protocol patient, patient(s). Default: each in turn.",
)
@click.option(
    "--protocol",
    type=click.Choice(["section", "patient"]),
    default="section",
    show_default=True,
    help="section: hold out one section at a time; patient: every section of a patient together "
    "(model, gene panel and baselines fitted on the other patients only; needs --patient or --patient-column).",
)
@click.option("--patient", "patient_pairs", multiple=True, metavar="SECTION=PATIENT", help="A section's patient (repeatable), e.g. --patient C2=C.")
@click.option("--patient-column", metavar="KEY", help="Read each .h5ad section's patient from this obs column (one value) or uns entry.")
@click.option("--platform", help=PLATFORM_HELP)
@click.option(
    "--markers",
    default=",".join(("FASN", "SCD", "KRT8", "CD74", "MGP", "IGKC", "VIM", "MUC1")),
    show_default=True,
    help="Comma-separated marker genes scored as MG-n.",
)
@click.option("--k", type=int, help="Neighbours averaged per spot (default: the model's retrieval settings, --retrieval).")
@click.option(
    "--baselines/--no-baselines",
    default=True,
    show_default=True,
    help="Also score mean expression, colour retrieval, frozen-feature retrieval, ridge (penalty by inner CV) "
    "and, for context only, depth-only (reads the truth's total counts).",
)
@click.option("--out", type=click.Path(dir_okay=False), help="Write held-out predictions and truth (.parquet), keyed by section, system, spot.")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
@click.option("--mpp", type=float, help="Micrometres per full-resolution pixel for every reference.")
@click.option("--log-normalised", is_flag=True, help="The .h5ad files' X is log1p(counts per 10k) of a gene subset, with no raw counts beside it.")
@click.option("--cache", type=click.Path(file_okay=False), help="Keep each section's frozen-backbone features in this folder between runs.")
@device_option
@handle_errors
@training_options
def evaluate(
    references, holdouts, protocol, patient_pairs, patient_column, platform, markers, k, baselines, out, as_json, mpp, log_normalised, cache, device, training
):
    """Held-out evaluation (leave one section, or with --protocol patient one patient, out):
    per-gene Pearson r on held-out spots (HEG-50, HVG-50, markers, all genes) and MSE, for the
    model and for baselines, on the same genes.

    Example:

        histoindex evaluate C2.h5ad C3.h5ad C4.h5ad C5.h5ad --platform st --genes panel.txt

        histoindex evaluate C2.h5ad C3.h5ad B4.h5ad --protocol patient --patient C2=C --patient C3=C --patient B4=B
    """
    from ..evaluate import parse_patients, read_patient

    patients = parse_patients(patient_pairs)
    refs = [api.read_reference(r, platform=platform, mpp=mpp, log_normalised=log_normalised) for r in references]
    if patient_column:
        for path, ref in zip(references, refs, strict=True):
            patients.setdefault(ref.name, read_patient(path, patient_column, section=ref.name))
    result = api.evaluate(
        refs,
        holdouts=list(holdouts) or None,
        protocol=protocol,
        patients=patients or None,
        options=training,
        markers=[m.strip() for m in markers.split(",") if m.strip()],
        k=k,
        baselines=baselines,
        out=out,
        device=device,
        cache=cache,
        log=_log,
    )
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=1, default=str))
        return
    summary = result.summary()
    metrics = list(next(iter(summary.values())))
    table = Table(title=f"held-out scores, mean over {len(result.folds)} fold(s): {', '.join(f.holdout for f in result.folds)}")
    table.add_column("system")
    for m in metrics:
        table.add_column(m, justify="right")
    for system, values in summary.items():
        label = f"{system} (context only: reads the truth's depth)" if system in result.config.get("context_only", ()) else system
        table.add_row(label, *[f"{values[m]:.3f}" for m in metrics])
    Console().print(table)
