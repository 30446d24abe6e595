"""The ``histoindex`` command line: a thin shell over :mod:`histoindex.api`.

Each command parses its options, makes one API call and renders the result; every
``HistoindexError`` becomes ``Error: ...`` with exit code 1.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
import warnings
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from . import __version__
from .config import RetrievalSettings, rate_text
from .errors import HistoindexError, HistoindexWarning
from .recipe import TrainOptions


class _Api:
    """``histoindex.api``, imported when a command first uses it: `--help` and usage errors must
    not wait for LanceDB, DuckDB, anndata and torch to load."""

    def __getattr__(self, name: str):
        import importlib

        return getattr(importlib.import_module("histoindex.api"), name)


api = _Api()

console = Console(stderr=True, highlight=False)


def _default_db() -> str:
    return os.environ.get("HISTOINDEX_DB", "histoindex.db")


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


def _read_reference(path, **options):
    """``api.read_reference``, said first: the first read also loads anndata and friends (seconds)."""
    _log(f"reading {path}")
    return api.read_reference(path, **options)


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
    from .errors import one_line

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


def db_option(fn):
    return click.option(
        "--db",
        default=_default_db,
        show_default="$HISTOINDEX_DB or ./histoindex.db",
        help="Store location: a directory or a LanceDB URI.",
    )(fn)


def device_option(fn):
    return click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda, cuda:1 ...")(fn)


def precision_option(fn):
    return click.option(
        "--precision",
        type=click.Choice(["auto", "fp32", "bf16"]),
        default="auto",
        show_default=True,
        help="Image-embedding precision; auto: bf16 on CUDA and on CPUs with native bf16, else fp32.",
    )(fn)


#: --platform of the commands that read references
PLATFORM_HELP = (
    "visium or st, to confirm what the spots' lattice shows (hexagonal: visium, square: st; an error when they differ). [default: the lattice's, else visium]"
)


def reference_options(fn):
    for option in reversed(
        [
            click.option(
                "--image",
                type=click.Path(dir_okay=False),
                help="Full-resolution H&E (overrides the path recorded in the h5ad; needed for legacy ST counts; Space Ranger keeps none).",
            ),
            click.option("--mpp", type=float, help="Micrometres per full-resolution pixel (overrides image metadata and spot size)."),
            click.option(
                "--spot-table",
                type=click.Path(dir_okay=False),
                help="Legacy ST spot table (x, y, pixel_x, pixel_y[, selected]) for a counts .tsv(.gz) reference.",
            ),
            click.option(
                "--log-normalised",
                is_flag=True,
                help="The .h5ad's X is log1p(counts per 10k) of a gene subset and it has no raw counts (layers['counts'] or .raw are used first when present).",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def training_options(fn):
    """Options that shape a new model (used by train, and by ingest when the store has none)."""
    defaults = TrainOptions()
    for option in reversed(
        [
            click.option(
                "--method",
                type=click.Choice(["bleep", "stgchb", "frozen"]),
                default=defaults.method,
                show_default=True,
                help="bleep: each spot alone; stgchb: graph contrastive learning over each section's spatial kNN graph (ST-GCHB); frozen: no training, retrieval on the frozen backbone's features (the baseline).",
            ),
            click.option(
                "--method-param",
                "method_params",
                multiple=True,
                metavar="KEY=VALUE",
                help="A method hyper-parameter, e.g. --method-param layers=2 (stgchb: graph_k, hidden, layers, beta, sigma, hsic_weight, dgi_weight, pretrain_epochs).",
            ),
            click.option("--genes", "genes_file", type=click.Path(dir_okay=False), help="Gene panel: one symbol per line."),
            click.option(
                "--n-genes", type=int, default=defaults.n_genes, show_default=True, help="Else: this many highly variable genes of the training references."
            ),
            click.option(
                "--backbone",
                show_default="resnet18, or the one registered --weights fit",
                help="Any timm model name (hf-hub:... names need network).",
            ),
            click.option(
                "--weights",
                show_default="lite0-imagenet, unless --backbone is given",
                help="Backbone weights: a registered name (lite0-imagenet: ImageNet EfficientNet-Lite0, offline, sets the backbone), a local .safetensors/.pth file, 'timm' to download timm's, or 'none' for random initialisation.",
            ),
            click.option("--patch-um", type=float, default=defaults.patch_um, show_default=True, help="Patch side in micrometres."),
            click.option("--patch-px", type=int, default=defaults.patch_px, show_default=True, help="Patch side in pixels fed to the backbone."),
            click.option("--epochs", type=int, default=defaults.epochs, show_default=True),
            click.option("--batch-size", type=int, default=defaults.batch_size, show_default=True),
            click.option("--lr", type=float, default=defaults.lr, show_default=True, help="Backbone learning rate (AdamW)."),
            click.option("--head-lr", type=float, default=defaults.head_lr, show_default=True, help="Projection heads' learning rate."),
            click.option("--seed", type=int, default=defaults.seed, show_default=True),
            click.option(
                "--freeze-backbone/--fine-tune",
                default=defaults.freeze_backbone,
                show_default=True,
                help="Train only the projection heads on cached backbone features (far cheaper), or the whole network.",
            ),
            click.option(
                "--views",
                type=click.IntRange(1, 8),
                default=defaults.views,
                show_default=True,
                help="Dihedral views (rotations/flips) averaged when embedding a patch.",
            ),
            click.option(
                "--stain",
                type=click.Choice(["none", "macenko"]),
                default=defaults.stain,
                show_default=True,
                help="Stain normalisation of every section and slide (Macenko, fitted per slide on a sample of its own patches).",
            ),
            click.option(
                "--inner-check/--no-inner-check",
                default=defaults.inner_check,
                show_default=True,
                help="With several references and a frozen backbone, hold each out in turn and check that the trained model beats frozen-feature retrieval (recorded in the model; a warning when it does not).",
            ),
            click.option(
                "--fallback/--no-fallback",
                default=defaults.fallback,
                show_default=True,
                help="When the inner check finds frozen-feature retrieval ahead, keep that (method frozen) instead of the trained model.",
            ),
            click.option(
                "--retrieval",
                "retrieval",
                multiple=True,
                metavar="KEY=VALUE[,...]",
                help="How the model answers queries (recorded in it), over the default "
                + ",".join(f"{k}={v}" for k, v in defaults.retrieval.to_dict().items())
                + ": k neighbours; tau, softmax temperature of their similarity weights (0: plain mean); impute log or z (per-dataset z-scores);"
                " smooth 0..1, blend with the query's spatial neighbours (smooth_k nearest). BLEEP's own: k=50,tau=0,impute=log,smooth=0.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def _train_options(kwargs: dict) -> TrainOptions:
    keys = (
        "method",
        "genes_file",
        "n_genes",
        "backbone",
        "weights",
        "patch_um",
        "patch_px",
        "epochs",
        "batch_size",
        "lr",
        "head_lr",
        "seed",
        "freeze_backbone",
        "views",
        "stain",
        "inner_check",
        "fallback",
    )
    if kwargs.get("weights") is not None and kwargs["weights"].lower() == "none":
        kwargs = {**kwargs, "weights": ""}  # explicit random initialisation
    return TrainOptions(
        **{k: kwargs[k] for k in keys},
        method_params=_method_params(kwargs.get("method_params", ())),
        retrieval=_retrieval(kwargs.get("retrieval", ())),
    )


def _retrieval(values) -> RetrievalSettings:
    """``--retrieval k=50,tau=0 --retrieval impute=log`` over the default recipe's settings."""
    pairs = [p for value in values for p in value.split(",") if p.strip()]
    items = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{pair!r}: expected KEY=VALUE", param_hint="--retrieval")
        items[key.strip()] = value.strip()
    return RetrievalSettings.parse({**TrainOptions().retrieval.to_dict(), **items})


