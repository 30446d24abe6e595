"""Security through the real CLI on a real store: filter values are data, never SQL; weights never
run code when loaded; a stored model is checked against its weights and against the data before
it is used."""

from __future__ import annotations

import json
import os

import anndata
import lance
import pytest
import torch
from safetensors.torch import save

from histoindex.errors import StoreError
from histoindex.models import load_model
from histoindex.store import Store

from .conftest import TRAIN_ARGS, error_line, run

INJECTION = "x' OR 1=1 --"


def _snapshot(db):
    store = Store(db)
    return store.versions(), {name: store.table(name).count_rows() for name in store.table_names()}


# ---- filter values are matched literally ------------------------------------------------------
def test_filter_values_never_widen_a_query(store, sections):
    model = Store(store).model().model_id
    before = _snapshot(store)
    for option, column, present in (("--tissue", "tissue", "breast"), ("--platform", "platform", "visium"), ("--species", "species", "human")):
        result = run("query", sections.heldout_tif, option, INJECTION, "--db", store, ok=False)
        error_line(result, f'Error: no reference spots with {column} "{INJECTION}" (model {model}); {column} values present: {present}')
    assert _snapshot(store) == before


def test_delete_matches_the_dataset_literally(store, sections):
    before = _snapshot(store)
    result = run("delete", "--dataset", INJECTION, "--db", store, ok=False)
    error_line(result, f'Error: no spots of dataset "{INJECTION}"', "datasets (model): train (")
    assert _snapshot(store) == before, "nothing deleted"

    # a dataset really called that is stored, queried by --where and deleted as itself, alone
    run("ingest", sections.other_h5ad, "--tissue", "breast", "--dataset", INJECTION, "--db", store)
    spots = Store(store).table("spots")
    n_train = spots.count_rows("dataset = 'train'")
    assert spots.count_rows() > n_train
    assert Store(store).versions()["spots"][-1]["what"] == f"ingest of {INJECTION}"
    result = run("delete", "--dataset", INJECTION, "--db", store)
    assert f"spots of {INJECTION}: spots@" in result.stdout
    spots = Store(store).table("spots")
    assert spots.count_rows() == n_train == spots.count_rows("dataset = 'train'")
    assert Store(store).versions()["spots"][-1]["what"] == f"delete of {INJECTION}"


# ---- weights never run code ----------------------------------------------------------------------
class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_a_pickle_that_runs_code_is_refused(sections, tmp_path, suffix):
    marker = tmp_path / "pwned"
    weights = tmp_path / f"evil{suffix}"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _RunsCode(marker)}, weights)
    db = tmp_path / "db"
    result = run("train", sections.train_h5ad, "--db", db, *TRAIN_ARGS[:2], "--weights", weights, *TRAIN_ARGS[4:], ok=False)
    error_line(result, f"Error: refusing to load weights {weights}: it holds Python objects other than tensors", "never arbitrary pickles")
    assert not marker.exists(), "unpickling ran code"
    assert not db.exists()


def test_a_pickle_named_safetensors_is_refused(sections, tmp_path):
    marker = tmp_path / "pwned"
    weights = tmp_path / "evil.safetensors"
    torch.save({"payload": _RunsCode(marker)}, weights)
    result = run("train", sections.train_h5ad, "--db", tmp_path / "db", *TRAIN_ARGS[:2], "--weights", weights, *TRAIN_ARGS[4:], ok=False)
    error_line(result, f"Error: cannot read weights {weights}")
    assert not marker.exists()


# ---- a stored model is checked before use --------------------------------------------------------
def _edit_config(db, **changes):
    store = Store(db)
    record = store.model()
    config = json.loads(record.cfg.to_json()) | changes
    store.table("models").update(where=f"model_id = '{record.model_id}'", values={"config_json": json.dumps(config, sort_keys=True)})
    return record


def test_a_model_whose_config_does_not_match_its_weights_is_refused(store, sections, tmp_path):
    record = _edit_config(store, backbone="resnet18")
    before = _snapshot(store)
    out = tmp_path / "p.parquet"
    result = run("query", sections.heldout_tif, "--tissue", "breast", "--out", out, "--db", store, ok=False)
    error_line(result, "Error: the model's config does not match the config saved with its weights (backbone: resnet18 vs resnet10t", "refusing to use it")
    result = run("ingest", sections.other_h5ad, "--tissue", "breast", "--dataset", "other", "--db", store, ok=False)
    error_line(result, "backbone: resnet18 vs resnet10t")
    assert _snapshot(store) == before and not out.exists()

    # weights without the saved config (written by other code): their tensors are checked instead
    bare = save({k: v for k, v in load_model(record.cfg, record.weights()).state_dict().items()})
    wrong = record.cfg.replace(backbone="resnet18")
    with pytest.raises(StoreError, match=r"the model's weights do not fit its config \(method bleep, backbone resnet18\): .*missing"):
        load_model(wrong, bare)


def test_a_model_config_that_is_not_json_is_refused(store, sections):
    record = Store(store).model()
    Store(store).table("models").update(where=f"model_id = '{record.model_id}'", values={"config_json": "{not json"})
    result = run("query", sections.heldout_tif, "--tissue", "breast", "--db", store, ok=False)
    error_line(result, f"Error: model {record.model_id}: its config_json is not a histoindex model config (JSONDecodeError")


def test_a_reference_missing_most_model_genes_is_refused(store, sections, tmp_path):
    """Some missing genes are zero-filled (test_any_gene); below half of them, nothing is written."""
    genes = Store(store).model().cfg.genes
    dropped = genes[: len(genes) // 2 + 1]
    adata = anndata.read_h5ad(sections.other_h5ad)
    partial = tmp_path / "partial.h5ad"
    adata[:, [g for g in adata.var_names if g not in dropped]].copy().write_h5ad(partial)
    before = _snapshot(store)
    result = run("ingest", partial, "--tissue", "breast", "--db", store, ok=False)
    error_line(result, f"{partial} lacks {len(dropped)} of the model's {len(genes)} genes ({genes[0]}", "at least 50%")
    assert _snapshot(store) == before


def test_a_patch_of_a_few_pixels_is_refused(store, sections):
    """The model's patch is 110 µm; at 20 µm/px that is 5.5 px, upsampled to 64: noise, not tissue."""
    before = _snapshot(store)
    result = run("query", sections.heldout_tif, "--tissue", "breast", "--mpp", "20", "--db", store, ok=False)
    error_line(result, "Error: syn-heldout.tif: the model's 110 µm patch spans only 5.5 px of the image (20 µm/px); at least 8 px are needed")
    result = run("query", sections.heldout_tif, "--tissue", "breast", "--mpp", "20", "--spots", sections.heldout_h5ad, "--db", store, ok=False)
    error_line(result, "the model's 110 µm patch spans only 5.5 px")
    result = run("ingest", sections.other_h5ad, "--tissue", "breast", "--mpp", "20", "--db", store, ok=False)
    error_line(result, f"Error: {sections.other_h5ad} on syn-other.tif: the model's 110 µm patch spans only 5.5 px")
    assert _snapshot(store) == before
    assert lance.dataset(str(store / "spots.lance")).version == before[0]["spots"][-1]["version"]
