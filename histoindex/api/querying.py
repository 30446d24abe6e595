"""The ``query`` verb: a slide's tiles (or given spots) read, embedded, searched against the
reference spots, imputed and written, streaming, with one commit per slide.

:func:`open_query` loads what every slide shares (the store at one ``spots`` version, the model,
the filtered references) into a :class:`QuerySession`; :meth:`QuerySession.answer` answers one
slide in its stages: check the request, lay out the grid, describe the run, stream the tiles
(:mod:`histoindex.pipeline`) into the ``--out`` file and one ``predictions`` commit."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..config import RetrievalSettings, rate_text
from ..data import PatchGrid, check_patch_pixels
from ..errors import InputError
from ..io.hest import hest_slide_mpp
from ..io.slides import file_sha256, open_slide
from ..io.tables import check_positions_on_slide, read_positions
from ..io.write import TABLE_SUFFIXES, PredictionWriter, check_output_path
from ..patch import check_stride, default_stride_um, tile_grid
from ..plot import check_gene_names, picture_path, plot_predictions  # matplotlib loads only when drawing
from ..search import References, Scope, check_filter_values, check_where
from ..store import Store, prediction_rows, tile_rows
from .common import Log, Progress, _quiet, default_read_workers
from .indexing import SlideIdentity, batches, embedding_key, indexed_unreadable, slide_identity, stored_grid, tapped
from .options import CohortSlide, QueryOptions, answer_settings
from .streaming import RowStream

#: slide files above this size get a line before they are opened (decoding a large JPEG takes seconds)
LARGE_SLIDE_BYTES = 20_000_000


@dataclass(frozen=True)
class QueryResult:
    run_id: str
    slide: str
    model_id: str
    spots_version: int
    predictions_version: int
    n_tiles: int
    genes: tuple[str, ...] = field(repr=False)
    ids: np.ndarray = field(repr=False)
    xy: np.ndarray = field(repr=False)
    predictions: np.ndarray | None = field(repr=False)
    out: Path | None = None
    filter: str = ""
    seconds: float = 0.0  # the whole call
    stream_seconds: float = 0.0  # reading, embedding, searching and writing the tiles
    plots: tuple[Path, ...] = ()
    rows: pa.Table | None = field(default=None, repr=False)  # the uncommitted prediction rows (commit=False)
    tile_rows: pa.Table | None = field(default=None, repr=False)  # the uncommitted tiles rows (commit=False)
    indexed: bool = False  # answered from the tiles table (no image read)


@dataclass
class QuerySession:
    """What every slide of a query shares, loaded once by :func:`open_query`: the store at one
    ``spots`` version, the model (with the query's views) and the matching reference rows; then
    :meth:`answer`, slide after slide."""

    store: Store
    record: object
    cfg: object
    model: object | None  # loaded by the first slide that is embedded (an indexed slide needs none)
    references: References
    k: int
    device: object
    precision: str
    retrieval: RetrievalSettings = field(default_factory=RetrievalSettings)  # the model's, with the query's --k / --smooth
    stride_um: float | None = None  # the output grid's pitch (tiles): --stride-um, or the default rule
    stride_rule: str = ""  # why that pitch (the default rule's reason)
    options: dict = field(default_factory=dict)  # the answer-shaping options it was opened with (ANSWER_OPTIONS)
    results: Store | None = None  # where predictions are committed: the reference store, --results-db, or None (--no-store)
    genes: tuple[str, ...] | None = None  # the genes predicted (query --genes); None: the model's
    query: QueryOptions = field(default_factory=QueryOptions)  # the options it was opened with, as given

    @property
    def predicted_genes(self) -> tuple[str, ...]:
        return self.genes if self.genes is not None else tuple(self.cfg.genes)

    def answer(
        self,
        slide: str | Path | CohortSlide,
        *,
        out: str | Path | None = None,
        spots: str | Path | None = None,
        mpp: float | None = None,
        plot: Sequence[str] = (),
        keep_predictions: bool = True,
        commit: bool = True,
        progress: Progress | None = None,
        log: Log = _quiet,
    ) -> QueryResult:
        """Impute expression over ``slide`` (a path, or a :class:`CohortSlide` naming the key its
        predictions are stored under and metadata written beside every row): see :func:`query`.
        ``mpp`` is the pixel size when neither the slide's file nor the ``CohortSlide`` gives one.
        With ``commit=False`` nothing is written to the store: the result carries the prediction
        ``rows`` for the caller to commit (a cluster's driver commits what its workers predicted)."""
        request = slide if isinstance(slide, CohortSlide) else CohortSlide(str(slide))
        mpp = request.mpp if request.mpp is not None else mpp
        out = _check_request(request.path, out=out, mpp=mpp, spots=spots, where=None, results=self.results, log=log)
        return self._answer(request, out, spots=spots, mpp=mpp, plot=plot, keep_predictions=keep_predictions, commit=commit, progress=progress, log=log)

    def _answer(self, request: CohortSlide, out: Path | None, *, spots, mpp, plot, keep_predictions, commit, progress, log) -> QueryResult:
        # the stages, each below: what to draw, the grid, what the rows record, the stream
        started = time.perf_counter()
        if spots is not None and self.query.stride_um is not None:
            raise InputError("--stride-um sets the pitch of the tile grid; --spots predicts at the given positions instead: give one or the other")
        plot = self._check_plot(plot, out)
        indexed = self._indexed(request, spots=spots, mpp=mpp, log=log)
        if indexed.tiles is not None:  # embedded before: the grid and embeddings from the tiles table, no image read
            grid, stored = stored_grid(indexed.tiles)
            id_column = "spot" if spots is not None else "tile_id"
            log(self._grid_line(grid, Path(request.path).name, spots=spots, indexed=True))
        else:
            self._load_model(log)
            (grid, id_column), stored = self._grid(request.path, mpp=mpp, spots=spots, log=log), None
        run = self._describe(request, grid, spots=spots, asked_mpp=mpp)
        references, genes = self.references, self.predicted_genes
        writer = None
        if out is not None:
            writer = PredictionWriter(
                out, id_column=id_column, slide=run.slide, mpp=grid.mpp, genes=list(genes), provenance=run.provenance, metadata=request.metadata or None
            )
        stream_started = time.perf_counter()
        streamed = self._stream(request.path, grid, run, writer, indexed=indexed, stored=stored, keep=keep_predictions, commit=commit, progress=progress)
        predicted, predictions_version, uncommitted, tile_rows = streamed
        stream_seconds = time.perf_counter() - stream_started
        seconds = time.perf_counter() - started
        log(
            f"predicted {len(genes)} genes for {len(grid)} tiles ({references.path} top-{self.k} of {references.n} references, spots@{references.spots_version}) in {seconds:.1f} s ({rate_text(len(grid) / seconds, 'tiles')})"
            + (f"; predictions@{predictions_version}" if predictions_version >= 0 else "")
        )
        plots = tuple(plot_predictions(out, genes=[gene], out=picture_path(out, gene)) for gene in plot)  # the result names them
        return QueryResult(
            run_id=run.run_id,
            slide=run.slide,
            model_id=self.record.model_id,
            spots_version=references.spots_version,
            predictions_version=predictions_version,
            n_tiles=len(grid),
            genes=genes,
            ids=grid.ids,
            xy=grid.xy,
            predictions=predicted if keep_predictions else None,
            rows=uncommitted,
            tile_rows=tile_rows,
            indexed=stored is not None,
            out=Path(out) if out else None,
            filter=references.where,
            seconds=seconds,
            stream_seconds=stream_seconds,
            plots=plots,
        )

    def _load_model(self, log: Log) -> None:
        """The model, loaded once, when the first slide needs embedding (seconds: timm builds the backbone)."""
        if self.model is not None:
            return
        from ..models import load_model

        refs = self.references
        log(f"loading model {self.record.model_id} ({self.cfg.backbone}) on {self.device}; {refs.n:,} reference spots (spots@{refs.spots_version})")
        model = load_model(self.record.cfg, self.record.weights(), device=self.device)
        model.cfg = self.cfg  # the views to average (the weights are the same)
        self.model = model

    def _indexed(self, request: CohortSlide, *, spots, mpp: float | None, log: Log) -> _Indexed:
        """The slide's identity and embedding key, and its tiles when this model embedded these
        bytes with these settings before (unless ``re_embed``): in the store answers are kept in, or
        with ``--no-store`` in the reference store (read only: a shared store's indexed slides).
        The identity and key are also what the slide's ``predictions`` rows record (so they join
        their ``tiles`` rows): computed whenever rows are kept, indexed or not (``--no-keep-tiles``)."""
        index = self.results if self.results is not None else self.store
        indexable = self.query.keep_tiles or index.has_table("tiles")
        if not indexable and self.results is None:  # no tiles to read or write, no predictions rows to stamp
            return _Indexed(None, "", None)
        identity = slide_identity(request.path, name=request.name, metadata=request.metadata, store=index, log=log)
        spots_digest = file_sha256(spots) if spots is not None else None
        key = embedding_key(self.cfg, stride_um=self._stride, spots_digest=spots_digest, mpp=mpp, precision=self.precision)
        if identity is None or not indexable:  # a remote slide (no identity), or nothing indexed: the rows' stamp only
            return _Indexed(identity, key, None)
        tiles = None if self.query.re_embed else index.slide_tiles(identity.digest, model_id=self.record.model_id, embedding_key=key)
        if tiles is None and not identity.readable:
            raise InputError(f"{request.path} cannot be read, and its tiles were indexed with other settings than this query's: query it with its file present")
        names = index.indexed_as(identity.digest, model_id=self.record.model_id, embedding_key=key) if tiles is not None else set()
        return _Indexed(identity, key, tiles, names)

    def _check_plot(self, plot: Sequence[str], out: Path | None) -> tuple[str, ...]:
        """Genes to draw, checked now, not after minutes of embedding."""
        if not plot:
            return ()
        if out is None:
            raise InputError("--plot needs --out: pictures are drawn from the predictions file")
        if out.suffix.lower() not in TABLE_SUFFIXES:
            raise InputError(f"--plot draws from a .parquet or .h5ad --out, not {out.name}")
        where = f"the genes predicted (model {self.record.model_id}; query --genes)"
        return tuple(check_gene_names(plot, self.predicted_genes, where=where))

    def _grid(self, slide_path: str, *, mpp: float | None, spots: str | Path | None, log: Log) -> tuple[PatchGrid, str]:
        """Where the slide is answered: its tissue tiles on the session's grid, or the ``spots``
        positions; at the slide's pixel size (its own, ``mpp``, HEST's metadata, or the spots')."""
        cfg, name = self.cfg, Path(slide_path).name
        if Path(slide_path).is_file() and Path(slide_path).stat().st_size > LARGE_SLIDE_BYTES:  # a big JPEG/PNG decodes for seconds
            log(f"opening {name} ({Path(slide_path).stat().st_size / 1e6:,.0f} MB)")
        slide = open_slide(slide_path, mpp=mpp)
        if slide.mpp is None and (hest_mpp := hest_slide_mpp(slide_path)) is not None:  # a HEST slide: its metadata has the pixel size
            slide.close()
            log(f"{name}: {hest_mpp:.4g} µm/px from HEST's metadata (pixel_size_um_estimated)")
            slide = open_slide(slide_path, mpp=hest_mpp)
        try:
            if spots is not None:
                ids, xy = read_positions(spots)
                if slide.mpp is None:  # the spots' own pixel size, by the rules references follow
                    slide.mpp = spots_pixel_size(spots, xy, slide=name, platform=self.query.platform, session=self, log=log)
                check_patch_pixels(cfg.patch_um, slide.mpp, where=name)
                check_positions_on_slide(ids, xy, width=slide.width, height=slide.height, source=spots, slide=name)
                grid, id_column = PatchGrid(ids=ids, xy=xy, mpp=slide.mpp), "spot"
            else:
                if slide.mpp is not None:  # tiles of a few pixels would be upsampled noise
                    check_patch_pixels(cfg.patch_um, slide.mpp, where=name)
                grid, id_column = tile_grid(slide, tile_um=cfg.patch_um, stride_um=self._stride), "tile_id"
        finally:
            slide.close()
        log(self._grid_line(grid, name, spots=spots))
        return grid, id_column

    def _grid_line(self, grid: PatchGrid, name: str, *, spots, indexed: bool = False) -> str:
        """What the slide is answered at, and how: one log line."""
        rule = self.stride_rule
        pitch = "" if spots is not None else f", centred every {self._stride:g} µm ({rule})" if rule else f", centred every {self._stride:g} µm"
        where = "spots" if spots is not None else "tissue tiles"
        how = "; indexed before (tiles table): search only" if indexed else ""
        return (
            f"{len(grid)} {where} of {self.cfg.patch_um:g} µm on {name} ({grid.mpp:.3g} µm/px){pitch}{how}; "
            f"{self.references.path} search over {self.references.n} references on {self.device} ({self.precision})"
        )

    @property
    def _stride(self) -> float:
        return self.stride_um or self.cfg.patch_um

    def _describe(self, request: CohortSlide, grid: PatchGrid, *, spots: str | Path | None, asked_mpp: float | None) -> _Run:
        """What this answer's rows and file record: its run id, key, settings and provenance."""
        cfg, references = self.cfg, self.references
        run_id, slide_name, created_at = uuid.uuid4().hex[:12], request.name, datetime.now(timezone.utc)
        provenance = {
            "run_id": run_id,
            "slide": slide_name,
            "slide_path": str(Path(request.path).resolve()),
            "model_id": self.record.model_id,
            "method": cfg.method,
            "spots_version": references.spots_version,
            "filter": references.where,
            "k": self.k,
            "retrieval": self.retrieval.to_dict(),
            "search": references.path,
            "precision": self.precision,
            "mpp": grid.mpp,
            "patch_um": cfg.patch_um,
            **({} if spots is not None else {"stride_um": self._stride}),  # the grid's pitch: each tile stands for a stride × stride cell
            "stain": cfg.stain,
            "views": cfg.views,
            "normalisation": cfg.normalisation,
            **({"genes": "query --genes"} if self.genes is not None else {}),
            **_measured_summary(references),
            "created_at": created_at.isoformat(),
        }
        if request.metadata:
            provenance["metadata"] = dict(request.metadata)
        settings = answer_settings(self.options, mpp=asked_mpp, spots=spots)
        return _Run(run_id=run_id, slide=slide_name, created_at=created_at, settings=settings, provenance=provenance, spots=spots is not None)

    def _stream(self, slide_path: str, grid: PatchGrid, run: _Run, writer, *, indexed: _Indexed, stored, keep: bool, commit: bool, progress):
        """Read, embed, search, impute and write the grid (:mod:`histoindex.pipeline`): each
        chunk into ``writer`` and as ``predictions`` rows, committed once when the last is in
        (:class:`~histoindex.api.streaming.RowStream`). On any error (or Ctrl-C) nothing is
        committed and the partial file is removed. Returns the predictions (``keep``), the
        committed version (-1: none) and the rows left uncommitted (``commit=False``).

        The query-space embeddings come from the image (:func:`histoindex.pipeline.embed_grid`), each
        batch also written to the ``tiles`` table (one commit, before the predictions'), or from
        the slide's indexed tiles (``stored``), in the batches a fresh query makes."""
        from ..pipeline import answer, embed_grid  # torch: loaded by open_query already

        references, batch_size = self.references, self.query.batch_size
        committing = commit and self.results is not None  # --no-store: the rows go nowhere (the --out file holds the answer)
        rows_out = RowStream(self.results.add_predictions if committing else None, keep=self.results is not None)
        index_tiles = self.query.keep_tiles and indexed.to_write and self.results is not None
        tiles_out = RowStream(self.results.add_tiles if committing and index_tiles else None, keep=index_tiles)
        if stored is not None:
            embeddings = batches(stored, batch_size)
        else:
            embeddings = embed_grid(
                lambda: open_slide(slide_path, mpp=grid.mpp),
                grid,
                self.model,
                device=self.device,
                precision=self.precision,
                batch_size=batch_size,
                workers=default_read_workers() if self.query.workers is None else self.query.workers,
                progress=progress,
                where=run.slide,
            )
        if index_tiles:
            embeddings = tapped(embeddings, lambda start, batch: tiles_out.put(self._tile_rows(grid, start, batch, indexed, run)))
        pitch = None if run.spots else self._stride  # spots: their spacing, from the positions
        chunks = answer(embeddings, grid, references, retrieval=self.retrieval, pitch_um=pitch)
        kept: list[np.ndarray] = []
        try:
            for chunk in chunks:
                ids, xy = grid.ids[chunk.rows], grid.xy[chunk.rows]
                if writer is not None:
                    writer.write(ids, xy, chunk.values)
                if keep:
                    kept.append(chunk.values)
                rows_out.put(
                    prediction_rows(
                        run_id=run.run_id,
                        slide=run.slide,
                        ids=ids,
                        xy=xy,
                        mpp=grid.mpp,
                        values=chunk.values,
                        model_id=self.record.model_id,
                        spots_version=references.spots_version,
                        predicate=references.where,
                        k=self.k,
                        created_at=run.created_at,
                        settings=run.settings,
                        genes=self.genes,
                        slide_hash=indexed.identity.digest if indexed.identity is not None else None,
                        embedding_key=indexed.key or None,
                    )
                )
            tiles_out.finish()  # the slide's tiles first: predictions never name an index that is not there
            version = rows_out.finish()
            if writer is not None:
                writer.close()
        except BaseException:
            chunks.close()
            tiles_out.abort()
            rows_out.abort()
            if writer is not None:
                writer.abort()
            raise
        predicted = np.concatenate(kept) if kept else np.zeros((0, len(self.predicted_genes)), np.float32)
        uncommitted = (None, None) if committing else (rows_out.uncommitted, tiles_out.uncommitted)
        return predicted, version, *uncommitted

    def _tile_rows(self, grid: PatchGrid, start: int, batch: np.ndarray, indexed: _Indexed, run: _Run) -> pa.Table:
        rows = slice(start, start + len(batch))
        return tile_rows(
            slide=indexed.identity.row_fields(),
            ids=grid.ids[rows],
            index=np.arange(rows.start, rows.stop),
            xy=grid.xy[rows],
            mpp=grid.mpp,
            model_id=self.record.model_id,
            embedding_key=indexed.key,
            embeddings=batch,
            created_at=run.created_at,
        )


@dataclass(frozen=True)
class _Indexed:
    """A slide as the tiles table knows it: its identity (None: not indexable), the key of its
    embedding settings, and its tiles when they were indexed before."""

    identity: SlideIdentity | None
    key: str
    tiles: pa.Table | None
    names: set = field(default_factory=set)  # the (slide, path) pairs those tiles are indexed under

    @property
    def to_write(self) -> bool:
        """Whether this answer writes the slide's tiles: embedded now, or indexed before only under
        another name or path (a copy of the slide: its rows are written from the stored embeddings,
        so ``similar`` finds it too)."""
        if self.identity is None or not self.identity.readable:
            return False
        return self.tiles is None or (self.identity.name, self.identity.path) not in self.names


@dataclass(frozen=True)
class _Run:
    """What one answer's rows and file record."""

    run_id: str
    slide: str
    created_at: datetime
    settings: str
    provenance: dict
    spots: bool


def open_results(store: Store, *, results_db: str | Path | None, no_store: bool) -> Store | None:
    """The store a query commits its predictions (and resume state) to: ``store`` itself, a
    ``results_db`` of the user's own, or None (``no_store``). A reference store that cannot be
    written is an error now, before the model and the slide are read, naming the two ways out."""
    if no_store and results_db is not None:
        raise InputError("--no-store keeps predictions out of every store; --results-db puts them in another: give one or the other")
    if no_store:
        return None
    if results_db is not None:
        if Store.exists(results_db) or not Path(str(results_db)).exists() or "://" in str(results_db):
            results = Store(results_db, create=True)
        else:
            results = Store(results_db)  # a folder that is not a store: refused with its own message
        if results.uri == store.uri:
            return store
        why = results.unwritable("predictions")
        if why:
            raise InputError(f"--results-db {results_db}: {why}")
        return results
    why = store.unwritable("predictions")
    if why:
        raise InputError(
            f"the store at {store.uri} is read-only ({why}): pass --no-store to write only --out, or --results-db PATH to keep the predictions in a store of your own"
        )
    return store


def open_query(db: str | Path, options: QueryOptions | None = None, *, also: Sequence[str] = (), log: Log = _quiet, **fields) -> QuerySession:
    """Load what a query's slides share, once (see :func:`query`): ``options`` (a
    :class:`~histoindex.api.options.QueryOptions`, or its fields as keywords). The tile grid's
    pitch is ``stride_um`` or, by default, :func:`histoindex.patch.default_stride_um` of the
    platforms of the references the filters leave. ``k`` and ``smooth`` override the model's
    retrieval settings (:class:`~histoindex.config.RetrievalSettings`). ``genes``: what to predict
    (:func:`predicted_genes`; default the model's genes): any gene a searched reference measured;
    ``also``: genes predicted besides (``query --plot``: a gene drawn is a gene predicted).
    Predictions are committed to ``db`` itself, or to ``results_db`` (a store of the user's own,
    created if new: a shared reference store stays read-only), or nowhere with ``no_store`` (the
    ``--out`` files only); a reference store that cannot be written is said before anything loads."""
    from ..embed import resolve_device, resolve_precision

    options = QueryOptions.of(options, **fields)
    store = Store(db)
    results = open_results(store, results_db=options.results_db, no_store=options.no_store)
    version = store.table("spots", version=options.as_of).version  # a number or a tag
    record = store.query_model(version=version, model_id=options.model_id)
    cfg = record.cfg
    torch_device = resolve_device(options.device)
    precision = resolve_precision(options.precision, torch_device)
    tissue, platform, species = options.tissue, options.platform, options.species
    scope = Scope(model_id=record.model_id, tissue=tissue, platform=platform, species=species, where=options.where)
    check_filter_values(store, version=version, model_id=record.model_id, tissue=tissue, platform=platform, species=species)
    genes = predicted_genes(options.genes, cfg.genes, also=also)
    references = References(store, scope, version=version, mode=options.search_mode, device=str(torch_device), genes=genes)  # a bad filter fails here
    retrieval = _retrieval(cfg, references, options, log)
    if options.views is not None:  # fewer views: faster (each view is a backbone pass), a little less accurate
        cfg = cfg.replace(views=options.views)
    if options.stride_um is not None:
        stride, rule = check_stride(options.stride_um, cfg.patch_um), "--stride-um"
    else:  # the references' spot pitch when they are of one platform (one column scan of the filtered rows)
        platforms = [platform] if platform is not None else store.distinct("spots", "platform", where=references.where, version=version)
        stride, rule = default_stride_um(platforms, cfg.patch_um)
    asked = options.asked(genes)
    if results is not None and results is not store:  # predictions kept apart: their rows say which reference store answered
        asked["reference_db"] = store.uri
    return QuerySession(
        store=store, record=record, cfg=cfg, model=None, references=references, k=retrieval.k, device=torch_device, precision=precision,
        stride_um=stride, stride_rule=rule, retrieval=retrieval, options=asked, results=results, genes=genes, query=options,
    )  # fmt: skip


def _retrieval(cfg, references: References, options: QueryOptions, log: Log) -> RetrievalSettings:
    """The model's retrieval settings with the query's ``k`` / ``smooth``; k no more than the references."""
    retrieval = cfg.retrieval_settings.replace(k=options.k, smooth=options.smooth)
    k_eff = min(retrieval.k, references.n)
    if k_eff < retrieval.k:
        said = f"--k {options.k}" if options.k is not None else f"the model's k {retrieval.k}"
        log(f"warning: {said} is more than the {references.n} reference spots that match; averaging all {references.n}")
    return retrieval.replace(k=k_eff)


def predicted_genes(genes: Sequence[str] | str | None, panel: Sequence[str], *, also: Sequence[str] = ()) -> tuple[str, ...] | None:
    """The genes a query predicts: ``genes`` (names, ``"A,B"``, a gene-list file, or ``"all"``:
    every gene a searched reference measured, resolved by
    :class:`~histoindex.search.References`), default the model's ``panel``, then ``also``; without
    repeats, in order. None when that is the model's panel (read from the ``expression`` column,
    so outputs stay as they were)."""
    from ..genes import read_gene_list

    extra = [str(g) for g in also]
    if genes is None:
        names = list(dict.fromkeys([*panel, *extra]))
        return None if len(names) == len(panel) else tuple(names)
    if isinstance(genes, str):
        genes = [genes]
    names: list[str] = []
    for item in genes:
        item = str(item).strip()
        if item and Path(item).is_file():
            names += read_gene_list(item)
        else:
            names += [g.strip() for g in item.split(",") if g.strip()]
    if not names:
        raise InputError("--genes names no gene: give symbols (FASN,ERBB2), a file of one symbol per line, or all")
    if names == ["all"]:
        return ("all",)  # with ``also``: those are among all
    names = list(dict.fromkeys([*names, *extra]))
    return None if tuple(names) == tuple(panel) else tuple(names)


def _measured_summary(references: References) -> dict:
    """Provenance for genes some searched dataset did not measure: which did (a tile's value of
    such a gene is the mean over its neighbours from those datasets; NaN where none was)."""
    partial = {g: by for g, by in references.measured_by.items() if len(by) < len(references.dataset_names)}
    if not partial:
        return {}
    return {"measured_by": {g: {"datasets": by, "of": len(references.dataset_names)} for g, by in partial.items()}}


#: slide files above this size get a line before they are opened (decoding a large JPEG takes seconds)
LARGE_SLIDE_BYTES = 20_000_000


def spots_pixel_size(spots: str | Path, xy: np.ndarray, *, slide: str, platform: str | None, session: QuerySession, log: Log = _quiet) -> float:
    """µm per pixel for ``query --spots`` on a slide with none in its metadata: from a spots
    ``.h5ad`` by the rules references follow (:func:`histoindex.io.pixelsize.reference_pixel_size`:
    spot pitch from array coordinates or spacing, else ``spot_diameter_fullres``), the one function
    references are read through too. The spots' lattice decides the platform (``--platform`` must
    agree with it); when it does not tell, the references' platform (when they are of one)."""
    from ..io.h5ad import h5ad_pixel_size

    if Path(spots).suffix.lower() != ".h5ad":
        raise InputError(
            f"{slide} has no pixel size (µm per pixel) in its metadata, and {Path(spots).name} carries none (an .h5ad with its spot layout does); pass --mpp"
        )
    default = None
    if platform is None:  # for spots whose layout shows no lattice
        refs = session.references
        platforms = session.store.distinct("spots", "platform", where=refs.where, version=refs.spots_version)
        default = str(platforms[0]) if len(platforms) == 1 else None
    size = h5ad_pixel_size(spots, xy_px=xy, platform=platform, default_platform=default)
    log(f"{slide} has no pixel size in its metadata: {size.mpp:.4g} µm/px from {Path(spots).name} ({size.source})")
    return size.mpp


def check_query_inputs(slide_path: str | Path, *, mpp: float | None, spots: str | Path | None, where: str | None = None, log: Log = _quiet) -> None:
    """What a query can check from its arguments and the slide's header alone: the slide opens, has a
    pixel size (its own, ``--mpp``, HEST's metadata, or one ``--spots`` may give) and the positions
    file reads. Cheap (no pixel decoded, no model), so a mistake fails before minutes of loading."""
    from ..io.slides import probe_slide

    if where is not None:
        check_where(where)
    _, _, slide_mpp = probe_slide(slide_path, mpp=mpp)
    name = Path(slide_path).name
    if slide_mpp is None and spots is None and hest_slide_mpp(slide_path) is None:
        raise InputError(f"{name} has no pixel size (µm per pixel) in its metadata; pass --mpp (e.g. --mpp 0.5 for a 20x scan)")
    if spots is not None:
        read_positions(spots)
        if slide_mpp is None and Path(spots).suffix.lower() != ".h5ad":
            raise InputError(
                f"{name} has no pixel size (µm per pixel) in its metadata, and {Path(spots).name} carries none (an .h5ad with its spot layout does); pass --mpp"
            )


def _check_request(
    slide_path: str | Path, *, out: str | Path | None, mpp: float | None, spots, where: str | None, results: Store | None, log: Log
) -> Path | None:
    """A slide request's cheap checks (the output path, the slide's header, the positions file), in
    the first second, before the model loads; the ``out`` file checked. A slide file that cannot
    be read now but was indexed into ``results`` is not probed: its tiles may answer."""
    if out is not None:
        out = check_output_path(out)
    if indexed_unreadable(slide_path, results):
        if where is not None:
            check_where(where)
        if spots is not None:
            read_positions(spots)
    else:
        check_query_inputs(slide_path, mpp=mpp, spots=spots, where=where, log=log)
    if out is not None and out.exists():  # as scanpy's write_h5ad and pandas' to_parquet do: replaced, but said
        log(f"{out} exists: it is replaced when this query finishes")
    return out


def _results_store(db: str | Path, options: QueryOptions) -> Store | None:
    """The store a query's predictions and tiles go to, if it exists already (opened, nothing loaded)."""
    uri = None if options.no_store else options.results_db if options.results_db is not None else db
    return Store(uri) if uri is not None and Store.exists(uri) else None


def query(
    slide_path: str | Path,
    *,
    db: str | Path,
    out: str | Path | None = None,
    spots: str | Path | None = None,
    mpp: float | None = None,
    plot: Sequence[str] = (),
    keep_predictions: bool = True,
    progress: Progress | None = None,
    log: Log = _quiet,
    **options,
) -> QueryResult:
    """Impute expression over a slide (tissue tiles of the model's patch size, or the positions in
    ``spots``) by top-k retrieval against the reference expression embeddings; ``options``: the
    fields of :class:`~histoindex.api.options.QueryOptions` (filters, k, genes, device, …), or
    ``options=QueryOptions(...)``. Each gene in ``plot`` is drawn from ``out`` into
    ``<out stem>.<gene>.png`` beside it. One call, one slide: for many, :func:`open_query` once,
    then :meth:`QuerySession.answer` per slide (or :func:`histoindex.api.query_cohort`).

    The tiles are windows of the patch size centred on a grid of pitch ``stride_um`` (they overlap
    when it is finer than the patch; default: the references' spot pitch when they are of one
    platform, else the patch size; see :func:`histoindex.patch.default_stride_um`).

    The slide streams through: ``workers`` background threads read patches ahead, the model embeds
    them in batches (``precision``: auto / fp32 / bf16), and every ``SEARCH_CHUNK`` tiles are
    searched, imputed and written, so memory stays flat however large the slide. ``out`` and the
    ``predictions`` table (one new version) appear only when the whole slide is done; with
    ``keep_predictions=False`` the result carries no prediction matrix."""
    given = options.pop("options", None)
    query_options = QueryOptions.of(given, **options)  # a bad option fails here, before anything is read
    out = _check_request(slide_path, out=out, mpp=mpp, spots=spots, where=query_options.where, results=_results_store(db, query_options), log=log)
    if spots is not None and query_options.stride_um is not None:
        raise InputError("--stride-um sets the pitch of the tile grid; --spots predicts at the given positions instead: give one or the other")
    log(f"query {slide_path}: opening the store, loading the model…")  # the libraries and the model take seconds
    session = open_query(db, query_options, also=plot, log=log)
    request = CohortSlide(str(slide_path))
    return session._answer(request, out, spots=spots, mpp=mpp, plot=plot, keep_predictions=keep_predictions, commit=True, progress=progress, log=log)
