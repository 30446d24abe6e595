"""Upkeep: deleting a dataset's spots or a slide's tiles, and ``compact``: rewriting each table's data files, then
removing the old versions asked for (never the current one, nor by default a tagged one or a spots
version a stored prediction searched, nor one that stopped being current within the grace period)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from ..errors import StoreError, UnknownValue, one_line
from .records import _Records
from .rows import sql_literal
from .writes import OPERATION_KEY

#: the tag that keeps a spots version a stored prediction searched (``compact`` never removes it without --force)
PINNED_TAG = "pinned-by-predictions-v{version}"
#: ``compact`` never removes a version that stopped being current less than this long ago: a command
#: that opened it then (a query searching it, an ingest merging into it) may still be reading it, and
#: a query records the version it searched only when it commits (Lance's advice: a grace period)
COMPACT_GRACE = timedelta(hours=1)
#: how many slide names ``delete --slide``'s error lists
_SLIDES_LISTED = 20


@dataclass(frozen=True)
class DeleteResult:
    dataset: str
    model_id: str | None
    rows: int
    version: int


@dataclass(frozen=True)
class SlideDeleteResult:
    slide: str
    model_id: str | None
    rows: int
    version: int  # the tiles version without them


@dataclass(frozen=True)
class Compaction:
    """What ``compact`` did to one table."""

    table: str
    version: int  # current version afterwards
    compacted: bool  # whether data files were rewritten (Lance commits that as two versions)
    fragments_removed: int
    fragments_added: int
    removed: list[int]  # versions removed
    bytes_removed: int
    kept: dict[int, str]  # old versions kept, and why (tags, stored predictions)
    tags_dropped: list[str]  # tags deleted with their versions (--force)
    unpinned: list[int]  # spots versions stored predictions searched that were removed (--force)


def _age(timestamp: datetime) -> timedelta:
    now = datetime.now(timestamp.tzinfo) if timestamp.tzinfo else datetime.now()  # Lance lists naive local times
    return now - timestamp


def _window(listed: dict[int, dict], grace: timedelta, keep_versions: int | None) -> set[int]:
    """The versions ``compact`` leaves whatever their tags: the current one, those that stopped being
    current within ``grace``, and the ``keep_versions`` newest."""
    numbers = sorted(listed)
    latest = numbers[-1]
    # when each version stopped being current: the next one's timestamp (where compact removed
    # the versions between, a later time: the grace period then lasts longer, never less)
    replaced = {n: listed[after]["timestamp"] for n, after in zip(numbers, numbers[1:])}
    window = {n for n in numbers if n not in replaced or _age(replaced[n]) < grace}
    if keep_versions is not None:
        window |= set(numbers[-keep_versions:])
    window.add(latest)
    return window


def _kept_or_removed(old: list[int], tags: dict[int, list[str]], pinned: list[int], force: bool) -> tuple[dict[int, str], list[int]]:
    """The ``old`` versions (outside the window) kept, with why (a tag, a stored prediction searched
    it), and those to remove: all of them with ``force``."""
    kept: dict[int, str] = {}
    remove: list[int] = []
    for n in old:
        reasons = []
        if n in tags:
            reasons.append("tag " + ", ".join(sorted(tags[n])))
        if n in pinned:
            reasons.append("searched by stored predictions")
        if reasons and not force:
            kept[n] = "; ".join(reasons)
        else:
            remove.append(n)
    return kept, remove


def _remove_versions(tbl, name: str, remove: list[int]) -> int:
    """Remove versions ``remove`` of table ``name`` (their tags already deleted); returns the bytes freed."""
    dataset = tbl.to_lance()
    if not remove:
        return 0
    try:
        stats = dataset.cleanup_old_versions(versions=remove, error_if_tagged_old_versions=True)
    except Exception as exc:
        raise StoreError(f"removing old versions of the {name} table failed: {exc}") from exc
    return int(stats.bytes_removed)


class _Upkeep(_Records):
    """Deleting a dataset's spots or a slide's tiles, and compacting the tables."""

    def delete_dataset(self, dataset: str, *, model_id: str | None = None) -> DeleteResult:
        """Delete one dataset's spots (every model's rows of it, or only ``model_id``'s) in one new
        spots version. The values are matched literally; nothing matching is an error naming the
        datasets the store holds."""
        if not dataset or not dataset.strip():
            raise StoreError("--dataset must not be empty")
        where = f"dataset = {sql_literal(dataset)}" + (f" AND model_id = {sql_literal(model_id)}" if model_id is not None else "")
        n = self.table("spots").count_rows(where) if self.has_table("spots") else 0
        if n == 0:
            held = [f"{d} ({m})" for m, datasets in self.spot_models().items() for d in datasets]
            under = f" under model {model_id}" if model_id is not None else ""
            raise UnknownValue(f"no spots of dataset {dataset!r}{under} in {self.uri}; datasets (model): {', '.join(held) or 'none'}")

        version, rows = self._delete_rows("spots", where, f"the delete of {dataset}", expected=n)
        return DeleteResult(dataset=dataset, model_id=model_id, rows=rows, version=version)

    def delete_slide(self, slide: str, *, model_id: str | None = None) -> SlideDeleteResult:
        """Delete one slide's tiles (every model's and embedding's rows of the slide name, or only
        ``model_id``'s), whatever file bytes they came from, in one new tiles version; its predictions
        stay (they are answers, with their own provenance; the next query of the slide embeds it
        again). The name is matched literally; nothing matching is an error naming the slides held."""
        if not slide or not slide.strip():
            raise StoreError("--slide must not be empty")
        where = f"slide = {sql_literal(slide)}" + (f" AND model_id = {sql_literal(model_id)}" if model_id is not None else "")
        n = self.table("tiles").count_rows(where) if self.has_table("tiles") else 0
        if n == 0:
            held = self.distinct("tiles", "slide") if self.has_table("tiles") else []
            shown = ", ".join(held[:_SLIDES_LISTED]) + (f" and {len(held) - _SLIDES_LISTED} more" if len(held) > _SLIDES_LISTED else "")
            under = f" under model {model_id}" if model_id is not None else ""
            raise UnknownValue(f"no tiles of slide {slide!r}{under} in {self.uri}; slides with tiles: {shown or 'none'}")

        version, rows = self._delete_rows("tiles", where, f"the delete of the tiles of {slide}", expected=n)
        return SlideDeleteResult(slide=slide, model_id=model_id, rows=rows, version=version)

    def _delete_rows(self, name: str, where: str, what: str, *, expected: int) -> tuple[int, int]:
        """Delete the rows of table ``name`` matching ``where`` in one commit: the new version and
        the rows deleted (Lance's count, else the ``expected`` count read before)."""

        def write(tbl):
            result = tbl.delete(where)
            tbl.checkout_latest()
            return tbl, result

        tbl, result = self._commit(name, what, write)
        deleted = getattr(result, "num_deleted_rows", None)
        return tbl.version, int(expected if deleted is None else deleted)

    def compact(self, *, keep_versions: int | None = None, older_than: timedelta | None = None, force: bool = False) -> list[Compaction]:
        """Compact every table's data files (Lance ``compact_files``: one new version where there is
        something to rewrite), then remove old versions: those that stopped being current more than
        ``older_than`` ago (default :data:`COMPACT_GRACE`: a command that opened a version while it
        was current may still be reading it) and, with ``keep_versions``, are not among the
        ``keep_versions`` newest; the current one always stays, and so do tagged versions and spots
        versions a stored prediction searched, which are tagged ``pinned-by-predictions-v<N>`` first.
        With ``force`` those go too (their tags deleted); the grace period still holds.

        Unlike LanceDB's ``optimize()``, nothing is pruned by a default age: only what is asked."""
        if keep_versions is not None and keep_versions < 1:
            raise StoreError(f"--keep-versions must be at least 1 (the current version), got {keep_versions}")
        if older_than is not None and older_than < timedelta(0):
            raise StoreError(f"--older-than must not be negative, got {older_than.days} days")
        grace = COMPACT_GRACE if older_than is None else older_than
        searched = set(self.distinct("predictions", "spots_version")) if self.has_table("predictions") else set()
        return [self._compact_table(name, grace=grace, keep_versions=keep_versions, force=force, searched=searched) for name in self.table_names()]

    def _compact_table(self, name: str, *, grace: timedelta, keep_versions: int | None, force: bool, searched: set[int]) -> Compaction:
        """``compact`` of one table: its data files rewritten, spots versions stored predictions
        searched pinned by a tag, then the old versions outside the window that nothing keeps removed."""
        tbl, before, metrics = self._compact_files(name)
        listed = {v["version"]: v for v in tbl.to_lance().versions()}
        window = _window(listed, grace, keep_versions)
        pinned = sorted(n for n in searched if n in listed) if name == "spots" else []
        if not force:
            for n in pinned:
                self._tag(tbl, PINNED_TAG.format(version=n), n, {OPERATION_KEY: "pin"}, unique=True)
        dataset = tbl.to_lance()
        tags: dict[int, list[str]] = {}
        for tag, info in dataset.tags.list().items():
            tags.setdefault(info["version"], []).append(tag)
        kept, remove = _kept_or_removed(sorted(set(listed) - window), tags, pinned, force)
        dropped = sorted(t for n in remove for t in tags.get(n, []))
        for tag in dropped:
            dataset.tags.delete(tag)
        removed_bytes = _remove_versions(tbl, name, remove)
        tbl.checkout_latest()
        compacted = tbl.version != before
        return Compaction(
            table=name,
            version=tbl.version,
            compacted=compacted,
            fragments_removed=int(metrics.fragments_removed) if compacted else 0,
            fragments_added=int(metrics.fragments_added) if compacted else 0,
            removed=remove,
            bytes_removed=removed_bytes,
            kept=kept,
            tags_dropped=dropped,
            unpinned=sorted(n for n in pinned if n in remove),
        )

    def _compact_files(self, name: str):
        """Lance ``compact_files`` on table ``name``, one commit (none when there is nothing to
        rewrite); returns the table at its latest version, the version the rewrite read, and Lance's
        compaction metrics."""
        before, metrics = None, None

        def rewrite(tbl):
            nonlocal before, metrics
            before = tbl.version
            metrics = tbl.to_lance().optimize.compact_files()
            return tbl

        try:
            tbl = self._commit(name, f"the compaction of the {name} table", rewrite)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"compacting the {name} table failed (nothing was removed): {one_line(exc)}") from exc
        tbl.checkout_latest()
        return tbl, before, metrics
