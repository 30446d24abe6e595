"""Several `histoindex` processes on one local store at once, through the real CLI: two ingests of
different datasets, then two first ingests of the same dataset, land with the right rows (or one is
told to retry), never with a row repeated; and a query running while an ingest commits answers from
the one spots version it read, and records it.

The processes are lined up with signals: each is paused (SIGSTOP) when it says it is embedding, and
all are let go together (SIGCONT), so their writes meet; a query is paused once it has read its
references while an ingest commits underneath it. (test_store_integrity.py races two writers inside
one store; test_s3_store.py makes two commits collide on S3's conditional PUT.)"""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from histoindex import api
from histoindex.store import Store

from .conftest import run
from .test_crash_safety import (
    Cli,
    Data,
    _stop_leftovers,  # noqa: F401  (autouse: no histoindex process outlives its test)
    assert_dataset_rows,
    copy_store,
    ingest_args,
    make_data,
    tiny,
)


@pytest.fixture(scope="module")
def data(sections) -> Data:
    return make_data(sections)


@pytest.fixture(scope="module")
def base(data, tmp_path_factory):
    """A store with a model and the dataset "train" (spots@2). Tests write to copies."""
    db = tmp_path_factory.mktemp("concurrency") / "db"
    run(*ingest_args(data, db, "train"), *tiny())
    return db


def pause_at(cli: Cli, pattern: str) -> None:
    """Stop ``cli`` (SIGSTOP) as soon as it prints a line matching ``pattern``."""
    cli.wait_for_line(pattern)
    os.kill(cli.proc.pid, signal.SIGSTOP)


def resume(*clis: Cli) -> None:
    for cli in clis:
        os.kill(cli.proc.pid, signal.SIGCONT)


def failed_commits(db) -> int:
    """Commit attempts that lost a race and were made again: each attempt writes a transaction
    file, each version keeps one."""
    folder = db / "spots.lance"
    return len(os.listdir(folder / "_transactions")) - len(Store(db).versions()["spots"])


def race(db, data, datasets: list[str]) -> list[tuple[int, str]]:
    """Run one `histoindex ingest` per dataset name at once, lined up at their embedding; returns
    each one's (exit code, output)."""
    clis = [Cli(*ingest_args(data, db, name)) for name in datasets]
    for cli in clis:
        pause_at(cli, r"^embedding \d+ spots")
    resume(*clis)
    return [(cli.finish(), cli.stdout + cli.stderr) for cli in clis]


def check_outcomes(outcomes, dataset_of: list[str]) -> list[str]:
    """Each ingest succeeded, or failed with the clear "retry" message; returns the datasets that landed."""
    landed = []
    for (rc, output), dataset in zip(outcomes, dataset_of):
        if rc == 0:
            landed.append(dataset)
        else:
            assert rc == 1 and f"the store changed while writing {dataset}" in output and "retry" in output, output
            assert "Traceback" not in output, output
    return landed


def test_two_ingests_at_once_land_whole_and_never_repeat_a_row(base, data, tmp_path):
    db = copy_store(base, tmp_path)
    n = Store(db).table("spots").count_rows()

    # two datasets at once
    outcomes = race(db, data, ["a", "b"])
    landed = check_outcomes(outcomes, ["a", "b"])
    for dataset in landed:
        assert_dataset_rows(db, dataset, n)
    assert_dataset_rows(db, "train", n)
    versions = Store(db).versions()["spots"]
    assert [v["version"] for v in versions] == list(range(1, 3 + len(landed)))
    tags = {tag for v in versions for tag in v["tags"]}
    assert all(any(tag.startswith(f"ingest-{d}-v") for tag in tags) for d in landed), tags
    retried = failed_commits(db)
    print(f"different datasets: {len(landed)} of 2 landed, {retried} commit attempt(s) lost a race and were made again")

    # the same new dataset twice at once: the one case where a plain insert would repeat every row
    outcomes = race(db, data, ["c", "c"])
    landed_c = check_outcomes(outcomes, ["c", "c"])
    assert landed_c, "at least one of two writers of the same dataset lands"
    assert_dataset_rows(db, "c", n)
    for dataset in [*landed, "train"]:
        assert_dataset_rows(db, dataset, n)
    rows = Store(db).table("spots").to_arrow().select(["model_id", "dataset", "spot_id"]).to_pylist()
    assert len({tuple(r.values()) for r in rows}) == len(rows) == n * (2 + len(landed))
    print(f"same dataset: {len(landed_c)} of 2 landed, {failed_commits(db) - retried} commit attempt(s) lost a race and were made again")


