"""The public API: one function per CLI command. Each validates its inputs before touching the
store, so a bad input leaves the store exactly as it was."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from .config import ModelConfig, RetrievalSettings, rate_text
from .data import SPOT_DIAMETER_UM, PatchGrid, SpotSet, check_patch_pixels
from .errors import InputError, StoreError
from .io.hest import hest_slide_mpp
from .io.readers import check_reference_image, read_reference
from .io.slides import open_slide
from .io.tables import check_positions_on_slide, read_positions
from .io.write import TABLE_SUFFIXES, PredictionWriter, check_output_path
from .patch import check_stride, default_stride_um, spot_stain, stream_spot_patches, tile_grid
from .plot import check_gene_names, picture_path, plot_predictions  # matplotlib loads only when drawing
from .recipe import DEFAULT_WEIGHTS, TrainOptions, model_config

# torch and timm (seconds to import) load only inside the commands that run a model, so `sql`,
# `versions` and `info` start fast.
from .search import References, Scope, check_filter_values, check_where
from .sql import run_sql
from .stain import normalised
from .store import Compaction, DeleteResult, RestoreResult, Store, prediction_rows, spot_rows

Log = Callable[[str], None]
#: ``progress(step, done, total)``: called as a long step advances (the CLI draws rich progress bars)
Progress = Callable[[str, int, int], None]


def _quiet(_: str) -> None:
    pass


# ---- training -----------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainResult:
    model_id: str
    models_version: int
    metrics: dict


def train(
    references: Sequence[SpotSet],
    *,
    db: str | Path,
    options: TrainOptions | None = None,
    device: str | None = None,
    precision: str = "auto",
    progress: Progress | None = None,
    log: Log = _quiet,
    embed_after: int = 0,
) -> TrainResult:
    """Train a model (``options.method``: bleep or stgchb) on ``references`` and register it
    (weights + config) in the store. With a ``log``, the recipe is logged first, then an estimate
    of the time (the backbone timed on a few patches here; ``embed_after``: spots the caller embeds
    with the model next, as a first ingest does, counted in it).

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
    Store.exists(db)  # a --db that cannot be a store (a file, a folder of other things) fails now, not after training
    options = options or TrainOptions()
    cfg = model_config(references, options)
    for reference in references:  # a blank image, or spots off it, would train on nothing
        check_reference_image(reference, patch_um=cfg.patch_um)
    n_spots = sum(r.n_obs for r in references)
    weights = f"{cfg.weights} weights" if cfg.weights else "random initialisation"
    log(
        f"training {cfg.method}: backbone {cfg.backbone} ({weights}, {'frozen' if cfg.freeze_backbone else 'fine-tuned'}), {cfg.epochs} epochs, "
        f"{len(cfg.genes)} genes ({', '.join(cfg.genes[:3])}, …), {cfg.patch_um:g} µm patches at {cfg.patch_px} px, on {n_spots:,} spots of {', '.join(names)}"
    )
    from .embed import resolve_device, resolve_precision  # torch: seconds to import
    from .recipe import describe_inner_check, estimate_training, train_model

    torch_device = resolve_device(device)
    precision = resolve_precision(precision, torch_device)

    def epoch_done(epoch: int, epochs: int, loss: float) -> None:
        if progress is not None:
            progress("epochs", epoch, epochs)
        if progress is None or epoch == epochs:
            log(f"  epoch {epoch}/{epochs}  loss {loss:.4f}")

    def features_done(done: int, total: int) -> None:
        if progress is not None:
            progress("backbone features", done, total)

    def estimate(model) -> None:
        if log is not _quiet:
            guess = estimate_training(model, cfg, n_spots, device=torch_device, precision=precision, embed_spots=embed_after)
            log(f"estimated time on {torch_device} ({precision if cfg.freeze_backbone else 'fp32'}): {guess}")

    if progress is not None and not cfg.freeze_backbone:  # the bar shows while the patches are read
        progress("epochs", 0, cfg.epochs)
    result = train_model(
        references,
        cfg,
        weights=cfg.weights or None,
        device=torch_device,
        progress=epoch_done,
        precision=precision,
        feature_progress=features_done,
        on_model=estimate,
        check=options.inner_check,
        fallback=options.fallback,
    )
    if "inner_check" in result.metrics:
        log(describe_inner_check(result.metrics["inner_check"], fallback="fallback" in result.metrics))
    cfg = result.cfg  # the frozen-retrieval model when training fell back
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
    train_options: TrainOptions | None = None,
    device: str | None = None,
    batch_size: int = 64,
    precision: str = "auto",
    progress: Progress | None = None,
    log: Log = _quiet,
) -> IngestResult:
    """Embed every spot of ``reference`` and write them to ``spots`` in one commit (one new table
    version), replacing the dataset's earlier rows. Trains a model first if the store has none."""
    (result,) = ingest_many(
        [(reference, {"tissue": tissue, "platform": platform, "species": species})], db=db, model_id=model_id, train_options=train_options,
        device=device, batch_size=batch_size, precision=precision, progress=progress, log=log,
    )  # fmt: skip
    return result


class ReferenceEmbedder:
    """A model loaded once to embed reference spot sets into ``spots`` rows (nothing is written)."""

    def __init__(self, record, *, device: str | None = None, batch_size: int = 64, precision: str = "auto"):
        from .embed import resolve_device, resolve_precision
        from .models import load_model

        self.record, self.cfg, self.batch_size = record, record.cfg, batch_size
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.model = load_model(self.cfg, record.weights(), device=self.device)

    def rows(self, reference: SpotSet, *, tissue: str, platform: str, species: str, progress: Progress | None = None, log: Log = _quiet) -> pa.Table:
        from .embed import iter_image_features
        from .methods import get_method
        from .pipeline import counted
        from .train import TrainSection

        cfg = self.cfg
        expression, stored, profile, dataset_genes = reference_profiles(reference, list(cfg.genes), platform=platform)
        check_reference_image(reference, patch_um=cfg.patch_um)
        log(f"embedding {reference.n_obs} spots of {reference.name} with {self.record.model_id} on {self.device}")
        stain = spot_stain(reference, stain=cfg.stain, patch_um=cfg.patch_um, patch_px=cfg.patch_px)
        patches = normalised(
            stream_spot_patches(reference, patch_um=cfg.patch_um, patch_px=cfg.patch_px, batch_size=self.batch_size, workers=default_read_workers()), stain
        )
        features = iter_image_features(self.model, patches, device=self.device, precision=self.precision)
        features = np.concatenate(list(counted(features, "spots", reference.n_obs, progress)))
        section = TrainSection(name=reference.name, expression=expression, xy_um=reference.xy * reference.mpp, features=features)
        image_emb, expr_emb = get_method(cfg.method).embed_references(self.model, section, device=self.device)
        return spot_rows(
            spot_ids=reference.obs_names,
            dataset=reference.name,
            tissue=tissue,
            platform=platform,
            species=species,
            xy=reference.xy,
            mpp=reference.mpp,
            image_embedding=image_emb,
            expression_embedding=expr_emb,
            expression=stored,
            source_values=reference.source_values,
            model_id=self.record.model_id,
            profile=profile,
            dataset_genes=dataset_genes,
        )


