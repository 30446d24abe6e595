"""The public API: one module per verb, each a short orchestration of the stage modules
(read → patch → embed → store → search → impute → write), and each verb's options as one value
(:mod:`histoindex.api.options`). Every verb validates its inputs before touching the store, so a
bad input leaves the store exactly as it was.

torch and timm (seconds to import) load only inside the verbs that run a model, so ``sql``,
``versions`` and ``info`` start fast."""

from __future__ import annotations

from ..config import ModelConfig
from ..data import SPOT_DIAMETER_UM
from ..errors import InputError, StoreError
from ..io.readers import read_reference
from ..recipe import DEFAULT_WEIGHTS, TrainOptions
from .analysis import check_sql_output, evaluate, plot, sql
from .cohort import CohortResult, cohort_outputs, cohort_slides, plan_cohort, query_cohort, read_slide_manifest, settings_difference
from .common import Log, Progress, _quiet, default_read_workers, quiet
from .ingestion import (
    EmbedMany,
    HestSelection,
    IngestResult,
    ReferenceEmbedder,
    check_trained_pixel_size,
    ingest,
    ingest_hest,
    ingest_many,
    reference_profiles,
    warn_missing_genes,
)
from .options import ANSWER_OPTIONS, CohortOptions, CohortSlide, IngestOptions, QueryOptions, answer_settings
from .querying import QueryResult, QuerySession, check_query_inputs, open_query, open_results, predicted_genes, query, spots_pixel_size
from .similar import SimilarOptions, SimilarResult, similar
from .training import TrainResult, train
from .upkeep import COMPACT_DEFAULT_DAYS, compact, create_index, delete, info, restore, versions

__all__ = [
    "ANSWER_OPTIONS",
    "COMPACT_DEFAULT_DAYS",
    "DEFAULT_WEIGHTS",
    "SPOT_DIAMETER_UM",
    "CohortOptions",
    "CohortResult",
    "CohortSlide",
    "EmbedMany",
    "HestSelection",
    "IngestOptions",
    "IngestResult",
    "InputError",
    "Log",
    "ModelConfig",
    "Progress",
    "QueryOptions",
    "QueryResult",
    "QuerySession",
    "ReferenceEmbedder",
    "SimilarOptions",
    "SimilarResult",
    "StoreError",
    "TrainOptions",
    "TrainResult",
    "_quiet",
    "answer_settings",
    "check_query_inputs",
    "check_sql_output",
    "check_trained_pixel_size",
    "cohort_outputs",
    "cohort_slides",
    "compact",
    "create_index",
    "default_read_workers",
    "delete",
    "evaluate",
    "info",
    "ingest",
    "ingest_hest",
    "ingest_many",
    "open_query",
    "open_results",
    "plan_cohort",
    "plot",
    "predicted_genes",
    "query",
    "query_cohort",
    "quiet",
    "read_reference",
    "read_slide_manifest",
    "reference_profiles",
    "restore",
    "settings_difference",
    "similar",
    "spots_pixel_size",
    "sql",
    "train",
    "versions",
    "warn_missing_genes",
]