def _method_params(pairs) -> dict:
    """KEY=VALUE pairs as numbers where they read as numbers (the method checks names and values)."""
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{pair!r}: expected KEY=VALUE", param_hint="--method-param")
        for cast in (int, float):
            try:
                params[key.strip()] = cast(value)
                break
            except ValueError:
                continue
        else:
            params[key.strip()] = value.strip()
    return params


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="histoindex")
@click.option("-v", "--verbose", is_flag=True, help="Also show the libraries' own notices (Ray's start-up messages and warnings).")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Predict spatial gene expression from H&E slides with a versioned embedding index."""
    ctx.meta["histoindex.verbose"] = verbose


def _ray_connect(address: str):
    """Join (or start) the Ray cluster ``--ray`` names, quietly unless ``histoindex -v``."""
    from . import cluster

    cluster.connect(address, verbose=click.get_current_context().meta.get("histoindex.verbose", False))
    return cluster


@cli.command()
@click.argument("references", nargs=-1, required=True, type=click.Path(dir_okay=True))
@db_option
@click.option("--platform", help=PLATFORM_HELP)
@reference_options
@training_options
@device_option
@handle_errors
def train(references, db, platform, image, mpp, spot_table, log_normalised, device, **kwargs):
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
        result = api.train(refs, db=db, options=_train_options(kwargs), device=device, progress=bars, log=_log)
    click.echo(result.model_id)


@cli.command()
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
@training_options
@device_option
@handle_errors
def evaluate(
    references, holdouts, protocol, patient_pairs, patient_column, platform, markers, k, baselines, out, as_json, mpp, log_normalised, cache, device, **kwargs
):
    """Held-out evaluation (leave one section, or with --protocol patient one patient, out):
    per-gene Pearson r on held-out spots (HEG-50, HVG-50, markers, all genes) and MSE, for the
    model and for baselines, on the same genes.

    Example:

        histoindex evaluate C2.h5ad C3.h5ad C4.h5ad C5.h5ad --platform st --genes panel.txt

        histoindex evaluate C2.h5ad C3.h5ad B4.h5ad --protocol patient --patient C2=C --patient C3=C --patient B4=B
    """
    from .evaluate import parse_patients, read_patient

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
        options=_train_options(kwargs),
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


@cli.command()
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
@training_options
@device_option
@precision_option
@handle_errors
def ingest(
    references, tissue, platform, species, dataset, model_id, hest_ids, hest_where, ray_address, db, image, mpp, spot_table, log_normalised, device,
    precision, **kwargs,
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
    from .io.hest import is_hest_dir

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
                model_id=model_id,
                train_options=_train_options(kwargs),
                device=device,
                precision=precision,
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
            results = api.ingest_many(
                plans, db=db, model_id=model_id, train_options=_train_options(kwargs), device=device, precision=precision,
                embed_many=embed_many, progress=bars, log=_log,
            )  # fmt: skip
    for result in results:
        if result.spots_version < 0:  # a torchrun process other than rank 0, which writes
            return
        click.echo(f"{result.dataset}: {result.n_spots} spots, spots@{result.spots_version}, model {result.model_id}")


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


@cli.command()
@click.argument("slides", nargs=-1, type=click.Path(dir_okay=False))
@click.option(
    "--slides",
    "manifest",
    type=click.Path(dir_okay=False),
    help="A CSV/Parquet manifest of slides: a 'slide' column (paths relative to it), optional 'mpp' and 'slide_id'; other columns are kept with the predictions.",
)
@click.option("--tissue", help="Only reference spots of this tissue.")
@click.option("--platform", help="Only reference spots of this platform.")
@click.option("--species", help="Only reference spots of this species.")
@click.option("--where", help="Extra SQL filter on the spots table, e.g. \"dataset IN ('a', 'b')\".")
@click.option("--k", type=int, help="Neighbours averaged per tile (default: the model's; 100 for the default recipe).")
@click.option(
    "--smooth",
    type=click.FloatRange(0, 1),
    help="Blend each tile's prediction with its spatial neighbours' mean: 0 off, 1 the neighbourhood mean (default: the model's; 0.5 for the default recipe).",
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
@click.option(
    "--no-store", is_flag=True, help="Keep the predictions out of every store: write --out only (a shared, read-only reference store; no resume state)."
)
@click.option(
    "--results-db",
    metavar="URI",
    help="Commit predictions, provenance and resume state to this store of your own (created if new) instead of --db, which is only read.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary of a many-slide query as JSON.")
@click.option("--mpp", type=float, help="Micrometres per pixel, when the slide has none (or to override it).")
@click.option("--as-of", help="Search the spots table as of this version (number or tag).")
@click.option("--spots", "spots_file", type=click.Path(dir_okay=False), help="Predict at these positions: .h5ad, or CSV/Parquet with spot,x,y.")
@click.option(
    "--stride-um",
    type=float,
    metavar="UM",
    help="Pitch of the output grid, µm: windows of the model's patch size centred every UM µm (overlapping when UM is below the patch size); "
    "at most the patch size. Default: the spot pitch of the references searched (Visium 100, legacy ST 200) when they are all of one such "
    "platform and it is finer than the patch; otherwise (mixed or unknown platforms) the patch size, tiles side by side.",
)
@click.option("--model", "model_id", help="Model id (default: the one model the store's spots were embedded by; required when there are several).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option(
    "--plot", "plot_genes", multiple=True, metavar="GENE", help="Also draw this gene over the slide into <out stem>.<GENE>.png (repeatable; needs --out)."
)
@click.option(
    "--genes",
    "predict_genes",
    metavar="GENES",
    help="Genes to predict: FASN,ERBB2, a file of one symbol per line, or all; any gene a searched reference measured "
    "(default: the model's training panel). A gene is averaged over the neighbours whose dataset measured it.",
)
@click.option(
    "--search",
    "search_mode",
    type=click.Choice(["auto", "exact", "ann"]),
    default="auto",
    show_default=True,
    help="exact: in-memory matrix products over the filtered references; ann: LanceDB's vector index (histoindex index); auto: exact up to 2M candidates.",
)
@click.option("--workers", type=int, help="Background threads reading the slide (default: cores - 1, at most 8; 0 reads in the main thread).")
@click.option(
    "--ray",
    "ray_address",
    metavar="ADDRESS",
    help="Run the cohort on a Ray cluster: local (start one here), auto (the cluster this machine is in) or the head's address. Needs histoindex[ray].",
)
@click.option("--ray-actors", type=click.IntRange(1), help="Ray actors holding the model (default: one per GPU, else one per 4 CPUs).")
@click.option(
    "--views",
    type=click.IntRange(1, 8),
    help=f"Dihedral views averaged per tile (default: the model's, {TrainOptions().views} for the default recipe); each view is one backbone pass.",
)
@db_option
@device_option
@precision_option
@handle_errors
def query(
    slides,
    manifest,
    tissue,
    platform,
    species,
    where,
    k,
    smooth,
    out,
    out_format,
    redo,
    no_store,
    results_db,
    as_json,
    mpp,
    as_of,
    spots_file,
    stride_um,
    model_id,
    batch_size,
    plot_genes,
    predict_genes,
    search_mode,
    workers,
    ray_address,
    ray_actors,
    views,
    db,
    device,
    precision,
):
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
    cohort = len(entries) > 1 or manifest is not None or ray_address is not None or folder
    if no_store and not out:
        raise click.UsageError("--no-store keeps the predictions out of every store: give --out to keep them in a file")
    if cohort:
        if spots_file or plot_genes:
            raise click.UsageError("--spots and --plot take one slide")
        if workers is not None and workers < 0:
            raise click.BadParameter("must be 0 or more", param_hint="--workers")
        options = dict(tissue=tissue, platform=platform, species=species, where=where, k=k, as_of=as_of, model_id=model_id, device=device,
                       search_mode=search_mode, precision=precision, views=views, stride_um=stride_um, smooth=smooth, genes=predict_genes,
                       results_db=results_db, no_store=no_store)  # fmt: skip
        _log(f"query of {len(entries)} slide(s): " + ("starting Ray, " if ray_address is not None else "") + "opening the store, loading the model…")
        with ProgressBars() as bars:
            if ray_address is not None:
                cluster = _ray_connect(ray_address)
                result = cluster.query_cohort(
                    entries, db=db, address=ray_address, actors=ray_actors, out_dir=out, out_format=out_format, redo=redo, mpp=mpp, workers=workers,
                    batch_size=batch_size, progress=bars, log=_log, **options,
                )  # fmt: skip
            else:
                result = api.query_cohort(
                    entries, db=db, out_dir=out, out_format=out_format, redo=redo, mpp=mpp, workers=workers, batch_size=batch_size, progress=bars, log=_log,
                    **options,
                )  # fmt: skip
        if as_json:
            click.echo(json.dumps(result.to_dict(), indent=2))
        else:
            tiles = sum(r.n_tiles for r in result.predicted)
            click.echo(f"{len(result.predicted)} slides predicted ({tiles} tiles), {len(result.skipped)} skipped, {len(result.failed)} failed")
            for slide, error in result.failed:
                click.echo(f"failed: {slide}: {error}", err=True)
        if result.failed:
            click.get_current_context().exit(1)
        return
    slide = entries[0].path
    if plot_genes and not out:
        raise click.UsageError("--plot needs --out: pictures are drawn from the predictions file")
    if spots_file and stride_um is not None:
        raise click.UsageError("--stride-um sets the pitch of the tile grid; --spots predicts at the given positions instead: give one or the other")
    if workers is not None and workers < 0:
        raise click.BadParameter("must be 0 or more", param_hint="--workers")
    with ProgressBars() as bars:
        result = api.query(
            slide,
            db=db,
            tissue=tissue,
            platform=platform,
            species=species,
            where=where,
            k=k,
            out=out,
            mpp=mpp,
            as_of=as_of,
            spots=spots_file,
            model_id=model_id,
            device=device,
            batch_size=batch_size,
            plot=plot_genes,
            search_mode=search_mode,
            precision=precision,
            workers=workers,
            views=views,
            stride_um=stride_um,
            smooth=smooth,
            genes=predict_genes,
            results_db=results_db,
            no_store=no_store,
            keep_predictions=False,
            progress=bars,
            log=_log,
        )
    target = f" → {result.out}" if result.out else ""
    kept = "not stored (--no-store)" if no_store else f"predictions@{result.predictions_version}" + (f" in {results_db}" if results_db else "")
    click.echo(f"{result.n_tiles} tiles × {len(result.genes)} genes, run {result.run_id}, spots@{result.spots_version}, {kept}{target}")
    for picture in result.plots:
        click.echo(picture)


@cli.command()
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


@cli.command()
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
    """Run one read-only SQL statement (DuckDB) over the store: tables spots, predictions, models;
    views predictions_long and spots_long (one row per gene); and the data files the statement names.

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


