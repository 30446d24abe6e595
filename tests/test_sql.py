"""`histoindex sql` is read-only: one read-only statement, DuckDB with external access off, and
no file inside the store reachable by path. Each attack runs through the real CLI on a real store
and must leave every file of the store byte-identical and the store readable."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import duckdb
import polars as pl
import pytest

from histoindex import api
from histoindex.errors import HistoindexError
from histoindex.sql import SqlError, connect, run_sql
from histoindex.store import Store

from .conftest import run

REFUSED = "histoindex sql runs one read-only statement (SELECT, WITH, EXPLAIN, DESCRIBE, SUMMARIZE); got "
SEVERAL = "histoindex sql runs one read-only statement at a time; got 2 statements"
IN_STORE = "histoindex sql does not read files inside the store"
NOT_NAMED = "histoindex sql reads only the store's tables and the Parquet, CSV or JSON files the statement names"
WHOLE_FILES = "histoindex sql reads data files (Parquet, CSV, JSON), not whole files"


# ---- helpers --------------------------------------------------------------------------------
def snapshot(db: Path) -> dict[str, str]:
    """Every file of the store, by relative path, with its SHA-256."""
    return {str(p.relative_to(db)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(db.rglob("*")) if p.is_file()}


def latest_manifest(db: Path) -> Path:
    manifests = sorted((db / "spots.lance" / "_versions").glob("*.manifest"), key=lambda p: p.stat().st_mtime_ns)
    assert manifests, "the store has no spots manifests"
    return manifests[-1]


def count_spots(db: Path) -> int:
    result = run("sql", "SELECT count(*) AS n FROM spots", "--db", db, "--format", "csv")
    return int(result.stdout.splitlines()[1])


def refused(db: Path, statement: str, *extra: str):
    """Run ``statement``; it must fail (exit code 1) with `Error: ...`; returns the result."""
    result = run("sql", statement, "--db", db, *extra, ok=False)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result


def error_text(result) -> str:
    text = result.stderr if result.stderr else result.output
    assert text.startswith("Error: "), text
    return text[len("Error: ") :]


@pytest.fixture
def guarded(store):
    """A private store copy; after the test, every file must be byte-identical and the store
    still readable (the same spot count through `histoindex sql`)."""
    before = snapshot(store)
    manifest = latest_manifest(store)
    manifest_bytes = manifest.read_bytes()
    n = Store(store).table("spots").count_rows()
    yield store
    assert manifest.read_bytes() == manifest_bytes
    assert snapshot(store) == before
    assert count_spots(store) == n
    assert Store(store).table("spots").to_arrow().num_rows == n


@pytest.fixture(scope="module")
def queried(trained_store, sections, tmp_path_factory) -> tuple[Path, Path]:
    """A store copy holding predictions (a grid query of the held-out slide), and the Parquet
    file that query wrote."""
    directory = tmp_path_factory.mktemp("queried")
    db = directory / "db"
    shutil.copytree(trained_store, db)
    out = directory / "grid.parquet"
    run("query", sections.heldout_tif, "--tissue", "breast", "--out", out, "--k", "10", "--db", db)
    return db, out


# ---- attacks --------------------------------------------------------------------------------
def test_copy_over_the_latest_manifest_is_refused(guarded):
    manifest = latest_manifest(guarded)
    result = refused(guarded, f"COPY (SELECT 1) TO '{manifest}'")
    assert error_text(result).startswith(REFUSED + "COPY")


def test_copy_a_table_to_a_file_is_refused(guarded, tmp_path):
    target = tmp_path / "x.parquet"
    result = refused(guarded, f"COPY spots TO '{target}'")
    assert error_text(result).startswith(REFUSED + "COPY")
    assert not target.exists()


def test_explain_analyze_of_a_copy_is_refused(guarded, tmp_path):
    target = tmp_path / "x.parquet"
    result = refused(guarded, f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{target}'")
    assert error_text(result).startswith(REFUSED + "EXPLAIN COPY")
    assert not target.exists()


def test_attach_then_create_is_refused(guarded, tmp_path):
    target = tmp_path / "x.db"
    result = refused(guarded, f"ATTACH '{target}' AS x; CREATE TABLE x.t AS SELECT 1")
    assert error_text(result).startswith(SEVERAL + " (ATTACH, CREATE)")
    result = refused(guarded, f"ATTACH '{target}' AS x")
    assert error_text(result).startswith(REFUSED + "ATTACH")
    assert not target.exists()


def test_two_statements_are_refused(guarded):
    result = refused(guarded, "SELECT 1; SELECT 2")
    assert error_text(result).startswith(SEVERAL + " (SELECT, SELECT)")


@pytest.mark.parametrize(
    ("statement", "got"),
    [
        ("SET enable_external_access = true", "SET"),
        ("RESET lock_configuration", "RESET"),
        ("INSTALL httpfs", "INSTALL"),
        ("LOAD httpfs", "LOAD"),
        ("CREATE TABLE t AS SELECT 1", "CREATE"),
        ("CREATE VIEW v AS SELECT 1", "CREATE"),
        ("INSERT INTO spots SELECT * FROM spots", "INSERT"),
        ("DELETE FROM spots", "DELETE"),
        ("DROP VIEW spots", "DROP"),
        ("PRAGMA version", "PRAGMA"),
        ("CALL pragma_version()", "CALL"),
        ("EXPORT DATABASE 'dump'", "EXPORT"),
    ],
)
def test_statements_that_are_not_reads_are_refused(guarded, statement, got):
    result = refused(guarded, statement)
    assert error_text(result).strip() == REFUSED + got


def test_read_text_and_read_blob_are_refused(guarded):
    for function in ("read_text", "read_blob", '"READ_TEXT"'):
        result = refused(guarded, f"SELECT * FROM {function}('/etc/passwd')")
        assert error_text(result).startswith(WHOLE_FILES)


def test_a_named_file_that_is_not_a_data_file_is_refused(guarded):
    result = refused(guarded, "SELECT * FROM read_csv('/etc/passwd')")
    assert error_text(result).startswith(NOT_NAMED)
    assert "/etc/passwd" in result.output


def test_lance_files_inside_the_store_are_refused(guarded):
    for statement in (
        f"SELECT * FROM '{guarded}/spots.lance/data/*.lance'",
        f"SELECT * FROM read_parquet('{guarded}/spots.lance/data/*.parquet')",
        f"SELECT * FROM read_json('{latest_manifest(guarded)}.json')",
        f"SELECT * FROM glob('{guarded}/*')",
    ):
        result = refused(guarded, statement)
        assert error_text(result).startswith(IN_STORE), statement


def test_a_link_into_the_store_is_refused(guarded, tmp_path):
    link = tmp_path / "innocent.parquet"
    os.symlink(latest_manifest(guarded), link)
    result = refused(guarded, f"SELECT * FROM '{link}'")
    assert error_text(result).startswith(IN_STORE)


def test_a_path_built_at_run_time_is_refused(guarded, tmp_path):
    pl.DataFrame({"a": [1]}).write_parquet(tmp_path / "a.parquet")
    result = refused(guarded, f"SELECT * FROM read_parquet('{tmp_path}/' || 'a' || '.parquet')")
    assert error_text(result).startswith(NOT_NAMED)


def test_allow_files_cannot_open_the_store(guarded):
    for path in (guarded, guarded / "spots.lance", guarded.parent):
        result = refused(guarded, "SELECT 1", "--allow-files", str(path))
        assert error_text(result).startswith(f"--allow-files {path}: the store")


def test_the_connection_itself_is_locked(guarded):
    """Below the statement check: DuckDB itself refuses writes, settings, extensions, attaching."""
    con = connect(Store(guarded))
    try:
        attacks = {
            f"COPY (SELECT 1) TO '{latest_manifest(guarded)}'": duckdb.PermissionException,
            "SET enable_external_access = true": duckdb.InvalidInputException,
            "SET allowed_directories = ['/']": duckdb.InvalidInputException,
            "SET lock_configuration = false": duckdb.InvalidInputException,
            "INSTALL httpfs": duckdb.PermissionException,
            "LOAD httpfs": duckdb.PermissionException,
            f"ATTACH '{guarded}/x.db' AS x": duckdb.PermissionException,
            "SELECT * FROM read_text('/etc/passwd')": duckdb.PermissionException,
        }
        for statement, error in attacks.items():
            with pytest.raises(error):
                con.execute(statement)
        assert con.execute("SELECT count(*) FROM spots").fetchone()[0] > 0  # the tables still read
    finally:
        con.close()
    assert not (guarded / "x.db").exists()


# ---- what it does -------------------------------------------------------------------------
def test_select_over_spots(guarded):
    result = run("sql", "SELECT dataset, count(*) AS n FROM spots GROUP BY dataset", "--db", guarded, "--format", "json")
    assert json.loads(result.stdout) == [{"dataset": "train", "n": Store(guarded).table("spots").count_rows()}]


def test_select_over_predictions_long_and_the_query_parquet(queried):
    db, out = queried
    frame = pl.read_parquet(out)
    (model,) = Store(db).models()
    result = run("sql", "SELECT count(*) AS n, count(DISTINCT gene) AS genes FROM predictions_long", "--db", db, "--format", "json")
    assert json.loads(result.stdout) == [{"n": frame.height * len(model.cfg.genes), "genes": len(model.cfg.genes)}]
    result = run("sql", f"SELECT avg(FASN) AS fasn FROM '{out}'", "--db", db, "--format", "json")
    assert abs(json.loads(result.stdout)[0]["fasn"] - frame["FASN"].mean()) < 1e-6


def test_parquet_and_csv_files_written_here(guarded, tmp_path):
    pl.DataFrame({"dataset": ["train", "other"], "w": [2, 3]}).write_parquet(tmp_path / "weights.parquet")
    pl.DataFrame({"a": [1, 2, 3]}).write_csv(tmp_path / "a.csv")
    result = run(
        "sql",
        f"SELECT sum(w) AS n FROM spots JOIN '{tmp_path / 'weights.parquet'}' USING (dataset)",
        "--db",
        guarded,
        "--format",
        "csv",
    )
    assert result.stdout.splitlines() == ["n", str(2 * Store(guarded).table("spots").count_rows())]
    result = run("sql", f"SELECT sum(a) AS s FROM read_csv('{tmp_path / 'a.csv'}')", "--db", guarded, "--format", "csv")
    assert result.stdout.splitlines() == ["s", "6"]


def test_relative_paths_are_read_from_the_working_directory(guarded, tmp_path, monkeypatch):
    pl.DataFrame({"a": [5]}).write_parquet(tmp_path / "rel.parquet")
    monkeypatch.chdir(tmp_path)
    result = run("sql", "SELECT a FROM 'rel.parquet'", "--db", guarded, "--format", "csv")
    assert result.stdout.splitlines() == ["a", "5"]


def test_a_glob_opens_the_data_files_it_matches_and_nothing_else(guarded, tmp_path):
    preds = tmp_path / "preds"
    preds.mkdir()
    for i in range(3):
        pl.DataFrame({"i": [i]}).write_parquet(preds / f"slide{i}.parquet")
    (preds / "notes.csv.txt").write_text("a\n1\n")
    result = run("sql", f"SELECT sum(i) AS s FROM read_parquet('{preds}/*.parquet')", "--db", guarded, "--format", "csv")
    assert result.stdout.splitlines() == ["s", "3"]
    # the glob opened its matches, not their folder
    result = refused(guarded, f"SELECT count(*) FROM '{preds}/*.parquet' p, read_csv('{preds}/' || 'notes.csv.txt') n")
    assert error_text(result).startswith(NOT_NAMED)


def test_allow_files_opens_a_file_or_a_folder(guarded, tmp_path):
    data = tmp_path / "export"
    data.mkdir()
    (data / "table.dat").write_text("a\n4\n5\n")
    statement = f"SELECT sum(a) AS s FROM read_csv('{data / 'table.dat'}')"
    result = refused(guarded, statement)
    assert error_text(result).startswith(NOT_NAMED)
    for allowed in (data / "table.dat", data):
        result = run("sql", statement, "--db", guarded, "--format", "csv", "--allow-files", allowed)
        assert result.stdout.splitlines() == ["s", "9"]
    result = run("sql", "SELECT 1 AS one", "--db", guarded, "--allow-files", tmp_path / "missing", ok=False)
    assert result.exit_code == 2 and "does not exist" in result.output


def test_describe_summarize_and_explain(guarded):
    result = run("sql", "DESCRIBE spots", "--db", guarded, "--format", "json")
    columns = {row["column_name"] for row in json.loads(result.stdout)}
    assert {"dataset", "spot_id", "tissue", "expression"} <= columns
    result = run("sql", "SUMMARIZE SELECT x, y FROM spots", "--db", guarded, "--format", "json")
    assert [row["column_name"] for row in json.loads(result.stdout)] == ["x", "y"]
    for statement in ("EXPLAIN SELECT count(*) FROM spots", "EXPLAIN ANALYZE SELECT count(*) FROM spots_long"):
        result = run("sql", statement, "--db", guarded, "--format", "json")
        assert json.loads(result.stdout)
    result = run("sql", "WITH t AS (SELECT tissue FROM spots) SELECT DISTINCT tissue FROM t", "--db", guarded, "--format", "csv")
    assert result.stdout.splitlines() == ["tissue", "breast"]


def test_api_sql_refuses_and_runs_the_same_way(guarded, tmp_path):
    with pytest.raises(SqlError, match="got COPY"):
        api.sql(f"COPY spots TO '{tmp_path / 'x.csv'}'", db=guarded)
    assert issubclass(SqlError, HistoindexError)
    assert api.sql("SELECT count(*) AS n FROM models", db=guarded).column("n").to_pylist() == [1]
    pl.DataFrame({"a": [1]}).write_parquet(tmp_path / "a.bin")
    table = api.sql(f"SELECT a FROM read_parquet('{tmp_path / 'a.bin'}')", db=guarded, allow_files=[tmp_path / "a.bin"])
    assert table.column("a").to_pylist() == [1]
    assert run_sql(None, "SELECT 42 AS x").column("x").to_pylist() == [42]  # no store: plain DuckDB, still locked
    with pytest.raises(SqlError, match="got ATTACH"):
        run_sql(None, "ATTACH ':memory:' AS m")


def test_out_is_refused_inside_the_store(guarded, tmp_path):
    manifests = sorted((guarded / "spots.lance" / "_versions").glob("*.manifest"))
    targets = [guarded / "result.csv", manifests[-1], guarded / "spots.lance" / "x.parquet"]
    link = tmp_path / "into-store"
    link.symlink_to(guarded)
    targets.append(link / "result.json")
    for target in targets:
        result = run("sql", "SELECT count(*) AS n FROM spots", "--db", guarded, "--out", target, ok=False)
        assert result.exit_code == 1 and "inside the store" in result.output, (target, result.output)
    result = run("sql", "SELECT count(*) AS n FROM spots", "--db", guarded, "--out", tmp_path / "n.csv")
    assert (tmp_path / "n.csv").read_text().splitlines()[0] == "n"


# ---- sealed: links, raw datasets, SQL text, hidden files --------------------------------------
def test_a_named_link_to_a_file_that_is_not_a_data_file_is_refused(guarded, tmp_path):
    """The allow-list and the store check both take the named path resolved (links, ``..``): a
    ``*.csv`` link to another file is refused, not read; --allow-files opens it."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    link = tmp_path / "innocent.csv"
    link.symlink_to(secret / "passwd")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "up").symlink_to(secret)
    for named in (link, f"{tmp_path}/sub/../innocent.csv", f"{tmp_path}/sub/up/../innocent.csv"):
        result = refused(guarded, f"SELECT * FROM read_csv('{named}')")
        assert error_text(result).startswith(f"histoindex sql reads Parquet, CSV or JSON files: {named!s} leads to {secret / 'passwd'}, which is not one"), (
            named
        )
        assert "root:x" not in result.output
    result = run("sql", f"SELECT count(*) AS n FROM read_csv('{link}', header=false)", "--db", guarded, "--format", "csv", "--allow-files", secret / "passwd")
    assert result.stdout.splitlines() == ["n", "1"]
    # a link to a data file outside the store reads as the file itself
    pl.DataFrame({"a": [3]}).write_parquet(secret / "real.parquet")
    (tmp_path / "alias.parquet").symlink_to(secret / "real.parquet")
    result = run("sql", f"SELECT a FROM '{tmp_path / 'alias.parquet'}'", "--db", guarded, "--format", "csv")
    assert result.stdout.splitlines() == ["a", "3"]


