"""The public API: one function per CLI command. Each validates its inputs before touching the
store, so a bad input leaves the store exactly as it was."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from .data import SPOT_DIAMETER_UM, PatchGrid, SpotSet
from .errors import InputError, StoreError
from .genes import check_genes, highly_variable_genes, read_gene_list
from .io.h5ad import read_h5ad
from .io.spaceranger import read_spaceranger
from .io.st import read_st
from .io.slides import open_slide
from .io.tables import read_positions
from .io.write import PredictionWriter, check_output_path
from .plot import check_gene_names, picture_path, plot_predictions  # matplotlib loads only when drawing
from .config import ModelConfig
from .patch import stream_patches, stream_spot_patches, tile_grid

# torch and timm (seconds to import) load only inside the commands that run a model, so `sql`,
# `versions` and `info` start fast.
from .search import References, Scope, check_filter_values, search
from .sql import run_sql
from .store import Store, spot_rows

Log = Callable[[str], None]
#: ``progress(step, done, total)``: called as a long step advances (the CLI draws rich progress bars)
Progress = Callable[[str, int, int], None]


def _quiet(_: str) -> None:
    pass


# ---- references ---------------------------------------------------------------------------
def read_reference(
    path: str | Path,
    *,
    image: str | Path | None = None,
    platform: str = "visium",
    name: str | None = None,
    mpp: float | None = None,
    spot_table: str | Path | None = None,
    log_normalised: bool = False,
) -> SpotSet:
    """Read a reference dataset, by what ``path`` is.

    * a folder: a Space Ranger ``outs/`` folder (:func:`~histoindex.io.read_spaceranger`);
    * ``.tsv``/``.csv`` (optionally ``.gz``): legacy ST counts, spots × genes
      (:func:`~histoindex.io.read_st`), which needs ``spot_table`` and ``image``;
    * ``.h5ad``: AnnData in the scanpy/squidpy Visium layout (:func:`~histoindex.io.read_h5ad`).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".gz":
        suffix = Path(path.stem).suffix.lower() + suffix
    if not path.exists():
        raise InputError(f"reference file not found: {path}")
    if path.is_dir():
        reader = read_spaceranger
    elif suffix in {".tsv", ".tsv.gz", ".csv", ".csv.gz"}:
        missing = [option for option, value in (("--spot-table", spot_table), ("--image", image)) if value is None]
        if missing:
            raise InputError(
                f"{path} is read as legacy ST counts (spots × genes), which need {' and '.join(missing)}: "
                "the spot table (x, y, pixel_x, pixel_y) and the full-resolution H&E"
            )
        return read_st(path, spots=spot_table, image=image, name=name, mpp=mpp)
    elif suffix == ".h5ad":
        reader = read_h5ad
    else:
        raise InputError(
            f"unsupported reference {path}: expected an .h5ad file (scanpy/squidpy Visium layout), a Space Ranger outs/ "
            "folder, or legacy ST counts (.tsv/.csv, optionally .gz) with --spot-table and --image"
        )
    if spot_table is not None:
        raise InputError(f"--spot-table applies to legacy ST counts (.tsv/.csv), not to {path}")
    if reader is read_h5ad:
        return read_h5ad(path, image=image, platform=platform, name=name, mpp=mpp, log_normalised=log_normalised)
    return reader(path, image=image, platform=platform, name=name, mpp=mpp)


DEFAULT_WEIGHTS = "lite0-imagenet"


@dataclass(frozen=True)
class TrainOptions:
    """How to train when a model is needed (``train``, ``evaluate``, or ``ingest`` into a store
    with none). The defaults are the recipe that scored best in held-out evaluation on HER2ST
    (BENCHMARKS.md): ImageNet EfficientNet-Lite0 (offline), frozen, 224 µm patches at 224 px,
    projection heads trained for 60 epochs, 8 dihedral views averaged per patch."""

    backbone: str | None = None  # None: ModelConfig.backbone, or the backbone registered --weights fit
    weights: str | None = None  # None: lite0-imagenet unless a backbone is chosen; "": random init
    genes_file: str | None = None
    n_genes: int = 256
    patch_um: float = 224.0
    patch_px: int = 224
    epochs: int = 60
    batch_size: int = 128
    lr: float = ModelConfig.lr
    head_lr: float = ModelConfig.head_lr
    seed: int = 0
    freeze_backbone: bool = True
    views: int = 8


