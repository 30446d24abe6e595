"""SQL over the store with DuckDB: the tables are exposed as views over their Lance datasets
(scanned in place, never copied; ``models`` without its ``weights`` blobs), plus long-format views
with one row per gene."""

from __future__ import annotations

import duckdb
import pyarrow as pa

from .errors import HistoindexError, StoreError
from .store import WEIGHTS, Store

LONG_VIEWS = {
    # one row per (tile, gene): per-gene analytics as a single GROUP BY
    "predictions_long": """
        SELECT p.run_id, p.slide, p.tile_id, p.x, p.y, p.x_um, p.y_um, p.model_id, p.spots_version,
               UNNEST(m.genes) AS gene, UNNEST(p.expression) AS value
        FROM predictions p JOIN models m USING (model_id)""",
    "spots_long": """
        SELECT s.dataset, s.spot_id, s.tissue, s.platform, s.species, s.x, s.y, s.model_id,
               UNNEST(m.genes) AS gene, UNNEST(s.expression) AS value
        FROM spots s JOIN models m USING (model_id)""",
}


class SqlError(HistoindexError, ValueError):
    """DuckDB rejected the statement."""


def connect(store: Store | None, *, versions: dict[str, int] | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the store's tables registered as views (at ``versions`` if given)."""
    con = duckdb.connect(":memory:")
    if store is None:
        return con
    versions = versions or {}
    present = store.table_names()
    for name in present:
        dataset = store.table(name, version=versions.get(name)).to_lance()
        if WEIGHTS in dataset.schema.names:  # models: the weights blobs stay out of SQL
            con.register(f"_lance_{name}", dataset)
            con.execute(f"CREATE VIEW {name} AS SELECT * EXCLUDE ({WEIGHTS}) FROM _lance_{name}")
        else:
            con.register(name, dataset)
    for view, body in LONG_VIEWS.items():
        needed = {"models", view.split("_")[0]}
        if needed <= set(present):
            con.execute(f"CREATE VIEW {view} AS {body}")
    return con


def run_sql(store: Store | None, statement: str) -> pa.Table:
    """Run one SQL statement; returns its result as Arrow. Parquet/CSV files can be named in the
    statement directly (``FROM 'predictions.parquet'``)."""
    con = connect(store)
    try:
        relation = con.sql(statement)
        if relation is None:  # DDL / SET: nothing to show
            return pa.table({})
        return relation.to_arrow_table()
    except duckdb.Error as exc:
        tables = ", ".join(store.table_names() + [v for v in LONG_VIEWS]) if store else "none"
        raise SqlError(f"{exc}\n(tables and views: {tables})") from exc
    finally:
        con.close()


def ensure_tables(store: Store) -> None:
    if not store.table_names():
        raise StoreError(f"the store at {store.uri} is empty")