def reference_profiles(reference: SpotSet, genes: list[str], *, platform: str) -> tuple[np.ndarray, np.ndarray, object, list[str]]:
    """What an ingest stores of a reference's expression, for a model of ``genes``:

    * the expression the encoder embeds: log1p(CP10k) over ``genes``, a gene the reference lacks
      zero-filled (as the published methods do; too few of them is an error,
      :func:`~histoindex.data.check_panel_overlap`);
    * the ``expression`` column: the same, a lacking gene NaN (not measured) unless ``platform``
      measures the whole transcriptome, where a gene left out of the matrix had no counts (0);
    * the imputation panel: every gene of the reference (sparse), and their names (a model gene
      matched through an alias under the model's name; on a whole-transcriptome platform the
      lacking model genes too, as measured zeros)."""
    import scipy.sparse as sp

    from .data import check_panel_overlap, is_whole_transcriptome

    index = reference.gene_index()
    missing = check_panel_overlap(genes, index, where=reference.source or reference.name, aliases=reference.gene_aliases)
    present = [i for i, g in enumerate(genes) if g in index]
    expression = np.zeros((reference.n_obs, len(genes)), np.float32)
    expression[:, present] = reference.normalized([genes[i] for i in present])
    stored = expression
    names = [str(g) for g in reference.var_names]
    for i in present:
        names[index[genes[i]]] = genes[i]
    profile = reference.profiles()
    if missing and is_whole_transcriptome(platform):
        names += missing
        profile = sp.hstack([profile, sp.csr_matrix((reference.n_obs, len(missing)), dtype=np.float32)], format="csr")
    elif missing:
        stored = expression.copy()
        stored[:, [i for i, g in enumerate(genes) if g not in index]] = np.nan
    return expression, stored, profile, names


def warn_missing_genes(reference: SpotSet, genes: list[str], *, platform: str, log: Log) -> None:
    """Refuse a reference measuring too few of the model's ``genes``; one warning line when it lacks some."""
    from .data import check_panel_overlap, is_whole_transcriptome

    missing = check_panel_overlap(genes, reference.gene_index(), where=reference.source or reference.name, aliases=reference.gene_aliases)
    if not missing:
        return
    shown = ", ".join(missing[:5]) + (", …" if len(missing) > 5 else "")
    kept = (
        f"stored as measured zeros (platform {platform} measures the whole transcriptome: a gene left out of its matrix had no counts)"
        if is_whole_transcriptome(platform)
        else f"stored as not measured (platform {platform} is a targeted panel): predictions average them over the references that measured them"
    )
    log(f"warning: {reference.name} lacks {len(missing)} of the model's {len(genes)} genes ({shown}): zero-filled for its expression embedding; {kept}")


#: embeds many (reference, labels) pairs with one model record into ``spots`` row tables, in order
EmbedMany = Callable[[object, Sequence[tuple[SpotSet, dict]]], list[pa.Table]]


def ingest_many(
    plans: Sequence[tuple[SpotSet, dict]],
    *,
    db: str | Path,
    model_id: str | None = None,
    train_options: TrainOptions | None = None,
    device: str | None = None,
    batch_size: int = 64,
    precision: str = "auto",
    embed_many: EmbedMany | None = None,
    progress: Progress | None = None,
    log: Log = _quiet,
) -> list[IngestResult]:
    """Ingest many references in one commit: ``plans`` pairs each reference with its labels
    (tissue, platform, species). With no model in the store one is trained on all of them first;
    every reference is checked against the model before any is embedded, all are embedded (here
    with one model load, or by ``embed_many``: e.g. Ray actors), and their rows replace the
    datasets' earlier rows in one ``spots`` version: all of them or, on any error, none."""
    from .distributed import launch_rank

    if not plans:
        raise InputError("no references given")
    names = [reference.name for reference, _ in plans]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"dataset names repeat ({', '.join(repeated)}): each reference is one dataset; rename the files or ingest them one by one")
    for _, labels in plans:
        for label in ("tissue", "platform", "species"):
            if not labels.get(label) or not str(labels[label]).strip():
                raise InputError(f"--{label} must not be empty")
    references = [reference for reference, _ in plans]
    store = Store(db) if Store.exists(db) else None
    model_id = store.ingest_model(model_id, log=log) if store is not None else _no_store_model(model_id)
    trained = model_id is None
    if trained:
        _announce_training(db, references, store, log)
        model_id = train(
            references, db=db, options=train_options, device=device, precision=precision, progress=progress, log=log,
            embed_after=sum(r.n_obs for r in references) if embed_many is None else 0,
        ).model_id  # fmt: skip
    if launch_rank() != 0:  # under torchrun only training is shared; rank 0 embeds and writes the spots
        return [IngestResult(dataset=r.name, n_spots=r.n_obs, spots_version=-1, model_id=model_id, trained=trained) for r in references]
    store = Store(db)
    record = store.model(model_id)
    platforms = {reference.name: labels["platform"] for reference, labels in plans}
    for reference in references:  # nothing is embedded unless every reference fits the model
        log(f"{reference.name}: {reference.mpp:.4g} µm/px ({reference.mpp_source})")
        check_trained_pixel_size(reference, record)
        warn_missing_genes(reference, list(record.cfg.genes), platform=platforms[reference.name], log=log)
        check_reference_image(reference, patch_um=record.cfg.patch_um)
    if embed_many is None:
        embedder = ReferenceEmbedder(record, device=device, batch_size=batch_size, precision=precision)
        tables = [embedder.rows(reference, **labels, progress=progress, log=log) for reference, labels in plans]
    else:
        tables = embed_many(record, plans)
    version = store.write_datasets(pa.concat_tables(tables), model_id=record.model_id, datasets=names)
    what = f"{references[0].name}" if len(references) == 1 else f"{len(references)} datasets in one commit"
    log(f"wrote {sum(r.n_obs for r in references)} spots of {what} under model {record.model_id} (spots@{version})")
    return [IngestResult(r.name, r.n_obs, version, record.model_id, trained=trained and i == 0) for i, r in enumerate(references)]


#: a dataset ingested at a pixel size further than this (relative) from the one its model was
#: trained on it at is refused: the same section, patches of another physical size
TRAINED_MPP_TOLERANCE = 0.10


