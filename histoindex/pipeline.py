"""The streaming predict loop: read tiles → backbone features → the method's query encoder →
search → impute, yielding predictions chunk by chunk.

Background threads read patches ahead; the backbone embeds them in batches; the method turns the
features into query embeddings (a graph method, block by block with a halo); every ``SEARCH_CHUNK``
tiles are searched and imputed; then each tile's prediction is blended with its spatial
neighbours' when the retrieval settings say so (a few grid rows held back). Memory stays flat with
slide size."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from .config import RetrievalSettings
from .data import PatchGrid
from .embed import iter_image_features
from .impute import impute, smoothed
from .io.slides import Slide
from .methods import get_method
from .patch import sample_stain, stream_patches
from .search import References, search
from .stain import normalised

#: tiles searched, imputed and written together
SEARCH_CHUNK = 2048

#: ``progress(step, done, total)``: called as a long step advances
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class PredictedChunk:
    """Predictions for grid rows ``rows`` (a slice of the grid, in order)."""

    rows: slice
    values: np.ndarray  # (rows, genes) float32


def embed_grid(
    open_slide: Callable[[], Slide],
    grid: PatchGrid,
    model,
    *,
    device,
    precision: str,
    batch_size: int = 64,
    workers: int = 1,
    progress: Progress | None = None,
    where: str = "",
) -> Iterator[np.ndarray]:
    """The query-space embeddings (the ones the search uses) of every position of ``grid``, batch
    by batch in grid order: patches read ahead by ``workers`` threads, stain-normalised, through
    the backbone and the method's query encoder. Lazy: nothing is read until the first batch is
    asked for."""
    cfg = model.cfg
    method = get_method(cfg.method)
    side_px = cfg.patch_um / grid.mpp
    # the slide's own stain, from a fixed sample of its tiles, mapped to the reference stain
    stain = sample_stain(cfg.stain, open_slide, grid.xy, side_px=side_px, out_px=cfg.patch_px, where=where)
    patches = normalised(
        stream_patches(open_slide, grid.xy, side_px=side_px, out_px=cfg.patch_px, batch_size=batch_size, workers=workers),
        stain,
    )
    features = counted(iter_image_features(model, patches, device=device, precision=precision), "tiles", len(grid), progress)
    yield from method.query_encoder(model, grid.xy * grid.mpp, device=device)(features)


def answer(
    embeddings: Iterable[np.ndarray], grid: PatchGrid, references: References, *, retrieval: RetrievalSettings, pitch_um: float | None = None
) -> Iterator[PredictedChunk]:
    """Search, impute and smooth query ``embeddings`` (in grid order, from :func:`embed_grid` or
    from the ``tiles`` a query indexed before), every ``SEARCH_CHUNK`` rows together."""
    imputed = (impute(search(references, queries, k=retrieval.k), references, retrieval) for queries in rechunk(embeddings, SEARCH_CHUNK))
    done = 0
    for values in smoothed(imputed, grid.xy * grid.mpp, retrieval.smooth, retrieval.smooth_k, pitch_um=pitch_um):
        yield PredictedChunk(rows=slice(done, done + len(values)), values=values)
        done += len(values)


def counted(batches: Iterable[np.ndarray], step: str, total: int, progress: Progress | None) -> Iterator[np.ndarray]:
    """Pass batches through, reporting ``progress(step, rows so far, total)`` from the start."""
    if progress is None:
        yield from batches
        return
    done = 0
    progress(step, 0, total)
    for batch in batches:
        done += len(batch)
        progress(step, done, total)
        yield batch


def rechunk(batches: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Regroup row batches into chunks of ``size`` rows (the last may be smaller)."""
    pending, count = [], 0
    for batch in batches:
        pending.append(batch)
        count += len(batch)
        if count >= size:
            yield np.concatenate(pending)
            pending, count = [], 0
    if pending:
        yield np.concatenate(pending)
