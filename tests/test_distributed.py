"""Distributed (DDP) training: two gloo processes on CPU give the same losses and the same model
as one process on the combined batches."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from histoindex import distributed
from histoindex.data import ImageRef, SpotSet
from histoindex.errors import InputError
from histoindex.models import ModelConfig
from histoindex.recipe import train_model

from .conftest import TINY_BACKBONE

WORLD = 2
N_SPOTS, N_GENES = 20, 6
#: dropout 0 and a backbone without batch norm: the only per-process randomness and statistics
BASE = ModelConfig(
    backbone="test_vit", patch_px=32, patch_um=16.0, embed_dim=16, dropout=0.0, genes=tuple(f"G{i}" for i in range(N_GENES)), epochs=3, batch_size=8, seed=3
)
CASES = {
    "end_to_end": BASE,
    "frozen_heads": BASE.replace(freeze_backbone=True),
}


def _reference() -> SpotSet:
    rng = np.random.default_rng(0)
    return SpotSet(
        name="syn",
        X=rng.poisson(5.0, size=(N_SPOTS, N_GENES)).astype(np.float32),
        obs_names=np.array([f"s{i}" for i in range(N_SPOTS)]),
        var_names=np.array(BASE.genes),
        xy=rng.uniform(20, 100, size=(N_SPOTS, 2)),
        mpp=1.0,
        image=ImageRef(array=rng.integers(0, 256, size=(120, 120, 3), dtype=np.uint8)),
        is_counts=True,
    )


def _features() -> np.ndarray:
    """Frozen-backbone features of the 8 views (test_vit has 64)."""
    return np.random.default_rng(1).normal(size=(N_SPOTS, 8, 64)).astype(np.float32)


def _train(name: str, **changes) -> dict:
    cfg = CASES[name].replace(**changes)
    result = train_model([_reference()], cfg, features=_features() if cfg.freeze_backbone else None)
    # the gradients of the last step are left on the parameters: compared directly, since Adam's
    # steps hardly depend on the gradients' scale
    grads = {k: p.grad for k, p in result.model.named_parameters() if p.grad is not None}
    return {"loss": result.metrics["train_loss"], "state": result.model.state_dict(), "grad": grads}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    assert distributed.init_from_env("gloo")  # as under torchrun
    results = {name: _train(name) for name in CASES}
    try:
        _train("frozen_heads", batch_size=7)
    except InputError as exc:
        results["error"] = str(exc)
    results["rank"], results["world_size"] = distributed.rank(), distributed.world_size()
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, list[dict]]:
    """(one process's results, each of the two ranks' results). The ranks are spawned, not
    forked: by now the test process has LanceDB's and torch's thread pools running, which a fork
    would copy mid-flight."""
    single = {name: _train(name) for name in CASES}
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return single, ranks


def _assert_same_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        other = got[key]
        if key.endswith("attn.qkv.bias"):
            # the attention key bias gets no gradient (softmax ignores a shift common to all keys):
            # Adam scales float rounding there up to steps of ~lr, so it is compared on that scale
            third = len(value) // 3
            torch.testing.assert_close(other[third : 2 * third], value[third : 2 * third], rtol=0, atol=BASE.lr)
            other, value = torch.cat([other[:third], other[2 * third :]]), torch.cat([value[:third], value[2 * third :]])
        torch.testing.assert_close(other, value, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_train_like_one(runs, name):
    single, ranks = runs
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {WORLD}
    one = single[name]
    assert len(one["loss"]) == BASE.epochs and len(set(one["loss"])) == BASE.epochs  # the model learns
    for r in ranks:
        # the epochs after the first follow optimizer steps: equal losses mean equal steps too
        torch.testing.assert_close(torch.tensor(r[name]["loss"]), torch.tensor(one["loss"]), rtol=1e-5, atol=0)
        # the full batch's gradient (a factor of the world size off would show here)
        assert r[name]["grad"].keys() == one["grad"].keys() and one["grad"]
        for key, grad in one["grad"].items():
            torch.testing.assert_close(r[name]["grad"][key], grad, rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"grad {key}: {m}")
        _assert_same_weights(r[name]["state"], one["state"])
    for key, value in ranks[0][name]["state"].items():  # every rank ends with the same model
        assert torch.equal(ranks[1][name]["state"][key], value), key


def test_batch_size_must_divide_among_processes(runs):
    _, ranks = runs
    for r in ranks:
        assert "batch size 7 cannot be split evenly over 2 processes" in r["error"]


def test_single_process_helpers_are_no_ops():
    x = torch.arange(6.0)
    assert not distributed.is_distributed() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.local_rows(x) is x and distributed.gather_cat(x) is x
    assert not distributed.init_from_env()  # no WORLD_SIZE: nothing to join


def test_torchrun_ingest_trains_on_every_rank_and_writes_once(sections, tmp_path):
    """The real launcher: `torchrun --nproc-per-node 2 -m histoindex.cli ingest` into an empty store
    trains one model together; rank 0 alone registers it and writes the spots (one version each)."""
    import subprocess
    import sys

    import lancedb

    db = tmp_path / "db"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        "-m",
        "histoindex.cli",
        "ingest",
        str(sections.train_h5ad),
        "--tissue",
        "breast",
        "--db",
        str(db),
        *TINY_BACKBONE,
        "--epochs",
        "2",
        "--n-genes",
        "16",
        "--batch-size",
        "16",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    store = lancedb.connect(str(db))
    models = store.open_table("models")
    spots = store.open_table("spots")
    assert models.count_rows() == 1
    model_id = models.search().select(["model_id"]).limit(None).to_arrow().column("model_id")[0].as_py()
    assert f"spots, spots@{spots.version}, model {model_id}" in done.stdout  # printed once, by rank 0
    assert done.stdout.count("spots, spots@") == 1
    n_spots = int(done.stdout.split("syn-train: ")[1].split(" spots")[0])
    assert spots.count_rows() == spots.count_rows(f"model_id = '{model_id}'") == n_spots > 100  # written once, not per rank