def check_trained_pixel_size(reference: SpotSet, record) -> None:
    """A dataset the model was trained on (by name) must be read at the pixel size the model
    recorded for it, within 10 %: else the model learned from patches of another physical size than
    the ones it would now embed (e.g. a legacy ST section read once as Visium)."""
    datasets = record.metrics.get("datasets") if isinstance(record.metrics, dict) else None
    trained = datasets.get(reference.name) if isinstance(datasets, dict) else None
    recorded = trained.get("mpp") if isinstance(trained, dict) else None
    if not isinstance(recorded, (int, float)) or not recorded > 0:
        return
    if abs(reference.mpp / recorded - 1) > TRAINED_MPP_TOLERANCE:
        raise InputError(
            f"{reference.source or reference.name}: read at {reference.mpp:.4g} µm/px ({reference.mpp_source}), but model {record.model_id} was "
            f"trained on dataset {reference.name} at {recorded:.4g} µm/px ({trained.get('mpp_source', 'source not recorded')}): "
            f"{max(reference.mpp, recorded) / min(reference.mpp, recorded):.2f}× apart; pass --mpp with the right one, or --platform to match"
        )


def _announce_training(db, references: Sequence[SpotSet], store: Store | None, log: Log) -> None:
    where = "no store yet" if store is None else "no model in the store yet"
    log(
        f"{where} ({db}): ingest trains one first on {', '.join(r.name for r in references)} ({sum(r.n_obs for r in references):,} spots), "
        "then embeds the spots with it; this takes minutes (the recipe and an estimate follow; --model or `histoindex train` choose otherwise)"
    )


def _no_store_model(model_id: str | None) -> None:
    if model_id is not None:
        raise StoreError(f"--model {model_id}: there is no store yet, so no model to embed with")
    return None


def ingest_hest(
    root: str | Path,
    *,
    db: str | Path,
    ids: Sequence[str] = (),
    where: str | Sequence[str] | dict | None = None,
    tissue: str | None = None,
    platform: str | None = None,
    species: str | None = None,
    dataset: str | None = None,
    mpp: float | None = None,
    log_normalised: bool = False,
    model_id: str | None = None,
    train_options: TrainOptions | None = None,
    device: str | None = None,
    batch_size: int = 64,
    precision: str = "auto",
    embed_many: EmbedMany | None = None,
    progress: Progress | None = None,
    log: Log = _quiet,
) -> list[IngestResult]:
    """Ingest samples of a HEST-1k folder (:mod:`histoindex.io.hest`), chosen by ``ids`` and/or the
    metadata selection ``where`` (``KEY=VALUE`` terms), each as its own dataset named by its id,
    all in one commit (:func:`ingest_many`). tissue / platform / species come from each sample's
    metadata unless given."""
    from .io.hest import hest_samples, read_hest

    samples = hest_samples(root, ids, where, log=log)
    if len(samples) > 1:
        given = [option for option, value in (("--dataset", dataset), ("--mpp", mpp)) if value is not None]
        if given:
            raise InputError(f"{' and '.join(given)} name(s) one sample, but {len(samples)} HEST samples are selected ({', '.join(s.id for s in samples)})")
    plans = []
    for sample in samples:
        labels = {"tissue": tissue or sample.tissue, "platform": platform or sample.platform, "species": species or sample.species}
        keys = {"tissue": "organ", "platform": "st_technology", "species": "species"}
        missing = [label for label, value in labels.items() if not value]
        if missing:
            raise InputError(
                f"HEST sample {sample.id}: its metadata has no {', '.join(keys[m] for m in missing)}; pass {' and '.join('--' + m for m in missing)}"
            )
        reference = read_hest(root, sample, mpp=mpp, name=dataset, platform=labels["platform"], log_normalised=log_normalised)
        plans.append((reference, labels))
        described = f"tissue {labels['tissue']}, platform {labels['platform']}, species {labels['species']}"
        log(f"HEST {sample.id}: {reference.n_obs} spots, {described}, {reference.mpp:.4g} µm/px ({reference.mpp_source})")
    return ingest_many(
        plans, db=db, model_id=model_id, train_options=train_options, device=device, batch_size=batch_size, precision=precision,
        embed_many=embed_many, progress=progress, log=log,
    )  # fmt: skip


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
    rows: pa.Table | None = field(default=None, repr=False)  # the uncommitted prediction rows (commit=False)


def default_read_workers() -> int:
    """Background slide readers: one core is left to the embedding on small machines."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


@dataclass
class QuerySession:
    """What every slide of a query shares, loaded once: the store at one ``spots`` version, the
    model (with the query's views) and the matching reference rows."""

    store: Store
    record: object
    cfg: object
    model: object
    references: References
    k: int
    device: object
    precision: str
    retrieval: RetrievalSettings = field(default_factory=RetrievalSettings)  # the model's, with the query's --k / --smooth
    stride_um: float | None = None  # the output grid's pitch (tiles): --stride-um, or the default rule
    stride_rule: str = ""  # why that pitch (the default rule's reason)
    options: dict = field(default_factory=dict)  # the answer-shaping options it was opened with (ANSWER_OPTIONS)
    results: Store | None = None  # where predictions are committed: the reference store, --results-db, or None (--no-store)
    genes: tuple[str, ...] | None = None  # the genes predicted (query --genes); None: the model's

    @property
    def predicted_genes(self) -> tuple[str, ...]:
        return self.genes if self.genes is not None else tuple(self.cfg.genes)


#: the query options that shape an answer, besides the model and the spots version (which the
#: predictions rows record in their own columns); device, precision and batch size do not
ANSWER_OPTIONS = ("tissue", "platform", "species", "where", "k", "smooth", "views", "stride_um", "search_mode", "genes", "reference_db")


def answer_settings(options: dict, *, mpp: float | None = None, spots: str | Path | None = None) -> str:
    """What a slide's answer depends on besides the model, the ``spots`` version and the slide's own
    pixels, as canonical JSON: the ``settings`` each prediction row records and the key a cohort
    re-run matches before it skips a slide. The options as asked (``None``: the model's default, which
    the model id fixes), a ``--mpp`` given, and the positions file's content hash."""
    import hashlib
    import json

    settings = {name: options.get(name) for name in ANSWER_OPTIONS}
    settings["mpp"] = None if mpp is None else float(mpp)
    if spots is not None:
        settings["spots"] = hashlib.sha256(Path(spots).read_bytes()).hexdigest()
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)


def open_results(store: Store, *, results_db: str | Path | None, no_store: bool) -> Store | None:
    """The store a query commits its predictions (and resume state) to: ``store`` itself, a
    ``results_db`` of the user's own, or None (``no_store``). A reference store that cannot be
    written is an error now, before the model and the slide are read, naming the two ways out."""
    if no_store and results_db is not None:
        raise InputError("--no-store keeps predictions out of every store; --results-db puts them in another: give one or the other")
    if no_store:
        return None
    if results_db is not None:
        if Store.exists(results_db) or not Path(str(results_db)).exists() or "://" in str(results_db):
            results = Store(results_db, create=True)
        else:
            results = Store(results_db)  # a folder that is not a store: refused with its own message
        if results.uri == store.uri:
            return store
        why = results.unwritable("predictions")
        if why:
            raise InputError(f"--results-db {results_db}: {why}")
        return results
    why = store.unwritable("predictions")
    if why:
        raise InputError(
            f"the store at {store.uri} is read-only ({why}): pass --no-store to write only --out, or --results-db PATH to keep the predictions in a store of your own"
        )
    return store