@cli.command()
@db_option
@click.option("--type", "index_type", type=click.Choice(["IVF_PQ", "IVF_FLAT", "IVF_HNSW_SQ"], case_sensitive=False), default="IVF_PQ", show_default=True)
@click.option("--partitions", type=int, help="IVF partitions (default: about sqrt(rows)).")
@click.option("--sub-vectors", type=int, help="PQ sub-vectors (IVF_PQ; default 16).")
@handle_errors
def index(db, index_type, partitions, sub_vectors):
    """Build the ANN index on the reference expression embeddings (for `query --search ann`) and
    refresh the scalar indexes on the filter columns. Makes new spots versions.

    Example:

        histoindex index --db liver.db --type IVF_PQ
    """
    version = api.create_index(db=db, index_type=index_type, num_partitions=partitions, num_sub_vectors=sub_vectors)
    click.echo(f"indexed spots@{version}")


@cli.command()
@db_option
@handle_errors
def versions(db):
    """List every version of every table: timestamp, rows, data size (the data files it references,
    shared between versions), what made it (created, ingest of X, index build or refresh, restore of
    N, delete of X, compaction; "unknown" where the store does not say) and tags.

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


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


@cli.command()
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


def _stdout_console(*tables: Table) -> Console:
    """A console on stdout: the terminal's width, or (a pipe, a log) as wide as ``tables`` need, so
    nothing (a model id) is cut short with an ellipsis where a script reads it."""
    out = Console()
    if out.is_terminal or not tables:
        return out
    unbounded = Console(width=100_000)
    return Console(width=max(80, *(unbounded.measure(t).maximum for t in tables)))


@cli.command()
@click.argument("version")
@click.option("--table", type=click.Choice(["spots", "predictions", "models"]), default="spots", show_default=True)
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


@cli.command()
@click.option("--dataset", required=True, help="Dataset name (matched literally).")
@click.option("--model", "model_id", help="Only this model's rows of the dataset (default: every model's).")
@db_option
@handle_errors
def delete(dataset, model_id, db):
    """Delete one dataset's reference spots in one new spots version. Older versions keep them
    (`query --as-of`, `restore`) until `compact` removes those versions.

    Example:

        histoindex delete --dataset liver3 --db liver.db
    """
    result = api.delete(db=db, dataset=dataset, model_id=model_id)
    under = f" (model {result.model_id})" if result.model_id else ""
    click.echo(f"deleted {result.rows} spots of {result.dataset}{under}: spots@{result.version}")


@cli.command()
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


@cli.command()
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
    from .demo import run_demo

    with ProgressBars() as bars:
        result = run_demo(workdir, device=device, log=_log, progress=bars)
    click.echo(
        f"held-out section ({result.n_heldout_spots} spots): mean per-gene Pearson r {result.heldout_r:.3f} "
        f"(signature genes {result.heldout_r_markers:.3f}; a constant predictor scores 0)\n"
        f"held-out MSE: model {result.mse_model:.3f} vs constant (training mean) {result.mse_constant:.3f}\n"
        f"files and store in {result.db.parent}  |  {result.seconds:.0f} s"
    )


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


if __name__ == "__main__":
    main()
