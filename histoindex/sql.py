"""SQL over the store with DuckDB: the tables are exposed as views over their Lance datasets
(``spots`` and ``predictions`` scanned in place, never copied; ``models`` read without its
``weights`` column, which is never in DuckDB; ``tiles`` without its ``embedding`` column, which
``tiles_embeddings`` has), plus long-format views with one row per gene. Those
are the whole SQL surface: no raw dataset is registered beside them.

``histoindex sql`` is read-only. It runs exactly one statement, and only one that reads: SELECT
(also WITH …, VALUES, FROM-first, SHOW), DESCRIBE, SUMMARIZE, or EXPLAIN of one of those. DuckDB
runs with external access off and its configuration locked, so the statement reaches no file,
extension or database except:

* the store's tables, registered as Arrow/Lance datasets (read through the views, never by path);
* the data files the statement names as string literals (or quoted names): a path or glob ending
  in ``.parquet``, ``.csv``, ``.tsv``, ``.json``, ``.jsonl`` or ``.ndjson`` (optionally ``.gz`` or
  ``.zst``), outside the store. Each named path is resolved (links, ``..``) first: a link to a file
  that is not itself such a data file is refused. A glob is expanded here by DuckDB's own glob (so
  it matches what the read will: dotfiles too) and only the files it matches are opened to DuckDB,
  never their whole directory;
* the files and directories given with ``allow_files`` (``--allow-files``), outside the store.

Only the table functions that read data files, DuckDB's catalog and generators
(:data:`TABLE_FUNCTIONS`) may be called: ``read_text`` and ``read_blob`` (whole arbitrary files),
the functions that run SQL given as text (``query``, ``query_table``,
``json_execute_serialized_sql``), which the checks here could not see into, and DuckDB's internal
or stateful ones are refused. So is any literal path that leads into the store: Lance internals are
reached only through the tables.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable
from pathlib import Path

import duckdb
import pyarrow as pa

from .errors import HistoindexError, StoreError
from .schemas import layout
from .store import WEIGHTS, Store, _local_path

LONG_VIEWS = {
    # one row per (tile, gene): per-gene analytics as a single GROUP BY; a run's genes are its own
    # (query --genes) or, where it recorded none, the model's
    "predictions_long": """
        SELECT p.run_id, p.slide, p.tile_id, p.x, p.y, p.x_um, p.y_um, p.model_id, p.spots_version,
               UNNEST(COALESCE(p.genes, m.genes)) AS gene, UNNEST(p.expression) AS value
        FROM predictions p JOIN models m USING (model_id)""",
    "spots_long": """
        SELECT s.dataset, s.spot_id, s.tissue, s.platform, s.species, s.x, s.y, s.model_id,
               UNNEST(m.genes) AS gene, UNNEST(s.expression) AS value
        FROM spots s JOIN models m USING (model_id)""",
}

#: the tiles table's views: ``tiles`` without the embeddings (what most statements want), and
#: ``tiles_embeddings`` with them (the table as it is)
TILES, TILES_EMBEDDINGS = "tiles", "tiles_embeddings"
#: what ``histoindex sql`` runs, as named in its refusals
READ_ONLY_KINDS = "SELECT, WITH, EXPLAIN, DESCRIBE, SUMMARIZE"
#: the files a statement may name and read without --allow-files (case-insensitive)
DATA_FILE = re.compile(r"\.(parquet|csv|tsv|json|jsonl|ndjson)(\.(gz|gzip|zst|zstd))?$", re.IGNORECASE)
#: table functions that read any file whole: refused whatever the path
REFUSED_FUNCTIONS = ("read_text", "read_blob")
#: table functions that run SQL given as a string: the checks here cannot see into it
SQL_RUNNERS = ("query", "query_table", "json_execute_serialized_sql")
#: the table functions a statement may call (any other table function DuckDB has is refused):
#: data-file readers, DuckDB's catalog, generators
TABLE_FUNCTIONS = frozenset(
    "read_parquet parquet_scan parquet_metadata parquet_schema parquet_file_metadata parquet_kv_metadata "
    "read_csv read_csv_auto sniff_csv read_json read_json_auto read_ndjson read_ndjson_auto read_json_objects "
    "read_json_objects_auto read_ndjson_objects glob range generate_series unnest repeat repeat_row json_each "
    "json_tree summary duckdb_columns duckdb_tables duckdb_views duckdb_functions duckdb_types duckdb_keywords "
    "duckdb_schemas duckdb_databases duckdb_settings duckdb_constraints duckdb_dependencies duckdb_indexes "
    "duckdb_sequences pragma_table_info pragma_show pragma_version pragma_platform pg_timezone_names "
    "icu_calendar_names".split()
)
_GLOB_CHARS = re.compile(r"[*?\[]")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class SqlError(HistoindexError, ValueError):
    """DuckDB rejected the statement, or histoindex refused it (not one read-only statement, or a
    file it may not read)."""


# ---- what the statement is ------------------------------------------------------------------
def _spans(text: str) -> list[tuple[int, str, duckdb.token_type]]:
    """DuckDB's tokens of ``text`` as (UTF-8 byte offset, text, type); DuckDB reports byte offsets."""
    raw = text.encode()
    try:
        starts = duckdb.tokenize(text)
    except duckdb.Error as exc:
        raise SqlError(str(exc)) from exc
    ends = [s for s, _ in starts[1:]] + [len(raw)]
    return [(s, raw[s:e].decode(errors="replace").strip(), kind) for (s, kind), e in zip(starts, ends)]