def _model_config(references: Sequence[SpotSet], options: TrainOptions) -> ModelConfig:
    from .models import backbone_input_stats, get_pretrained, is_pretrained

    backbone = options.backbone
    weights = options.weights
    if weights is None:  # the default recipe's weights, unless the user picked another backbone
        weights = DEFAULT_WEIGHTS if backbone is None else ""
    if weights and is_pretrained(weights):
        # registered weights fix the backbone and the input normalisation
        source = get_pretrained(weights)
        if backbone is None:
            backbone = source.backbone
        elif backbone != source.backbone:
            raise InputError(
                f"--weights {source.name} fits backbone {source.backbone}, not {backbone}; "
                f"leave --backbone out or pass --backbone {source.backbone}"
            )
        mean, std = source.mean, source.std
    else:
        backbone = backbone or ModelConfig.backbone
        mean, std = backbone_input_stats(backbone)
    if options.genes_file:
        genes = check_genes(references, read_gene_list(options.genes_file))
    else:
        genes = highly_variable_genes(references, options.n_genes)
    return ModelConfig(
        backbone=backbone,
        weights=weights,
        patch_um=options.patch_um,
        patch_px=options.patch_px,
        mean=mean,
        std=std,
        genes=tuple(genes),
        seed=options.seed,
        epochs=options.epochs,
        batch_size=options.batch_size,
        lr=options.lr,
        head_lr=options.head_lr,
        freeze_backbone=options.freeze_backbone,
        views=options.views,
    )


@dataclass(frozen=True)
class TrainResult:
    model_id: str
    models_version: int
    metrics: dict


def train(
    references: Sequence[SpotSet],
    *,
    db: str | Path,
    options: TrainOptions = TrainOptions(),
    device: str | None = None,
    precision: str = "auto",
    progress: Progress | None = None,
    log: Log = _quiet,
) -> TrainResult:
    """Train a BLEEP model on ``references`` and register it (weights + config) in the store.

    Data-parallel over N processes (GPUs, or CPU workers) with
    ``torchrun --nproc-per-node N -m histoindex.cli train ...``: the process group is set up from
    torchrun's environment (:func:`histoindex.distributed.init_from_env`), the loss is computed on
    every batch gathered from all processes (the same loss as one process), and only rank 0 writes
    the model; the other ranks return its id with ``models_version`` -1."""
    if not references:
        raise InputError("train needs at least one reference")
    names = [r.name for r in references]
    if len(set(names)) != len(names):
        raise InputError(f"reference names repeat: {', '.join(names)}; give each a distinct --dataset name")
    from .embed import resolve_device, resolve_precision
    from .train import train_model

    cfg = _model_config(references, options)
    torch_device = resolve_device(device)
    precision = resolve_precision(precision, torch_device)

    def epoch_done(epoch: int, epochs: int, loss: float) -> None:
        if progress is not None:
            progress("epochs", epoch, epochs)
        if progress is None or epoch == epochs:
            log(f"  epoch {epoch}/{epochs}  loss {loss:.4f}")

    log(f"training {cfg.method} ({cfg.backbone}, {len(cfg.genes)} genes, {sum(r.n_obs for r in references)} spots) on {torch_device}")
    result = train_model(
        references,
        cfg,
        weights=cfg.weights or None,
        device=torch_device,
        progress=epoch_done,
        precision=precision,
    )
    from .distributed import launch_rank

    if launch_rank() != 0:  # torchrun: every rank holds the same model; rank 0 writes it
        from .models import state_digest

        return TrainResult(model_id=f"{cfg.method}-{state_digest(result.model, cfg)}", models_version=-1, metrics=result.metrics)
    store = Store(db, create=True)
    model_id, version = store.add_model(result.model, cfg, metrics=result.metrics, train_datasets=names)
    log(f"registered model {model_id} (models@{version})")
    return TrainResult(model_id=model_id, models_version=version, metrics=result.metrics)


