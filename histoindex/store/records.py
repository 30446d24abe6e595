"""Model records: the models table (each model's config, metrics and safetensors weights, one row
per model), which models the spots were embedded by, and which one an ingest or a query uses."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa

from ..config import ModelConfig
from ..errors import StoreError, UnknownValue
from ..schemas import conform, layout
from .rows import sql_literal
from .writes import WRITE_TIMEOUT, _Writes

#: the models column holding the safetensors bytes: read for one model at a time, never when listing
WEIGHTS = "weights"


@dataclass(frozen=True)
class ModelRecord:
    """A registered model, without its weights: :meth:`weights` reads them from the store."""

    model_id: str
    cfg: ModelConfig
    created_at: datetime
    train_datasets: tuple[str, ...]
    metrics: dict
    _fetch: Callable[[str], bytes] = field(repr=False, compare=False)

    def weights(self) -> bytes:
        """The model's safetensors bytes (``load_model(record.cfg, record.weights())``)."""
        return self._fetch(self.model_id)


def _model_config(model_id: str, text: str) -> ModelConfig:
    try:
        return ModelConfig.from_json(text)
    except Exception as exc:  # a models row edited by hand, or written by other code
        raise StoreError(f"model {model_id}: its config_json is not a histoindex model config ({type(exc).__name__}: {exc})") from exc