def _tokens(text: str) -> list[tuple[str, duckdb.token_type]]:
    return [(token, kind) for _, token, kind in _spans(text)]


def _first_keyword(text: str) -> str:
    for token, kind in _tokens(text):
        if kind != duckdb.token_type.comment:
            return token.upper()
    return ""


def _parse(text: str) -> list:
    try:
        return duckdb.extract_statements(text)
    except duckdb.Error as exc:
        raise SqlError(str(exc)) from exc


def _explained(text: str) -> str | None:
    """For ``EXPLAIN [ANALYZE] stmt``: stmt's text (None when it is not that shape)."""
    words = [(start, token) for start, token, kind in _spans(text) if kind != duckdb.token_type.comment]
    if not words or words[0][1].upper() != "EXPLAIN":
        return None
    rest = words[1:]
    if rest and rest[0][1].upper() in ("ANALYZE", "ANALYSE"):
        rest = rest[1:]
    return text.encode()[rest[0][0] :].decode() if rest else None


def check_statement(text: str) -> None:
    """Refuse (SqlError) anything but exactly one read-only statement."""
    statements = _parse(text)
    if not statements:
        raise SqlError("histoindex sql needs one SQL statement; got none")
    if len(statements) > 1:
        kinds = ", ".join(_first_keyword(s.query) or s.type.name for s in statements)
        raise SqlError(f"histoindex sql runs one read-only statement at a time; got {len(statements)} statements ({kinds})")
    (statement,) = statements
    refused = _first_keyword(statement.query) or statement.type.name
    if statement.type == duckdb.StatementType.SELECT:  # also DESCRIBE, SUMMARIZE, SHOW, VALUES, FROM …
        return
    if statement.type == duckdb.StatementType.EXPLAIN:
        inner = _explained(statement.query)
        try:
            inner_statements = _parse(inner) if inner is not None else []
        except SqlError:
            inner_statements = []
        if len(inner_statements) == 1 and inner_statements[0].type == duckdb.StatementType.SELECT:
            return
        if inner is None or not inner_statements:
            raise SqlError(f"histoindex sql runs one read-only statement ({READ_ONLY_KINDS}); EXPLAIN takes no options here: write EXPLAIN [ANALYZE] SELECT …")
        refused = f"EXPLAIN {_first_keyword(inner) or inner_statements[0].type.name}"
    raise SqlError(f"histoindex sql runs one read-only statement ({READ_ONLY_KINDS}); got {refused}")


# ---- which files it may read ----------------------------------------------------------------
def _unquote(token: str, kind: duckdb.token_type) -> str | None:
    """The value of a string literal or quoted identifier token; None for anything else."""
    if kind == duckdb.token_type.string_const:
        if len(token) >= 2 and token[0] == "'" and token[-1] == "'":
            return token[1:-1].replace("''", "'")
        if len(token) >= 3 and token[0] in "eE" and token[1] == "'" and token[-1] == "'":
            return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m.group(1), m.group(1)), token[2:-1])
        match = re.match(r"^(\$[A-Za-z_0-9]*\$)(.*)\1$", token, re.DOTALL)
        if match:
            return match.group(2)
        return None  # x'..', b'..': not text
    if kind == duckdb.token_type.identifier and len(token) >= 2 and token[0] == '"' and token[-1] == '"':
        return token[1:-1].replace('""', '"')
    return None