def test_the_raw_lance_datasets_are_not_part_of_the_sql_surface(guarded):
    """Only the documented tables and views are reachable; the model weights nowhere."""
    result = refused(guarded, "SELECT weights FROM _lance_models")
    assert "_lance_models" in result.output and "does not exist" in result.output
    result = run("sql", "DESCRIBE models", "--db", guarded, "--format", "json")
    columns = [row["column_name"] for row in json.loads(result.stdout)]
    assert "model_id" in columns and "config_json" in columns and "weights" not in columns
    result = run("sql", "SELECT model_id FROM models", "--db", guarded, "--format", "csv")
    assert result.stdout.splitlines() == ["model_id", Store(guarded).model().model_id]


RUNS_SQL = "runs SQL given as text"


@pytest.mark.parametrize(
    "call",
    [
        "query('SELECT content FROM read_text(''{csv}'')')",
        "main.query('SELECT content FROM read_text(' || '''{csv}''' || ')')",
        "\"QUERY\" /* x */ ('SELECT content FROM read_text(''{csv}'')')",
        "json_execute_serialized_sql(json_serialize_sql('SELECT content FROM read_text(''{csv}'')'))",
        "query_table('spots')",
    ],
)
def test_functions_that_run_sql_text_are_refused(guarded, tmp_path, call):
    csv = tmp_path / "a.csv"
    csv.write_text("a\n1\n")
    result = refused(guarded, f"SELECT * FROM '{csv}', {call.format(csv=csv)}")
    assert RUNS_SQL in error_text(result), result.output
    assert "a\\n1" not in result.output


