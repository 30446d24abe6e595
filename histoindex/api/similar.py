"""The ``similar`` verb: search by example. The tiles most like a given one (a slide position, a
tile id, or an image patch embedded by the model) across every slide a query indexed into the
``tiles`` table, optionally also the reference spots.

Everything compared lives in one space: the query-space tile embeddings of one model with one set of
embedding settings (views, stain, patch size and pixels; the grid and the pixel size asked for do
not change what a vector means). Each slide is searched as it was last indexed in that space (its
newest file, its newest commit). Similarity is cosine (the vectors are unit length): exact in memory
up to ``EXACT_MAX_ROWS`` candidates, else LanceDB's vector index on ``tiles.embedding``
(``histoindex index --table tiles``), as :mod:`histoindex.search` plans a query's search.

Filters: ``slide_where`` on the slides (their ``tiles`` columns slide, slide_path, slide_hash, mpp,
created_at, and the cohort manifest columns stored with each slide); ``where`` on the predicted
expression of each tile (the latest ``predictions`` run by the same model of the tile's slide bytes
and embedding settings)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InputError, StoreError, UnknownValue
from ..search import EXACT_MAX_ROWS, SEARCH_MODES, check_where
from ..store import Store, has_vector_index, sql_literal
from .common import Log, _quiet

#: the embedding settings that change what a tile's vector means (the rest of ``embedding_key``,
#: the grid and the pixel size asked for, only says where the tiles are)
SPACE_KEYS = ("views", "stain", "patch_um", "patch_px")
#: per-slide columns ``slide_where`` may name besides the manifest's
SLIDE_COLUMNS = ("slide", "slide_path", "slide_hash", "mpp", "created_at")
#: the columns read from ``tiles`` besides the embedding
_ROW_COLUMNS = [
    "slide",
    "slide_path",
    "slide_hash",
    "slide_bytes",
    "tile_id",
    "tile_index",
    "x",
    "y",
    "x_um",
    "y_um",
    "mpp",
    "model_id",
    "embedding_key",
    "metadata",
    "created_at",
]
#: ANN: nprobes and refine factor. Tiles of one tissue crowd together (at 10⁶ tiles a query's 10th
#: neighbour is at cosine 0.85): the query search's 20 / 5 gave recall@10 0.85 there, these 0.97 at
#: 12 ms p50 instead of 9 ms (BENCHMARKS.md, "The tiles table at 10⁶ rows")
NPROBES, REFINE_FACTOR = 100, 20
#: contact sheet: columns, cell size (px)
SHEET_COLUMNS, SHEET_CELL_PX = 5, 160


@dataclass(frozen=True)
class SimilarOptions:
    """How ``similar`` searches (see :func:`similar`): ``k`` results; ``model_id`` (default: the one
    model whose tiles are indexed, or the query tile's); ``slide_where`` (SQL on the slides' columns
    and manifest metadata) and ``where`` (SQL on predicted expression, e.g. ``FASN > 2``);
    ``references``: also the reference spots' image embeddings; ``search_mode`` auto / exact / ann;
    for an image query, ``device`` and ``precision``."""

    k: int = 10
    model_id: str | None = None
    slide_where: str | None = None
    where: str | None = None
    references: bool = False
    search_mode: str = "auto"
    device: str | None = None
    precision: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise InputError(f"--k must be 1 or more; got {self.k}")
        if self.search_mode not in SEARCH_MODES:
            raise InputError(f"unknown search mode {self.search_mode!r}; use one of {', '.join(SEARCH_MODES)}")
        for name in ("slide_where", "where"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, check_where(value))
        if self.references and (self.where or self.slide_where):
            raise InputError(
                "--where and --slide-where filter the indexed tiles; the reference spots have no predictions or slide metadata: leave out --references"
            )


@dataclass(frozen=True)
class SimilarResult:
    """The hits, best first: source (tiles | spots), slide, tile_id, x_um, y_um, similarity and
    distance_um (on the query's own slide; null elsewhere); and how they were found."""

    table: pa.Table = field(repr=False)
    query: str  # what was searched for, in words
    model_id: str
    candidates: int  # tiles searched (after the filters)
    path: str  # exact | ann
    seconds: float
    sheet: Path | None = None


@dataclass(frozen=True)
class _Query:
    vector: np.ndarray
    text: str
    model_id: str
    space: tuple
    slide: str | None = None  # the query's slide (distances are measured on it)
    slide_hash: str | None = None
    xy_um: tuple[float, float] | None = None


def similar(
    *,
    db: str | Path,
    slide: str | None = None,
    at: tuple[float, float] | None = None,
    tile: str | None = None,
    image: str | Path | None = None,
    options: SimilarOptions | None = None,
    sheet: str | Path | None = None,
    log: Log = _quiet,
    **fields,
) -> SimilarResult:
    """The ``k`` tiles most like the query across every slide indexed in ``db``'s ``tiles`` table
    (see the module's docstring). The query is one of: ``slide`` and ``at`` (µm; the indexed tile of
    that slide nearest the position), ``tile`` (``"SLIDE:TILE_ID"``, or ``slide`` with a tile id),
    or ``image`` (a patch file, taken as one tile of the model's patch size, embedded as a query
    embeds a slide's tiles). ``sheet``: also draw the hits, read from their slides, into a PNG."""
    started = time.perf_counter()
    options = SimilarOptions(**fields) if options is None else dataclasses.replace(options, **fields) if fields else options
    given = [name for name, value in (("--at", at), ("--tile", tile), ("--image", image)) if value is not None]
    if len(given) != 1:
        raise InputError(
            "give one query: --slide SLIDE --at X_UM,Y_UM, --tile SLIDE:TILE_ID, or --image PATCH.png" + (f" (not {' and '.join(given)})" if given else "")
        )
    if at is not None and slide is None:
        raise InputError("--at needs --slide: the position is on that slide")
    if image is not None and slide is not None:
        raise InputError("--slide names the slide of --at or --tile; --image is a patch of its own: give one or the other")
    if sheet is not None:
        sheet = Path(sheet)
        if sheet.suffix.lower() != ".png":
            raise InputError(f"the contact sheet is a .png; got {sheet.name}")
    if image is not None and not Path(image).is_file():
        raise InputError(f"--image {image}: no such file")
    store = Store(db)
    if not store.has_table("tiles") or store.table("tiles").count_rows() == 0:
        raise StoreError(f"the store at {store.uri} has no indexed slides yet: run `histoindex query SLIDE --db {db}` first (it indexes the slide's tiles)")
    tiles = store.table("tiles")
    if image is not None:
        query = _image_query(store, image, options, log)
    else:
        if tile is not None and slide is None:
            if ":" not in tile:
                raise InputError(f"--tile {tile!r}: give SLIDE:TILE_ID (or --slide SLIDE --tile TILE_ID)")
            slide, tile = tile.rsplit(":", 1)
        query = _tile_query(tiles, slide, at=at, tile_id=tile, model_id=options.model_id)
    log(f"similar to {query.text} (model {query.model_id})")

    rows = _latest_rows(tiles, query, options)
    if options.slide_where is not None:
        rows = _filter_slides(rows, options.slide_where)
    if options.where is not None:
        rows = _filter_predictions(store, rows, query.model_id, options.where, log)
    n = rows.num_rows
    path = "exact" if options.search_mode == "exact" or (options.search_mode == "auto" and n <= EXACT_MAX_ROWS) else "ann"
    if n == 0:
        found = _empty_hits()
    elif path == "exact":
        found = _exact(tiles, rows, query, options.k)
    else:
        found = _ann(tiles, rows, query, options.k)
    hits = _hits_table(found, query)
    if options.references:
        hits = _merge(hits, _reference_hits(store, query, options.k), options.k)
    drawn = None
    if sheet is not None:
        drawn = draw_sheet(hits, found, sheet)
    seconds = time.perf_counter() - started
    log(f"{hits.num_rows} hits among {n:,} tiles ({path}) in {seconds:.2f} s")
    return SimilarResult(table=hits, query=query.text, model_id=query.model_id, candidates=n, path=path, seconds=seconds, sheet=drawn)


# ---- the query --------------------------------------------------------------------------
def _space(key: str) -> tuple:
    settings = json.loads(key)
    return tuple(settings.get(name) for name in SPACE_KEYS)


def _slide_rows(tiles, slide: str) -> pa.Table:
    """The rows of the slide named ``slide`` (its name, or its file's path), all models."""
    ds = tiles.to_lance()
    found = ds.to_table(columns=[*_ROW_COLUMNS, "embedding"], filter=f"slide = {sql_literal(slide)}")
    if not found.num_rows and Path(slide).exists():
        found = ds.to_table(columns=[*_ROW_COLUMNS, "embedding"], filter=f"slide_path = {sql_literal(str(Path(slide).resolve()))}")
    if not found.num_rows:
        names = sorted(set(ds.to_table(columns=["slide"]).column("slide").to_pylist()))
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        raise UnknownValue(f"no indexed slide {slide!r}; slides indexed: {shown}")
    return found


def _tile_query(tiles, slide: str, *, at, tile_id: str | None, model_id: str | None) -> _Query:
    rows = _slide_rows(tiles, slide)
    models = sorted(set(rows.column("model_id").to_pylist()))
    if model_id is not None:
        if model_id not in models:
            raise UnknownValue(f"{slide} is indexed by model {', '.join(models)}, not {model_id!r}")
        rows = rows.filter(pc.equal(rows.column("model_id"), model_id))
    elif len(models) > 1:
        raise InputError(f"{slide} is indexed by {len(models)} models ({', '.join(models)}): pass --model")
    newest = pc.max(rows.column("created_at"))  # the slide as it was last indexed
    rows = rows.filter(pc.equal(rows.column("created_at"), newest))
    name = rows.column("slide")[0].as_py()
    key = rows.column("embedding_key")[0].as_py()
    if tile_id is not None:
        match = np.flatnonzero(np.asarray(rows.column("tile_id").to_pylist(), dtype=object) == tile_id)
        if not len(match):
            example = rows.column("tile_id")[0].as_py()
            raise UnknownValue(f"{name} has no indexed tile {tile_id!r} ({rows.num_rows} tiles, ids like {example!r})")
        i, text = int(match[0]), f"{name}:{tile_id}"
    else:
        x_um, y_um = float(at[0]), float(at[1])
        if not (math.isfinite(x_um) and math.isfinite(y_um)):
            raise InputError(f"--at {at[0]},{at[1]}: give two finite numbers, X_UM,Y_UM")
        xs, ys = rows.column("x_um").to_numpy(), rows.column("y_um").to_numpy()
        d = np.hypot(xs - x_um, ys - y_um)
        i = int(np.argmin(d))
        settings = json.loads(key)
        half = max(float(settings.get("patch_um", 0.0)), float(settings.get("grid", {}).get("stride_um") or 0.0)) / 2
        if max(abs(xs[i] - x_um), abs(ys[i] - y_um)) > half:
            raise InputError(
                f"--at {x_um:g},{y_um:g} µm is off the indexed tiles of {name} (tiles span x {xs.min():.0f}–{xs.max():.0f}, y {ys.min():.0f}–{ys.max():.0f} µm; "
                f"the nearest, {rows.column('tile_id')[i].as_py()}, is centred {d[i]:.0f} µm away)"
            )
        text = f"{name} at ({x_um:g}, {y_um:g}) µm: tile {rows.column('tile_id')[i].as_py()}"
    vector = np.asarray(rows.column("embedding")[i].values.to_numpy(zero_copy_only=False), np.float32)
    return _Query(
        vector=vector,
        text=text,
        model_id=rows.column("model_id")[i].as_py(),
        space=_space(key),
        slide=name,
        slide_hash=rows.column("slide_hash")[i].as_py(),
        xy_um=(float(rows.column("x_um")[i].as_py()), float(rows.column("y_um")[i].as_py())),
    )


def _image_query(store: Store, image: str | Path, options: SimilarOptions, log: Log) -> _Query:
    """A patch file as one tile of the model's patch size (its central square), embedded as a
    query embeds a slide's tiles (stain, views, backbone, the method's query encoder): with the
    views of the tiles indexed in the model's space (the most tiles, if several)."""
    from ..data import PatchGrid
    from ..embed import resolve_device, resolve_precision
    from ..io.slides import open_slide, probe_slide
    from ..models import load_model
    from ..pipeline import embed_grid

    keys = _distinct(store.table("tiles"), ["model_id", "embedding_key"])
    models = sorted({m for m, _ in keys})
    if options.model_id is not None:
        if options.model_id not in models:
            raise UnknownValue(f"no slides are indexed by model {options.model_id!r}; models with indexed slides: {', '.join(models)}")
        model_id = options.model_id
    elif len(models) > 1:
        raise InputError(f"slides are indexed by {len(models)} models ({', '.join(models)}): pass --model")
    else:
        (model_id,) = models
    record = store.model(model_id)
    cfg = record.cfg
    spaces: dict[tuple, int] = {}
    counts = store.table("tiles").to_lance().to_table(columns=["embedding_key"], filter=f"model_id = {sql_literal(model_id)}").column("embedding_key")
    for key, n in zip(*np.unique(np.asarray(counts.to_pylist(), dtype=object), return_counts=True)):
        space = _space(key)
        if space[1:] == (cfg.stain, float(cfg.patch_um), int(cfg.patch_px)):
            spaces[space] = spaces.get(space, 0) + int(n)
    if not spaces:
        raise StoreError(f"no slides are indexed with model {model_id}'s stain and patch settings")
    space = max(spaces, key=spaces.get)
    width, height, _ = probe_slide(image, mpp=1.0)
    side = min(width, height)
    mpp = float(cfg.patch_um) / side
    grid = PatchGrid(ids=np.array(["patch"]), xy=np.array([[width / 2, height / 2]], np.float64), mpp=mpp)
    device = resolve_device(options.device)
    precision = resolve_precision(options.precision, device)
    model = load_model(cfg, record.weights(), device=device)
    model.cfg = cfg.replace(views=space[0])
    log(f"embedding {Path(image).name} ({side} px square as one {cfg.patch_um:g} µm tile) with model {model_id} ({space[0]} views, stain {cfg.stain})")
    (vector,) = np.concatenate(list(embed_grid(lambda: open_slide(image, mpp=mpp), grid, model, device=device, precision=precision, batch_size=1)))
    return _Query(vector=np.asarray(vector, np.float32), text=f"{Path(image).name}", model_id=model_id, space=space)


def _distinct(tbl, columns: list[str]) -> set[tuple]:
    found = tbl.to_lance().to_table(columns=columns)
    return set(zip(*(found.column(c).to_pylist() for c in columns)))


# ---- the candidates ---------------------------------------------------------------------
def _latest_rows(tiles, query: _Query, options: SimilarOptions) -> pa.Table:
    """The model's tiles in the query's space, each slide as it was last indexed (its newest
    commit: a changed file's old rows and an older grid stay out), without embeddings, with row ids."""
    ds = tiles.to_lance()
    rows = ds.to_table(columns=_ROW_COLUMNS, filter=f"model_id = {sql_literal(query.model_id)}", with_row_id=True)
    keys = rows.column("embedding_key").to_pylist()
    in_space = {k: _space(k) == query.space for k in set(keys)}
    rows = rows.filter(pa.array([in_space[k] for k in keys], pa.bool_()))
    if not rows.num_rows:
        return rows
    newest = rows.group_by("slide").aggregate([("created_at", "max")])
    latest = dict(zip(newest.column("slide").to_pylist(), newest.column("created_at_max").to_pylist()))
    keep = [latest[s] == t for s, t in zip(rows.column("slide").to_pylist(), rows.column("created_at").to_pylist())]
    return rows.filter(pa.array(keep, pa.bool_()))


def _duckdb(**tables: pa.Table):
    """A locked-down DuckDB connection over ``tables`` (no file, no extension, no setting change)."""
    import duckdb

    from ..sql import lock_down

    con = duckdb.connect(":memory:")
    for name, table in tables.items():
        con.register(name, table)
    lock_down(con)
    return con


def _select(con, statement: str, what: str, named: str) -> pa.Table:
    import duckdb

    try:
        return con.sql(statement).to_arrow_table()
    except duckdb.Error as exc:
        first = str(exc).splitlines()[0]
        raise InputError(f"{what} {named!r}: {first}") from exc


def _filter_slides(rows: pa.Table, slide_where: str) -> pa.Table:
    """Rows of the slides ``slide_where`` keeps: a SQL condition on the per-slide columns
    (``SLIDE_COLUMNS``) and the manifest columns stored with each slide (``metadata``)."""
    slides = rows.select(list(SLIDE_COLUMNS) + ["metadata"]).group_by(list(SLIDE_COLUMNS) + ["metadata"]).aggregate([])
    metas = [json.loads(m) if m else {} for m in slides.column("metadata").to_pylist()]
    columns = {c: slides.column(c) for c in SLIDE_COLUMNS}
    for key in sorted({k for m in metas for k in m} - set(SLIDE_COLUMNS)):
        values = [m.get(key) for m in metas]
        try:
            columns[key] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types across slides: as text
            columns[key] = pa.array([None if v is None else str(v) for v in values], pa.string())
    con = _duckdb(slides=pa.table(columns))
    try:
        kept = _select(con, f"SELECT slide, slide_hash FROM slides WHERE ({slide_where})", "--slide-where", slide_where)
    finally:
        con.close()
    pairs = set(zip(kept.column("slide").to_pylist(), kept.column("slide_hash").to_pylist()))
    return rows.filter(pa.array([p in pairs for p in zip(rows.column("slide").to_pylist(), rows.column("slide_hash").to_pylist())], pa.bool_()))


def _filter_predictions(store: Store, rows: pa.Table, model_id: str, where: str, log: Log) -> pa.Table:
    """Rows whose tile's predicted expression meets ``where`` (gene names as columns), from the
    latest ``predictions`` run by ``model_id`` of the tile's own slide bytes and embedding settings
    (the run's ``slide_hash`` and ``embedding_key`` those of the tiles rows: the tiles of a file since
    changed under the same name, or of another grid, are not filtered by another run's predictions);
    a run that predates those columns (null) stands for any bytes and settings of its slide, as
    before they were recorded. A slide with no such run drops out."""
    if not store.has_table("predictions"):
        raise StoreError("--where filters on predicted expression, and the store has no predictions")
    slides = sorted(set(rows.column("slide").to_pylist()))
    listed = ", ".join(sql_literal(s) for s in slides)
    predicate = f"model_id = {sql_literal(model_id)} AND slide IN ({listed})"
    tbl = store.table("predictions")
    stamps = [c for c in ("slide_hash", "embedding_key") if c in tbl.schema.names]  # absent: a table not written since schema v3
    runs = tbl.to_lance().to_table(columns=["run_id", "slide", *stamps, "created_at"], filter=predicate)
    if not runs.num_rows:
        raise StoreError(f"--where filters on predicted expression, and none of the {len(slides)} slides searched has predictions by model {model_id}")
    runs = runs.group_by(["run_id", "slide", *stamps, "created_at"]).aggregate([])  # one row a run
    nulls = [None] * runs.num_rows
    by_slide: dict[str, list[tuple]] = {}
    for run_id, slide, digest, key, at in zip(
        runs.column("run_id").to_pylist(),
        runs.column("slide").to_pylist(),
        runs.column("slide_hash").to_pylist() if "slide_hash" in stamps else nulls,
        runs.column("embedding_key").to_pylist() if "embedding_key" in stamps else nulls,
        runs.column("created_at").to_pylist(),
    ):
        by_slide.setdefault(slide, []).append((at, run_id, digest, key))
    latest: dict[tuple[str, str, str], str] = {}  # (slide, slide_hash, embedding_key) of the tiles → the run that predicted them
    for slide, digest, key in set(zip(*(rows.column(c).to_pylist() for c in ("slide", "slide_hash", "embedding_key")))):
        candidates = by_slide.get(slide, [])
        exact = [r for r in candidates if r[2] == digest and r[3] == key]
        unknown = [r for r in candidates if r[2] is None and r[3] in (None, key)]  # bytes not recorded: today's name match
        if exact or unknown:
            latest[(slide, digest, key)] = max(exact or unknown, key=lambda r: (r[0], r[1]))[1]
    never = sorted(set(slides) - set(by_slide))
    if never:
        log(f"--where: {len(never)} slide(s) have no predictions by model {model_id} and are left out ({', '.join(never[:3])}{'…' if len(never) > 3 else ''})")
    other = sorted(set(slides) - set(never) - {s for s, _, _ in latest})
    if other:
        log(
            f"--where: {len(other)} slide(s) were predicted by model {model_id} only from other file contents or embedding settings than their indexed tiles, "
            f"and are left out ({', '.join(other[:3])}{'…' if len(other) > 3 else ''}): query them again to predict these"
        )
    ds, wanted = tbl.to_lance(), ["run_id", "slide", "tile_id", "expression", "genes"]
    if latest:
        predicted = ds.to_table(columns=wanted, filter=f"run_id IN ({', '.join(sql_literal(r) for r in set(latest.values()))})")
    else:  # no run of these tiles: nothing kept, but ``where`` is still checked against the model's genes
        predicted = pa.schema([ds.schema.field(c) for c in wanted]).empty_table()
    model_genes = list(store.model(model_id).cfg.genes)
    named = set(re.findall(r'"((?:[^"]|"")+)"|([A-Za-z_][A-Za-z0-9_.]*)', where))
    tokens = {a.replace('""', '"') or b for a, b in named}
    expression = predicted.column("expression").to_pylist()
    gene_lists = predicted.column("genes").to_pylist()
    asked = sorted({g for genes in {tuple(gl) if gl else tuple(model_genes) for gl in gene_lists} or {tuple(model_genes)} for g in genes if g in tokens})
    if not asked:
        shown = ", ".join(model_genes[:8]) + ("…" if len(model_genes) > 8 else "")
        raise InputError(f'--where {where!r} names no predicted gene (model {model_id} predicts {shown}); quote names like "HLA-A"')
    columns: dict[str, list] = {g: [] for g in asked}
    for values, genes in zip(expression, gene_lists):
        position = {g: i for i, g in enumerate(genes or model_genes)}
        for g in asked:
            j = position.get(g)
            v = values[j] if j is not None else None
            columns[g].append(None if v is None or v != v else v)  # NaN: not measured by any neighbour
    table = pa.table(
        {
            "run_id": predicted.column("run_id"),
            "slide": predicted.column("slide"),
            "tile_id": predicted.column("tile_id"),
            **{g: pa.array(v, pa.float32()) for g, v in columns.items()},
        }
    )
    con = _duckdb(predictions=table)
    try:
        kept = _select(con, f"SELECT run_id, tile_id FROM predictions WHERE ({where})", "--where", where)
    finally:
        con.close()
    pairs = set(zip(kept.column("run_id").to_pylist(), kept.column("tile_id").to_pylist()))
    keys = zip(*(rows.column(c).to_pylist() for c in ("slide", "slide_hash", "embedding_key", "tile_id")))
    return rows.filter(pa.array([(latest.get((s, h, k)), t) in pairs for s, h, k, t in keys], pa.bool_()))


# ---- the search -------------------------------------------------------------------------
def _empty_hits() -> pa.Table:
    return pa.table(
        {
            c: pa.array([], pa.float64() if c in ("x", "y", "x_um", "y_um", "mpp") else pa.string())
            for c in ("slide", "slide_path", "slide_hash", "tile_id", "x", "y", "x_um", "y_um", "mpp", "embedding_key")
        }
    ).append_column("similarity", pa.array([], pa.float64()))


def _exact(tiles, rows: pa.Table, query: _Query, k: int) -> pa.Table:
    """Cosine similarity of every candidate (their embeddings read by row id), top ``k``."""
    ids = rows.column("_rowid").to_numpy()
    ds = tiles.to_lance()
    read = ds._take_rows(ids.tolist(), columns=["embedding"]) if hasattr(ds, "_take_rows") else ds.take_rows(ids.tolist(), columns=["embedding"])
    flat = read.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    matrix = np.asarray(flat, np.float32).reshape(len(ids), -1)
    scores = matrix @ query.vector
    top = _best(scores, rows, query, k)
    return rows.take(pa.array(top, pa.int64())).append_column("similarity", pa.array(scores[top].astype(np.float64)))


def _best(scores: np.ndarray, rows: pa.Table, query: _Query, k: int) -> np.ndarray:
    """The ``k`` best rows, most similar first; among equals (a copy's duplicate tiles), the
    query's own slide first."""
    elsewhere = np.asarray(
        [not (s == query.slide and h == query.slide_hash) for s, h in zip(rows.column("slide").to_pylist(), rows.column("slide_hash").to_pylist())]
    )
    return np.lexsort((elsewhere, -scores))[:k]


def _ann(tiles, rows: pa.Table, query: _Query, k: int) -> pa.Table:
    """LanceDB's vector search (the index on ``tiles.embedding`` when there is one, else its flat
    scan), pre-filtered to the model, asked for more until ``k`` hits are among the candidates."""
    wanted = set(rows.column("_rowid").to_pylist())
    keys = ", ".join(sql_literal(k) for k in set(rows.column("embedding_key").to_pylist()))
    predicate = f"model_id = {sql_literal(query.model_id)} AND embedding_key IN ({keys})"
    limit = max(4 * k, 32)
    indexed = has_vector_index(tiles)
    while True:
        builder = tiles.search(np.asarray(query.vector, np.float32), vector_column_name="embedding").distance_type("cosine").where(predicate, prefilter=True)
        if indexed:
            builder = builder.nprobes(NPROBES).refine_factor(REFINE_FACTOR)
        found = builder.select(["_distance"]).with_row_id(True).limit(limit).to_arrow()
        ids = found.column("_rowid").to_pylist()
        sims = {i: 1.0 - float(d) for i, d in zip(ids, found.column("_distance").to_pylist()) if i in wanted}
        if len(sims) >= k or len(ids) < limit or limit >= 16 * len(wanted):
            break
        limit *= 4
    position = {i: n for n, i in enumerate(rows.column("_rowid").to_pylist())}
    taken = rows.take(pa.array([position[i] for i in sims], pa.int64()))
    scores = np.asarray(list(sims.values()), np.float64)
    top = _best(scores, taken, query, k)
    return taken.take(pa.array(top, pa.int64())).append_column("similarity", pa.array(scores[top]))


def _hits_table(found: pa.Table, query: _Query) -> pa.Table:
    n = found.num_rows
    distance = [None] * n
    if query.slide is not None and n:
        for i, (s, h, x, y) in enumerate(zip(*(found.column(c).to_pylist() for c in ("slide", "slide_hash", "x_um", "y_um")))):
            if s == query.slide and h == query.slide_hash:
                distance[i] = float(math.hypot(x - query.xy_um[0], y - query.xy_um[1]))
    return pa.table(
        {
            "source": pa.array(["tiles"] * n, pa.string()),
            "slide": found.column("slide").cast(pa.string()),
            "tile_id": found.column("tile_id").cast(pa.string()),
            "x_um": found.column("x_um").cast(pa.float64()),
            "y_um": found.column("y_um").cast(pa.float64()),
            "similarity": found.column("similarity"),
            "distance_um": pa.array(distance, pa.float64()),
        }
    )


def _reference_hits(store: Store, query: _Query, k: int) -> pa.Table:
    """The reference spots nearest the query by their image embeddings (the image tower's, as the
    tiles' are): exact, over the model's spots."""
    if not store.has_table("spots"):
        raise StoreError("--references: the store has no reference spots")
    spots = (
        store.table("spots")
        .to_lance()
        .to_table(columns=["dataset", "spot_id", "x", "y", "mpp", "image_embedding"], filter=f"model_id = {sql_literal(query.model_id)}")
    )
    if not spots.num_rows:
        raise StoreError(f"--references: no reference spots embedded by model {query.model_id}")
    matrix = np.asarray(spots.column("image_embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False), np.float32).reshape(spots.num_rows, -1)
    scores = matrix @ query.vector
    top = np.argsort(-scores, kind="stable")[:k]
    taken = spots.take(pa.array(top))
    mpp = taken.column("mpp").to_numpy()
    return pa.table(
        {
            "source": pa.array(["spots"] * len(top), pa.string()),
            "slide": taken.column("dataset").cast(pa.string()),
            "tile_id": taken.column("spot_id").cast(pa.string()),
            "x_um": pa.array(taken.column("x").to_numpy() * mpp, pa.float64()),
            "y_um": pa.array(taken.column("y").to_numpy() * mpp, pa.float64()),
            "similarity": pa.array(scores[top].astype(np.float64)),
            "distance_um": pa.array([None] * len(top), pa.float64()),
        }
    )


def _merge(a: pa.Table, b: pa.Table, k: int) -> pa.Table:
    both = pa.concat_tables([a, b])
    order = np.argsort(-both.column("similarity").to_numpy(), kind="stable")[:k]
    return both.take(pa.array(order))


# ---- the contact sheet ------------------------------------------------------------------
def draw_sheet(hits: pa.Table, found: pa.Table, out: Path) -> Path:
    """A grid of the tile hits (``SHEET_COLUMNS`` across, ``SHEET_CELL_PX`` square each), read from
    their slides, captioned slide / tile / similarity; a slide whose file is gone (or a reference
    spot) is a grey box saying so."""
    from PIL import Image, ImageDraw

    from ..io.slides import open_slide

    where = {(s, t): i for i, (s, t) in enumerate(zip(found.column("slide").to_pylist(), found.column("tile_id").to_pylist()))}
    n = max(hits.num_rows, 1)
    cols = min(SHEET_COLUMNS, n)
    rows = math.ceil(n / cols)
    caption = 28
    cell = SHEET_CELL_PX
    sheet = Image.new("RGB", (cols * cell, rows * (cell + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    opened: dict[str, object] = {}
    try:
        for n_hit, hit in enumerate(hits.to_pylist()):
            x0, y0 = (n_hit % cols) * cell, (n_hit // cols) * (cell + caption)
            picture, why = None, "reference spot"
            i = where.get((hit["slide"], hit["tile_id"])) if hit["source"] == "tiles" else None
            if i is not None:
                path = found.column("slide_path")[i].as_py()
                settings = json.loads(found.column("embedding_key")[i].as_py())
                mpp = found.column("mpp")[i].as_py()
                side = float(settings["patch_um"]) / mpp
                try:
                    if os.stat(path).st_size != found.column("slide_bytes")[i].as_py():
                        raise OSError("changed")
                    if path not in opened:
                        opened[path] = open_slide(path, mpp=mpp)
                    x, y = found.column("x")[i].as_py(), found.column("y")[i].as_py()
                    picture = Image.fromarray(opened[path].read_region(x - side / 2, y - side / 2, side, cell))
                except Exception:  # gone, moved, changed or unreadable: the hit is still listed
                    why = "slide file gone"
            if picture is not None:
                sheet.paste(picture, (x0, y0))
            else:
                draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=(170, 170, 170))
                draw.text((x0 + 8, y0 + cell // 2 - 6), why, fill="black")
            draw.text((x0 + 4, y0 + cell + 2), _fit(f"{hit['slide']}", 24), fill="black")
            draw.text((x0 + 4, y0 + cell + 14), _fit(f"{hit['tile_id']}  {hit['similarity']:.3f}", 24), fill="black")
    finally:
        for slide in opened.values():
            slide.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def _fit(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "…"