def _names(text: str) -> tuple[list[str], list[str], list[str]]:
    """(string values, identifiers, names called: an identifier or keyword followed by ``(``)
    of the statement; names lowercased, unquoted."""
    values, identifiers, called = [], [], []
    previous: str | None = None
    before = last = ""  # the tokens before ``previous`` and before this one: after AS, ``name(`` is an alias with its column names
    for token, kind in _tokens(text):
        if kind == duckdb.token_type.comment:
            continue
        if token == "(" and previous is not None and before != "as":
            called.append(previous)
        value = _unquote(token, kind)
        if value is not None:
            values.append(value)
        name = None
        if kind == duckdb.token_type.identifier:
            name = (value if value is not None else token).lower()
            identifiers.append(name)
        elif kind == duckdb.token_type.keyword:
            name = token.lower()
        before, last, previous = last, token.lower(), name
    return values, identifiers, called


@functools.cache
def _duckdb_table_functions() -> frozenset[str]:
    """Every table function (and table macro) this DuckDB has, lowercased."""
    con = duckdb.connect(":memory:")
    try:
        rows = con.execute("SELECT DISTINCT lower(function_name) FROM duckdb_functions() WHERE function_type IN ('table', 'table_macro')").fetchall()
    finally:
        con.close()
    return frozenset(name for (name,) in rows)


def check_functions(text: str) -> None:
    """Refuse (SqlError) the table functions that read whole files or run SQL text, and any
    other table function but :data:`TABLE_FUNCTIONS`."""
    _, identifiers, called = _names(text)
    for name in REFUSED_FUNCTIONS:
        if name in identifiers:
            raise SqlError(f"histoindex sql reads data files (Parquet, CSV, JSON), not whole files: {name} is refused")
    for name in called:
        if name in SQL_RUNNERS:
            raise SqlError(
                f"histoindex sql does not run {name}: it runs SQL given as text, which histoindex sql cannot check; write that SQL in the statement itself"
            )
        if name in _duckdb_table_functions() and name not in TABLE_FUNCTIONS:
            raise SqlError(
                f"histoindex sql does not run {name}: it is not one of the table functions histoindex sql runs "
                "(the read_parquet/read_csv/read_json family, glob, range, generate_series, unnest, summary, the duckdb_* catalog functions)"
            )


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _glob_base(pattern: str) -> str:
    """The directory part of ``pattern`` before its first glob character."""
    match = _GLOB_CHARS.search(pattern)
    if not match:
        return pattern
    head = pattern[: match.start()]
    return head[: head.rfind("/") + 1] or "."


def _store_dir(store: Store | None) -> Path | None:
    local = _local_path(store.uri) if store is not None else None
    return _real(local) if local is not None else None


def check_output_outside_store(out: str | Path, store: Store | None) -> Path:
    """``sql --out``'s file, refused inside the store's folder: a result written there could
    replace or sit among the tables' own files."""
    store_dir = _store_dir(store)
    target = _real(out)
    if store_dir is not None and _inside(target, store_dir):
        raise SqlError(f"--out {out}: inside the store ({store_dir}); write results outside it")
    return Path(out)


def _refuse_store(path: Path, shown: str, store_dir: Path) -> None:
    raise SqlError(
        f"histoindex sql does not read files inside the store ({store_dir}): {shown!r}; "
        "query its tables (spots, predictions, models, tiles and the *_long and tiles_embeddings views) instead"
    )


def _duckdb_glob(pattern: str) -> list[str]:
    """The files DuckDB's own glob matches for ``pattern`` (what a read of it opens: dotfiles too)."""
    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    try:
        return [file for (file,) in con.execute("SELECT file FROM glob($p)", {"p": pattern}).fetchall()]
    except duckdb.Error:
        return []  # the read itself reports it
    finally:
        con.close()


