"""Each verb's options as one value: built once (by the CLI or a library user), checked in one place
(``__post_init__``: a bad value fails before anything loads), and recorded as provenance as is.
``TrainOptions`` (the recipe) lives beside the recipe in :mod:`histoindex.recipe`.

A new query option is a field here (and, if it shapes the answer, a name in ``ANSWER_OPTIONS``, so
a cohort re-run with another value predicts again) plus the code that reads it."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.slides import file_sha256
from ..recipe import TrainOptions

#: the query options that shape an answer, besides the model and the spots version (which the
#: predictions rows record in their own columns); device, precision and batch size do not
ANSWER_OPTIONS = ("tissue", "platform", "species", "where", "k", "smooth", "views", "stride_um", "search_mode", "genes", "reference_db")


@dataclass(frozen=True)
class QueryOptions:
    """How a query answers, for every slide it is asked about (see :func:`histoindex.api.open_query`).

    What is searched and how it is averaged (these shape the answer and are recorded with it):
    the ``tissue`` / ``platform`` / ``species`` filters and a SQL ``where`` on the reference spots;
    ``k`` and ``smooth`` (default: the model's retrieval settings); ``views`` (test-time views
    averaged); ``stride_um`` (the tile grid's pitch; default: the references' spot pitch);
    ``search_mode`` (auto / exact / ann); ``genes`` (default: the model's; names, ``"A,B"``, a
    gene-list file, or ``"all"``). Which store state: ``as_of`` (a spots version or tag) and
    ``model_id``. Where answers go: the reference store, ``results_db`` (a store of the user's
    own), or nowhere with ``no_store``; ``keep_tiles``: index the slide's tile embeddings in the
    ``tiles`` table there, so asking the same slide again is search only (``re_embed``: read the
    image even when its tiles are indexed). How it runs (not part of the answer): ``device``,
    ``precision``, ``batch_size``, ``workers`` (background slide readers)."""

    tissue: str | None = None
    platform: str | None = None
    species: str | None = None
    where: str | None = None
    k: int | None = None
    smooth: float | None = None
    views: int | None = None
    stride_um: float | None = None
    search_mode: str = "auto"
    genes: tuple[str, ...] | str | None = None
    as_of: int | str | None = None
    model_id: str | None = None
    results_db: str | Path | None = None
    no_store: bool = False
    keep_tiles: bool = True
    re_embed: bool = False
    device: str | None = None
    precision: str = "auto"
    batch_size: int = 64
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.k is not None and self.k < 1:
            raise InputError(f"--k must be at least 1, got {self.k}")
        if self.smooth is not None and not 0 <= self.smooth <= 1:
            raise InputError(f"--smooth must be between 0 (off) and 1 (the neighbourhood mean), got {self.smooth}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.views is not None and not 1 <= self.views <= 8:
            raise InputError(f"--views must be 1..8, got {self.views}")
        if self.stride_um is not None and not (np.isfinite(self.stride_um) and self.stride_um > 0):
            raise InputError(f"--stride-um must be a positive number of micrometres, got {self.stride_um}")
        if self.no_store and self.results_db is not None:
            raise InputError("--no-store keeps predictions out of every store; --results-db puts them in another: give one or the other")
        if self.genes is not None and not isinstance(self.genes, str):
            object.__setattr__(self, "genes", tuple(str(g) for g in self.genes))
        if isinstance(self.as_of, str) and self.as_of.isdigit():
            object.__setattr__(self, "as_of", int(self.as_of))

    def replace(self, **changes) -> QueryOptions:
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, options: QueryOptions | None = None, **fields) -> QueryOptions:
        """``options`` with ``fields`` replaced (a library call's keywords), or new ones from them."""
        return (options or cls()).replace(**fields) if fields else options or cls()

    def asked(self, genes: Sequence[str] | None) -> dict:
        """The answer-shaping options as asked (``None``: the model's default), ``genes`` as resolved
        (:func:`histoindex.api.predicted_genes`)."""
        asked = {name: getattr(self, name) for name in ANSWER_OPTIONS if name not in ("genes", "reference_db")}
        asked["genes"] = list(genes) if genes is not None else None
        return asked


def answer_settings(options: dict, *, mpp: float | None = None, spots: str | Path | None = None) -> str:
    """What a slide's answer depends on besides the model, the ``spots`` version and the slide's own
    pixels, as canonical JSON: the ``settings`` each prediction row records and the key a cohort
    re-run matches before it skips a slide. The options as asked (``None``: the model's default, which
    the model id fixes), a ``--mpp`` given, and the positions file's content hash."""
    settings = {name: options.get(name) for name in ANSWER_OPTIONS}
    settings["mpp"] = None if mpp is None else float(mpp)
    if spots is not None:
        settings["spots"] = file_sha256(spots)
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class IngestOptions:
    """How references are embedded into ``spots``: with ``model_id`` (default: the model the store's
    spots use), or, in a store with no model yet, a model trained first with ``train_options``; and
    how it runs (``device``, ``batch_size``, ``precision``)."""

    model_id: str | None = None
    train_options: TrainOptions | None = None
    device: str | None = None
    batch_size: int = 64
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")

    @classmethod
    def of(cls, options: IngestOptions | None = None, **fields) -> IngestOptions:
        return dataclasses.replace(options or cls(), **fields) if fields else options or cls()


@dataclass(frozen=True)
class CohortSlide:
    """One slide to answer: its path (or URI), optional pixel size, the name its predictions are
    keyed by (default: the file name) and metadata columns kept with its predictions."""

    path: str
    mpp: float | None = None
    slide_id: str | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.slide_id or Path(self.path).name

    @property
    def stem(self) -> str:
        return self.slide_id or Path(self.path).stem


@dataclass(frozen=True)
class CohortOptions:
    """How a many-slide query runs, besides its :class:`QueryOptions`: ``out_dir`` receives one
    ``<slide stem>.<out_format>`` per slide; ``redo`` predicts slides already predicted with the same
    settings again; ``mpp`` is the pixel size of slides whose files and manifest row give none."""

    out_dir: str | Path | None = None
    out_format: str = "parquet"
    redo: bool = False
    mpp: float | None = None  # checked with each slide (as query --mpp is)

    @classmethod
    def of(cls, options: CohortOptions | None = None, **fields) -> CohortOptions:
        return dataclasses.replace(options or cls(), **fields) if fields else options or cls()
