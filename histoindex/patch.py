"""From positions to pixels: patches of a fixed physical size, tissue detection, tiling grids."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .data import PatchGrid, SpotSet
from .errors import InputError, MissingPixelSize
from .io.pixelsize import SPOT_PITCH_UM
from .io.slides import ArraySlide, Slide, open_slide
from .stain import StainTransform, check_stain, fit_macenko, sample_indices

#: the finest output grid, as a fraction of the window (patch) size: ``--stride-um`` at least patch / 16
MAX_OVERSAMPLING = 16
#: the coarsest default output grid (``query`` without ``--stride-um``): a map a pathologist can read
DEFAULT_MAX_STRIDE_UM = 100.0


def open_spot_image(spots: SpotSet) -> Slide:
    """The image a SpotSet's positions refer to."""
    if spots.image.array is not None:
        return ArraySlide(spots.image.array)
    return open_slide(spots.image.path)


def iter_patches(
    slide: Slide,
    xy: np.ndarray,
    *,
    side_px: float,
    out_px: int,
    scale: float = 1.0,
    batch_size: int = 64,
) -> Iterator[np.ndarray]:
    """Yield uint8 batches (b, out_px, out_px, 3) of squares of ``side_px`` (level-0 pixels of the
    coordinate frame) centred on ``xy``; ``scale`` maps those coordinates onto ``slide``'s pixels."""
    for start in range(0, len(xy), batch_size):
        chunk = xy[start : start + batch_size] * scale
        size = side_px * scale
        yield np.stack([slide.read_region(x - size / 2, y - size / 2, size, out_px) for x, y in chunk])


def stream_patches(
    open_fn: Callable[[], Slide],
    xy: np.ndarray,
    *,
    side_px: float,
    out_px: int,
    scale: float = 1.0,
    batch_size: int = 64,
    workers: int = 2,
    prefetch: int | None = None,
) -> Iterator[np.ndarray]:
    """:func:`iter_patches` read ahead by ``workers`` background threads, in order.

    Each thread opens its own slide handle with ``open_fn`` (OpenSlide and Pillow release the GIL
    while decoding, so threads overlap reading with the caller's embedding). At most ``prefetch``
    batches (default ``2 × workers``) are held, so memory does not grow with the slide."""
    if workers <= 0:
        slide = open_fn()
        try:
            yield from iter_patches(slide, xy, side_px=side_px, out_px=out_px, scale=scale, batch_size=batch_size)
        finally:
            slide.close()
        return
    local = threading.local()
    handles: list[Slide] = []
    lock = threading.Lock()

    def read(start: int) -> np.ndarray:
        slide = getattr(local, "slide", None)
        if slide is None:
            slide = local.slide = open_fn()
            with lock:
                handles.append(slide)
        return next(iter_patches(slide, xy[start : start + batch_size], side_px=side_px, out_px=out_px, scale=scale, batch_size=batch_size))

    starts = iter(range(0, len(xy), batch_size))
    pending: deque = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="histoindex-read")
    try:
        for start in starts:
            pending.append(pool.submit(read, start))
            if len(pending) >= (prefetch or 2 * workers):
                break
        while pending:
            batch = pending.popleft().result()
            start = next(starts, None)
            if start is not None:
                pending.append(pool.submit(read, start))
            yield batch
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True)
        for slide in handles:
            slide.close()


def stream_spot_patches(spots: SpotSet, *, patch_um: float, patch_px: int, batch_size: int = 64, workers: int = 1) -> Iterator[np.ndarray]:
    """A SpotSet's patches in batches, read ahead in the background (see :func:`stream_patches`)."""
    if spots.image.array is not None:
        shared = ArraySlide(spots.image.array)  # read-only: one copy serves every thread
        open_fn = lambda: shared  # noqa: E731
    else:
        open_fn = lambda: open_slide(spots.image.path)  # noqa: E731
    return stream_patches(open_fn, spots.xy, side_px=patch_um / spots.mpp, out_px=patch_px, scale=spots.image.scale, batch_size=batch_size, workers=workers)


def spot_patches(spots: SpotSet, *, patch_um: float, patch_px: int) -> np.ndarray:
    """All patches of a SpotSet as one uint8 array (n_obs, patch_px, patch_px, 3)."""
    slide = open_spot_image(spots)
    try:
        side = patch_um / spots.mpp
        return np.concatenate(list(iter_patches(slide, spots.xy, side_px=side, out_px=patch_px, scale=spots.image.scale)))
    finally:
        slide.close()