def _check_target(named: str, path: str, store_dir: Path | None, allowed: tuple[list[str], list[str]]) -> None:
    """``path`` (named as ``named``) resolved, links and ``..`` followed: refused inside the store,
    and unless it is itself a data file (or given with --allow-files)."""
    real = _real(path)
    if store_dir is not None and _inside(real, store_dir):
        _refuse_store(real, named, store_dir)
    paths, dirs = allowed
    if DATA_FILE.search(real.name) or str(real) in paths or any(_inside(real, Path(d)) for d in dirs):
        return
    raise SqlError(f"histoindex sql reads Parquet, CSV or JSON files: {named} leads to {real}, which is not one; give it with --allow-files to read it")


def named_files(text: str, store_dir: Path | None, allowed: tuple[list[str], list[str]] = ([], [])) -> tuple[list[str], list[str], list[str]]:
    """(allowed paths, allowed directories, hidden files a glob matched) for the data files
    ``text`` names: each resolved (links, ``..``) and refused when it leads into ``store_dir`` or
    to a file that is not a data file (unless ``allowed``, the --allow-files (paths, dirs))."""
    values, _, _ = _names(text)
    paths: list[str] = []
    hidden: list[str] = []
    for value in values:
        if not value or "\n" in value or _URL.match(value):
            continue  # no local path (a remote URL stays unreachable: external access is off)
        expanded = os.path.expanduser(value)
        is_glob = bool(_GLOB_CHARS.search(expanded))
        pathlike = "/" in value or os.sep in value or value.startswith("~") or DATA_FILE.search(value)
        if store_dir is not None and pathlike and _inside(_real(_glob_base(expanded)), store_dir):
            _refuse_store(_real(_glob_base(expanded)), value, store_dir)
        if not DATA_FILE.search(value):
            continue
        if is_glob:
            matches = [os.path.abspath(m) for m in _duckdb_glob(expanded)]
            for match in matches:
                _check_target(match, match, store_dir, allowed)
            paths.append(os.path.abspath(expanded))  # DuckDB checks the pattern, then each file
            paths.extend(matches)
            hidden.extend(m for m in matches if os.path.basename(m).startswith("."))
        else:
            _check_target(value, expanded, store_dir, allowed)
            paths.append(os.path.abspath(expanded))
    return paths, [], hidden


def allowed_files(allow_files: Iterable[str | Path], store_dir: Path | None) -> tuple[list[str], list[str]]:
    """(paths, directories) for ``--allow-files``: each must exist and not lead into, nor hold,
    the store."""
    paths: list[str] = []
    dirs: list[str] = []
    for item in allow_files:
        real = _real(item)
        if not real.exists():
            raise SqlError(f"--allow-files {item}: no such file or directory")
        if store_dir is not None and (_inside(real, store_dir) or _inside(store_dir, real)):
            raise SqlError(
                f"--allow-files {item}: the store ({store_dir}) cannot be opened to file reads; name a file or folder that neither is in the store nor holds it"
            )
        (dirs if real.is_dir() else paths).append(str(real))
        if os.path.abspath(os.path.expanduser(str(item))) != str(real):  # the path as written, too
            (dirs if real.is_dir() else paths).append(os.path.abspath(os.path.expanduser(str(item))))
    return paths, dirs