# ---- ingest -------------------------------------------------------------------------------
@dataclass(frozen=True)
class IngestResult:
    dataset: str
    n_spots: int
    spots_version: int
    model_id: str
    trained: bool


def ingest(
    reference: SpotSet,
    *,
    db: str | Path,
    tissue: str,
    platform: str,
    species: str = "human",
    model_id: str | None = None,
    train_options: TrainOptions = TrainOptions(),
    device: str | None = None,
    batch_size: int = 64,
    precision: str = "auto",
    progress: Progress | None = None,
    log: Log = _quiet,
) -> IngestResult:
    """Embed every spot of ``reference`` and write them to ``spots`` in one commit (one new table
    version), replacing the dataset's earlier rows. Trains a model first if the store has none."""
    from .embed import embed_expression, iter_image_embeddings, resolve_device, resolve_precision
    from .models import load_model

    for label, value in (("tissue", tissue), ("platform", platform), ("species", species)):
        if not value or not value.strip():
            raise InputError(f"--{label} must not be empty")
    store = Store(db) if Store.exists(db) else None
    trained = False
    model_id = ingest_model(store, model_id, log=log)
    if model_id is None:
        result = train([reference], db=db, options=train_options, device=device, precision=precision, progress=progress, log=log)
        model_id, trained = result.model_id, True
    from .distributed import launch_rank

    if launch_rank() != 0:  # under torchrun only training is shared; rank 0 embeds and writes the spots
        return IngestResult(dataset=reference.name, n_spots=reference.n_obs, spots_version=-1, model_id=model_id or "", trained=trained)
    store = Store(db)
    record = store.model(model_id)
    cfg = record.cfg
    expression = reference.normalized(list(cfg.genes))  # fails early if genes are missing
    torch_device = resolve_device(device)
    model = load_model(cfg, record.weights(), device=torch_device)
    log(f"embedding {reference.n_obs} spots of {reference.name} with {record.model_id} on {torch_device}")
    precision = resolve_precision(precision, torch_device)
    patches = stream_spot_patches(reference, patch_um=cfg.patch_um, patch_px=cfg.patch_px, batch_size=batch_size, workers=default_read_workers())
    embedded = iter_image_embeddings(model, patches, device=torch_device, precision=precision)
    image_emb = np.concatenate(list(_counted(embedded, "spots", reference.n_obs, progress)))
    expr_emb = embed_expression(model, expression, device=torch_device)
    rows = spot_rows(
        spot_ids=reference.obs_names,
        dataset=reference.name,
        tissue=tissue,
        platform=platform,
        species=species,
        xy=reference.xy,
        mpp=reference.mpp,
        image_embedding=image_emb,
        expression_embedding=expr_emb,
        expression=expression,
        source_values=reference.source_values,
        model_id=record.model_id,
    )
    version = store.write_dataset(rows, model_id=record.model_id, dataset=reference.name)
    log(f"wrote {reference.n_obs} spots of {reference.name} under model {record.model_id} (spots@{version})")
    return IngestResult(dataset=reference.name, n_spots=reference.n_obs, spots_version=version, model_id=record.model_id, trained=trained)


