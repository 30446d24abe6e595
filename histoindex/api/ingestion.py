"""The ``ingest`` verb: reference spots embedded with the store's model and written in one commit
(a model trained first when the store has none)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..data import SpotSet
from ..errors import InputError, StoreError
from ..io.readers import check_reference_image
from ..patch import spot_stain, stream_spot_patches
from ..stain import normalised
from ..store import Store, spot_rows
from .common import Log, Progress, _quiet, default_read_workers
from .options import IngestOptions
from .training import train


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
    options: IngestOptions | None = None,
    progress: Progress | None = None,
    log: Log = _quiet,
    **fields,
) -> IngestResult:
    """Embed every spot of ``reference`` and write them to ``spots`` in one commit (one new table
    version), replacing the dataset's earlier rows. Trains a model first if the store has none.
    ``options``: an :class:`~histoindex.api.options.IngestOptions`, or its fields as keywords."""
    (result,) = ingest_many(
        [(reference, {"tissue": tissue, "platform": platform, "species": species})], db=db, options=IngestOptions.of(options, **fields),
        progress=progress, log=log,
    )  # fmt: skip
    return result


class ReferenceEmbedder:
    """A model loaded once to embed reference spot sets into ``spots`` rows (nothing is written)."""

    def __init__(self, record, *, device: str | None = None, batch_size: int = 64, precision: str = "auto"):
        from ..embed import resolve_device, resolve_precision
        from ..models import load_model

        self.record, self.cfg, self.batch_size = record, record.cfg, batch_size
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.model = load_model(self.cfg, record.weights(), device=self.device)

    def rows(self, reference: SpotSet, *, tissue: str, platform: str, species: str, progress: Progress | None = None, log: Log = _quiet) -> pa.Table:
        from ..embed import iter_image_features
        from ..methods import get_method
        from ..pipeline import counted
        from ..train import TrainSection

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

    from ..data import check_panel_overlap, is_whole_transcriptome

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
    from ..data import check_panel_overlap, is_whole_transcriptome

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
    options: IngestOptions | None = None,
    embed_many: EmbedMany | None = None,
    progress: Progress | None = None,
    log: Log = _quiet,
) -> list[IngestResult]:
    """Ingest many references in one commit: ``plans`` pairs each reference with its labels
    (tissue, platform, species). With no model in the store one is trained on all of them first;
    every reference is checked against the model before any is embedded, all are embedded (here
    with one model load, or by ``embed_many``: e.g. Ray actors), and their rows replace the
    datasets' earlier rows in one ``spots`` version: all of them or, on any error, none."""
    from ..distributed import launch_rank

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
    options = options or IngestOptions()
    references = [reference for reference, _ in plans]
    store = Store(db) if Store.exists(db) else None
    model_id = store.ingest_model(options.model_id, log=log) if store is not None else _no_store_model(options.model_id)
    trained = model_id is None
    if trained:
        _announce_training(db, references, store, log)
        model_id = train(
            references, db=db, options=options.train_options, device=options.device, precision=options.precision, progress=progress, log=log,
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
        embedder = ReferenceEmbedder(record, device=options.device, batch_size=options.batch_size, precision=options.precision)
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


@dataclass(frozen=True)
class HestSelection:
    """Which samples of a HEST-1k folder to ingest (``ids`` and/or ``where`` terms), with labels
    and reading options that override each sample's metadata."""

    ids: Sequence[str] = ()
    where: str | Sequence[str] | dict | None = None
    tissue: str | None = None
    platform: str | None = None
    species: str | None = None
    dataset: str | None = None
    mpp: float | None = None
    log_normalised: bool = False


def ingest_hest(
    root: str | Path,
    *,
    db: str | Path,
    options: IngestOptions | None = None,
    embed_many: EmbedMany | None = None,
    progress: Progress | None = None,
    log: Log = _quiet,
    **selection,
) -> list[IngestResult]:
    """Ingest samples of a HEST-1k folder (:mod:`histoindex.io.hest`), chosen by ``ids`` and/or the
    metadata selection ``where`` (``KEY=VALUE`` terms), each as its own dataset named by its id,
    all in one commit (:func:`ingest_many`). tissue / platform / species come from each sample's
    metadata unless given. ``selection``: the fields of :class:`HestSelection`."""
    from ..io.hest import hest_samples, read_hest

    chosen = HestSelection(**selection)
    ids, where, dataset, mpp = chosen.ids, chosen.where, chosen.dataset, chosen.mpp
    tissue, platform, species = chosen.tissue, chosen.platform, chosen.species

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
        reference = read_hest(root, sample, mpp=mpp, name=dataset, platform=labels["platform"], log_normalised=chosen.log_normalised)
        plans.append((reference, labels))
        described = f"tissue {labels['tissue']}, platform {labels['platform']}, species {labels['species']}"
        log(f"HEST {sample.id}: {reference.n_obs} spots, {described}, {reference.mpp:.4g} µm/px ({reference.mpp_source})")
    return ingest_many(plans, db=db, options=options, embed_many=embed_many, progress=progress, log=log)
