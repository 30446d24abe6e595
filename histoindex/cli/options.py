"""Option groups several commands share (``--db``, ``--device``, ``--precision``, the reference
options, the training options) and the helpers that turn their values into library objects."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import click

from ..config import RetrievalSettings
from ..recipe import DEFAULT_PATCH_PX, DEFAULT_PATCH_UM, TrainOptions
from .console import _log, api


def _default_db() -> str:
    return os.environ.get("HISTOINDEX_DB", "histoindex.db")


def _read_reference(path, **options):
    """``api.read_reference``, said first: the first read also loads anndata and friends (seconds)."""
    _log(f"reading {path}")
    return api.read_reference(path, **options)


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


def gathered(options: list, build: Callable[[dict], object], into: str):
    """A decorator adding ``options`` to a command and handing them to it as one value: ``build``
    of their values, as the keyword ``into`` (e.g. the training options as one ``TrainOptions``).
    Below ``handle_errors``, so a value ``build`` refuses is one line."""
    names = [param.name for param in click.command()(_apply(options, lambda **_: None)).params]

    def decorate(fn):
        @functools.wraps(fn)
        def command(*args, **kwargs):
            kwargs[into] = build({name: kwargs.pop(name) for name in names})
            return fn(*args, **kwargs)

        return _apply(options, command)

    return decorate


def _apply(options: list, fn):
    for option in reversed(options):
        fn = option(fn)
    return fn


def training_options(fn):
    """Options that shape a new model (used by train, and by ingest when the store has none), as
    one ``training: TrainOptions``."""
    defaults = TrainOptions()
    return gathered([*_model_options(defaults), *_fitting_options(defaults)], _train_options, "training")(fn)


def _model_options(defaults: TrainOptions) -> list:
    """``training_options``' first half: the method, the gene panel, the backbone and its patches."""
    return [
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
            help="Any timm model name, or an encoder with its own timm config: hf-hub:ORG/NAME (network or the Hugging Face cache) "
            "or local-dir:PATH (config.json + weights), whose normalisation, input size (--patch-px) and µm per pixel "
            "(config.json's mpp, else 0.5; sets --patch-um) come from that config.",
        ),
        click.option(
            "--weights",
            show_default="lite0-imagenet, unless --backbone is given",
            help="Backbone weights: a registered name (lite0-imagenet: ImageNet EfficientNet-Lite0, offline, sets the backbone), a local .safetensors/.pth file, 'timm' to download timm's, or 'none' for random initialisation. An hf-hub:/local-dir: backbone brings its own unless a file is given.",
        ),
        click.option(
            "--patch-um",
            type=float,
            show_default=f"{DEFAULT_PATCH_UM:g}; an hf-hub:/local-dir: backbone's µm per pixel × --patch-px",
            help="Patch side in micrometres.",
        ),
        click.option(
            "--patch-px",
            type=int,
            show_default=f"{DEFAULT_PATCH_PX}; an hf-hub:/local-dir: backbone's input size",
            help="Patch side in pixels fed to the backbone.",
        ),
    ]


def _fitting_options(defaults: TrainOptions) -> list:
    """``training_options``' second half: how the model is fitted, checked, and answers queries."""
    return [
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


#: command parameter → QueryOptions field, where the names differ
_QUERY_FIELDS = {"predict_genes": "genes"}


def query_options(fn):
    """The options of a query (filters, retrieval, store state, where answers go, how it runs) as
    one ``options: QueryOptions``, checked as it is built."""
    options = [
        click.option("--tissue", help="Only reference spots of this tissue."),
        click.option("--platform", help="Only reference spots of this platform."),
        click.option("--species", help="Only reference spots of this species."),
        click.option("--where", help="Extra SQL filter on the spots table, e.g. \"dataset IN ('a', 'b')\"."),
        click.option("--k", type=int, help="Neighbours averaged per tile (default: the model's; 100 for the default recipe)."),
        click.option(
            "--smooth",
            type=click.FloatRange(0, 1),
            help="Blend each tile's prediction with its spatial neighbours' mean: 0 off, 1 the neighbourhood mean (default: the model's; 0.5 for the default recipe).",
        ),
        click.option(
            "--no-store", is_flag=True, help="Keep the predictions out of every store: write --out only (a shared, read-only reference store; no resume state)."
        ),
        click.option(
            "--results-db",
            metavar="URI",
            help="Commit predictions, provenance and resume state to this store of your own (created if new) instead of --db, which is only read.",
        ),
        click.option("--as-of", help="Search the spots table as of this version (number or tag)."),
        click.option(
            "--stride-um",
            type=float,
            metavar="UM",
            help="Pitch of the output grid, µm: windows of the model's patch size centred every UM µm (overlapping when UM is below the patch size); "
            "at most the patch size. Default: the spot pitch of the references searched (Visium 100, legacy ST 200) when they are all of one such "
            "platform and it is finer than the patch; otherwise (mixed or unknown platforms) the patch size, tiles side by side.",
        ),
        click.option("--model", "model_id", help="Model id (default: the one model the store's spots were embedded by; required when there are several)."),
        click.option("--batch-size", type=int, default=64, show_default=True),
        click.option(
            "--genes",
            "predict_genes",
            metavar="GENES",
            help="Genes to predict: FASN,ERBB2, a file of one symbol per line, or all; any gene a searched reference measured "
            "(default: the model's training panel). A gene is averaged over the neighbours whose dataset measured it.",
        ),
        click.option(
            "--search",
            "search_mode",
            type=click.Choice(["auto", "exact", "ann"]),
            default="auto",
            show_default=True,
            help="exact: in-memory matrix products over the filtered references; ann: LanceDB's vector index (histoindex index); auto: exact up to 2M candidates.",
        ),
        click.option("--workers", type=int, help="Background threads reading the slide (default: cores - 1, at most 8; 0 reads in the main thread)."),
        click.option(
            "--views",
            type=click.IntRange(1, 8),
            help=f"Dihedral views averaged per tile (default: the model's, {TrainOptions().views} for the default recipe); each view is one backbone pass.",
        ),
        click.option(
            "--keep-tiles/--no-keep-tiles",
            default=True,
            show_default=True,
            help="Index the slide's tile embeddings in the store's tiles table, so asking the same slide again (another filter, k, "
            "reference version) is search only, and `histoindex similar` finds its tissue.",
        ),
        click.option("--re-embed", is_flag=True, help="Read and embed the slide even when its tiles are indexed (same bytes, model and settings)."),
        device_option,
        precision_option,
    ]
    return gathered(options, lambda values: api.QueryOptions(**{_QUERY_FIELDS.get(k, k): v for k, v in values.items()}), "options")(fn)


def _ray_connect(address: str):
    """Join (or start) the Ray cluster ``--ray`` names, quietly unless ``histoindex -v``."""
    from .. import cluster

    cluster.connect(address, verbose=click.get_current_context().meta.get("histoindex.verbose", False))
    return cluster