def open_query(
    *,
    db: str | Path,
    tissue: str | None = None,
    platform: str | None = None,
    species: str | None = None,
    where: str | None = None,
    k: int | None = None,
    as_of: int | str | None = None,
    model_id: str | None = None,
    device: str | None = None,
    batch_size: int = 64,
    search_mode: str = "auto",
    precision: str = "auto",
    views: int | None = None,
    stride_um: float | None = None,
    smooth: float | None = None,
    genes: Sequence[str] | str | None = None,
    also: Sequence[str] = (),
    results_db: str | Path | None = None,
    no_store: bool = False,
    log: Log = _quiet,
) -> QuerySession:
    """Check a query's options and load what its slides share (see :func:`query`). The tile grid's
    pitch is ``stride_um`` or, by default, :func:`histoindex.patch.default_stride_um` of the
    platforms of the references the filters leave. ``k`` and ``smooth`` override the model's
    retrieval settings (:class:`~histoindex.config.RetrievalSettings`). ``genes``: what to predict
    (:func:`predicted_genes`; default the model's genes): any gene a searched reference measured;
    ``also``: genes predicted besides (``query --plot``: a gene drawn is a gene predicted).
    Predictions are committed to ``db`` itself, or to ``results_db`` (a store of the user's own,
    created if new: a shared reference store stays read-only), or nowhere with ``no_store`` (the
    ``--out`` files only); a reference store that cannot be written is said before anything loads."""
    from .embed import resolve_device, resolve_precision
    from .models import load_model

    if k is not None and k < 1:
        raise InputError(f"--k must be at least 1, got {k}")
    if smooth is not None and not 0 <= smooth <= 1:
        raise InputError(f"--smooth must be between 0 (off) and 1 (the neighbourhood mean), got {smooth}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    if views is not None and not 1 <= views <= 8:
        raise InputError(f"--views must be 1..8, got {views}")
    if stride_um is not None and not (np.isfinite(stride_um) and stride_um > 0):
        raise InputError(f"--stride-um must be a positive number of micrometres, got {stride_um}")
    store = Store(db)
    results = open_results(store, results_db=results_db, no_store=no_store)
    version = int(as_of) if as_of is not None and str(as_of).isdigit() else as_of
    version = store.table("spots", version=version).version  # a number or a tag
    record = store.query_model(version=version, model_id=model_id)
    cfg = record.cfg
    torch_device = resolve_device(device)
    precision = resolve_precision(precision, torch_device)
    scope = Scope(model_id=record.model_id, tissue=tissue, platform=platform, species=species, where=where)
    check_filter_values(store, version=version, model_id=record.model_id, tissue=tissue, platform=platform, species=species)
    genes = predicted_genes(genes, cfg.genes, also=also)
    references = References(store, scope, version=version, mode=search_mode, device=str(torch_device), genes=genes)  # a bad filter fails here
    retrieval = cfg.retrieval_settings.replace(k=k, smooth=smooth)
    k_eff = min(retrieval.k, references.n)
    if k_eff < retrieval.k:
        said = f"--k {k}" if k is not None else f"the model's k {retrieval.k}"
        log(f"warning: {said} is more than the {references.n} reference spots that match; averaging all {references.n}")
    retrieval = retrieval.replace(k=k_eff)
    if views is not None:  # fewer views: faster (each view is a backbone pass), a little less accurate
        cfg = cfg.replace(views=views)
    if stride_um is not None:
        stride, rule = check_stride(stride_um, cfg.patch_um), "--stride-um"
    else:  # the references' spot pitch when they are of one platform (one column scan of the filtered rows)
        platforms = [platform] if platform is not None else store.distinct("spots", "platform", where=references.where, version=version)
        stride, rule = default_stride_um(platforms, cfg.patch_um)
    log(f"loading model {record.model_id} ({cfg.backbone}) on {torch_device}; {references.n:,} reference spots (spots@{version})")
    model = load_model(record.cfg, record.weights(), device=torch_device)
    model.cfg = cfg  # the views to average (the weights are the same)
    asked = dict(tissue=tissue, platform=platform, species=species, where=where, k=k, smooth=smooth, views=views, stride_um=stride_um, search_mode=search_mode)
    asked["genes"] = list(genes) if genes is not None else None  # as predicted_genes resolved them (None: the model's)
    if results is not None and results is not store:  # predictions kept apart: their rows say which reference store answered
        asked["reference_db"] = store.uri
    return QuerySession(
        store=store, record=record, cfg=cfg, model=model, references=references, k=k_eff, device=torch_device, precision=precision,
        stride_um=stride, stride_rule=rule, retrieval=retrieval, options=asked, results=results, genes=genes,
    )  # fmt: skip


def predicted_genes(genes: Sequence[str] | str | None, panel: Sequence[str], *, also: Sequence[str] = ()) -> tuple[str, ...] | None:
    """The genes a query predicts: ``genes`` (names, ``"A,B"``, a gene-list file, or ``"all"``:
    every gene a searched reference measured, resolved by
    :class:`~histoindex.search.References`), default the model's ``panel``, then ``also``; without
    repeats, in order. None when that is the model's panel (read from the ``expression`` column,
    so outputs stay as they were)."""
    from .genes import read_gene_list

    extra = [str(g) for g in also]
    if genes is None:
        names = list(dict.fromkeys([*panel, *extra]))
        return None if len(names) == len(panel) else tuple(names)
    if isinstance(genes, str):
        genes = [genes]
    names: list[str] = []
    for item in genes:
        item = str(item).strip()
        if item and Path(item).is_file():
            names += read_gene_list(item)
        else:
            names += [g.strip() for g in item.split(",") if g.strip()]
    if not names:
        raise InputError("--genes names no gene: give symbols (FASN,ERBB2), a file of one symbol per line, or all")
    if names == ["all"]:
        return ("all",)  # with ``also``: those are among all
    names = list(dict.fromkeys([*names, *extra]))
    return None if tuple(names) == tuple(panel) else tuple(names)


def _measured_summary(references: References) -> dict:
    """Provenance for genes some searched dataset did not measure: which did (a tile's value of
    such a gene is the mean over its neighbours from those datasets; NaN where none was)."""
    partial = {g: by for g, by in references.measured_by.items() if len(by) < len(references.dataset_names)}
    if not partial:
        return {}
    return {"measured_by": {g: {"datasets": by, "of": len(references.dataset_names)} for g, by in partial.items()}}


#: slide files above this size get a line before they are opened (decoding a large JPEG takes seconds)
LARGE_SLIDE_BYTES = 20_000_000


def spots_pixel_size(spots: str | Path, xy: np.ndarray, *, slide: str, platform: str | None, session: QuerySession, log: Log = _quiet) -> float:
    """µm per pixel for ``query --spots`` on a slide with none in its metadata: from a spots
    ``.h5ad`` by the rules references follow (:func:`histoindex.io.pixelsize.reference_pixel_size`:
    spot pitch from array coordinates or spacing, else ``spot_diameter_fullres``), the one function
    references are read through too. The spots' lattice decides the platform (``--platform`` must
    agree with it); when it does not tell, the references' platform (when they are of one)."""
    from .io.h5ad import h5ad_pixel_size

    if Path(spots).suffix.lower() != ".h5ad":
        raise InputError(
            f"{slide} has no pixel size (µm per pixel) in its metadata, and {Path(spots).name} carries none (an .h5ad with its spot layout does); pass --mpp"
        )
    default = None
    if platform is None:  # for spots whose layout shows no lattice
        refs = session.references
        platforms = session.store.distinct("spots", "platform", where=refs.where, version=refs.spots_version)
        default = str(platforms[0]) if len(platforms) == 1 else None
    size = h5ad_pixel_size(spots, xy_px=xy, platform=platform, default_platform=default)
    log(f"{slide} has no pixel size in its metadata: {size.mpp:.4g} µm/px from {Path(spots).name} ({size.source})")
    return size.mpp


def check_query_inputs(slide_path: str | Path, *, mpp: float | None, spots: str | Path | None, where: str | None = None, log: Log = _quiet) -> None:
    """What a query can check from its arguments and the slide's header alone: the slide opens, has a
    pixel size (its own, ``--mpp``, HEST's metadata, or one ``--spots`` may give) and the positions
    file reads. Cheap (no pixel decoded, no model), so a mistake fails before minutes of loading."""
    from .io.slides import probe_slide

    if where is not None:
        check_where(where)
    _, _, slide_mpp = probe_slide(slide_path, mpp=mpp)
    name = Path(slide_path).name
    if slide_mpp is None and spots is None and hest_slide_mpp(slide_path) is None:
        raise InputError(f"{name} has no pixel size (µm per pixel) in its metadata; pass --mpp (e.g. --mpp 0.5 for a 20x scan)")
    if spots is not None:
        read_positions(spots)
        if slide_mpp is None and Path(spots).suffix.lower() != ".h5ad":
            raise InputError(
                f"{name} has no pixel size (µm per pixel) in its metadata, and {Path(spots).name} carries none (an .h5ad with its spot layout does); pass --mpp"
            )


def query(
    slide_path: str | Path,
    *,
    db: str | Path,
    tissue: str | None = None,
    platform: str | None = None,
    species: str | None = None,
    where: str | None = None,
    k: int | None = None,
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
    views: int | None = None,
    stride_um: float | None = None,
    smooth: float | None = None,
    genes: Sequence[str] | str | None = None,
    keep_predictions: bool = True,
    commit: bool = True,
    results_db: str | Path | None = None,
    no_store: bool = False,
    slide_name: str | None = None,
    metadata: dict | None = None,
    progress: Progress | None = None,
    log: Log = _quiet,
    session: QuerySession | None = None,
) -> QueryResult:
    """Impute expression over a slide (tissue tiles of the model's patch size, or the positions in
    ``spots``) by top-k retrieval against the reference expression embeddings. Each gene in
    ``plot`` is drawn from ``out`` into ``<out stem>.<gene>.png`` beside it.

    The tiles are windows of the patch size centred on a grid of pitch ``stride_um`` (they overlap
    when it is finer than the patch; default: the references' spot pitch when they are of one
    platform, else the patch size; see :func:`histoindex.patch.default_stride_um`).

    The slide streams through: ``workers`` background threads read patches ahead, the model embeds
    them in batches (``precision``: auto / fp32 / bf16), and every ``SEARCH_CHUNK`` tiles are
    searched, imputed and written, so memory stays flat however large the slide. ``out`` and the
    ``predictions`` table (one new version) appear only when the whole slide is done; with
    ``keep_predictions=False`` the result carries no prediction matrix. ``session`` (from
    :func:`open_query`) replaces the store, model and filter options: many slides, one load.
    ``slide_name`` keys the predictions (default: the file name); ``metadata`` (a cohort
    manifest's columns) is written into ``out`` beside every row and into its provenance. With
    ``commit=False`` nothing is written to the store: the result carries the prediction ``rows``
    for the caller to commit (a cluster's driver commits what its workers predicted)."""
    started = time.perf_counter()
    asked_mpp = mpp  # the --mpp given (the resume key), before a HEST slide's metadata fills it in
    if out is not None:
        out = check_output_path(out)
    check_query_inputs(slide_path, mpp=mpp, spots=spots, where=where, log=log)  # in the first second, before the model loads
    if out is not None and out.exists():  # as scanpy's write_h5ad and pandas' to_parquet do: replaced, but said
        log(f"{out} exists: it is replaced when this query finishes")
    if session is None:
        log(f"query {slide_path}: opening the store, loading the model…")  # the libraries and the model take seconds
    from .pipeline import predict  # torch: after the checks above

    if session is None:
        session = open_query(
            db=db, tissue=tissue, platform=platform, species=species, where=where, k=k, as_of=as_of, model_id=model_id,
            device=device, batch_size=batch_size, search_mode=search_mode, precision=precision, views=views, stride_um=stride_um,
            smooth=smooth, genes=genes, also=plot, results_db=results_db, no_store=no_store, log=log,
        )  # fmt: skip
    elif batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    if spots is not None and stride_um is not None:
        raise InputError("--stride-um sets the pitch of the tile grid; --spots predicts at the given positions instead: give one or the other")
    if stride_um is None:  # the session's: --stride-um given to open_query, or the default rule
        stride, stride_rule = session.stride_um or session.cfg.patch_um, session.stride_rule
    else:
        stride, stride_rule = check_stride(stride_um, session.cfg.patch_um), "--stride-um"
    record, cfg, model, references = session.record, session.cfg, session.model, session.references
    torch_device, precision, k_eff = session.device, session.precision, session.k
    if plot:  # checked now, not after minutes of embedding
        if out is None:
            raise InputError("--plot needs --out: pictures are drawn from the predictions file")
        if out.suffix.lower() not in TABLE_SUFFIXES:
            raise InputError(f"--plot draws from a .parquet or .h5ad --out, not {out.name}")
        plot = check_gene_names(plot, session.predicted_genes, where=f"the genes predicted (model {record.model_id}; query --genes)")
    genes = session.predicted_genes
    predicate, path = references.where, references.path

    if Path(slide_path).is_file() and Path(slide_path).stat().st_size > LARGE_SLIDE_BYTES:  # a big JPEG/PNG decodes for seconds
        log(f"opening {Path(slide_path).name} ({Path(slide_path).stat().st_size / 1e6:,.0f} MB)")
    slide = open_slide(slide_path, mpp=mpp)
    if slide.mpp is None and (hest_mpp := hest_slide_mpp(slide_path)) is not None:  # a HEST slide: its metadata has the pixel size
        slide.close()
        mpp = hest_mpp
        log(f"{Path(slide_path).name}: {mpp:.4g} µm/px from HEST's metadata (pixel_size_um_estimated)")
        slide = open_slide(slide_path, mpp=mpp)
    try:
        if spots is not None:
            ids, xy = read_positions(spots)
            if slide.mpp is None:  # the spots' own pixel size, by the rules references follow
                slide.mpp = spots_pixel_size(spots, xy, slide=Path(slide_path).name, platform=platform, session=session, log=log)
            check_patch_pixels(cfg.patch_um, slide.mpp, where=Path(slide_path).name)
            check_positions_on_slide(ids, xy, width=slide.width, height=slide.height, source=spots, slide=Path(slide_path).name)
            grid = PatchGrid(ids=ids, xy=xy, mpp=slide.mpp)
            id_column = "spot"
        else:
            if slide.mpp is not None:  # tiles of a few pixels would be upsampled noise
                check_patch_pixels(cfg.patch_um, slide.mpp, where=Path(slide_path).name)
            grid = tile_grid(slide, tile_um=cfg.patch_um, stride_um=stride)
            id_column = "tile_id"
    finally:
        slide.close()
    n = len(grid)
    pitch = "" if spots is not None else f", centred every {stride:g} µm ({stride_rule})" if stride_rule else f", centred every {stride:g} µm"
    log(
        f"{n} {'spots' if spots is not None else 'tissue tiles'} of {cfg.patch_um:g} µm on {Path(slide_path).name} ({grid.mpp:.3g} µm/px){pitch}; {path} search over {references.n} references on {torch_device} ({precision})"
    )
    run_id = uuid.uuid4().hex[:12]
    slide_name = slide_name or Path(slide_path).name
    created_at = datetime.now(timezone.utc)
    settings = answer_settings({**session.options, **({"stride_um": stride_um} if stride_um is not None else {})}, mpp=asked_mpp, spots=spots)
    provenance = {
        "run_id": run_id,
        "slide": slide_name,
        "slide_path": str(Path(slide_path).resolve()),
        "model_id": record.model_id,
        "method": cfg.method,
        "spots_version": references.spots_version,
        "filter": predicate,
        "k": k_eff,
        "retrieval": session.retrieval.to_dict(),
        "search": path,
        "precision": precision,
        "mpp": grid.mpp,
        "patch_um": cfg.patch_um,
        **({} if spots is not None else {"stride_um": stride}),  # the grid's pitch: each tile stands for a stride × stride cell
        "stain": cfg.stain,
        "views": cfg.views,
        "normalisation": cfg.normalisation,
        **({"genes": "query --genes"} if session.genes is not None else {}),
        **_measured_summary(references),
        "created_at": created_at.isoformat(),
    }
    if metadata:
        provenance["metadata"] = dict(metadata)
    writer = (
        PredictionWriter(out, id_column=id_column, slide=slide_name, mpp=grid.mpp, genes=list(genes), provenance=provenance, metadata=metadata)
        if out is not None
        else None
    )
    chunks = predict(
        lambda: open_slide(slide_path, mpp=grid.mpp),
        grid,
        model,
        references,
        retrieval=session.retrieval,
        device=torch_device,
        precision=precision,
        batch_size=batch_size,
        workers=default_read_workers() if workers is None else workers,
        progress=progress,
        where=slide_name,
        pitch_um=None if spots is not None else stride,  # spots: their spacing, from the positions
    )
    kept: list[np.ndarray] = []
    stream_started = time.perf_counter()
    # The tiles are read (background threads), embedded, searched, imputed and written to `out` here,
    # in the calling thread; one more thread hands each chunk's rows to LanceDB, which writes them as
    # they come and commits once, after the last chunk. An error or a Ctrl-C therefore lands here,
    # never while another thread is still writing `out` (closing a Parquet writer under a writing
    # thread crashes the process), and is handled in order: LanceDB's stream fails so nothing is
    # committed, the committing thread is waited for, the partial `out` is removed, then it goes on.
    import queue
    import threading

    handoff: queue.Queue = queue.Queue(maxsize=2)  # rows waiting for LanceDB: memory stays flat
    last, stop = object(), object()
    outcome: dict = {}

    def rows_for_lancedb():  # pulled by LanceDB's writer
        while True:
            item = handoff.get()
            if item is last:
                return
            if item is stop:
                raise RuntimeError("the query stopped before its last tile; nothing of it is committed")
            yield from item.to_batches()

    def commit_rows() -> None:
        try:
            outcome["version"] = session.results.add_predictions(rows_for_lancedb())
        except BaseException as exc:  # re-raised in the calling thread
            outcome["error"] = exc

    uncommitted: list[pa.Table] = []
    if session.results is None:  # --no-store: the rows go nowhere (the --out file holds the answer)
        commit = False

    def hand_over(item) -> None:
        if not commit:
            if item is not last and session.results is not None:
                uncommitted.append(item)
            return
        while True:
            if "error" in outcome:
                raise outcome["error"]
            try:
                handoff.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    committer = threading.Thread(target=commit_rows, name="histoindex-commit", daemon=True)
    if commit:
        committer.start()
    else:
        outcome["version"] = -1
    try:
        for chunk in chunks:
            ids, xy = grid.ids[chunk.rows], grid.xy[chunk.rows]
            if writer is not None:
                writer.write(ids, xy, chunk.values)
            if keep_predictions:
                kept.append(chunk.values)
            rows = prediction_rows(
                run_id=run_id,
                slide=slide_name,
                ids=ids,
                xy=xy,
                mpp=grid.mpp,
                values=chunk.values,
                model_id=record.model_id,
                spots_version=references.spots_version,
                predicate=predicate,
                k=k_eff,
                created_at=created_at,
                settings=settings,
                genes=session.genes,
            )
            hand_over(rows)
        hand_over(last)
        if commit:
            committer.join()
        if "error" in outcome:
            raise outcome["error"]
        predictions_version = outcome["version"]
        if writer is not None:
            writer.close()
    except BaseException:
        chunks.close()
        if committer.is_alive():  # LanceDB is still reading rows: make its stream fail (no commit), then wait
            while True:
                try:
                    handoff.get_nowait()
                except queue.Empty:
                    break
            handoff.put_nowait(stop)
            committer.join()
        if writer is not None:
            writer.abort()
        raise
    stream_seconds = time.perf_counter() - stream_started
    predicted = np.concatenate(kept) if kept else np.zeros((0, len(genes)), np.float32)
    seconds = time.perf_counter() - started
    log(
        f"predicted {len(genes)} genes for {n} tiles ({path} top-{k_eff} of {references.n} references, spots@{references.spots_version}) in {seconds:.1f} s ({rate_text(n / seconds, 'tiles')})"
        + (f"; predictions@{predictions_version}" if commit else "")
    )
    plots = tuple(plot_predictions(out, genes=[gene], out=picture_path(out, gene)) for gene in plot)  # the result names them
    return QueryResult(
        run_id=run_id,
        slide=slide_name,
        model_id=record.model_id,
        spots_version=references.spots_version,
        predictions_version=predictions_version,
        n_tiles=n,
        genes=genes,
        ids=grid.ids,
        xy=grid.xy,
        predictions=predicted if keep_predictions else None,
        rows=None if commit else (pa.concat_tables(uncommitted) if uncommitted else None),
        out=Path(out) if out else None,
        filter=predicate,
        seconds=seconds,
        stream_seconds=stream_seconds,
        plots=plots,
    )


# ---- pictures -----------------------------------------------------------------------------
@dataclass
class CohortResult:
    """What a many-slide query did, slide by slide."""

    predicted: list[QueryResult] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # slide, why
    failed: list[tuple[str, str]] = field(default_factory=list)  # slide, the error

    def to_dict(self) -> dict:
        return {
            "predicted": [
                {"slide": r.slide, "tiles": r.n_tiles, "out": str(r.out) if r.out else None, "run_id": r.run_id, "seconds": round(r.seconds, 2)}
                for r in self.predicted
            ],
            "skipped": [{"slide": s, "reason": why} for s, why in self.skipped],
            "failed": [{"slide": s, "error": err} for s, err in self.failed],
            "tiles": sum(r.n_tiles for r in self.predicted),
        }


@dataclass(frozen=True)
class CohortSlide:
    """One slide of a cohort: its path (or URI), optional pixel size, the name its predictions are
    keyed by (default: the file name) and metadata columns kept with its predictions."""

    path: str
    mpp: float | None = None
    slide_id: str | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.slide_id or Path(self.path).name

    @property
    def stem(self) -> str:
        return self.slide_id or Path(self.path).stem


#: manifest columns with a meaning of their own; any others are metadata kept with the predictions
MANIFEST_COLUMNS = ("slide", "mpp", "slide_id")


def read_slide_manifest(path: str | Path) -> list[CohortSlide]:
    """A cohort's slides from a CSV or Parquet manifest: a ``slide`` column (paths relative to the
    manifest's folder, or absolute), optional ``mpp`` and ``slide_id`` columns, and any other
    columns (patient, site, stage, ...) as metadata written beside each slide's predictions."""
    import polars as pl

    path = Path(path)
    if not path.exists():
        raise InputError(f"manifest not found: {path}")
    try:
        frame = pl.read_parquet(path) if path.suffix.lower() == ".parquet" else pl.read_csv(path)
    except Exception as exc:
        raise InputError(f"cannot read manifest {path}: {exc}") from None
    if "slide" not in frame.columns:
        raise InputError(f"manifest {path} has no 'slide' column (columns: {', '.join(frame.columns)})")
    mpps = frame["mpp"].cast(pl.Float64, strict=False).to_list() if "mpp" in frame.columns else [None] * frame.height
    ids = frame["slide_id"].cast(pl.String).to_list() if "slide_id" in frame.columns else [None] * frame.height
    extra = [c for c in frame.columns if c not in MANIFEST_COLUMNS]
    metadata = frame.select(extra).to_dicts() if extra else [{}] * frame.height
    slides = []
    for slide, mpp, slide_id, meta in zip(frame["slide"].cast(pl.String).to_list(), mpps, ids, metadata):
        if not slide:
            raise InputError(f"manifest {path} has an empty slide path")
        slide_path = Path(slide) if Path(slide).is_absolute() else path.parent / slide
        slides.append(CohortSlide(str(slide_path), mpp, slide_id or None, meta))
    return slides


def cohort_slides(slides: Sequence[str | Path | tuple[str | Path, float | None] | CohortSlide]) -> list[CohortSlide]:
    """A cohort's slides as :class:`CohortSlide`, checked: at least one, names unique."""
    entries = [s if isinstance(s, CohortSlide) else CohortSlide(str(s[0]), s[1]) if isinstance(s, tuple) else CohortSlide(str(s)) for s in slides]
    if not entries:
        raise InputError("no slides given")
    names = [e.name for e in entries]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"slide names repeat ({', '.join(repeated)}): predictions are keyed by the slide's name (its file name, or the manifest's slide_id)")
    return entries


