"""Store upkeep through the real CLI on a real store: restore, delete, compact, what each version
was, and refusing a store written by a newer release (on every open, reads included)."""

from __future__ import annotations

import lance
import polars as pl
import pytest

from histoindex.schemas import layout
from histoindex.store import Store

from .conftest import run

KEYS = [("model_id", "ascending"), ("dataset", "ascending"), ("spot_id", "ascending")]


def _content(db, version=None):
    return Store(db).table("spots", version=version).to_arrow().sort_by(KEYS)


def _versions(db, table="spots") -> list[int]:
    return [v["version"] for v in Store(db).versions()[table]]


def _what(db, table="spots") -> dict[int, str]:
    return {v["version"]: v["what"] for v in Store(db).versions()[table]}


def _query(db, sections, out, *extra):
    run("query", sections.heldout_tif, "--tissue", "breast", "--spots", sections.heldout_h5ad, "--k", "5", "--out", out, *extra, "--db", db)
    return pl.read_parquet(out)


def test_restore_makes_a_new_version_with_the_old_content_and_keeps_history(store, sections, tmp_path):
    run("ingest", sections.other_h5ad, "--tissue", "breast", "--dataset", "other", "--db", store)
    (first, second) = (2, 3)
    assert _versions(store) == [1, first, second]
    assert _content(store).num_rows > _content(store, first).num_rows

    result = run("restore", first, "--db", store)
    assert result.stdout.strip() == f"spots@4: the content of spots@{first} ({_content(store, first).num_rows} rows), tagged restore-of-{first}"
    assert _versions(store) == [1, first, second, 4], "a new version; nothing removed"
    assert _content(store).equals(_content(store, first))
    assert _content(store, second).num_rows > _content(store).num_rows, "the version restored over is still there"
    assert _what(store)[4] == f"restore of spots@{first}"
    assert "restore-of-2" in Store(store).versions()["spots"][-1]["tags"]

    # by tag, and queries see it
    run("restore", "ingest-other-v3", "--db", store)
    assert _content(store).equals(_content(store, second))
    assert _versions(store)[-1] == 5
    a = _query(store, sections, tmp_path / "a.parquet")
    b = _query(store, sections, tmp_path / "b.parquet", "--as-of", second)
    assert a.equals(b)

    # errors: the current version, an unknown one; nothing written
    before = Store(store).versions()
    result = run("restore", "5", "--db", store, ok=False)
    assert result.exit_code == 1 and "Error: spots@5 is already the current version; nothing to restore" in result.output
    result = run("restore", "999", "--db", store, ok=False)
    assert result.exit_code == 1 and "Error: table 'spots' has no version '999'; versions are 1..5, tags: " in result.output
    assert Store(store).versions() == before
    assert "Example:" in run("restore", "--help").output


def test_delete_one_dataset_in_one_version(store, sections):
    db = Store(store)
    model = db.model().model_id
    run("ingest", sections.other_h5ad, "--tissue", "breast", "--dataset", "other", "--db", store)
    n_train = _content(store, 2).num_rows
    assert _content(store).num_rows > n_train
    version = Store(store).table("spots").version

    result = run("delete", "--dataset", "other", "--db", store)
    n_other = _content(store, version).num_rows - n_train
    assert result.stdout.strip() == f"deleted {n_other} spots of other: spots@{version + 1}"
    assert _versions(store)[-1] == version + 1 and len(_versions(store)) == version + 1, "exactly one new version"
    assert _content(store).equals(_content(store, 2)), "only the dataset's rows went"
    assert _content(store, version).num_rows == n_train + n_other, "older versions keep them"
    assert _what(store)[version + 1] == "delete of other"

    before = Store(store).versions()
    result = run("delete", "--dataset", "other", "--db", store, ok=False)
    assert result.exit_code == 1
    assert f"Error: no spots of dataset 'other' in {store}; datasets (model): train ({model})" in result.output
    result = run("delete", "--dataset", "train", "--model", "bleep-nope", "--db", store, ok=False)
    assert result.exit_code == 1 and "no spots of dataset 'train' under model bleep-nope" in result.output
    assert Store(store).versions() == before

    result = run("delete", "--dataset", "train", "--model", model, "--db", store)
    assert f"(model {model})" in result.stdout and _content(store).num_rows == 0
    assert _what(store)[version + 2] == f"delete of train (model {model})"
    assert "Example:" in run("delete", "--help").output


