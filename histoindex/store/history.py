"""History: every version of every table with what made it (from histoindex's tags and Lance's
transaction records), making an old version current again (``restore``), and the store's overview
(``info``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import StoreError, UnknownValue
from ..schemas import TABLES
from .records import _Records
from .writes import OPERATION_KEY


@dataclass(frozen=True)
class RestoreResult:
    table: str
    restored: int  # the version made current again
    version: int  # the new version holding it
    rows: int
    tag: str | None


def _transaction(dataset, version: int):
    try:
        return dataset.read_transaction(version)
    except Exception:  # removed, or written before Lance kept transactions
        return None


_DELETE_PREDICATE = re.compile(r"^dataset = '((?:[^']|'')*)'(?: AND model_id = '((?:[^']|'')*)')?$")
_DELETE_SLIDE_PREDICATE = re.compile(r"^slide = '((?:[^']|'')*)'(?: AND model_id = '((?:[^']|'')*)')?$")
#: how many slides a tiles version's "what" names before "and N more"
_SLIDES_NAMED = 3
_OPERATIONS = {
    "Rewrite": "compaction",
    "CreateIndex": "index build or refresh",
    "Append": "rows added",
    "Update": "rows merged or updated",
    "UpdateConfig": "metadata update",
    "Project": "columns changed",
    "Merge": "columns added",
}


def _appended_slides(dataset, version: int, txn) -> list[str] | None:
    """The slides whose tiles an append to the tiles table wrote (read from the fragments it added,
    found at ``version`` by their data files), or None when that cannot be read."""
    try:
        files = {d.path for f in txn.operation.fragments for d in f.files}
        at = dataset.checkout_version(version)
        added = [f for f in at.get_fragments() if any(d.path in files for d in f.metadata.files)]
        if not added:  # rewritten since (compaction): the version's own fragments are gone
            return None
        return sorted(at.scanner(columns=["slide"], fragments=added).to_table().column("slide").unique().to_pylist())
    except Exception:
        return None


def _named(slides: list[str]) -> str:
    more = len(slides) - _SLIDES_NAMED
    return ", ".join(slides[:_SLIDES_NAMED]) + (f" and {more} more" if more > 0 else "")


def _what(table: str, version: int, tags: list[tuple[str, dict]], txn, dataset=None) -> str:
    """What made a version, from what histoindex wrote beside it (tag metadata) and Lance's own
    transaction record; "unknown" when neither says."""
    op = type(txn.operation).__name__ if txn is not None and getattr(txn, "operation", None) is not None else None
    if op == "BaseOperation":  # an operation pylance does not describe (e.g. compaction reserving fragment ids)
        op = None
    for tag, meta in tags:
        if meta.get(OPERATION_KEY) == "ingest" or (tag.startswith("ingest-") and not meta):
            dataset = meta.get("histoindex.dataset") or re.sub(r"^ingest-(.*)-v\d+$", r"\1", tag)
            return f"ingest of {dataset}" + (" (rows folded into the indexes)" if op == "CreateIndex" else "")
    if op is None:
        return "unknown"
    if op == "Restore":
        return f"restore of {table}@{txn.operation.version}"
    if op == "Overwrite":
        return "created" if version == 1 else "every row replaced"
    if op == "Delete" and table == "tiles":
        found = _DELETE_SLIDE_PREDICATE.match(getattr(txn.operation, "predicate", "") or "")
        if not found:
            return "rows deleted"
        slide, model = (g.replace("''", "'") if g is not None else None for g in found.groups())
        return f"delete of tiles of {slide}" + (f" (model {model})" if model else "")
    if op == "Append" and table == "tiles":
        slides = _appended_slides(dataset, version, txn) if dataset is not None else None
        return f"tiles of {_named(slides)}" if slides else "tiles added"
    if op == "Delete":
        found = _DELETE_PREDICATE.match(getattr(txn.operation, "predicate", "") or "")
        if not found:
            return "rows deleted"
        dataset, model = (g.replace("''", "'") if g is not None else None for g in found.groups())
        return f"delete of {dataset}" + (f" (model {model})" if model else "")
    if op == "Update" and table == "predictions":
        return "rows merged or updated"
    if op == "Append" and table == "predictions":
        return "predictions added"
    if op == "Update" and table == "models":
        return "model added or updated"
    return _OPERATIONS.get(op, f"Lance operation {op}")


class _History(_Records):
    """The versions of each table, restoring one, and the overview of the store."""

    def restore(self, version: int | str, *, table: str = "spots") -> RestoreResult:
        """Make ``version`` (a number or a tag) of ``table`` current again: one new version whose
        content equals it, tagged ``restore-of-<version>``. Nothing is lost: every version stays."""
        if table not in TABLES:
            raise UnknownValue(f"no table {table!r}; tables are {', '.join(TABLES)}")
        target = self.table(table, version=version).version  # a tag resolves; an unknown version is an error listing the known ones

        def write(tbl):
            if target == tbl.version:
                raise StoreError(f"{table}@{target} is already the current version; nothing to restore")
            tbl.restore(target)
            tbl.checkout_latest()
            return tbl

        tbl = self._commit(table, f"the restore of {table}@{target}", write)
        tag = self._tag(tbl, f"restore-of-{target}", tbl.version, {OPERATION_KEY: "restore", "histoindex.restored": str(target)})
        return RestoreResult(table=table, restored=target, version=tbl.version, rows=tbl.count_rows(), tag=tag)

    def versions(self) -> dict[str, list[dict]]:
        """Per table: every version with its timestamp, row count, ``bytes`` (the size of the data
        files it references, Lance's ``total_files_size``: files are shared between versions, indexes
        are not counted), tags, and ``what`` made it (created, ingest of X, index build or refresh,
        restore of N, delete of X, compaction, ...; "unknown" where neither histoindex's tags nor
        Lance's transaction record say)."""
        out = {}
        for name in self.table_names():
            tbl = self._open(name)
            dataset = tbl.to_lance()
            tags: dict[int, list[tuple[str, dict]]] = {}
            for tag, info in dataset.tags.list().items():
                tags.setdefault(info["version"], []).append((tag, dict(info.get("metadata") or {})))
            rows = []
            for v in tbl.list_versions():
                number, meta = v["version"], v["metadata"]
                size = meta.get("total_files_size")
                rows.append(
                    {
                        "version": number,
                        "timestamp": v["timestamp"],
                        "rows": int(meta.get("total_rows", 0)),
                        "bytes": int(size) if size is not None else None,
                        "tags": sorted(t for t, _ in tags.get(number, [])),
                        "what": _what(name, number, tags.get(number, []), _transaction(dataset, number), dataset),
                    }
                )
            out[name] = rows
        return out

    def info(self) -> dict:
        tables = {}
        for name in self.table_names():
            tbl = self._open(name)
            tables[name] = {
                "version": tbl.version,
                "rows": tbl.count_rows(),
                "indexes": [f"{i.index_type}({', '.join(i.columns)})" for i in tbl.list_indices()],
            }
        datasets = []
        if self.has_table("spots") and tables["spots"]["rows"]:
            arrow = self.table("spots").search().select(["dataset", "tissue", "platform", "species", "model_id"]).limit(None).to_arrow()
            import polars as pl

            frame = pl.from_arrow(arrow).group_by(["model_id", "dataset", "tissue", "platform", "species"]).len("spots")
            datasets = frame.sort(["model_id", "dataset"]).to_dicts()
            panels = {m.model_id: len(m.cfg.genes) for m in self.models()}
            measured = self.measured_genes()
            for d in datasets:  # how many genes a query can ask this dataset for (before schema 3: the model's)
                genes = measured.get((d["model_id"], d["dataset"]))
                d["genes"] = len(genes) if genes is not None else panels.get(d["model_id"])
        models = [
            {
                "model_id": m.model_id,
                "method": m.cfg.method,
                "backbone": m.cfg.backbone,
                "genes": len(m.cfg.genes),
                "trained_on": list(m.train_datasets),
                "created_at": m.created_at,
                "views": m.cfg.views,
                "retrieval": m.cfg.retrieval_settings.to_dict(),
                "inner_check": m.metrics.get("inner_check"),
                "datasets": [{k: v for k, v in d.items() if k != "model_id"} for d in datasets if d["model_id"] == m.model_id],
            }
            for m in self.models()
        ]
        return {"uri": self.uri, "tables": tables, "datasets": datasets, "models": models}