def cohort_outputs(entries: Sequence[CohortSlide], out_dir: str | Path | None, out_format: str) -> list[Path | None]:
    """Each slide's output file, ``<out_dir>/<slide stem>.<out_format>`` (the folder is made)."""
    if out_dir is None:
        return [None] * len(entries)
    suffix = "." + out_format.lower().lstrip(".")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_output_path(out_dir / f"x{suffix}")
    return [out_dir / f"{e.stem}{suffix}" for e in entries]


def settings_difference(before: str | None, now: str) -> str:
    """What differs between two runs' ``settings`` (JSON), for one line: ``k 5 → 100; filter …``."""
    import json

    if before is None:
        return "that run predates recorded settings"
    old, new = json.loads(before), json.loads(now)
    changed = [f"{key} {old.get(key)!r} → {new.get(key)!r}" for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    return "; ".join(changed) or "none"


def plan_cohort(
    store: Store | None,
    entries: Sequence[CohortSlide],
    outs: Sequence[Path | None],
    *,
    model_id: str,
    spots_version: int,
    options: dict,
    redo: bool,
    mpp: float | None = None,
    log: Log = _quiet,
) -> tuple[list[tuple[CohortSlide, Path | None]], list[tuple[str, str]]]:
    """Which slides a cohort run predicts, and which it skips (with why): a slide is skipped when
    ``predictions`` holds a run of it by this model against this ``spots`` version with the same
    answer settings (:func:`answer_settings` of ``options``: filter, k, smoothing, views, ...) and its
    output file (if one is asked for) is present, unless ``redo``. A slide predicted before with
    other settings is predicted again, with a line saying what differs."""
    runs = {} if redo or store is None else store.predicted_slides(model_id=model_id, spots_version=spots_version)
    todo, skipped = [], []
    for entry, out in zip(entries, outs):
        settings = answer_settings(options, mpp=entry.mpp if entry.mpp is not None else mpp)
        before = runs.get(entry.name, set())
        if settings in before and (out is None or out.exists()):
            skipped.append((entry.name, f"already predicted by {model_id} against spots@{spots_version} with the same settings"))
            log(f"{entry.name}: already predicted (same model, spots version and settings); --redo to predict again")
        else:
            if before and settings not in before:
                earlier = sorted(before, key=lambda s: (s is None, s or ""))[0]
                log(f"{entry.name}: predicted before with other settings ({settings_difference(earlier, settings)}); predicting again")
            todo.append((entry, out))
    return todo, skipped


def query_cohort(
    slides: Sequence[str | Path | tuple[str | Path, float | None] | CohortSlide],
    *,
    db: str | Path,
    out_dir: str | Path | None = None,
    out_format: str = "parquet",
    redo: bool = False,
    mpp: float | None = None,
    workers: int | None = None,
    batch_size: int = 64,
    progress: Progress | None = None,
    log: Log = _quiet,
    **options,
) -> CohortResult:
    """Predict many slides with one load of the model and the references (``options``: those of
    :func:`open_query`). Each slide is one commit to ``predictions`` and, with ``out_dir``, one
    ``<slide stem>.<out_format>`` file. A slide already predicted by the same model against the
    same ``spots`` version (and with its file present) is skipped unless ``redo``; a slide that
    fails is reported and the others go on."""
    entries = cohort_slides(slides)
    outs = cohort_outputs(entries, out_dir, out_format)
    session = open_query(db=db, batch_size=batch_size, log=log, **options)
    model_id, spots_version = session.record.model_id, session.references.spots_version
    todo, skipped = plan_cohort(
        session.results, entries, outs, model_id=model_id, spots_version=spots_version, options=session.options, redo=redo, mpp=mpp, log=log
    )
    result = CohortResult(skipped=skipped)
    total = len(todo)
    for i, (entry, out) in enumerate(todo, 1):
        if progress is not None:
            progress("slides", i - 1, total)
        try:
            r = query(entry.path, db=db, out=out, mpp=entry.mpp if entry.mpp is not None else mpp, workers=workers, batch_size=batch_size,
                      keep_predictions=False, progress=progress, log=log, session=session, slide_name=entry.name, metadata=entry.metadata)  # fmt: skip
        except (InputError, StoreError, OSError) as exc:
            result.failed.append((entry.name, str(exc)))
            log(f"[{i}/{total}] {entry.name}: failed: {exc}")
            continue
        result.predicted.append(r)
        done_tiles = sum(p.n_tiles for p in result.predicted)
        busy = sum(p.seconds for p in result.predicted)
        log(
            f"[{i}/{total}] {entry.name}: {r.n_tiles} tiles in {r.seconds:.1f} s (cohort so far: {done_tiles} tiles, {rate_text(done_tiles / max(busy, 1e-9), 'tiles')})"
        )
    if progress is not None and total:
        progress("slides", total, total)
    return result


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
    protocol: str = "section",
    patients: Mapping[str, str] | None = None,
    options: TrainOptions | None = None,
    markers: Sequence[str] | None = None,
    k: int | None = None,
    baselines: bool = True,
    out: str | Path | None = None,
    device: str | None = None,
    cache: str | Path | None = None,
    log: Log = _quiet,
):
    """Held-out evaluation of ``options`` against baselines; see :mod:`histoindex.evaluate`.
    ``protocol``: "section" (leave each section out) or "patient" (leave every section of a patient
    out together; ``patients`` maps section name → patient). ``out`` (.parquet) receives the
    held-out predictions and truth keyed by section, system and spot."""
    from .evaluate import BREAST_MARKERS
    from .evaluate import evaluate as run_evaluation

    if out is not None:
        out = check_output_path(out, (".parquet",))
    result = run_evaluation(
        references,
        holdouts=holdouts,
        protocol=protocol,
        patients=patients,
        options=options,
        markers=markers or BREAST_MARKERS,
        k=k,
        baselines=baselines,
        device=device,
        cache=cache,
        log=log,
    )
    if out is not None:
        import json as _json

        import pyarrow.parquet as pq

        table = result.predictions_table()
        pq.write_table(table.replace_schema_metadata({"histoindex": _json.dumps(result.to_dict(), default=str)}), out)
    return result


