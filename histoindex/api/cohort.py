"""Many slides, one load of the model and the references: the cohort planner (which slides to
predict, which to skip, and why) and the one-process runner (:mod:`histoindex.cluster` is the Ray one)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..config import rate_text
from ..errors import InputError, StoreError
from ..io.write import check_output_path
from ..store import Store
from .common import Log, Progress, _quiet
from .indexing import local_file, slide_identity
from .options import CohortOptions, CohortSlide, QueryOptions, answer_settings
from .querying import QueryResult, open_query


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
    answer settings (:func:`answer_settings` of ``options``: filter, k, smoothing, views, ...) of the
    same slide bytes (:func:`_same_bytes`) and its output file (if one is asked for) is present,
    unless ``redo``. A slide predicted before with other settings, or whose file changed, is
    predicted again, with a line saying why."""
    runs = {} if redo or store is None else store.predicted_slides(model_id=model_id, spots_version=spots_version)
    todo, skipped = [], []
    for entry, out in zip(entries, outs):
        settings = answer_settings(options, mpp=entry.mpp if entry.mpp is not None else mpp)
        before = runs.get(entry.name, {})
        if settings in before and (out is None or out.exists()):
            same, why = _same_bytes(store, entry, before[settings])
            if same:
                skipped.append((entry.name, f"already predicted by {model_id} against spots@{spots_version} with the same settings"))
                log(f"{entry.name}: already predicted (same model, spots version and settings{why}); --redo to predict again")
                continue
            log(f"{entry.name}: predicted before with the same settings, but {why}; predicting again")
        elif before and settings not in before:
            earlier = sorted(before, key=lambda s: (s is None, s or ""))[0]
            log(f"{entry.name}: predicted before with other settings ({settings_difference(earlier, settings)}); predicting again")
        todo.append((entry, out))
    return todo, skipped


def _same_bytes(store: Store, entry: CohortSlide, hashes: set[str | None]) -> tuple[bool, str]:
    """Whether the runs of ``entry`` (the ``slide_hash`` of each: ``hashes``) answered the bytes its
    file holds now (:func:`slide_identity`: the hash the store's tiles know for the file's path, size
    and modification time, else the hash of its bytes; no image is decoded), and the words for why
    (``", …"`` to append to a skip line, or the reason to predict again)."""
    if local_file(entry.path) is None:
        # a remote (URI) slide is not hashed (its bytes would be downloaded to plan): skipped on its
        # name and settings, as before slide hashes were recorded; --redo answers a changed one again
        return True, ""
    identity = slide_identity(entry.path, name=entry.name, metadata=entry.metadata, store=store, log=_quiet)
    if identity is None:  # unreadable and never indexed: nothing to compare, and nothing to answer it from
        return True, "; its file cannot be read to check its bytes"
    if identity.digest in hashes:
        return True, ", same file"
    if hashes == {None}:
        return False, "those runs predate recorded slide hashes, so whether its file changed since is unknown"
    return False, f"its file changed since (sha256 now {identity.digest[:12]}…)"


def query_cohort(
    slides: Sequence[str | Path | tuple[str | Path, float | None] | CohortSlide],
    *,
    db: str | Path,
    options: QueryOptions | None = None,
    cohort: CohortOptions | None = None,
    progress: Progress | None = None,
    log: Log = _quiet,
) -> CohortResult:
    """Predict many slides with one load of the model and the references (:func:`open_query` of
    ``options``). Each slide is one commit to ``predictions`` and, with ``cohort.out_dir``, one
    ``<slide stem>.<out_format>`` file. A slide already predicted by the same model against the
    same ``spots`` version with the same settings, of the same slide bytes (and with its output
    file present) is skipped unless
    ``cohort.redo``; a slide that fails is reported and the others go on."""
    cohort = cohort or CohortOptions()
    entries = cohort_slides(slides)
    outs = cohort_outputs(entries, cohort.out_dir, cohort.out_format)
    session = open_query(db, options, log=log)
    model_id, spots_version = session.record.model_id, session.references.spots_version
    todo, skipped = plan_cohort(
        session.results, entries, outs, model_id=model_id, spots_version=spots_version, options=session.options, redo=cohort.redo, mpp=cohort.mpp, log=log
    )
    result = CohortResult(skipped=skipped)
    total = len(todo)
    for i, (entry, out) in enumerate(todo, 1):
        if progress is not None:
            progress("slides", i - 1, total)
        try:
            r = session.answer(entry, out=out, mpp=cohort.mpp, keep_predictions=False, progress=progress, log=log)
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
