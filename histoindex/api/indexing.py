"""Indexed slides: a query slide's identity (the hash of its bytes), the settings its embeddings
depend on, and its tiles read back from the ``tiles`` table, so a slide embedded once is answered
again by search alone (another filter, k, reference version: nothing of the image is read)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data import PatchGrid
from ..io.slides import file_sha256
from ..store import Store
from .common import Log


@dataclass(frozen=True)
class SlideIdentity:
    """Which slide bytes a query answers: the name its rows are keyed by, the resolved path, the
    sha256 of the bytes, and the size and modification time they were hashed at (-1: the file could
    not be read; its identity is the newest one indexed at that path)."""

    name: str
    path: str
    digest: str
    size: int
    mtime_ns: int
    metadata: dict = field(default_factory=dict)

    @property
    def readable(self) -> bool:
        return self.size >= 0

    def row_fields(self) -> dict:
        return {"name": self.name, "path": self.path, "hash": self.digest, "bytes": self.size, "mtime_ns": self.mtime_ns, "metadata": self.metadata}


def local_file(path: str | Path) -> Path | None:
    """The slide's local path, resolved; None for a URI (remote slides are not indexed)."""
    return None if "://" in str(path) else Path(path).resolve()


def slide_identity(path: str | Path, *, name: str, metadata: dict, store: Store | None, log: Log) -> SlideIdentity | None:
    """The identity of the slide at ``path``: the hash recorded for the same path, size and
    modification time in ``store``'s tiles (nothing read), else the hash of its bytes. A file that
    is gone or unreadable but indexed at that path: the newest identity recorded for it. None when
    the slide cannot be indexed (a URI, no results store) or is unreadable and was never indexed."""
    local = local_file(path)
    if local is None or store is None:
        return None
    try:
        stat = local.stat() if os.access(local, os.R_OK) else None
    except OSError:
        stat = None
    if stat is None:
        known = store.known_slide_hash(str(local), size=None, mtime_ns=None)
        if known is None:
            return None
        log(f"{local.name} cannot be read: answering from the tiles indexed from it (sha256 {known[:12]}…)")
        return SlideIdentity(name, str(local), known, -1, -1, dict(metadata))
    digest = store.known_slide_hash(str(local), size=stat.st_size, mtime_ns=stat.st_mtime_ns) or file_sha256(local)
    return SlideIdentity(name, str(local), digest, stat.st_size, stat.st_mtime_ns, dict(metadata))


def indexed_unreadable(path: str | Path, store: Store | None) -> bool:
    """Whether ``path`` cannot be read now but a query indexed it into ``store`` (so a re-query can
    answer without it, and its header is not probed)."""
    local = local_file(path)
    if local is None or store is None or os.access(local, os.R_OK):
        return False
    return store.known_slide_hash(str(local), size=None, mtime_ns=None) is not None


def embedding_key(cfg, *, stride_um: float | None, spots_digest: str | None, mpp: float | None, precision: str) -> str:
    """What a slide's tile embeddings depend on besides the model and the pixels, as canonical JSON
    (the ``tiles`` rows' ``embedding_key``): views, stain, patch size and pixels, the grid (its
    stride, or the positions file's hash), the pixel size asked for, and the precision."""
    grid = {"spots": spots_digest} if spots_digest is not None else {"stride_um": float(stride_um)}
    key = {
        "views": cfg.views,
        "stain": cfg.stain,
        "patch_um": float(cfg.patch_um),
        "patch_px": int(cfg.patch_px),
        "grid": grid,
        "mpp": None if mpp is None else float(mpp),
        "precision": str(precision),
    }
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def stored_grid(tiles) -> tuple[PatchGrid, np.ndarray]:
    """The grid and the embeddings of an indexed slide's tiles (a ``Store.slide_tiles`` table)."""
    ids = np.asarray(tiles.column("tile_id").to_pylist(), dtype=str)
    xy = np.stack([tiles.column("x").to_numpy(), tiles.column("y").to_numpy()], axis=1)
    mpp = float(tiles.column("mpp")[0].as_py())
    embeddings = tiles.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(tiles.num_rows, -1)
    return PatchGrid(ids=ids, xy=xy, mpp=mpp), np.asarray(embeddings, dtype=np.float32)


def batches(embeddings: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Stored embeddings in the batches a fresh query embeds them in (so they are searched in the same chunks)."""
    for start in range(0, len(embeddings), size):
        yield embeddings[start : start + size]


def tapped(embeddings: Iterable[np.ndarray], on_batch: Callable[[int, np.ndarray], None]) -> Iterator[np.ndarray]:
    """``embeddings`` passed through, each batch also handed to ``on_batch(first row, batch)``."""
    start = 0
    for batch in embeddings:
        on_batch(start, batch)
        start += len(batch)
        yield batch