def ingest_model(store: Store | None, model_id: str | None, *, log: Log = _quiet) -> str | None:
    """The model an ingest embeds with: ``model_id`` if given; else the one model the store's
    spots already use (never silently a newer one: spots of two models are two embedding spaces,
    and a query searches one); else, with no spots yet, the newest model; None when the store has
    no model (the ingest trains one)."""
    if store is None:
        if model_id is not None:
            raise StoreError(f"--model {model_id}: there is no store yet, so no model to embed with")
        return None
    models = store.models()
    if model_id is not None:
        store.model(model_id)  # an unknown id is an error that lists the known ones
        return model_id
    in_use = store.spot_models()
    if len(in_use) > 1:
        listed = "; ".join(f"{m} ({', '.join(d)})" for m, d in in_use.items())
        raise StoreError(f"the store's spots were embedded by {len(in_use)} models: {listed}; pass --model to choose one")
    if in_use:
        (chosen,) = in_use
        newest = models[-1].model_id if models else chosen
        if newest != chosen:
            log(f"embedding with {chosen}, the model the store's spots use; the newer model {newest} has none (pass --model {newest} to ingest under it)")
        return chosen
    return models[-1].model_id if models else None


# ---- query --------------------------------------------------------------------------------
@dataclass(frozen=True)
class QueryResult:
    run_id: str
    slide: str
    model_id: str
    spots_version: int
    predictions_version: int
    n_tiles: int
    genes: tuple[str, ...] = field(repr=False)
    ids: np.ndarray = field(repr=False)
    xy: np.ndarray = field(repr=False)
    predictions: np.ndarray | None = field(repr=False)
    out: Path | None = None
    filter: str = ""
    seconds: float = 0.0  # the whole call
    stream_seconds: float = 0.0  # reading, embedding, searching and writing the tiles
    plots: tuple[Path, ...] = ()


def _query_model(store: Store, version: int | None, model_id: str | None):
    """The model a query searches: ``model_id`` (which must have spots at ``version``), else the one
    model the spots at ``version`` were embedded by; several is an error naming them."""
    in_use = store.spot_models(version=version)
    at = f"spots@{version if version is not None else 'latest'}"
    if model_id is not None:
        record = store.model(model_id)
        if model_id not in in_use:
            raise StoreError(f"{at} holds no spots embedded by model {model_id}; models with spots: {', '.join(in_use) or 'none'}")
        return record
    if not in_use:
        raise StoreError(f"{at} holds no spots of any registered model; ingest a reference first")
    if len(in_use) > 1:
        listed = "; ".join(f"{m} ({', '.join(d)})" for m, d in in_use.items())
        raise StoreError(f"{at} holds spots of {len(in_use)} models (separate embedding spaces): {listed}; pass --model")
    (only,) = in_use
    return store.model(only)