def test_a_query_during_an_ingest_answers_from_the_version_it_read(base, data, sections, tmp_path):
    db = copy_store(base, tmp_path)
    out = tmp_path / "during.parquet"
    ingest = Cli("ingest", sections.other_h5ad, "--tissue", "breast", "--dataset", "other", "--db", db)
    pause_at(ingest, r"^embedding \d+ spots")  # the ingest has its rows nearly ready: it commits when let go
    query = Cli("query", data.slide, "--tissue", "breast", "--spots", data.h5ad, "--k", "5", "--precision", "fp32", "--out", out, "--db", db)
    pause_at(query, r"exact search over \d+ references")  # it has read its references (spots@2)
    resume(ingest)
    assert "other:" in ingest.succeed() and Store(db).table("spots").version == 3  # committed under the query
    started = time.monotonic()
    resume(query)
    query.succeed()

    stored = Store(db).table("predictions").to_arrow()
    assert set(stored.column("spots_version").to_pylist()) == {2}
    assert stored.num_rows == pq.read_table(out).num_rows
    provenance = json.loads(pq.read_schema(out).metadata[b"histoindex"])
    assert provenance["spots_version"] == 2
    assert Store(db).versions()["predictions"][-1]["timestamp"] > Store(db).versions()["spots"][-1]["timestamp"], "it committed after spots@3"

    # its neighbours all came from spots@2: the same answer as --as-of 2, not as the store now
    genes = [g for g in pq.read_schema(out).names if g not in ("slide", "spot", "x", "y", "x_um", "y_um")]
    during = pq.read_table(out).select(genes).to_pandas().to_numpy()

    def as_of(version):
        copy = copy_store(db, tmp_path)
        return api.query(data.slide, db=copy, tissue="breast", spots=data.h5ad, k=5, precision="fp32", as_of=version).predictions

    np.testing.assert_allclose(during, as_of(2), rtol=1e-5, atol=1e-6)
    assert not np.allclose(during, as_of(3), rtol=1e-3, atol=1e-4), "the ingest changed the answer, so the version mattered"
    print(f"query resumed after spots@3 landed; finished {time.monotonic() - started:.1f} s later from spots@2")


def test_compact_beside_a_running_query_keeps_the_version_it_searched(base, data, sections, tmp_path):
    """A query opens the current spots version (an untagged one: a delete made it) and is paused once
    it has read its references; an ingest replaces that version and `compact --keep-versions 1` runs.
    The version was replaced seconds ago, inside the grace period, so compact keeps it: the query
    finishes, and `--as-of` that version gives the same answer later, after more compacts (its
    stored predictions pin it from then on)."""
    db = copy_store(base, tmp_path)
    run("ingest", sections.other_h5ad, "--tissue", "breast", "--dataset", "other", "--db", db)  # spots@3
    run("delete", "--dataset", "other", "--db", db)  # spots@4: untagged, current
    searched = Store(db).table("spots").version
    assert Store(db).versions()["spots"][-1]["tags"] == []
    out = tmp_path / "during.parquet"
    query = Cli("query", data.slide, "--tissue", "breast", "--spots", data.h5ad, "--k", "5", "--precision", "fp32", "--out", out, "--db", db)
    pause_at(query, r"exact search over \d+ references")  # it searches spots@4
    run("ingest", sections.other_h5ad, "--tissue", "breast", "--dataset", "other", "--db", db)  # spots@5 replaces it
    compacted = run("compact", "--keep-versions", "1", "--db", db).stdout
    assert searched in [v["version"] for v in Store(db).versions()["spots"]], f"compact removed spots@{searched} under a running query:\n{compacted}"
    resume(query)
    query.succeed()
    assert set(Store(db).table("predictions").to_arrow().column("spots_version").to_pylist()) == {searched}

    # committed, the predictions pin it: even with no grace period it stays, and reproduces the answer
    run("compact", "--keep-versions", "1", "--older-than", "0", "--db", db)
    again = tmp_path / "again.parquet"
    run("query", data.slide, "--tissue", "breast", "--spots", data.h5ad, "--k", "5", "--precision", "fp32", "--as-of", searched, "--out", again, "--db", db)
    genes = [g for g in pq.read_schema(out).names if g not in ("slide", "spot", "x", "y", "x_um", "y_um")]
    np.testing.assert_array_equal(pq.read_table(again).select(genes).to_pandas().to_numpy(), pq.read_table(out).select(genes).to_pandas().to_numpy())
