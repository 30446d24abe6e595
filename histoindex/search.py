"""Top-k search of query image embeddings against the reference expression embeddings, with the
filter pushed down into LanceDB (prefilter), for a whole batch of queries at once.

A search runs inside a :class:`Scope`: always one model (embeddings of different models live in
different spaces), then the user's tissue / platform / species values (matched literally) and an
optional ``--where`` expression (validated as one boolean expression and parenthesised, so it can
only narrow the scope). Every reference row read is checked against the scope's model and values.

A small planner picks the path. ``exact``: the filtered reference embeddings are read once (the
filter runs inside the Lance scan), moved to the device once, and top-k comes from chunked matrix
products (torch, on the GPU when present) — exact, and the fastest path while the candidates fit in
memory. ``ann``: LanceDB's vector index (``histoindex index``), with ``nprobes`` and
``refine_factor``, for references too large to hold; without an index LanceDB falls back to its own
flat scan. ``auto``: exact up to ``EXACT_MAX_ROWS`` candidates, else ann. Either way, expression
profiles are read only for the rows that are hits, chunk by chunk, unless all the candidates'
profiles fit in ``EXPRESSION_CACHE_BYTES``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .data import DatasetStats, Hits
from .errors import InputError, StoreError, UnknownValue
from .store import Store, has_vector_index, sql_literal

SEARCH_MODES = ("auto", "exact", "ann")
#: candidates held in memory for exact search: 2M × 256 float32 = 2 GB
EXACT_MAX_ROWS = 2_000_000
#: queries per LanceDB batched search (a batch of 10k exhausts file handles on 1M rows)
ANN_BATCH = 1024
#: all candidates' expression profiles are read up front when they fit in this many bytes;
#: otherwise only the hit rows' profiles are read, chunk by chunk
EXPRESSION_CACHE_BYTES = 1 << 30
#: columns that scope a search; each is checked on every reference row read
SCOPE_COLUMNS = ("model_id", "tissue", "platform", "species")


def plan_search(mode: str, n_candidates: int) -> str:
    """``exact`` or ``ann`` for a search over ``n_candidates`` filtered rows."""
    if mode not in SEARCH_MODES:
        raise StoreError(f"unknown search mode {mode!r}; use one of {', '.join(SEARCH_MODES)}")
    if mode == "auto":
        return "exact" if n_candidates <= EXACT_MAX_ROWS else "ann"
    return mode


def check_where(where: str) -> str:
    """``where`` if it is one self-contained boolean expression: parentheses balanced outside string
    literals and quoted names (so it cannot close the scope's parentheses and add ``OR ...``), no
    statement separator, no comment and no ``$`` (dollar quoting) outside them. Returns it stripped."""
    text = where.strip()
    if not text:
        raise InputError("--where is empty")
    depth, i, n = 0, 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "'\"`":  # a literal or quoted name: skip to its closing quote ('' and "" escape)
            j = i + 1
            while True:
                j = text.find(ch, j)
                if j < 0:
                    raise InputError(f"--where {where!r}: unterminated {ch} quote")
                if j + 1 < n and text[j + 1] == ch:
                    j += 2
                    continue
                break
            i = j + 1
            continue
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise InputError(f"--where {where!r}: a ')' closes a parenthesis the expression did not open; give one boolean expression")
        elif ch == ";":
            raise InputError(f"--where {where!r}: ';' is not allowed; give one boolean expression")
        elif text.startswith("--", i) or text.startswith("/*", i):
            raise InputError(f"--where {where!r}: comments are not allowed; give one boolean expression")
        elif ch == "$":  # Lance's parser reads $$…$$ / $tag$…$tag$ as a string (and $1 as a parameter)
            raise InputError(f"--where {where!r}: '$' outside a quoted string is not allowed; quote text with '...' ('' for a quote inside)")
        i += 1
    if depth:
        raise InputError(f"--where {where!r}: {depth} unclosed '('; give one boolean expression")
    return text


@dataclass(frozen=True)
class Scope:
    """Which reference rows a search may use: one model, literal filter values, and an optional
    validated ``where`` expression."""

    model_id: str
    tissue: str | None = None
    platform: str | None = None
    species: str | None = None
    where: str | None = None

    def __post_init__(self) -> None:
        if self.where is not None:
            object.__setattr__(self, "where", check_where(self.where))

    @property
    def values(self) -> dict[str, str]:
        """The columns pinned to one value: the model, and whichever filters are set."""
        pinned = {"model_id": self.model_id, "tissue": self.tissue, "platform": self.platform, "species": self.species}
        return {column: value for column, value in pinned.items() if value is not None}

    @property
    def predicate(self) -> str:
        """The SQL pushed into the Lance scan; ``where`` is parenthesised, so it only narrows."""
        clauses = [f"{column} = {sql_literal(value)}" for column, value in self.values.items()]
        if self.where:
            clauses.append(f"({self.where})")
        return " AND ".join(clauses)

    def verify(self, rows: pa.Table, *, version: int) -> None:
        """Every row read must carry the scope's model and filter values (a second check behind the
        predicate: rows of another model are in another embedding space)."""
        for column, value in self.values.items():
            if column in rows.column_names and rows.num_rows and not pc.all(pc.equal(rows.column(column), value)).as_py():
                found = sorted(set(rows.column(column).unique().to_pylist()) - {value})
                raise StoreError(
                    f"spots@{version}: the search for {column} = {value!r} read rows with {column} {', '.join(map(repr, found))}; refusing to mix them"
                )


def build_filter(*, model_id: str, tissue: str | None = None, platform: str | None = None, species: str | None = None, where: str | None = None) -> str:
    """The SQL predicate of :class:`Scope` (kept for callers that only need the text)."""
    return Scope(model_id=model_id, tissue=tissue, platform=platform, species=species, where=where).predicate


def check_filter_values(store: Store, *, version: int | None, model_id: str, **filters: str | None) -> None:
    """A filter value absent from the reference is a user error: say which values exist."""
    for column, value in filters.items():
        if value is None:
            continue
        present = store.distinct("spots", column, where=f"model_id = {sql_literal(model_id)}", version=version)
        if value not in present:
            raise UnknownValue(
                f"no reference spots with {column} {value!r} (model {model_id}); {column} values present: {', '.join(map(str, present)) or 'none'}"
            )


def _as_matrix(column: pa.ChunkedArray | pa.Array, width: int | None = None) -> np.ndarray:
    """A list / fixed-size-list column as a float32 (n, width) matrix."""
    lists = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    flat = lists.flatten().to_numpy(zero_copy_only=False)
    n = len(lists)
    width = width if width is not None else (len(flat) // n if n else 0)
    return np.require(flat.reshape(n, width), np.float32, ["C", "W"])  # Arrow buffers are read-only


class References:
    """The reference rows a search may return, at one ``spots`` version.

    ``exact``: the candidates' row ids and expression embeddings are read once (embeddings moved to
    ``device`` once, for every chunk of queries), and their expression profiles too when they fit in
    ``EXPRESSION_CACHE_BYTES``. ``ann``: nothing is read up front but the count. In both, the
    profiles of hit rows not held in memory are read by row id (:meth:`expression`)."""

    def __init__(
        self, store: Store, scope: Scope, *, version: int | str | None = None, mode: str = "auto", device: str = "cpu", genes: Sequence[str] | None = None
    ):
        self.store = store
        #: the genes profiles are read for: None, the model's (the ``expression`` column); else any
        #: genes the references measured, read from their imputation panels (``profile_*``)
        self.genes = tuple(genes) if genes is not None else None
        self.scope = scope
        self.table = store.table("spots", version=version)
        self.spots_version = self.table.version
        self.where = scope.predicate
        try:
            self.n = self.table.count_rows(self.where)
        except Exception as exc:
            raise StoreError(f"cannot apply filter {self.where!r}: {exc}") from exc
        if self.n == 0:
            raise StoreError(f"no reference spots match {self.where!r} in spots@{self.spots_version}")
        self.path = plan_search(mode, self.n)
        self.device = device
        self.row_ids: np.ndarray | None = None
        self.keys = None  # torch tensor on device (exact)
        self._expression: np.ndarray | None = None
        self._datasets: np.ndarray | None = None  # dataset of every candidate row (exact)
        self._stats = None  # DatasetStats, read when "z" imputation first needs them
        self._dataset_index: dict[str, int] = {}
        self._positions: dict | None = None
        if self.path == "exact":
            self._load_exact()
        self._map_genes()

    def _map_genes(self) -> None:
        """Per candidate dataset, where each of its measured genes goes among ``genes`` (-1: not
        asked for), and which asked-for genes it measured (``measured_by``: gene → datasets). A
        gene asked for that no candidate dataset measured is an error naming it; ``("all",)``
        becomes every gene one measured (the model's first)."""
        model_id = self.scope.model_id
        panel = list(self.store.model(model_id).cfg.genes)
        if self._datasets is not None:
            datasets = sorted(set(map(str, np.unique(self._datasets))))
        else:
            datasets = self.store.distinct("spots", "dataset", where=self.where, version=self.spots_version)
        self.dataset_names = datasets
        measured = self.store.measured_genes(version=self.spots_version, where=f"model_id = {sql_literal(model_id)}")
        asked = self.genes
        if asked == ("all",):
            every = [g for d in datasets for g in measured.get((model_id, d), panel)]
            asked = self.genes = tuple(dict.fromkeys([*panel, *every]))
        elif asked is None:
            asked = tuple(panel)
        column = {g: i for i, g in enumerate(asked)}
        self._maps: dict[str, np.ndarray] = {}
        self._measured: dict[str, np.ndarray] = {}
        self._old: set[str] = set()  # datasets ingested before schema version 3: profile = expression over the model's genes
        for name in datasets:
            genes = measured.get((model_id, name))
            if genes is None:
                self._old.add(name)
                genes = panel
            self._maps[name] = np.array([column.get(g, -1) for g in genes], np.int64)
            mask = np.zeros(len(asked), bool)
            mask[self._maps[name][self._maps[name] >= 0]] = True
            self._measured[name] = mask
        #: gene → the candidate datasets that measured it
        self.measured_by = {g: [d for d in datasets if self._measured[d][i]] for i, g in enumerate(asked)}
        nowhere = [g for g, by in self.measured_by.items() if not by]
        if nowhere and self.genes is not None:
            shown = ", ".join(nowhere[:10]) + (f", … ({len(nowhere)} in all)" if len(nowhere) > 10 else "")
            raise InputError(
                f"gene{'s' if len(nowhere) > 1 else ''} {shown} measured by none of the references searched ({', '.join(datasets)}; model {model_id}, "
                f"spots@{self.spots_version}); `histoindex info` lists how many genes each dataset measured"
            )
        if self.genes is not None and self.path == "exact" and self.n * len(self.genes) * 4 <= EXPRESSION_CACHE_BYTES:
            # every candidate's asked-for genes, in one scan (row-id order, as the keys)
            arrow = self._scan([*self._profile_columns(), *SCOPE_COLUMNS])
            self.scope.verify(arrow, version=self.spots_version)
            arrow = arrow.take(pa.array(np.argsort(arrow.column("_rowid").to_numpy())))
            if not np.array_equal(arrow.column("_rowid").to_numpy(), self.row_ids):
                raise StoreError(f"spots@{self.spots_version}: the candidates changed between two reads of {self.where!r}")
            self._expression = self._dense(arrow)

    def _profile_columns(self) -> list[str]:
        """The columns :meth:`_dense` reads (a table from before schema version 3 has no profiles)."""
        profiles = ["profile_index", "profile_values"] if len(self._old) < len(self._maps) else []
        return ["dataset", *profiles] + (["expression"] if self._old else [])

    def _dense(self, rows: pa.Table) -> np.ndarray:
        """The asked-for genes' values of ``rows`` (columns of :meth:`_profile_columns`): float32,
        NaN where the row's dataset did not measure the gene, 0 where it measured no counts."""
        out = np.full((rows.num_rows, len(self.genes)), np.nan, np.float32)
        labels = rows.column("dataset").to_numpy(zero_copy_only=False)
        for name in np.unique(labels):
            name = str(name)
            if name not in self._maps:
                raise StoreError(f"spots@{self.spots_version}: a neighbour of dataset {name!r} is not among the datasets matching {self.where!r}")
            sel = np.flatnonzero(labels == name)
            cols = self._maps[name]
            block = np.full((len(sel), len(self.genes)), np.nan, np.float32)
            block[:, self._measured[name]] = 0.0
            if name in self._old:
                values = _as_matrix(rows.column("expression").take(pa.array(sel)))
                keep = cols >= 0
                block[:, cols[keep]] = values[:, keep]
            else:
                index = rows.column("profile_index").take(pa.array(sel)).combine_chunks()
                values = rows.column("profile_values").take(pa.array(sel)).combine_chunks()
                lengths = pc.fill_null(pc.list_value_length(index), 0).to_numpy()
                where = cols[index.flatten().to_numpy()]
                keep = where >= 0
                block[np.repeat(np.arange(len(sel)), lengths)[keep], where[keep]] = values.flatten().to_numpy()[keep]
            out[sel] = block
        return out

    def _scan(self, columns: list[str]) -> pa.Table:
        try:
            return self.table.search().where(self.where).select(columns).with_row_id(True).limit(None).to_arrow()
        except Exception as exc:
            raise StoreError(f"cannot apply filter {self.where!r}: {exc}") from exc

    def _load_exact(self) -> None:
        import torch

        n_genes = self._n_genes()
        cache = self.genes is None and self.n * n_genes * 4 <= EXPRESSION_CACHE_BYTES
        columns = ["expression_embedding", "dataset", *SCOPE_COLUMNS] + (["expression"] if cache else [])
        arrow = self._scan(columns)
        self.scope.verify(arrow, version=self.spots_version)
        order = np.argsort(arrow.column("_rowid").to_numpy())
        arrow = arrow.take(pa.array(order))
        self.row_ids = arrow.column("_rowid").to_numpy()
        keys = _as_matrix(arrow.column("expression_embedding"))
        self.keys = torch.from_numpy(keys).to(self.device)  # once per query, not per chunk
        self._datasets = arrow.column("dataset").to_numpy(zero_copy_only=False)
        if cache:
            self._expression = _as_matrix(arrow.column("expression"), n_genes)

    def _n_genes(self) -> int:
        first = self.table.search().where(self.where).select(["expression"]).limit(1).to_arrow()
        return len(first.column("expression")[0])

    def dataset_stats(self):
        """Per-dataset and pooled gene means/sds of the candidate rows (:class:`DatasetStats`, codes
        as :meth:`dataset_codes` gives them): from the profiles in memory, else one streaming scan
        of the filtered rows' ``dataset`` and ``expression`` columns, once per session."""
        if self._stats is not None:
            return self._stats
        if self._expression is not None:
            names, codes = np.unique(self._datasets, return_inverse=True)
            self._stats = DatasetStats.of(self._expression, codes)
        else:
            sums: dict[str, list] = {}
            columns, size = (["dataset", "expression"], 8192) if self.genes is None else (self._profile_columns(), 1024)
            try:
                batches = self.table.to_lance().to_batches(columns=columns, filter=self.where, batch_size=size)
                for batch in batches:
                    labels = batch.column("dataset").to_numpy(zero_copy_only=False)
                    if self.genes is None:
                        values = _as_matrix(batch.column("expression")).astype(np.float64)
                    else:
                        values = self._dense(pa.Table.from_batches([batch])).astype(np.float64)
                    measured = ~np.isnan(values)  # a gene its dataset did not measure counts nowhere
                    values = np.where(measured, values, 0.0)
                    for name in np.unique(labels):
                        chosen = labels == name
                        rows = values[chosen]
                        acc = sums.setdefault(str(name), [0, 0.0, 0.0])
                        acc[0] = acc[0] + measured[chosen].sum(axis=0)
                        acc[1] = acc[1] + rows.sum(axis=0)
                        acc[2] = acc[2] + (rows**2).sum(axis=0)
            except Exception as exc:
                raise StoreError(f"cannot read the reference profiles' statistics ({self.where!r}): {exc}") from exc
            names = np.array(sorted(sums))
            self._stats = DatasetStats.from_sums(
                np.array([sums[n][0] for n in names]), np.stack([sums[n][1] for n in names]), np.stack([sums[n][2] for n in names])
            )
        self._dataset_index = {str(name): i for i, name in enumerate(names)}
        return self._stats

    def dataset_codes(self, row_ids: np.ndarray) -> np.ndarray:
        """The dataset (a code of :meth:`dataset_stats`) of each of ``row_ids``."""
        self.dataset_stats()
        row_ids = np.asarray(row_ids, np.int64)
        if self._datasets is not None:
            labels = self._datasets[np.searchsorted(self.row_ids, row_ids)]
        else:
            rows = self.table.to_lance()._take_rows(pa.array(row_ids.astype(np.uint64)), columns=["dataset"])
            labels = rows.column("dataset").to_numpy(zero_copy_only=False)
        names, inverse = np.unique(labels, return_inverse=True)
        return np.array([self._dataset_index[str(name)] for name in names], np.int64)[inverse]

    def expression(self, row_ids: np.ndarray) -> np.ndarray:
        """Expression profiles of ``row_ids`` (LanceDB row ids), in that order, over ``genes`` (NaN:
        a gene the row's dataset did not measure); rows outside the scope are an error."""
        row_ids = np.asarray(row_ids, np.int64)
        if self.genes is not None and self._expression is None:  # the asked-for genes, from the rows' imputation panels
            rows = self.table.to_lance()._take_rows(pa.array(row_ids.astype(np.uint64)), columns=[*self._profile_columns(), *SCOPE_COLUMNS])
            if rows.num_rows != len(row_ids):
                raise StoreError(f"spots@{self.spots_version}: {len(row_ids) - rows.num_rows} neighbour rows could not be read")
            self.scope.verify(rows, version=self.spots_version)
            return self._dense(rows)
        if self._expression is not None:
            positions = np.searchsorted(self.row_ids, row_ids)
            if (positions >= len(self.row_ids)).any() or (self.row_ids[np.minimum(positions, len(self.row_ids) - 1)] != row_ids).any():
                raise StoreError(f"spots@{self.spots_version}: a neighbour is not among the rows matching {self.where!r}")
            return self._expression[positions]
        rows = self.table.to_lance()._take_rows(pa.array(row_ids.astype(np.uint64)), columns=["expression", *SCOPE_COLUMNS])
        if rows.num_rows != len(row_ids):
            raise StoreError(f"spots@{self.spots_version}: {len(row_ids) - rows.num_rows} neighbour rows could not be read")
        self.scope.verify(rows, version=self.spots_version)
        return _as_matrix(rows.column("expression"))


def search(
    references: References,
    queries: np.ndarray,
    *,
    k: int = 50,
    nprobes: int = 20,
    refine_factor: int = 5,
) -> Hits:
    """For each query (unit-length image embedding), the ``k`` most cosine-similar reference
    expression embeddings among ``references``, by the path the planner chose. ``k`` above the
    number of candidates is cut to it."""
    if k < 1:
        raise StoreError(f"k must be at least 1, got {k}")
    k_eff = min(k, references.n)
    if references.path == "exact":
        positions, sims = exact_topk(queries, references.keys, k_eff, device=references.device)
        return Hits(indices=references.row_ids[positions], similarities=sims, spots_version=references.spots_version)

    tbl = references.table
    indexed = has_vector_index(tbl)
    parts = []
    for start in range(0, len(queries), ANN_BATCH):  # LanceDB opens files per query: bounded batches
        builder = (
            tbl.search(np.ascontiguousarray(queries[start : start + ANN_BATCH], np.float32), vector_column_name="expression_embedding")
            .distance_type("cosine")
            .where(references.where, prefilter=True)
            .limit(k_eff)
        )
        if indexed:
            builder = builder.nprobes(nprobes).refine_factor(refine_factor)
        part = builder.select(["_distance"]).with_row_id(True).to_arrow()
        offset = part.column("query_index").to_numpy() if "query_index" in part.column_names else np.zeros(part.num_rows, np.int64)
        parts.append((offset + start, part.column("_rowid").to_numpy(), part.column("_distance").to_numpy()))
    query_index, row_ids, distance = (np.concatenate(columns) for columns in zip(*parts))
    order = np.lexsort((distance, query_index))  # group by query, nearest first
    query_index, row_ids, distance = query_index[order], row_ids[order], distance[order]
    counts = np.bincount(query_index, minlength=len(queries))
    if not (counts == k_eff).all():
        raise StoreError(f"search returned {counts.min()}..{counts.max()} neighbours per query, expected {k_eff}")
    return Hits(
        indices=row_ids.astype(np.int64).reshape(len(queries), k_eff),
        similarities=(1.0 - distance).astype(np.float32).reshape(len(queries), k_eff),
        spots_version=references.spots_version,
    )


#: similarity matrix entries computed at once (float32: 1 GiB), which sets the query chunk
EXACT_CHUNK_ELEMENTS = 2**28


def exact_topk(queries: np.ndarray, keys, k: int, *, device: str = "cpu", chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product (cosine for unit vectors) with chunked matrix products:
    returns (indices, similarities), each n_query × k, nearest first. ``keys`` is an array or a
    torch tensor already on ``device`` (then it is used in place: no copy per call). Queries go in
    chunks of ``chunk`` (default: as many as keep one similarity block within
    ``EXACT_CHUNK_ELEMENTS``)."""
    import torch

    if not isinstance(keys, torch.Tensor):
        keys = torch.from_numpy(np.require(keys, np.float32, ["C", "W"])).to(device)  # Arrow buffers are read-only
    device = keys.device
    k = min(k, len(keys))
    if chunk is None:
        chunk = int(np.clip(EXACT_CHUNK_ELEMENTS // max(len(keys), 1), 1, 8192))
    indices = np.empty((len(queries), k), np.int64)
    sims = np.empty((len(queries), k), np.float32)
    with torch.inference_mode():
        for start in range(0, len(queries), chunk):
            q = torch.from_numpy(np.ascontiguousarray(queries[start : start + chunk], np.float32)).to(device)
            values, idx = torch.topk(q @ keys.T, k, dim=1)
            indices[start : start + len(q)] = idx.cpu().numpy()
            sims[start : start + len(q)] = values.cpu().numpy()
    return indices, sims