def default_read_workers() -> int:
    """Background slide readers: one core is left to the embedding on small machines."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def query(
    slide_path: str | Path,
    *,
    db: str | Path,
    tissue: str | None = None,
    platform: str | None = None,
    species: str | None = None,
    where: str | None = None,
    k: int = 50,
    out: str | Path | None = None,
    mpp: float | None = None,
    as_of: int | str | None = None,
    spots: str | Path | None = None,
    model_id: str | None = None,
    device: str | None = None,
    batch_size: int = 64,
    plot: Sequence[str] = (),
    search_mode: str = "auto",
    precision: str = "auto",
    workers: int | None = None,
    keep_predictions: bool = True,
    progress: Progress | None = None,
    log: Log = _quiet,
) -> QueryResult:
    """Impute expression over a slide (tissue tiles of the model's patch size, or the positions in
    ``spots``) by top-k retrieval against the reference expression embeddings. Each gene in
    ``plot`` is drawn from ``out`` into ``<out stem>.<gene>.png`` beside it.

    The slide streams through: ``workers`` background threads read patches ahead, the model embeds
    them in batches (``precision``: auto / fp32 / bf16), and every ``SEARCH_CHUNK`` tiles are
    searched, imputed and written, so memory stays flat however large the slide. ``out`` and the
    ``predictions`` table (one new version) appear only when the whole slide is done; with
    ``keep_predictions=False`` the result carries no prediction matrix."""
    from .embed import iter_image_embeddings, resolve_device, resolve_precision
    from .impute import impute
    from .models import load_model

    started = time.perf_counter()
    if out is not None:
        out = check_output_path(out)
    if k < 1:
        raise InputError(f"--k must be at least 1, got {k}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    store = Store(db)
    version = int(as_of) if as_of is not None and str(as_of).isdigit() else as_of
    spots_tbl = store.table("spots", version=version)
    version = spots_tbl.version
    record = _query_model(store, version, model_id)
    cfg = record.cfg
    if plot:  # checked now, not after minutes of embedding
        if out is None:
            raise InputError("--plot needs --out: pictures are drawn from the predictions file")
        plot = check_gene_names(plot, cfg.genes, where=f"model {record.model_id}")
    torch_device = resolve_device(device)
    precision = resolve_precision(precision, torch_device)
    scope = Scope(model_id=record.model_id, tissue=tissue, platform=platform, species=species, where=where)
    check_filter_values(store, version=version, model_id=record.model_id, tissue=tissue, platform=platform, species=species)
    references = References(store, scope, version=version, mode=search_mode, device=str(torch_device))  # a bad filter fails here
    predicate, path = references.where, references.path
    k_eff = min(k, references.n)
    if k_eff < k:
        log(f"warning: --k {k} is more than the {references.n} reference spots that match; averaging all {references.n}")

    slide = open_slide(slide_path, mpp=mpp)
    try:
        if spots is not None:
            ids, xy = read_positions(spots)
            if slide.mpp is None:
                raise InputError(f"{Path(slide_path).name} has no pixel size (µm per pixel) in its metadata; pass --mpp")
            grid = PatchGrid(ids=ids, xy=xy, mpp=slide.mpp)
            id_column = "spot"
        else:
            grid = tile_grid(slide, tile_um=cfg.patch_um)
            id_column = "tile_id"
    finally:
        slide.close()
    n = len(grid)
    log(f"{n} {'spots' if spots is not None else 'tissue tiles'} of {cfg.patch_um:g} µm on {Path(slide_path).name} ({grid.mpp:.3g} µm/px); {path} search over {references.n} references on {torch_device} ({precision})")
    model = load_model(cfg, record.weights(), device=torch_device)

    run_id = uuid.uuid4().hex[:12]
    slide_name = Path(slide_path).name
    created_at = datetime.now(timezone.utc)
    provenance = {
        "run_id": run_id,
        "slide": slide_name,
        "slide_path": str(Path(slide_path).resolve()),
        "model_id": record.model_id,
        "spots_version": references.spots_version,
        "filter": predicate,
        "k": k_eff,
        "search": path,
        "precision": precision,
        "mpp": grid.mpp,
        "patch_um": cfg.patch_um,
        "normalisation": cfg.normalisation,
        "created_at": created_at.isoformat(),
    }
    writer = PredictionWriter(out, id_column=id_column, slide=slide_name, mpp=grid.mpp, genes=list(cfg.genes), provenance=provenance) if out is not None else None
    patches = stream_patches(
        lambda: open_slide(slide_path, mpp=grid.mpp),
        grid.xy,
        side_px=cfg.patch_um / grid.mpp,
        out_px=cfg.patch_px,
        batch_size=batch_size,
        workers=default_read_workers() if workers is None else workers,
    )
    embedded = iter_image_embeddings(model, patches, device=torch_device, precision=precision)
    embeddings = _rechunk(_counted(embedded, "tiles", n, progress), SEARCH_CHUNK)
    kept: list[np.ndarray] = []
    failure: list[BaseException] = []
    stream_started = time.perf_counter()

    def prediction_batches():
        done = 0
        try:
            for queries in embeddings:
                hits = search(references, queries, k=k)
                values = impute(hits, references)
                rows = slice(done, done + len(values))
                if writer is not None:
                    writer.write(grid.ids[rows], grid.xy[rows], values)
                if keep_predictions:
                    kept.append(values)
                yield from _prediction_rows(run_id, slide_name, grid, rows, values, record.model_id, references.spots_version, predicate, k_eff, created_at).to_batches()
                done += len(values)
        except BaseException as exc:  # surfaces as an Arrow error inside LanceDB; re-raised below as itself
            failure.append(exc)
            raise

    try:
        predictions_version = store.add_predictions(prediction_batches())
        if writer is not None:
            writer.close()
    except BaseException as exc:
        if writer is not None:
            writer.abort()
        if failure and failure[0] is not exc:
            raise failure[0] from None
        raise
    stream_seconds = time.perf_counter() - stream_started
    predicted = np.concatenate(kept) if kept else np.zeros((0, len(cfg.genes)), np.float32)
    seconds = time.perf_counter() - started
    log(f"predicted {len(cfg.genes)} genes for {n} tiles ({path} top-{k_eff} of {references.n} references, spots@{references.spots_version}) in {seconds:.1f} s ({n / seconds:.0f} tiles/s); predictions@{predictions_version}")
    plots = tuple(plot_predictions(out, genes=[gene], out=picture_path(out, gene)) for gene in plot)
    for picture in plots:
        log(f"drew {picture}")
    return QueryResult(
        run_id=run_id,
        slide=slide_name,
        model_id=record.model_id,
        spots_version=references.spots_version,
        predictions_version=predictions_version,
        n_tiles=n,
        genes=cfg.genes,
        ids=grid.ids,
        xy=grid.xy,
        predictions=predicted if keep_predictions else None,
        out=Path(out) if out else None,
        filter=predicate,
        seconds=seconds,
        stream_seconds=stream_seconds,
        plots=plots,
    )


#: tiles searched, imputed and written together
SEARCH_CHUNK = 2048


def _counted(batches, step: str, total: int, progress: Progress | None):
    """Pass batches through, reporting ``progress(step, rows so far, total)`` from the start."""
    if progress is None:
        yield from batches
        return
    done = 0
    progress(step, 0, total)
    for batch in batches:
        done += len(batch)
        progress(step, done, total)
        yield batch


def _rechunk(batches, size: int):
    """Regroup row batches into chunks of ``size`` rows (the last may be smaller)."""
    pending, count = [], 0
    for batch in batches:
        pending.append(batch)
        count += len(batch)
        if count >= size:
            yield np.concatenate(pending)
            pending, count = [], 0
    if pending:
        yield np.concatenate(pending)


def _prediction_rows(run_id, slide_name, grid: PatchGrid, rows: slice, values: np.ndarray, model_id, spots_version, predicate, k, created_at) -> pa.Table:
    n, n_genes = values.shape
    xy = grid.xy[rows]
    return pa.table(
        {
            "run_id": [run_id] * n,
            "slide": [slide_name] * n,
            "tile_id": grid.ids[rows].astype(str),
            "x": xy[:, 0],
            "y": xy[:, 1],
            "x_um": xy[:, 0] * grid.mpp,
            "y_um": xy[:, 1] * grid.mpp,
            "model_id": [model_id] * n,
            "spots_version": np.full(n, spots_version, np.int64),
            "filter": [predicate] * n,
            "k": np.full(n, k, np.int32),
            "created_at": pa.array([created_at] * n, pa.timestamp("us", tz="UTC")),
            "expression": pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * n_genes, n_genes, dtype=np.int32)), pa.array(values.ravel())),
        }
    )


# ---- pictures -----------------------------------------------------------------------------
def plot(
    predictions: str | Path,
    *,
    genes: Sequence[str],
    out: str | Path,
    slide: str | Path | None = None,
    truth: str | Path | None = None,
    max_side: int = 1600,
) -> Path:
    """Draw a ``query --out`` file's predicted expression over its slide, one row per gene, into
    ``out`` (.png). With ``truth`` (a reference .h5ad of the same section), the measured expression
    is drawn beside it on a shared colour scale, with Pearson r. See :func:`histoindex.plot.plot_predictions`."""
    return plot_predictions(predictions, genes=genes, out=out, slide=slide, truth=truth, max_side=max_side)


# ---- evaluation ---------------------------------------------------------------------------
def evaluate(
    references: Sequence[SpotSet],
    *,
    holdouts: Sequence[str] | None = None,
    options: TrainOptions = TrainOptions(),
    markers: Sequence[str] | None = None,
    k: int = 50,
    baselines: bool = True,
    out: str | Path | None = None,
    device: str | None = None,
    log: Log = _quiet,
):
    """Leave-one-section-out evaluation of ``options`` against baselines; see :mod:`histoindex.evaluate`.
    ``out`` (.parquet) receives the held-out predictions and truth keyed by section, system and spot."""
    from .evaluate import BREAST_MARKERS, evaluate as run_evaluation

    if out is not None:
        out = check_output_path(out, (".parquet",))
    result = run_evaluation(
        references, holdouts=holdouts, options=options, markers=markers or BREAST_MARKERS, k=k,
        baselines=baselines, device=device, log=log,
    )
    if out is not None:
        import pyarrow.parquet as pq

        import json as _json

        table = result.predictions_table()
        pq.write_table(table.replace_schema_metadata({"histoindex": _json.dumps(result.to_dict(), default=str)}), out)
    return result


# ---- indexes ------------------------------------------------------------------------------
def create_index(*, db: str | Path, index_type: str = "IVF_PQ", num_partitions: int | None = None, num_sub_vectors: int | None = None) -> int:
    """Build the ANN index on the reference expression embeddings (cosine) used by
    ``query --search ann`` (and ``auto`` above the exact-search size), build the scalar (bitmap)
    indexes on the filter columns if missing, and bring them up to date with rows ingested since.
    Returns the new spots version."""
    from .store import Store as _Store

    store = _Store(db)
    tbl = store.table("spots")
    n = tbl.count_rows()
    if n == 0:
        raise StoreError("the spots table is empty: ingest a reference first")
    from lancedb.index import HnswSq, IvfFlat, IvfPq

    kinds = {"IVF_PQ": IvfPq, "IVF_FLAT": IvfFlat, "IVF_HNSW_SQ": HnswSq}
    index_type = index_type.upper()
    if index_type not in kinds:
        raise InputError(f"unknown index type {index_type!r}; use one of {', '.join(sorted(kinds))}")
    if num_partitions:
        partitions = num_partitions
    elif index_type == "IVF_HNSW_SQ":  # a graph per partition: few, large partitions
        partitions = max(1, n // 100_000)
    else:  # IVF: ~√n partitions of at least 256 rows
        partitions = max(1, min(int(np.sqrt(n)), n // 256 or 1))
    options = {"distance_type": "cosine", "num_partitions": partitions}
    if index_type == "IVF_PQ":
        options["num_sub_vectors"] = num_sub_vectors or 16
    tbl.create_index("expression_embedding", config=kinds[index_type](**options), replace=True)
    for name in ("spots", "predictions"):  # bitmap indexes on the filter columns, built once
        store.build_scalar_indexes(name)
    return store.refresh_indexes()  # folds rows ingested since into the scalar indexes


# ---- SQL and overview ---------------------------------------------------------------------
def sql(statement: str, *, db: str | Path | None, allow_files: Sequence[str | Path] = ()) -> pa.Table:
    """Run one read-only DuckDB statement (SELECT, WITH, EXPLAIN, DESCRIBE, SUMMARIZE) over the
    store's tables (spots, predictions, models and the predictions_long / spots_long views) and
    the Parquet / CSV / JSON files it names outside the store; ``allow_files`` are further files
    or folders it may read. Anything else raises SqlError (see :mod:`histoindex.sql`)."""
    store = None
    if db is not None and Store.exists(db):
        store = Store(db)
    return run_sql(store, statement, allow_files=allow_files)


def versions(*, db: str | Path) -> dict[str, list[dict]]:
    return Store(db).versions()


def info(*, db: str | Path) -> dict:
    return Store(db).info()


__all__ = [
    "TrainOptions",
    "TrainResult",
    "IngestResult",
    "QueryResult",
    "read_reference",
    "train",
    "evaluate",
    "create_index",
    "ingest",
    "query",
    "plot",
    "sql",
    "versions",
    "info",
    "SPOT_DIAMETER_UM",
]
