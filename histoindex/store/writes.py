"""Writes: every write is one commit to one table, made again on the table's then latest version when
another process committed under it (or ``compact`` removed the version it read), and reports the
version it made; here too the writes of spots and predictions rows, and the tags that say what
wrote a version."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import Any

import pyarrow as pa

from ..errors import HistoindexError, StoreError, one_line
from ..schemas import conform, layout
from .rows import sql_literal
from .tables import _Tables, has_vector_index

#: tag metadata saying what wrote the tagged version (``ingest``, ``restore``), read by :meth:`Store.versions`
OPERATION_KEY = "histoindex.operation"
#: how long a write may take, retries after a concurrent commit included (LanceDB's default of
#: 30 s after the first attempt is too short for a large reference on a busy machine)
WRITE_TIMEOUT = timedelta(minutes=10)
#: how many times a write is made whole again on the table's then latest version when the table
#: changed under it (a concurrent commit Lance could not rebase, or ``compact`` removing the version
#: it read) before the command ends with "the store changed while writing …; retry"
WRITE_ATTEMPTS = 3
#: words in Lance's messages for a commit that lost a race (retried when the table's version moved)
_CONFLICT_WORDS = ("conflict", "concurrent", "retryable", "retry")


def _tag_safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text)


class _Writes(_Tables):
    """Commits with conflict handling and retry, and the spots and predictions written through them."""

    def _commit(self, name: str, what: str, write: Callable[[Any], Any], *, replayable: bool = True) -> Any:
        """``write(table)``: one commit to table ``name``, opened (by :meth:`_writable`) at its latest
        version. When the table changed under it (another process committed, or ``compact`` removed
        the version it read: Lance then reports a conflict or a file not found) it is made again on
        the then latest version, WRITE_ATTEMPTS times at most; then a :class:`StoreError` saying to
        retry. A failed attempt commits nothing, so nothing of it is ever visible. A write that is
        not ``replayable`` (it consumes a stream) is made once, and only Lance naming a conflict
        counts as the table changing (an error from the stream itself is left as it is)."""
        last: Exception | None = None
        attempts = WRITE_ATTEMPTS if replayable else 1
        for _ in range(attempts):
            read = None
            try:
                tbl = self._writable(name)
                read = tbl.version if replayable else None
                return write(tbl)
            except HistoindexError:
                raise
            except Exception as exc:
                if not self._changed_under(name, read, exc):
                    raise
                last = exc
        raise StoreError(
            f"the store changed while writing {what} (another process wrote to the {name} table, or removed old versions of it, "
            f"at the same time) and the write could not be re-applied in {attempts} attempt(s); nothing of it was written: retry "
            f"(Lance: {one_line(last)})"
        ) from last

    def _changed_under(self, name: str, read: int | None, exc: Exception) -> bool:
        """Whether ``exc``, raised by a write to ``name`` that read version ``read``, came from the table
        changing under it (a new version since, or Lance naming a conflict), not from a damaged store."""
        if not isinstance(exc, (RuntimeError, OSError, ValueError)):
            return False
        if any(word in str(exc).lower() for word in _CONFLICT_WORDS):
            return True
        if read is None or isinstance(exc, ValueError):  # Lance reports missing files as RuntimeError / OSError
            return False
        try:
            return self.db.open_table(name).version != read
        except Exception:
            return False

    @staticmethod
    def _tag(tbl, name: str, version: int, metadata: dict[str, str], *, unique: bool = False) -> str | None:
        """Tag ``version`` ``name`` (``name-v<version>`` if that tag exists, unless ``unique``: then
        an existing tag of that name is kept); returns the tag, or None if Lance refused."""
        existing = tbl.tags.list()
        if name in existing:
            if unique:
                return name
            name = f"{name}-v{version}"
        try:
            tbl.tags.create(name, version)
            tbl.to_lance().tags.replace_metadata(name, metadata)
        except Exception:
            return None
        return name

    # ---- spots --------------------------------------------------------------------------
    def write_dataset(self, rows: pa.Table, *, model_id: str, dataset: str) -> int:
        """One dataset's spots (see :meth:`write_datasets`)."""
        return self.write_datasets(rows, model_id=model_id, datasets=[dataset])

    def write_datasets(self, rows: pa.Table, *, model_id: str, datasets: Sequence[str]) -> int:
        """Write datasets' spots under one model in a single commit, replacing the rows that each
        (model, dataset) had; returns the version that holds them, tagged
        ``ingest-<dataset>-v<version>`` (several: ``ingest-<first>-and-<n>-more-v<version>``, the
        tag's metadata listing them all).

        Always one ``merge_insert`` keyed on (model_id, dataset, spot_id): matching spots are
        updated, new ones inserted, the (model, dataset) rows it no longer has deleted. The key
        columns carry Lance's primary-key metadata, so two concurrent ingests of the same dataset
        conflict at commit and the later one is re-run against the earlier one's rows (no
        duplicates). When the table has a vector index, the new rows are folded into it (one more
        version, the one returned and tagged)."""
        data = conform("spots", rows)
        datasets = list(datasets)
        if set(data.column("model_id").unique().to_pylist()) != {model_id}:
            raise StoreError(f"rows for model_id {model_id!r} carry other model_id values")
        if set(data.column("dataset").unique().to_pylist()) != set(datasets):
            raise StoreError(f"rows for datasets {', '.join(map(repr, datasets))} carry other dataset values (or lack one)")
        scope = f"model_id = {sql_literal(model_id)} AND dataset IN ({', '.join(sql_literal(d) for d in datasets)})"
        dataset = datasets[0] if len(datasets) == 1 else f"{datasets[0]}-and-{len(datasets) - 1}-more"

        def write(tbl) -> int:
            return (
                tbl.merge_insert(list(layout("spots").key))
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .when_not_matched_by_source_delete(scope)
                .execute(data, timeout=WRITE_TIMEOUT)
            ).version

        version = self._commit("spots", dataset, write)
        tbl = self.table("spots")
        if has_vector_index(tbl):  # keep `query --search ann` on the index for every row
            try:
                version = self.refresh_indexes()
            except StoreError as exc:
                raise StoreError(
                    f"wrote {dataset} whole (spots@{version}), but folding its rows into the indexes failed: {exc}; "
                    "run `histoindex index` (until then `query --search ann` misses them)"
                ) from exc
        try:
            tag = _tag_safe(f"ingest-{dataset}-v{version}")
            tbl.tags.create(tag, version)
            tbl.to_lance().tags.replace_metadata(tag, {OPERATION_KEY: "ingest", "histoindex.dataset": ", ".join(datasets), "histoindex.model_id": model_id})
        except Exception:  # a tag is a convenience; the version itself is the record
            pass
        return version

    def refresh_indexes(self, table: str = "spots") -> int:
        """Fold rows written since the indexes were built into them (vector and scalar), in one
        commit; returns the new version. Unlike LanceDB's ``optimize()``, this prunes no old
        versions, so ``--as-of`` keeps working."""

        def write(tbl) -> int:
            tbl.to_lance().optimize.optimize_indices()
            tbl.checkout_latest()
            return tbl.version

        return self._commit(table, f"the {table} indexes", write)

    # ---- predictions --------------------------------------------------------------------
    def predicted_slides(self, *, model_id: str, spots_version: int) -> dict[str, dict[str | None, set[str | None]]]:
        """The slides ``predictions`` holds a run of by this model against this ``spots`` version:
        each slide's runs' ``settings`` (None for rows written before they were recorded), each with
        the ``slide_hash`` of the bytes those runs answered (None: not known, a remote slide or rows
        written before it was recorded): one scan of three columns, however many slides a cohort asks about."""
        where = f"model_id = {sql_literal(model_id)} AND spots_version = {int(spots_version)}"
        tbl = self.table("predictions")
        columns = ["slide"] + [c for c in ("settings", "slide_hash") if c in tbl.schema.names]
        rows = tbl.to_lance().to_table(columns=columns, filter=where).group_by(columns).aggregate([])
        slides = rows.column("slide").to_pylist()
        settings = rows.column("settings").to_pylist() if "settings" in columns else [None] * len(slides)
        hashes = rows.column("slide_hash").to_pylist() if "slide_hash" in columns else [None] * len(slides)
        runs: dict[str, dict[str | None, set[str | None]]] = {}
        for slide, setting, digest in zip(slides, settings, hashes):
            runs.setdefault(slide, {}).setdefault(setting, set()).add(digest)
        return runs

    def add_predictions(self, rows: pa.Table | Iterable[pa.RecordBatch]) -> int:
        """Append prediction rows in one commit; ``rows`` may be a stream of record batches, which
        LanceDB writes as they come (nothing is committed if the stream fails)."""
        return self._append("predictions", "the predictions", rows)

    def _append(self, name: str, what: str, rows: pa.Table | Iterable[pa.RecordBatch]) -> int:
        """Append ``rows`` (a table, or a stream of record batches) to table ``name`` in one commit,
        conformed to its layout; the new version."""
        if isinstance(rows, pa.Table):
            table = conform(name, rows)
            return self._commit(name, what, lambda tbl: tbl.add(table).version)
        target = layout(name).schema
        batches = (b for batch in rows for b in conform(name, pa.Table.from_batches([batch])).to_batches())
        # a stream is read once: a write that loses a race is not made again, the command says to retry
        return self._commit(name, what, lambda tbl: tbl.add(pa.RecordBatchReader.from_batches(target, batches)).version, replayable=False)