def sample_stain(
    stain: str, open_fn: Callable[[], Slide], xy: np.ndarray, *, side_px: float, out_px: int, scale: float = 1.0, where: str = ""
) -> StainTransform | None:
    """The stain normalisation of one section or slide (None for ``stain="none"``), fitted on the
    patches at :func:`histoindex.stain.sample_indices` of ``xy`` (the same positions whatever reads
    them: training, ingest, evaluation or a query at the same spots)."""
    if check_stain(stain) == "none":
        return None
    slide = open_fn()
    try:
        patches = np.concatenate(list(iter_patches(slide, xy[sample_indices(len(xy))], side_px=side_px, out_px=out_px, scale=scale)))
    finally:
        slide.close()
    return fit_macenko(patches, where=where)


def spot_stain(spots: SpotSet, *, stain: str, patch_um: float, patch_px: int) -> StainTransform | None:
    """:func:`sample_stain` of a reference section, from its spot patches."""
    return sample_stain(
        stain,
        lambda: open_spot_image(spots),
        spots.xy,
        side_px=patch_um / spots.mpp,
        out_px=patch_px,
        scale=spots.image.scale,
        where=spots.source or spots.name,
    )


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold for values in [0, 255]."""
    hist = np.bincount(np.clip(values.ravel(), 0, 255).astype(np.int64), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    bins = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * bins)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(np.argmax(between))


def tissue_mask(thumbnail: np.ndarray) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail: stained pixels (saturation above its Otsu
    threshold: glass and background are grey) that are also not bright (grey level below its Otsu
    threshold, at least 180: this drops pale stain smeared on the glass), then small gaps closed
    and holes filled."""
    from scipy import ndimage

    rgb = thumbnail.astype(np.int16)
    saturation = (rgb.max(axis=-1) - rgb.min(axis=-1)).astype(np.uint8)
    brightness = rgb.mean(axis=-1)
    sat_threshold = max(otsu_threshold(saturation), 8.0)  # a blank slide has no contrast to split
    grey_threshold = max(otsu_threshold(brightness.astype(np.uint8)), 180.0)
    mask = (saturation > sat_threshold) & (brightness < grey_threshold) & (brightness > 20)
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3)), iterations=2)
    return ndimage.binary_fill_holes(mask)


def default_stride_um(platforms: Iterable[str], patch_um: float) -> tuple[float, str]:
    """The default pitch of a query's output grid, and why: the spot pitch of the references'
    platform (Visium 100 µm; :data:`~histoindex.io.pixelsize.SPOT_PITCH_UM`) when every reference
    searched is of that one platform, else the patch size, and never coarser than the patch nor
    than :data:`DEFAULT_MAX_STRIDE_UM` (100 µm: a legacy ST reference's 200 µm pitch would map a
    1.5 mm section in 15 tiles; 100 µm costs what a Visium query costs)."""
    names = sorted({str(p).strip().lower() for p in platforms if p is not None})
    pitch = SPOT_PITCH_UM.get(names[0]) if len(names) == 1 else None
    if pitch is not None and pitch <= min(patch_um, DEFAULT_MAX_STRIDE_UM):
        return float(pitch), f"the {names[0]} spot pitch"
    if pitch is not None:
        why = f"the {names[0]} spot pitch, {pitch:g} µm, is not finer"
    elif len(names) == 1:
        why = f"platform {names[0]!r} has no known spot pitch"
    else:
        why = f"the references mix platforms ({', '.join(names)})" if names else ""
    if patch_um <= DEFAULT_MAX_STRIDE_UM:
        return float(patch_um), "the patch size" + (f": {why}" if why else "")
    return DEFAULT_MAX_STRIDE_UM, f"the default's {DEFAULT_MAX_STRIDE_UM:g} µm limit" + (f": {why}" if why else "") + "; --stride-um sets another"