# ---- indexes ------------------------------------------------------------------------------
def create_index(*, db: str | Path, index_type: str = "IVF_PQ", num_partitions: int | None = None, num_sub_vectors: int | None = None) -> int:
    """Build the ANN index on the reference expression embeddings (cosine) used by
    ``query --search ann`` (and ``auto`` above the exact-search size), build the scalar (bitmap)
    indexes on the filter columns if missing, and bring them up to date with rows ingested since.
    Returns the new spots version."""
    return Store(db).create_vector_index(index_type, num_partitions=num_partitions, num_sub_vectors=num_sub_vectors)


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


def check_sql_output(out: str | Path, *, db: str | Path | None) -> Path:
    """Refuse an ``sql --out`` file inside the store's folder (before the statement runs)."""
    from .sql import check_output_outside_store

    return check_output_outside_store(out, Store(db) if db is not None and Store.exists(db) else None)


def versions(*, db: str | Path) -> dict[str, list[dict]]:
    return Store(db).versions()


def info(*, db: str | Path) -> dict:
    return Store(db).info()


# ---- store upkeep -------------------------------------------------------------------------
#: ``compact`` with neither ``keep_versions`` nor ``older_than_days`` removes versions older than this
COMPACT_DEFAULT_DAYS = 7.0


def restore(version: int | str, *, db: str | Path, table: str = "spots") -> RestoreResult:
    """Make ``version`` (a number or a tag) of ``table`` current again: one new version whose content
    equals it, tagged ``restore-of-<version>``; every version stays (nothing is lost)."""
    return Store(db).restore(version, table=table)


