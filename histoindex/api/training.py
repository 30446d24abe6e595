"""The ``train`` verb: a model trained on reference sections and registered in the store."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data import SpotSet
from ..errors import InputError
from ..io.readers import check_reference_image
from ..recipe import TrainOptions, model_config
from ..store import Store
from .common import Log, Progress, _quiet


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
    from ..embed import resolve_device, resolve_precision  # torch: seconds to import
    from ..recipe import describe_inner_check, estimate_training, train_model

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
    from ..distributed import launch_rank

    if launch_rank() != 0:  # torchrun: every rank holds the same model; rank 0 writes it
        from ..models import state_digest

        return TrainResult(model_id=f"{cfg.method}-{state_digest(result.model, cfg)}", models_version=-1, metrics=result.metrics)
    store = Store(db, create=True)
    model_id, version = store.add_model(result.model, cfg, metrics=result.metrics, train_datasets=names)
    log(f"registered model {model_id} (models@{version})")
    return TrainResult(model_id=model_id, models_version=version, metrics=result.metrics)
