"""Rows handed to a store table while they are made, committed once at the end: one slide, one
version, memory flat, and nothing committed when the slide fails part-way."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable

import pyarrow as pa

#: writes a stream of record batches as one commit and returns the new table version
Commit = Callable[[Iterable[pa.RecordBatch]], int]


class RowStream:
    """``put`` row tables as they come; ``finish`` commits them all as one version; ``abort`` commits
    nothing. One more thread hands the rows to LanceDB, which writes them as they come and commits
    once, after the last: the calling thread keeps reading, embedding and writing the ``--out``
    file, so an error or a Ctrl-C lands there, never while another thread is still writing ``out``
    (closing a Parquet writer under a writing thread crashes the process). On ``abort`` LanceDB's
    stream fails, so nothing is committed, and the committing thread is waited for.

    With ``commit`` None nothing is written: the rows are kept (``uncommitted``) for a caller that
    commits them itself (a cluster's driver commits what its workers predicted), or dropped with
    ``keep=False`` (``--no-store``: the ``--out`` file holds the answer)."""

    _LAST, _STOP = object(), object()

    def __init__(self, commit: Commit | None, *, keep: bool = True):
        self._commit, self._keep = commit, keep
        self._handoff: queue.Queue = queue.Queue(maxsize=2)  # rows waiting for LanceDB: memory stays flat
        self._outcome: dict = {}
        self._kept: list[pa.Table] = []
        self._thread = threading.Thread(target=self._run, name="histoindex-commit", daemon=True)
        if commit is not None:
            self._thread.start()

    def _rows(self):  # pulled by LanceDB's writer
        while True:
            item = self._handoff.get()
            if item is self._LAST:
                return
            if item is self._STOP:
                raise RuntimeError("the query stopped before its last tile; nothing of it is committed")
            yield from item.to_batches()

    def _run(self) -> None:
        try:
            self._outcome["version"] = self._commit(self._rows())
        except BaseException as exc:  # re-raised in the calling thread
            self._outcome["error"] = exc

    def put(self, rows: pa.Table) -> None:
        if self._commit is None:
            if self._keep:
                self._kept.append(rows)
            return
        self._hand_over(rows)

    def _hand_over(self, item) -> None:
        while True:
            if "error" in self._outcome:
                raise self._outcome["error"]
            try:
                self._handoff.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> int:
        """Commit: the new version (-1 when nothing is committed here)."""
        if self._commit is None:
            return -1
        self._hand_over(self._LAST)
        self._thread.join()
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome["version"]

    def abort(self) -> None:
        if self._thread.is_alive():  # LanceDB is still reading rows: make its stream fail (no commit), then wait
            while True:
                try:
                    self._handoff.get_nowait()
                except queue.Empty:
                    break
            self._handoff.put_nowait(self._STOP)
            self._thread.join()

    @property
    def uncommitted(self) -> pa.Table | None:
        return pa.concat_tables(self._kept) if self._kept else None