class _Records(_Writes):
    """The models a store holds, and the models its spots use."""

    # ---- models -------------------------------------------------------------------------
    def _models_table(self, *, create: bool = False):
        tbl = self.table("models", create=create)
        if WEIGHTS not in tbl.schema.names:
            raise StoreError(
                f"the models table at {self.uri} predates weights kept in the table (models schema "
                f"version {layout('models').schema_version}); train the model again into a new store"
            )
        return tbl

    def add_model(self, model, cfg: ModelConfig, *, metrics: dict, train_datasets: list[str]) -> tuple[str, int]:
        """Register the model, weights included (one row, one commit); returns (model_id, models version)."""
        from ..models import state_digest, weights_bytes  # torch: only when a model is written

        model_id = f"{cfg.method}-{state_digest(model, cfg)}"
        row = {
            "model_id": model_id,
            "method": cfg.method,
            "backbone": cfg.backbone,
            "created_at": datetime.now(timezone.utc),
            "genes": list(cfg.genes),
            "train_datasets": list(train_datasets),
            "config_json": cfg.to_json(),
            "metrics_json": json.dumps(metrics),
            WEIGHTS: weights_bytes(model, cfg),
        }
        self._models_table(create=True)
        data = conform("models", pa.Table.from_pylist([row], schema=layout("models").schema))

        def write(tbl) -> int:
            return tbl.merge_insert("model_id").when_matched_update_all().when_not_matched_insert_all().execute(data, timeout=WRITE_TIMEOUT).version

        return model_id, self._commit("models", f"model {model_id}", write)

    def model_weights(self, model_id: str) -> bytes:
        """The safetensors bytes of model ``model_id`` (only that row's weights are read)."""
        rows = self._models_table().search().where(f"model_id = {sql_literal(model_id)}").select([WEIGHTS]).limit(None).to_arrow()
        if rows.num_rows == 0:
            raise UnknownValue(f"no model {model_id!r} in the store at {self.uri}")
        return rows.column(WEIGHTS)[0].as_py()

    def models(self) -> list[ModelRecord]:
        """Every registered model, oldest first (without reading any weights)."""
        if not self.has_table("models"):
            return []
        tbl = self.table("models")
        columns = [name for name in tbl.schema.names if name != WEIGHTS]
        rows = tbl.search().select(columns).limit(None).to_arrow().to_pylist()
        rows.sort(key=lambda r: r["created_at"])
        return [
            ModelRecord(
                model_id=r["model_id"],
                cfg=_model_config(r["model_id"], r["config_json"]),
                created_at=r["created_at"],
                train_datasets=tuple(r["train_datasets"]),
                metrics=json.loads(r["metrics_json"]),
                _fetch=self.model_weights,
            )
            for r in rows
        ]

    def model(self, model_id: str | None = None) -> ModelRecord:
        """The model ``model_id``, or the newest one."""
        records = self.models()
        if not records:
            raise StoreError(f"the store at {self.uri} has no model; run `histoindex train` or `histoindex ingest`")
        if model_id is None:
            return records[-1]
        for record in records:
            if record.model_id == model_id:
                return record
        raise UnknownValue(f"no model {model_id!r}; models: {', '.join(r.model_id for r in records)}")

    # ---- which model -------------------------------------------------------------------
    def ingest_model(self, model_id: str | None = None, *, log: Callable[[str], None] = lambda _: None) -> str | None:
        """The model an ingest embeds with: ``model_id`` if given; else the one model the store's
        spots already use (never silently a newer one: spots of two models are two embedding spaces,
        and a query searches one); else, with no spots yet, the newest model; None when the store has
        no model (the ingest trains one)."""
        models = self.models()
        if model_id is not None:
            self.model(model_id)  # an unknown id is an error that lists the known ones
            return model_id
        in_use = self.spot_models()
        if len(in_use) > 1:
            listed = "; ".join(f"{m} ({', '.join(d)})" for m, d in in_use.items())
            raise StoreError(f"the store's spots were embedded by {len(in_use)} models: {listed}; pass --model to choose one")
        if in_use:
            (chosen,) = in_use
            newest = models[-1].model_id if models else chosen
            if newest != chosen:
                log(f"embedding with {chosen}, the model the store's spots use; the newer model {newest} has none (pass --model {newest} to ingest under it)")
            return chosen
        return models[-1].model_id if models else None

    def query_model(self, *, version: int | str | None = None, model_id: str | None = None) -> ModelRecord:
        """The model a query searches: ``model_id`` (which must have spots at ``version``), else the one
        model the spots at ``version`` were embedded by; several is an error naming them."""
        in_use = self.spot_models(version=version)
        at = f"spots@{version if version is not None else 'latest'}"
        if model_id is not None:
            record = self.model(model_id)
            if model_id not in in_use:
                raise StoreError(f"{at} holds no spots embedded by model {model_id}; models with spots: {', '.join(in_use) or 'none'}")
            return record
        if not in_use:
            raise StoreError(f"{at} holds no spots of any registered model; ingest a reference first")
        if len(in_use) > 1:
            listed = "; ".join(f"{m} ({', '.join(d)})" for m, d in in_use.items())
            raise StoreError(f"{at} holds spots of {len(in_use)} models (separate embedding spaces): {listed}; pass --model")
        (only,) = in_use
        return self.model(only)

    # ---- what each model's spots hold ---------------------------------------------------
    def spot_models(self, *, version: int | str | None = None) -> dict[str, list[str]]:
        """Which models the spots (at ``version``) were embedded by: model id → its datasets."""
        if not self.has_table("spots"):
            return {}
        arrow = self.table("spots", version=version).search().select(["model_id", "dataset"]).limit(None).to_arrow()
        out: dict[str, set[str]] = {}
        for model, dataset in zip(arrow.column("model_id").to_pylist(), arrow.column("dataset").to_pylist()):
            out.setdefault(model, set()).add(dataset)
        return {model: sorted(datasets) for model, datasets in sorted(out.items())}

    def measured_genes(self, *, version: int | str | None = None, where: str | None = None) -> dict[tuple[str, str], list[str]]:
        """(model_id, dataset) → every gene the dataset measured (its ``dataset_genes``, which
        ``profile_index`` counts in), for the datasets of spots at ``version`` (``where``: a
        predicate narrowing them) ingested at schema version 3 or later; older datasets are absent
        (their profile is their ``expression`` over the model's genes)."""
        if not self.has_table("spots"):
            return {}
        tbl = self.table("spots", version=version)
        if "dataset_genes" not in tbl.schema.names:
            return {}
        predicate = "dataset_genes IS NOT NULL" + (f" AND ({where})" if where else "")
        rows = tbl.to_lance().to_table(columns=["model_id", "dataset", "dataset_genes"], filter=predicate)
        return {(m, d): g for m, d, g in zip(*(rows.column(c).to_pylist() for c in ("model_id", "dataset", "dataset_genes")))}
