"""Reading H&E images: whole-slide formats through OpenSlide (tiffslide as fallback), plain images
through Pillow, and in-memory arrays. Every reader answers the same three questions: size,
micrometres per pixel, and an RGB region at a requested output size."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from ..errors import InputError
from ._guard import reader


@contextlib.contextmanager
def _large_images_allowed():
    """H&E JPEGs are routinely larger than Pillow's decompression-bomb guard: lift it while a slide
    is read, not for the whole process."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


WSI_SUFFIXES = {".svs", ".ndpi", ".tif", ".tiff", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"}
PLAIN_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}


class Slide(Protocol):
    path: Path | None
    width: int
    height: int
    mpp: float | None

    def read_region(self, x: float, y: float, size: float, out_px: int) -> np.ndarray:
        """RGB uint8 (out_px, out_px, 3) of the square with top-left (x, y) and side ``size`` in
        level-0 pixels; areas outside the image are white."""

    def thumbnail(self, max_side: int) -> np.ndarray:
        """RGB uint8 thumbnail whose longer side is at most ``max_side``."""

    def close(self) -> None: ...


def _paste_region(img: np.ndarray, x: float, y: float, size: float, out_px: int) -> np.ndarray:
    """Crop a square from an in-memory RGB array (white outside) and resize it."""
    h, w = img.shape[:2]
    x0, y0 = int(round(x)), int(round(y))
    s = max(1, int(round(size)))
    out = np.full((s, s, 3), 255, np.uint8)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + s, w), min(y0 + s, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = img[sy0:sy1, sx0:sx1, :3]
    if s != out_px:
        out = np.asarray(Image.fromarray(out).resize((out_px, out_px), Image.BILINEAR))
    return out


class ArraySlide:
    """An image held in memory (a plain JPEG/PNG, or an hires image from an h5ad)."""

    def __init__(self, array: np.ndarray, *, mpp: float | None = None, path: Path | None = None):
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        if array.dtype != np.uint8:  # scanpy stores hires images as float in [0, 1]
            scale = 255.0 if array.max() <= 1.0 else 1.0
            array = np.clip(array * scale, 0, 255).astype(np.uint8)
        self.array = np.ascontiguousarray(array[..., :3])
        self.path = path
        self.height, self.width = self.array.shape[:2]
        self.mpp = mpp

    def read_region(self, x: float, y: float, size: float, out_px: int) -> np.ndarray:
        return _paste_region(self.array, x, y, size, out_px)

    def thumbnail(self, max_side: int) -> np.ndarray:
        img = Image.fromarray(self.array)
        img.thumbnail((max_side, max_side), Image.BILINEAR)
        return np.asarray(img)

    def close(self) -> None:
        pass


class WholeSlide:
    """A pyramidal slide read through OpenSlide, or tiffslide where OpenSlide cannot open it."""

    def __init__(self, path: Path, *, mpp: float | None = None):
        self.path = path
        with _tifffile_quiet():  # a damaged TIFF makes tifffile log a stray line of its own; the error below says it
            self._osr = self._open(path)
        try:
            self.width, self.height = (int(v) for v in self._osr.dimensions)
            self.mpp = mpp if mpp is not None else self._metadata_mpp()
        except Exception as exc:  # opened, but its header describes no readable image
            self._osr.close()
            raise InputError(f"slide {path} is damaged or truncated: its header describes no readable image ({type(exc).__name__}: {exc})") from exc
        if self.width <= 0 or self.height <= 0:
            self._osr.close()
            raise InputError(f"slide {path} has no pixels ({self.width}×{self.height})")

    @staticmethod
    def _open(path: Path):
        errors = []
        try:
            import openslide

            return openslide.OpenSlide(str(path))
        except Exception as exc:  # unsupported format, or the native library is missing
            errors.append(f"OpenSlide: {exc}")
        try:
            import tiffslide

            return tiffslide.TiffSlide(str(path))
        except Exception as exc:
            errors.append(f"tiffslide: {exc}")
        raise InputError(f"cannot open slide {path}: " + "; ".join(errors))

    def _metadata_mpp(self) -> float | None:
        props = self._osr.properties
        for key in ("openslide.mpp-x", "tiffslide.mpp-x"):
            value = props.get(key)
            if value not in (None, ""):
                mpp = float(value)
                if mpp > 0:
                    return mpp
        # generic TIFF: resolution tags (pixels per centimetre or inch)
        res, unit = props.get("tiff.XResolution"), str(props.get("tiff.ResolutionUnit", "")).lower()
        if res and float(res) > 0 and unit in ("centimeter", "inch", "3", "2"):
            per_um = float(res) / (1e4 if unit in ("centimeter", "3") else 25400.0)
            mpp = 1.0 / per_um
            if mpp < 50:  # 72 dpi screen defaults say nothing about a microscope
                return mpp
        return None

    def read_region(self, x: float, y: float, size: float, out_px: int) -> np.ndarray:
        downsample = max(size / out_px, 1.0)
        level = self._osr.get_best_level_for_downsample(downsample)
        level_ds = self._osr.level_downsamples[level]
        side = max(1, int(round(size / level_ds)))
        try:
            region = self._osr.read_region((int(round(x)), int(round(y))), level, (side, side))
        except Exception as exc:  # a damaged tile: name the file and place, not a library traceback
            raise InputError(f"cannot read {self.path.name} at ({x:.0f}, {y:.0f}) px, level {level} (is the file truncated or damaged?): {exc}") from exc
        region = region.convert("RGBA")
        white = Image.new("RGBA", region.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, region).convert("RGB")  # transparent = outside the scan
        if side != out_px:
            rgb = rgb.resize((out_px, out_px), Image.BILINEAR)
        return np.asarray(rgb)

    def thumbnail(self, max_side: int) -> np.ndarray:
        try:
            img = self._osr.get_thumbnail((max_side, max_side)).convert("RGB")
        except Exception as exc:
            raise InputError(f"cannot read a thumbnail of {self.path.name} (is the file truncated or damaged?): {exc}") from exc
        return np.asarray(img)

    def close(self) -> None:
        self._osr.close()


@contextlib.contextmanager
def _tifffile_quiet():
    import logging

    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


#: files that are references or positions, never slides: named in the error when given as one
ANNDATA_SUFFIXES = {".h5ad", ".h5", ".zarr", ".loom"}


@reader("a slide or image")
def probe_slide(path: str | Path, *, mpp: float | None = None) -> tuple[int, int, float | None]:
    """``(width, height, mpp)`` of a slide from its header alone (no pixel is decoded), with every
    error :func:`open_slide` would give: a command checks its slide with this before it loads a
    model, so a wrong path, a reference given as a slide, a bad ``--mpp`` or a damaged file fail in
    the first second."""
    path = Path(path)
    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise InputError(f"--mpp must be a positive number of micrometres per pixel, got {mpp}")
    if not path.exists():
        raise InputError(f"slide not found: {path}")
    suffix = path.suffix.lower()
    if suffix in ANNDATA_SUFFIXES:
        raise InputError(
            f"{path.name} is a reference/positions file, not a slide: give the slide image (.svs, .tif, .jpg, …), "
            f"and {path.name} as --spots to predict at its positions (or `histoindex ingest` it as a reference)"
        )
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a slide file")
    if suffix in PLAIN_SUFFIXES:
        try:
            with _large_images_allowed(), Image.open(path) as img:
                width, height = img.size
        except Exception as exc:
            raise InputError(f"cannot read image {path}: {exc}") from exc
        return width, height, mpp
    slide = open_slide(path, mpp=mpp)
    try:
        return slide.width, slide.height, slide.mpp
    finally:
        slide.close()


@reader("a slide or image")
def open_slide(path: str | Path, *, mpp: float | None = None) -> Slide:
    """Open a slide or image file. ``mpp`` overrides the pixel size found in its metadata.

    Whole-slide formats (.svs, .ndpi, .tif(f), ...) go through OpenSlide/tiffslide; .jpg/.png through
    Pillow (their DPI tags are not microscope calibrations, so they carry no pixel size).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"image not found: {path}")
    if mpp is not None and not mpp > 0:
        raise InputError(f"--mpp must be positive, got {mpp}")
    suffix = path.suffix.lower()
    if suffix in WSI_SUFFIXES:
        return WholeSlide(path, mpp=mpp)
    if suffix in PLAIN_SUFFIXES:
        try:
            with _large_images_allowed(), Image.open(path) as img:
                array = np.asarray(img.convert("RGB"))
        except Exception as exc:
            raise InputError(f"cannot read image {path}: {exc}") from exc
        return ArraySlide(array, mpp=mpp, path=path)
    raise InputError(f"unsupported image type {suffix!r} for {path}; expected one of {', '.join(sorted(WSI_SUFFIXES | PLAIN_SUFFIXES))}")


@reader("an image")
def image_overview(path: str | Path, *, max_side: int = 1024) -> tuple[int, int, np.ndarray]:
    """An image's level-0 ``(width, height)`` and an RGB thumbnail whose longer side is at most
    ``max_side`` (JPEGs are decoded at reduced scale, so a large one costs little)."""
    path = Path(path)
    if path.suffix.lower() not in PLAIN_SUFFIXES:
        slide = open_slide(path)
        try:
            return slide.width, slide.height, slide.thumbnail(max_side)
        finally:
            slide.close()
    if not path.exists():
        raise InputError(f"image not found: {path}")
    try:
        with _large_images_allowed(), Image.open(path) as img:
            width, height = img.size
            img.draft("RGB", (max_side, max_side))  # JPEG: decode at 1/2, 1/4 or 1/8 scale
            thumb = img.convert("RGB")
            thumb.thumbnail((max_side, max_side), Image.BILINEAR)
            return width, height, np.asarray(thumb)
    except Exception as exc:
        raise InputError(f"cannot read image {path}: {exc}") from exc


@reader("an image")
def image_mpp(path: str | Path) -> float | None:
    """Pixel size from an image's metadata, without decoding plain images (which have none)."""
    path = Path(path)
    if path.suffix.lower() in PLAIN_SUFFIXES:
        if not path.exists():
            raise InputError(f"image not found: {path}")
        return None
    slide = open_slide(path)
    try:
        return slide.mpp
    finally:
        slide.close()


def write_pyramidal_tiff(path: str | Path, image: np.ndarray, *, mpp: float | None, tile: int = 256, levels: int | None = None) -> Path:
    """Write an RGB array as a tiled, JPEG-compressed pyramidal TIFF that OpenSlide reads as a
    generic TIFF, with its pixel size in the resolution tags (none when ``mpp`` is None)."""
    import tifffile

    path = Path(path)
    if levels is None:
        levels = 1
        while max(image.shape[:2]) / 2**levels >= tile:
            levels += 1
    res = (1e4 / mpp, 1e4 / mpp) if mpp else None  # pixels per centimetre
    with tifffile.TiffWriter(path, bigtiff=image.nbytes > 2**31) as tif:
        level_img = image
        for level in range(levels):
            tif.write(
                level_img,
                photometric="rgb",
                tile=(tile, tile),
                compression="jpeg",
                compressionargs={"level": 90},
                resolution=(res[0] / 2**level, res[1] / 2**level) if res else None,
                resolutionunit="CENTIMETER" if res else None,
                subfiletype=0 if level == 0 else 1,
                metadata=None,
            )
            if level + 1 < levels:
                h, w = level_img.shape[:2]
                level_img = np.asarray(Image.fromarray(level_img).resize((max(1, w // 2), max(1, h // 2)), Image.BILINEAR))
    return path


def file_sha256(path: str | Path, *, block: int = 8 << 20) -> str:
    """sha256 of a file's bytes, read in blocks (a slide of a few GB hashes in seconds)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()