def check_stride(stride_um: float, patch_um: float) -> float:
    """``stride_um`` if it is a usable output pitch for windows of ``patch_um``: positive, at most
    the patch (a coarser grid would leave unpredicted gaps between windows), and at least
    ``patch_um / MAX_OVERSAMPLING`` (finer only multiplies the windows over each point)."""
    stride = float(stride_um)
    if not (np.isfinite(stride) and stride > 0):
        raise InputError(f"--stride-um must be a positive number of micrometres, got {stride_um}")
    if stride > patch_um:
        raise InputError(
            f"--stride-um {stride:g} is larger than the model's {patch_um:g} µm patch: windows would leave gaps between them; use at most {patch_um:g}"
        )
    if stride < patch_um / MAX_OVERSAMPLING:
        raise InputError(
            f"--stride-um {stride:g} is finer than 1/{MAX_OVERSAMPLING} of the model's {patch_um:g} µm patch ({patch_um / MAX_OVERSAMPLING:g} µm): "
            f"every point would lie under over {MAX_OVERSAMPLING**2} windows for no more detail"
        )
    return stride


def tile_grid(slide: Slide, *, tile_um: float, stride_um: float | None = None, min_tissue: float = 0.5, thumb_side: int = 2048) -> PatchGrid:
    """Windows of ``tile_um`` µm centred on a regular grid of pitch ``stride_um`` (default
    ``tile_um``: tiles side by side) over the slide, kept where at least ``min_tissue`` of the
    stride-sized cell around the centre is tissue (at stride = tile, the tile itself; at a finer
    stride, about "the centre is on tissue"). Every window lies inside the slide: the first centre
    is half a window from the edge, so when the stride divides the tile size, every centre of the
    coarse grid is also one of the finer grid. Ids are ``r{row}_c{col}`` on the grid; centres are
    level-0 pixels."""
    if slide.mpp is None:
        name = slide.path.name if slide.path else "the image"
        raise MissingPixelSize(f"{name} has no pixel size (µm per pixel) in its metadata; pass --mpp (e.g. --mpp 0.5 for a 20x scan)")
    side = tile_um / slide.mpp
    step = side if stride_um is None or stride_um == tile_um else stride_um / slide.mpp
    if not 0 < step <= side:
        raise InputError(f"the grid's stride ({stride_um} µm) must be positive and at most the tile size ({tile_um:g} µm)")
    if step < 1:
        raise InputError(f"--stride-um {stride_um:g} is under one pixel of the slide ({slide.mpp:.3g} µm/px)")
    margin = side - step  # a window reaches this much further than its cell, half on each side
    n_cols, n_rows = int((slide.width - margin) // step), int((slide.height - margin) // step)
    if n_cols <= 0 or n_rows <= 0:
        raise InputError(f"the slide ({slide.width}×{slide.height} px at {slide.mpp:.3g} µm/px) is smaller than one {tile_um:g} µm tile")
    thumb = slide.thumbnail(thumb_side)
    mask = tissue_mask(thumb)
    sy, sx = thumb.shape[0] / slide.height, thumb.shape[1] / slide.width
    # the thumbnail pixels of each cell (at least one), summed from an integral image
    x0 = ((margin / 2 + np.arange(n_cols) * step) * sx).astype(np.int64)
    x1 = np.minimum(np.maximum(((margin / 2 + np.arange(1, n_cols + 1) * step) * sx).astype(np.int64), x0 + 1), mask.shape[1])
    y0 = ((margin / 2 + np.arange(n_rows) * step) * sy).astype(np.int64)
    y1 = np.minimum(np.maximum(((margin / 2 + np.arange(1, n_rows + 1) * step) * sy).astype(np.int64), y0 + 1), mask.shape[0])
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    integral[1:, 1:] = mask.cumsum(axis=0).cumsum(axis=1)
    Y0, X0 = np.meshgrid(y0, x0, indexing="ij")
    Y1, X1 = np.meshgrid(y1, x1, indexing="ij")
    inside = integral[Y1, X1] - integral[Y0, X1] - integral[Y1, X0] + integral[Y0, X0]
    fractions = inside / ((Y1 - Y0) * (X1 - X0))
    rows, cols = np.nonzero(fractions >= min_tissue)  # row-major: the order of the grid
    xy = np.stack([margin / 2 + (cols + 0.5) * step, margin / 2 + (rows + 0.5) * step], axis=1).astype(np.float64)
    ids = np.asarray([f"r{r}_c{c}" for r, c in zip(rows.tolist(), cols.tolist())], dtype=str)
    if len(ids) == 0:
        raise InputError(f"no tissue found on {slide.path.name if slide.path else 'the image'} (Otsu on a thumbnail)")
    return PatchGrid(ids=ids, xy=xy.reshape(-1, 2), mpp=slide.mpp)
