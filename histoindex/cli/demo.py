"""``demo``."""

from __future__ import annotations

import click

from .console import ProgressBars, _log, handle_errors
from .options import device_option


@click.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    help="Folder to write into (recreated if a demo made it; new or empty otherwise). [default: a new temporary folder]",
)
@device_option
@handle_errors
def demo(workdir, device):
    """Run the whole pipeline on built-in synthetic data: train, ingest, query a held-out
    pyramidal TIFF, SQL, and score the predictions against the held-out truth.

    Example:

        histoindex demo --workdir /tmp/histoindex-demo
    """
    _log(f"histoindex demo in {workdir or 'a new temporary folder'}: loading the libraries")  # the first import takes seconds
    from ..demo import run_demo

    with ProgressBars() as bars:
        result = run_demo(workdir, device=device, log=_log, progress=bars)
    click.echo(
        f"held-out section ({result.n_heldout_spots} spots): mean per-gene Pearson r {result.heldout_r:.3f} "
        f"(signature genes {result.heldout_r_markers:.3f}; a constant predictor scores 0)\n"
        f"held-out MSE: model {result.mse_model:.3f} vs constant (training mean) {result.mse_constant:.3f}\n"
        f"files and store in {result.db.parent}  |  {result.seconds:.0f} s"
    )