# ---- running it -----------------------------------------------------------------------------
def lock_down(con: duckdb.DuckDBPyConnection, *, paths: Iterable[str] = (), directories: Iterable[str] = ()) -> None:
    """No extensions, no external access except ``paths`` / ``directories``, and the
    configuration locked so that no statement can undo it."""
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET allow_community_extensions = false")
    con.execute("SET python_enable_replacements = false")  # no scanning of the caller's Python variables
    paths, directories = sorted(set(paths)), sorted(set(directories))
    if paths:
        con.execute("SET allowed_paths = $v", {"v": paths})
    if directories:
        con.execute("SET allowed_directories = $v", {"v": [d.rstrip("/") + "/" for d in directories]})
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def connect(
    store: Store | None,
    *,
    versions: dict[str, int] | None = None,
    read_only: bool = True,
    allowed_paths: Iterable[str] = (),
    allowed_directories: Iterable[str] = (),
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the store's tables registered as views (at ``versions`` if given).
    With ``read_only`` (the default) it is locked down (:func:`lock_down`): no file but
    ``allowed_paths`` / ``allowed_directories``, no extension, no configuration change."""
    con = duckdb.connect(":memory:")
    if store is not None:
        versions = versions or {}
        present = store.table_names()
        for name in present:
            if name == TILES:
                continue
            dataset = store.table(name, version=versions.get(name)).to_lance()
            if WEIGHTS in dataset.schema.names:  # models: read without the weights, which never reach DuckDB
                con.register(name, dataset.to_table(columns=[c for c in dataset.schema.names if c != WEIGHTS]))
            else:
                _register(con, name, dataset)
        _register_tiles(con, store, versions.get(TILES) if TILES in present else None, present=TILES in present)
        for view, body in LONG_VIEWS.items():
            needed = {"models", view.split("_")[0]}
            if needed <= set(present):
                if view == "predictions_long" and "genes" not in store.table("predictions", version=versions.get("predictions")).schema.names:
                    body = body.replace("COALESCE(p.genes, m.genes)", "m.genes")  # a table from before query --genes
                con.execute(f"CREATE VIEW {view} AS {body}")
    if read_only:
        lock_down(con, paths=allowed_paths, directories=allowed_directories)
    return con


def _register(con: duckdb.DuckDBPyConnection, name: str, dataset) -> None:
    """Table ``name`` (its Lance ``dataset``, scanned in place) as a view with this release's
    layout: the nullable columns a newer layout added, which the next write adds to the table
    itself all null (``predictions.slide_hash``, ...), read as nulls from a table written before them,
    so a statement written for the current layout runs on every store."""
    missing = [f for f in layout(name).schema if f.name not in dataset.schema.names and f.nullable]
    if not missing:
        con.register(name, dataset)
        return
    types = con.from_arrow(pa.schema(missing).empty_table()).types  # DuckDB's spelling of each column's type
    nulls = ", ".join(f'CAST(NULL AS {t}) AS "{f.name}"' for f, t in zip(missing, types))
    con.from_arrow(dataset).project(f"*, {nulls}").create_view(name)


def _register_tiles(con: duckdb.DuckDBPyConnection, store: Store, version: int | None, *, present: bool) -> None:
    """``tiles_embeddings`` (the tiles table, scanned in place) and ``tiles`` (the same without the
    embedding column, so ``SELECT *`` and joins do not drag 256 floats per row along). A store made
    before the tiles table existed gets both, empty, with the table's layout."""
    if present:
        con.register(TILES_EMBEDDINGS, store.table(TILES, version=version).to_lance())
    else:
        con.register(TILES_EMBEDDINGS, layout(TILES).schema.empty_table())
    con.execute(f"CREATE VIEW {TILES} AS SELECT * EXCLUDE (embedding) FROM {TILES_EMBEDDINGS}")


def run_sql(store: Store | None, statement: str, *, allow_files: Iterable[str | Path] = ()) -> pa.Table:
    """Run one read-only SQL statement; returns its result as Arrow. Data files (Parquet, CSV,
    JSON) outside the store can be named in the statement directly (``FROM 'predictions.parquet'``,
    ``read_parquet('preds/*.parquet')``); ``allow_files`` opens more files or folders to it."""
    check_statement(statement)
    check_functions(statement)
    store_dir = _store_dir(store)
    more_paths, more_dirs = allowed_files(allow_files, store_dir)
    paths, dirs, hidden = named_files(statement, store_dir, (more_paths, more_dirs))
    con = connect(store, allowed_paths=paths + more_paths, allowed_directories=dirs + more_dirs)
    try:
        relation = con.sql(statement)
        if relation is None:  # cannot happen for a read-only statement; kept for safety
            return pa.table({})
        return relation.to_arrow_table()
    except duckdb.PermissionException as exc:
        raise SqlError(
            "histoindex sql reads only the store's tables and the Parquet, CSV or JSON files the "
            f"statement names outside the store (more with --allow-files): {exc}"
        ) from exc
    except duckdb.Error as exc:
        tables = ", ".join([t for t in store.table_names() if t != TILES] + [TILES, TILES_EMBEDDINGS, *LONG_VIEWS]) if store else "none"
        if hidden:
            shown = ", ".join(os.path.basename(h) for h in hidden[:3]) + (f" and {len(hidden) - 3} more" if len(hidden) > 3 else "")
            raise SqlError(f"{exc}\n(the glob matched hidden files, {shown}: leave them out with a pattern like '[!.]*.parquet')") from exc
        raise SqlError(f"{exc}\n(tables and views: {tables})") from exc
    finally:
        con.close()


def ensure_tables(store: Store) -> None:
    if not store.table_names():
        raise StoreError(f"the store at {store.uri} is empty")
