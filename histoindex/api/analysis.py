"""The reading verbs: ``plot``, ``evaluate`` and ``sql``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow as pa

from ..data import SpotSet
from ..io.write import check_output_path
from ..plot import plot_predictions
from ..recipe import TrainOptions
from ..sql import run_sql
from ..store import Store
from .common import Log, _quiet


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
    from ..evaluate import BREAST_MARKERS
    from ..evaluate import evaluate as run_evaluation

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


# ---- SQL ----------------------------------------------------------------------------------
def sql(statement: str, *, db: str | Path | None, allow_files: Sequence[str | Path] = ()) -> pa.Table:
    """Run one read-only DuckDB statement (SELECT, WITH, EXPLAIN, DESCRIBE, SUMMARIZE) over the
    store's tables (spots, predictions, models, tiles without its embeddings, tiles_embeddings
    with them, and the predictions_long / spots_long views) and
    the Parquet / CSV / JSON files it names outside the store; ``allow_files`` are further files
    or folders it may read. Anything else raises SqlError (see :mod:`histoindex.sql`)."""
    store = None
    if db is not None and Store.exists(db):
        store = Store(db)
    return run_sql(store, statement, allow_files=allow_files)


def check_sql_output(out: str | Path, *, db: str | Path | None) -> Path:
    """Refuse an ``sql --out`` file inside the store's folder (before the statement runs)."""
    from ..sql import check_output_outside_store

    return check_output_outside_store(out, Store(db) if db is not None and Store.exists(db) else None)
