"""Cohorts on a Ray cluster: ``histoindex query ... --ray ADDRESS``.

The unit of work is a slide. Actors each hold the model and the reference embeddings (loaded once
per actor, one actor per GPU when the cluster has GPUs) and predict whole slides with the same
streaming pipeline as a local query: reader threads inside the actor read and tile the slide while
it embeds, searches and imputes. Shipping decoded tiles between processes would move ~150 kB per
tile through Ray's object store for work that the actor's reader threads already overlap with
embedding. Each slide's output file is written by the actor (atomically, so a retried slide
replaces it); its prediction rows (and its ``tiles`` rows, the embeddings, unless
``--no-keep-tiles``) come back to the driver, which commits them to ``tiles`` then ``predictions``:
one writer, one commit per slide and table (slides that finish together share one), and a slide whose actor died is retried by Ray (the actor
restarts and loads the model again) without anything reaching the store twice. The store is
opened by URI on every node, so a shared ``s3://`` store works from many machines.

Ray is an optional extra (``pip install 'histoindex[ray]'``), imported only here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pyarrow as pa

from . import api
from .config import rate_text
from .errors import InputError, StoreError
from .store import Store

#: how often Ray restarts a dead actor, and re-runs the slide it was predicting
MAX_RETRIES = 3


def _ray():
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'histoindex[ray]' (or pip install 'ray>=2.9')") from None
    return ray


def connect(address: str, *, num_cpus: int | None = None, verbose: bool = False):
    """Join a Ray cluster: ``local`` starts a Ray instance on this machine, ``auto`` joins the
    cluster this machine belongs to, anything else is the head's address (``ray://host:10001`` or
    ``host:6379``). A Ray already initialised in this process is used as it is. Unless ``verbose``
    (``histoindex -v``), Ray's start-up notices (its token-authentication notice) and the warnings
    its process launches raise (LanceDB's and Polars' fork-safety warnings: Ray's processes exec a
    fresh program, so they share no state with this one) are kept quiet."""
    import logging
    import warnings

    ray = _ray()
    if ray.is_initialized():
        return ray
    ray_logger = logging.getLogger("ray")
    level = ray_logger.level
    with warnings.catch_warnings():
        if not verbose:
            warnings.filterwarnings("ignore", message=r".*\bfork", category=RuntimeWarning)
            ray_logger.setLevel(logging.ERROR)
        try:
            if address == "local":
                # workers must import histoindex from the same environment; the dashboard is not needed
                ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, configure_logging=False, log_to_driver=False)
            else:
                ray.init(address=address, configure_logging=False, log_to_driver=False)
        except ConnectionError as exc:
            raise InputError(f"--ray {address}: no Ray cluster there ({exc}); use --ray local to start one on this machine") from None
        finally:
            ray_logger.setLevel(level)
    return ray


def actor_resources(ray) -> tuple[int, dict]:
    """How many slide actors to start and what each reserves: one per GPU when the cluster has
    GPUs; else one per 4 CPUs (torch uses the actor's CPUs for its threads, its readers share them)."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return gpus, {"num_gpus": 1, "num_cpus": max(1, int(resources.get("CPU", gpus)) // gpus)}
    cpus = max(1, int(resources.get("CPU", 1)))
    per_actor = min(4, cpus)
    return max(1, cpus // per_actor), {"num_cpus": per_actor}


class SlidePredictor:
    """A Ray actor: the query session (model + references) loaded once, then slide after slide."""

    def __init__(self, db: str, options: api.QueryOptions):
        self.session = api.open_query(db, options)

    def predict(self, entry: api.CohortSlide, out: str | None, mpp: float | None) -> api.QueryResult:
        return self.session.answer(entry, out=out, mpp=mpp, keep_predictions=False, commit=False)


def query_cohort(
    slides: Sequence,
    *,
    db: str | Path,
    options: api.QueryOptions | None = None,
    cohort: api.CohortOptions | None = None,
    address: str = "local",
    actors: int | None = None,
    progress: api.Progress | None = None,
    log: api.Log = api._quiet,
) -> api.CohortResult:
    """:func:`histoindex.api.query_cohort` on a Ray cluster (``address``: see :func:`connect`):
    the same slides, skips, files, commits and predictions, slide by slide."""
    options, cohort = options or api.QueryOptions(), cohort or api.CohortOptions()
    entries = api.cohort_slides(slides)
    outs = api.cohort_outputs(entries, cohort.out_dir, cohort.out_format)
    store = Store(db)
    # every actor searches the same spots version, whatever is ingested while the cohort runs
    spots = store.table("spots", version=options.as_of)  # as open_query reads it
    record = store.query_model(version=spots.version, model_id=options.model_id)
    model_id, spots_version = record.model_id, spots.version
    results = api.open_results(store, results_db=options.results_db, no_store=options.no_store)
    asked = options.asked(api.predicted_genes(options.genes, record.cfg.genes))  # as each actor's open_query resolves them
    if results is not None and results is not store:
        asked["reference_db"] = store.uri
    todo, skipped = api.plan_cohort(
        results, entries, outs, model_id=model_id, spots_version=spots_version, options=asked, redo=cohort.redo, mpp=cohort.mpp, log=log
    )
    result = api.CohortResult(skipped=skipped)
    if not todo:
        return result
    ray = connect(address)
    n_actors, resources = actor_resources(ray)
    n_actors = min(actors or n_actors, len(todo))
    remote = ray.remote(max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES, **resources)(SlidePredictor)
    options = options.replace(as_of=spots_version, model_id=model_id)
    pool = [remote.remote(str(db), options) for _ in range(n_actors)]
    log(f"{len(todo)} slides on {n_actors} Ray actor{'s' if n_actors > 1 else ''} ({', '.join(f'{k}={v}' for k, v in resources.items())} each)")
    started, done, tiles = time.perf_counter(), 0, 0
    pending, running = list(todo), {}
    try:
        while pending or running:
            while pending and pool:
                actor = pool.pop()
                entry, out = pending.pop(0)
                running[actor.predict.remote(entry, None if out is None else str(out), cohort.mpp)] = (actor, entry)
            # wait for one slide, then take every other slide finished meanwhile: they share a commit
            (first,), _ = ray.wait(list(running), num_returns=1)
            ready = [first] + ray.wait([r for r in running if r != first], num_returns=len(running) - 1, timeout=0)[0] if len(running) > 1 else [first]
            finished = []
            for ref in ready:
                actor, entry = running.pop(ref)
                pool.append(actor)
                done += 1
                try:
                    finished.append(ray.get(ref))
                except ray.exceptions.RayTaskError as exc:  # the slide's own error (a bad file): reported, not retried
                    cause = exc.cause if isinstance(exc.cause, (InputError, StoreError, OSError)) else exc
                    result.failed.append((entry.name, str(cause)))
                    log(f"[{done}/{len(todo)}] {entry.name}: failed: {cause}")
                except ray.exceptions.RayActorError as exc:  # the actor died more often than it may restart
                    result.failed.append((entry.name, f"its Ray worker died {MAX_RETRIES + 1} times: {exc}"))
                    log(f"[{done}/{len(todo)}] {entry.name}: failed: its Ray worker died")
                    pool.remove(actor)
                    pool.append(remote.remote(str(db), options))
            rows = [r.rows for r in finished if r.rows is not None]
            tile_rows = [r.tile_rows for r in finished if r.tile_rows is not None]
            if results is None:  # --no-store: the files are the answer
                version = -1
            else:
                if tile_rows:  # the slides' tiles first, as a local query: predictions never name an index that is not there
                    results.add_tiles(pa.concat_tables(tile_rows))
                version = results.add_predictions(pa.concat_tables(rows)) if rows else results.table("predictions").version
            for r in finished:
                tiles += r.n_tiles
                result.predicted.append(replace(r, predictions_version=version, rows=None, tile_rows=None))
                rate = tiles / (time.perf_counter() - started)
                log(f"{r.slide}: {r.n_tiles} tiles in {r.seconds:.1f} s; predictions@{version} (cohort: {done}/{len(todo)} slides, {rate_text(rate, 'tiles')})")
            if progress is not None:
                progress("slides", done, len(todo))
    finally:
        for actor in pool + [a for a, _ in running.values()]:
            ray.kill(actor)
    return result


class ReferenceEmbedderActor:
    """A Ray actor: one model loaded once, embedding reference after reference into spots rows."""

    def __init__(self, db: str, model_id: str, device: str | None, precision: str, batch_size: int):
        self.embedder = api.ReferenceEmbedder(Store(db).model(model_id), device=device, batch_size=batch_size, precision=precision)

    def rows(self, reference, labels: dict) -> pa.Table:
        return self.embedder.rows(reference, **labels)


def ray_embedder(address: str, *, db: str | Path, device: str | None = None, precision: str = "auto", batch_size: int = 64, log: api.Log = api._quiet):
    """An ``embed_many`` for :func:`histoindex.api.ingest_many` that embeds the references in
    parallel on Ray actors (one per GPU, else one per 4 CPUs), in the order given. The driver
    commits all of them at once, so a retried reference is never written twice."""

    def embed_many(record, plans) -> list[pa.Table]:
        ray = connect(address)
        n_actors, resources = actor_resources(ray)
        n_actors = min(n_actors, len(plans))
        remote = ray.remote(max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES, **resources)(ReferenceEmbedderActor)
        actors = [remote.remote(str(db), record.model_id, device, precision, batch_size) for _ in range(n_actors)]
        log(f"embedding {len(plans)} references on {n_actors} Ray actor{'s' if n_actors > 1 else ''}")
        try:
            refs = [actors[i % n_actors].rows.remote(reference, labels) for i, (reference, labels) in enumerate(plans)]
            tables = []
            for (reference, _), ref in zip(plans, refs):
                try:
                    tables.append(ray.get(ref))
                except ray.exceptions.RayTaskError as exc:  # nothing is written: the commit needs every reference
                    cause = exc.cause if isinstance(exc.cause, (InputError, StoreError, OSError)) else exc
                    raise InputError(f"{reference.name}: {cause}") from None
                log(f"embedded {reference.n_obs} spots of {reference.name}")
            return tables
        finally:
            for actor in actors:
                ray.kill(actor)

    return embed_many