def test_compact_keeps_tagged_and_predicted_versions_and_removes_the_rest(store, sections, tmp_path):
    run("ingest", sections.other_h5ad, "--tissue", "breast", "--dataset", "other", "--db", store)  # 3, tagged
    stored = _query(store, sections, tmp_path / "stored.parquet")  # predictions searched spots@3
    run("delete", "--dataset", "other", "--db", store)  # 4, untagged
    run("ingest", sections.other_h5ad, "--tissue", "breast", "--dataset", "other", "--db", store)  # 5, tagged
    run("delete", "--dataset", "other", "--db", store)  # 6, untagged
    run("ingest", sections.other_h5ad, "--tissue", "breast", "--dataset", "other", "--db", store)  # 7, tagged
    assert _versions(store) == [1, 2, 3, 4, 5, 6, 7]
    rows = {name: Store(store).table(name).count_rows() for name in ("spots", "predictions", "models")}
    current = _content(store)

    result = run("compact", "--keep-versions", "1", "--older-than", "0", "--db", store)  # 0: no grace period
    out = result.stdout
    # re-ingests and deletes left fragments and deletion files: Lance compacts in two commits (8:
    # reserving fragment ids, 9: the rewrite)
    assert "spots@9: compacted (2 → 1 fragments)" in out, out
    assert "removed 4 old version(s)" in out and "kept 2 (tag ingest-train-v2)" in out, out
    assert "3 (tag ingest-other-v3, pinned-by-predictions-v3; searched by stored predictions)" in out, out
    assert _versions(store) == [2, 3, 5, 7, 9], "1 (created), 4 and 6 (deletes), 8 gone; tagged and predicted ones kept"
    assert _what(store)[9] == "compaction"
    assert {name: Store(store).table(name).count_rows() for name in rows} == rows
    assert _content(store).equals(current)
    assert Store(store).table("predictions").version == max(_versions(store, "predictions")), "predictions: only the current version"

    # the prediction's version still answers exactly as it did; a removed one is a clear error
    again = _query(store, sections, tmp_path / "again.parquet", "--as-of", "3")
    assert again.equals(stored)
    result = run("query", sections.heldout_tif, "--tissue", "breast", "--as-of", "4", "--db", store, ok=False)
    assert result.exit_code == 1 and "Error: table 'spots' has no version 4; versions are 2..3, 5, 7, 9, tags:" in result.output

    # nothing old enough: --older-than removes nothing; both options is an error
    result = run("compact", "--older-than", "30", "--db", store)
    assert "spots@9: nothing to compact; removed no version" in result.stdout and _versions(store) == [2, 3, 5, 7, 9]
    result = run("compact", "--keep-versions", "1", "--older-than", "3", "--db", store)  # both: old enough and outside the newest
    assert "spots@9: nothing to compact; removed no version" in result.stdout and _versions(store) == [2, 3, 5, 7, 9]

    # --force: tagged and predicted versions go too, with their tags
    result = run("compact", "--keep-versions", "1", "--older-than", "0", "--force", "--db", store)
    assert "deleted tags" in result.stdout and "pinned-by-predictions-v3" in result.stdout
    assert "removed version(s) 3 that stored predictions searched (no longer reproducible with --as-of)" in result.stdout
    assert len(_versions(store)) == 1
    assert _content(store).equals(current)
    result = run("query", sections.heldout_tif, "--tissue", "breast", "--as-of", "3", "--db", store, ok=False)
    assert result.exit_code == 1 and "no version" in result.output
    assert "Example:" in run("compact", "--help").output


def test_versions_say_what_made_each_version(store, sections):
    run("ingest", sections.other_h5ad, "--tissue", "breast", "--dataset", "other", "--db", store)
    run("delete", "--dataset", "other", "--db", store)
    run("restore", "3", "--db", store)
    run("compact", "--keep-versions", "100", "--db", store)
    run("index", "--db", store)
    what = _what(store)
    assert what[1] == "created" and what[2] == "ingest of train" and what[3] == "ingest of other"
    assert what[4] == "delete of other" and what[5] == "restore of spots@3"
    # what neither histoindex nor Lance's record says is "unknown", not a guess: compaction's first
    # commit (reserving fragment ids) is an operation pylance does not describe
    assert what[6] == "unknown" and what[7] == "compaction"
    assert set(list(what.values())[7:]) == {"index build or refresh"}, what
    assert _what(store, "models") == {1: "created", 2: "model added or updated"}
    listed = Store(store).versions()["spots"]
    assert all(v["bytes"] is not None and v["bytes"] >= 0 for v in listed) and listed[1]["bytes"] > 0
    assert listed[2]["rows"] > listed[1]["rows"] == listed[3]["rows"]

    result = run("versions", "--db", store)
    for text in ("what", "created", "ingest of", "delete of", "restore of", "unknown"):
        assert text in result.stdout, text


def test_a_store_from_a_newer_release_is_refused_on_every_open(store, sections, tmp_path):
    newer = layout("spots").schema_version + 1
    path = str(store / "spots.lance")
    lance.dataset(path).update_schema_metadata({"histoindex.schema_version": str(newer)})
    files = sorted(p.relative_to(store) for p in store.rglob("*"))
    message = (
        f"Error: the spots table at {store} was written by a newer histoindex (table schema version {newer}; "
        f"this release, histoindex 0.1.0, knows schema version {newer - 1} and older): upgrade histoindex to open this store"
    )
    for args in (
        ["query", sections.heldout_tif, "--tissue", "breast"],
        ["sql", "SELECT count(*) FROM spots"],
        ["info"],
        ["versions"],
        ["ingest", sections.other_h5ad, "--tissue", "breast", "--dataset", "other"],
        ["delete", "--dataset", "train"],
        ["restore", "2"],
        ["compact", "--keep-versions", "1"],
    ):
        result = run(*args, "--db", store, ok=False)
        assert result.exit_code == 1, args
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == files, "nothing written"

    # the same table at this release's version opens again
    lance.dataset(path).update_schema_metadata({"histoindex.schema_version": str(newer - 1)})
    assert run("info", "--db", store).exit_code == 0


@pytest.mark.parametrize("name", ["predictions", "models"])
def test_every_table_is_checked(store, name):
    lance.dataset(str(store / f"{name}.lance")).update_schema_metadata({"histoindex.schema_version": "99"})
    result = run("versions", "--db", store, ok=False)
    assert result.exit_code == 1 and f"Error: the {name} table at {store} was written by a newer histoindex (table schema version 99;" in result.output
