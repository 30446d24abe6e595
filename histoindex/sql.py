"""SQL over the store with DuckDB: the tables are exposed as views over their Lance datasets
(scanned in place, never copied; ``models`` without its ``weights`` blobs), plus long-format views
with one row per gene.

``histoindex sql`` is read-only. It runs exactly one statement, and only one that reads: SELECT
(also WITH …, VALUES, FROM-first, SHOW), DESCRIBE, SUMMARIZE, or EXPLAIN of one of those. DuckDB
runs with external access off and its configuration locked, so the statement reaches no file,
extension or database except:

* the store's tables, registered as Arrow/Lance datasets (read through the views, never by path);
* the data files the statement names as string literals (or quoted names): a path or glob ending
  in ``.parquet``, ``.csv``, ``.tsv``, ``.json``, ``.jsonl`` or ``.ndjson`` (optionally ``.gz`` or
  ``.zst``), outside the store. A glob is expanded here and only the data files it matches are
  opened to DuckDB, never their whole directory;
* the files and directories given with ``allow_files`` (``--allow-files``), outside the store.

``read_text`` and ``read_blob`` (whole arbitrary files) are refused, and so is any literal path
that leads into the store: Lance internals are reached only through the tables.
"""

from __future__ import annotations

import glob as _glob
import os
import re
from collections.abc import Iterable
from pathlib import Path

import duckdb
import pyarrow as pa

from .errors import HistoindexError, StoreError
from .store import WEIGHTS, Store, _local_path

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

#: what ``histoindex sql`` runs, as named in its refusals
READ_ONLY_KINDS = "SELECT, WITH, EXPLAIN, DESCRIBE, SUMMARIZE"
#: the files a statement may name and read without --allow-files (case-insensitive)
DATA_FILE = re.compile(r"\.(parquet|csv|tsv|json|jsonl|ndjson)(\.(gz|gzip|zst|zstd))?$", re.IGNORECASE)
#: table functions that read any file whole: refused whatever the path
REFUSED_FUNCTIONS = ("read_text", "read_blob")
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


def _names(text: str) -> tuple[list[str], list[str]]:
    """(string values, function-ish identifiers) of the statement."""
    values, identifiers = [], []
    for token, kind in _tokens(text):
        value = _unquote(token, kind)
        if value is not None:
            values.append(value)
        if kind == duckdb.token_type.identifier:
            identifiers.append((value if value is not None else token).lower())
    return values, identifiers


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
        "query its tables (spots, predictions, models and the *_long views) instead"
    )


def named_files(text: str, store_dir: Path | None) -> tuple[list[str], list[str]]:
    """(allowed paths, allowed directories) for the data files ``text`` names. Refuses read_text /
    read_blob and any named path that leads into ``store_dir``."""
    values, identifiers = _names(text)
    for name in REFUSED_FUNCTIONS:
        if name in identifiers:
            raise SqlError(f"histoindex sql reads data files (Parquet, CSV, JSON), not whole files: {name} is refused")
    paths: list[str] = []
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
            matches = _glob.glob(expanded, recursive=True)
            for match in matches:
                if store_dir is not None and _inside(_real(match), store_dir):
                    _refuse_store(_real(match), match, store_dir)
            paths.append(os.path.abspath(expanded))  # DuckDB checks the pattern, then each file
            paths.extend(os.path.abspath(m) for m in matches if DATA_FILE.search(m))
        else:
            paths.append(os.path.abspath(expanded))
    return paths, []


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
    if read_only:
        lock_down(con, paths=allowed_paths, directories=allowed_directories)
    return con


def run_sql(store: Store | None, statement: str, *, allow_files: Iterable[str | Path] = ()) -> pa.Table:
    """Run one read-only SQL statement; returns its result as Arrow. Data files (Parquet, CSV,
    JSON) outside the store can be named in the statement directly (``FROM 'predictions.parquet'``,
    ``read_parquet('preds/*.parquet')``); ``allow_files`` opens more files or folders to it."""
    check_statement(statement)
    store_dir = _store_dir(store)
    paths, dirs = named_files(statement, store_dir)
    more_paths, more_dirs = allowed_files(allow_files, store_dir)
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
        tables = ", ".join(store.table_names() + [v for v in LONG_VIEWS]) if store else "none"
        raise SqlError(f"{exc}\n(tables and views: {tables})") from exc
    finally:
        con.close()


def ensure_tables(store: Store) -> None:
    if not store.table_names():
        raise StoreError(f"the store at {store.uri} is empty")