def delete(*, db: str | Path, dataset: str, model_id: str | None = None) -> DeleteResult:
    """Delete dataset ``dataset``'s reference spots (every model's rows of it, or only ``model_id``'s)
    in one new spots version; older versions keep them until :func:`compact` removes those."""
    return Store(db).delete_dataset(dataset, model_id=model_id)


def compact(*, db: str | Path, keep_versions: int | None = None, older_than_days: float | None = None, force: bool = False) -> list[Compaction]:
    """Compact every table's data files, then remove old versions: those replaced by a newer one more
    than ``older_than_days`` ago (default 7 days when neither option is given; with only
    ``keep_versions``, the grace period ``store.COMPACT_GRACE``, 1 hour: a command may still be
    reading a version it opened) and, with ``keep_versions``, not among the ``keep_versions`` newest.
    Tagged versions and spots versions that stored predictions searched are kept (and tagged
    ``pinned-by-predictions-v<N>``) unless ``force``."""
    if keep_versions is None and older_than_days is None:
        older_than_days = COMPACT_DEFAULT_DAYS
    if older_than_days is not None and not (np.isfinite(older_than_days) and older_than_days >= 0):
        raise InputError(f"--older-than must be a number of days, 0 or more; got {older_than_days}")
    older_than = timedelta(days=older_than_days) if older_than_days is not None else None
    return Store(db).compact(keep_versions=keep_versions, older_than=older_than, force=force)


__all__ = [
    "DEFAULT_WEIGHTS",
    "ModelConfig",
    "TrainOptions",
    "TrainResult",
    "IngestResult",
    "QueryResult",
    "read_reference",
    "train",
    "evaluate",
    "create_index",
    "ingest",
    "ingest_hest",
    "query",
    "plot",
    "sql",
    "versions",
    "info",
    "restore",
    "delete",
    "compact",
    "SPOT_DIAMETER_UM",
]