def test_table_functions_outside_the_reads_are_refused(guarded):
    for call in ("enable_profiling()", "force_checkpoint()", "duckdb_secrets()", "arrow_scan(0, 0, 0)"):
        result = refused(guarded, f"SELECT * FROM {call}")
        assert "is not one of the table functions histoindex sql runs" in error_text(result), call
    result = run("sql", "SELECT count(*) AS n FROM range(3), generate_series(1, 2), duckdb_tables()", "--db", guarded, "--format", "csv")
    assert result.stdout.splitlines()[0] == "n"
    result = run("sql", "SELECT y FROM (SELECT 1 AS x) AS query(y)", "--db", guarded, "--format", "csv")  # an alias, not a call
    assert result.stdout.splitlines() == ["y", "1"]


def test_a_glob_over_a_folder_with_hidden_files_reads_what_duckdb_matches(guarded, tmp_path):
    """DuckDB's glob matches dotfiles (``._x.parquet`` from macOS shares): they are opened to it
    like the others, so the statement reads them or fails on their content, naming them."""
    preds = tmp_path / "preds"
    preds.mkdir()
    for i in range(3):
        pl.DataFrame({"i": [i]}).write_parquet(preds / f"slide{i}.parquet")
    pl.DataFrame({"i": [10]}).write_parquet(preds / ".hidden.parquet")
    result = run("sql", f"SELECT sum(i) AS s FROM read_parquet('{preds}/*.parquet')", "--db", guarded, "--format", "csv")
    assert result.stdout.splitlines() == ["s", "13"]
    (preds / "._slide0.parquet").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    result = refused(guarded, f"SELECT sum(i) AS s FROM read_parquet('{preds}/*.parquet')")
    text = error_text(result)
    assert "Permission Error" not in text and str(preds / "._slide0.parquet") in text
    assert "the glob matched hidden files" in text
    result = run("sql", f"SELECT sum(i) AS s FROM read_parquet('{preds}/[!.]*.parquet')", "--db", guarded, "--format", "csv")
    assert result.stdout.splitlines() == ["s", "3"]
