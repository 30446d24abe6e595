"""Crash safety through the real CLI: `histoindex ingest`, `train` and `query` run as processes and
are killed (SIGKILL) or interrupted (SIGINT, what Ctrl-C sends) while training, embedding, writing or
streaming a slide. Afterwards every table is at a version it had (or, where the stop came as the
commit landed, at one the command wrote whole): same versions, same rows, queries answer as before;
no `--out` file, never a partial one; and the same command run again succeeds with the right rows.
Ctrl-C ends a command with one line on stderr and exit code 130.

The moments are found from what the command prints on stderr (one line per log message) and from
the store's files as they appear, not from timings; SIGKILL and Ctrl-C each get their own copy of
the store and run side by side. This module also holds the process helpers that
test_concurrency.py and test_s3_store.py use."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from histoindex import api
from histoindex.io.slides import open_slide, write_pyramidal_tiff
from histoindex.models import load_model, state_digest
from histoindex.store import Store

from .conftest import run

#: how long one phase may take on a slow, shared machine: the tests wait for events, never for time
PATIENCE = 600.0
#: the start of the one line Ctrl-C leaves on stderr
INTERRUPTED = "Interrupted: nothing is half-written"


def tiny(*, epochs: int = 2, seed: int = 0) -> list[str]:
    """A model trained in seconds, with 32 µm patches (a slide has thousands of tiles: several
    search and write chunks)."""
    return [
        *("--backbone", "test_resnet", "--weights", "none", "--fine-tune", "--views", "1", "--patch-px", "32", "--patch-um", "32"),
        *("--n-genes", "16", "--batch-size", "32", "--epochs", str(epochs), "--seed", str(seed)),
    ]


# ---- processes ------------------------------------------------------------------------------
def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a `histoindex` process: this one, offline. Where bytecode is not written
    (PYTHONDONTWRITEBYTECODE), each start would compile torch & co. again (seconds): it is cached
    in a folder of its own instead, outside the environment's packages."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    if env.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
        env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / f"histoindex-tests-pycache-{os.getuid()}")
    env.update(extra)
    return env


class Cli:
    """``histoindex ARGS`` as a real process (``python -m histoindex.cli``). Its stderr, where the
    CLI logs one line per message, is read line by line as it runs, so a test can act at a moment
    the command announces. Stopped at teardown if still running (see ``_stop_leftovers``)."""

    running: list[Cli] = []

    def __init__(self, *args, env: dict[str, str] | None = None):
        self.args = [str(a) for a in args]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "histoindex.cli", *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env or cli_env(),
        )
        self.lines: list[str] = []
        self.times: list[float] = []  # when each line arrived (monotonic)
        self.stdout = ""
        self.signalled_at: float | None = None
        self.exit_seconds: float | None = None  # from the signal to the exit
        self._changed = threading.Condition()
        self._eof = False
        self._readers = [threading.Thread(target=self._read_stderr, daemon=True), threading.Thread(target=self._read_stdout, daemon=True)]
        for reader in self._readers:
            reader.start()
        Cli.running.append(self)

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self.times.append(time.monotonic())
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def _read_stdout(self) -> None:
        self.stdout = self.proc.stdout.read()

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def describe(self) -> str:
        return f"histoindex {' '.join(self.args)}"

    def saw(self, pattern: str) -> bool:
        return self.since(pattern) is not None

    def since(self, pattern: str) -> float | None:
        """Seconds since the first stderr line matching ``pattern`` arrived (None: none yet)."""
        regex = re.compile(pattern)
        with self._changed:
            for line, at in zip(self.lines, self.times):
                if regex.search(line):
                    return time.monotonic() - at
        return None

    def wait_for_line(self, pattern: str, timeout: float = PATIENCE) -> str:
        """The first stderr line matching ``pattern``, waiting for it; fails if the process ends first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines:
                    if regex.search(line):
                        return line
                if self._eof:
                    pytest.fail(f"{self.describe()} exited ({self.proc.wait()}) before printing {pattern!r}:\n{self.stderr}")
                if time.monotonic() > deadline:
                    pytest.fail(f"{self.describe()} printed no {pattern!r} within {timeout:.0f} s:\n{self.stderr}")
                self._changed.wait(min(1.0, max(0.0, deadline - time.monotonic())))

    def send(self, sig: int) -> None:
        self.signalled_at = time.monotonic()
        self.proc.send_signal(sig)

    def finish(self, timeout: float = PATIENCE) -> int:
        """Wait for the exit; returns the exit code (-N: killed by signal N)."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"{self.describe()} still ran {timeout:.0f} s later:\n{self.stderr}")
        if self.signalled_at is not None:
            self.exit_seconds = time.monotonic() - self.signalled_at
        for reader in self._readers:
            reader.join(30)
        return rc

    def succeed(self, timeout: float = PATIENCE) -> str:
        rc = self.finish(timeout)
        assert rc == 0, f"{self.describe()} exited {rc}:\n{self.stderr}"
        return self.stdout

    def check_stopped(self, sig: int) -> None:
        """Wait for the exit after ``sig`` and check it: SIGKILL kills the process; SIGINT (Ctrl-C)
        ends it with exit code 130, one line on stderr and no traceback, promptly (no reader or
        writer thread keeps it alive)."""
        rc = self.finish()
        if sig == signal.SIGKILL:
            assert rc == -signal.SIGKILL, f"{self.describe()} exited {rc}:\n{self.stderr}"
            return
        assert rc == 130, f"Ctrl-C: exit code {rc}, not 130:\n{self.stderr}"
        assert "Traceback" not in self.stderr and "Aborted!" not in self.stderr, self.stderr
        said = [i for i, line in enumerate(self.lines) if "Interrupted" in line]
        assert len(said) == 1 and self.lines[said[0]].startswith(INTERRUPTED), self.stderr
        assert [line for line in self.lines if line.strip()][-1] == self.lines[said[0]], "the message is the last line"
        assert self.exit_seconds < 60, f"exited {self.exit_seconds:.0f} s after Ctrl-C"
        print(f"{self.args[0]}: said so {self.times[said[0]] - self.signalled_at:.2f} s and exited {self.exit_seconds:.1f} s after SIGINT")


def stop_when(*plans: tuple[Cli, Callable[[], object], int], what: str, timeout: float = PATIENCE) -> None:
    """Send each process its signal the moment its condition holds (all polled every 2 ms, so
    several processes run, and are stopped, at once), then check how each ended."""
    pending = list(plans)
    deadline = time.monotonic() + timeout
    while pending:
        for plan in list(pending):
            cli, condition, sig = plan
            if condition():
                cli.send(sig)
                pending.remove(plan)
            elif cli.proc.poll() is not None:
                pytest.fail(f"{cli.describe()} exited ({cli.proc.returncode}) before {what}:\n{cli.stderr}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f} s")
        time.sleep(0.002)
    for cli, _, sig in plans:
        cli.check_stopped(sig)


def after_line(cli: Cli, pattern: str, seconds: float = 0.0) -> Callable[[], bool]:
    """A condition: ``seconds`` have passed since ``cli`` printed a line matching ``pattern``."""
    return lambda: (cli.since(pattern) or -1.0) >= seconds


@pytest.fixture(autouse=True)
def _stop_leftovers():
    """A failed test leaves no histoindex process behind (only the ones it started, by pid)."""
    started = len(Cli.running)
    yield
    for cli in Cli.running[started:]:
        if cli.proc.poll() is None:
            cli.proc.kill()
            cli.proc.wait(30)
    del Cli.running[started:]


# ---- the store, before and after ------------------------------------------------------------
def snapshot(db) -> dict:
    """Per table: every version (number, time, rows, size, tags, what made it) and the current rows."""
    store = Store(db)
    return {name: (versions, store.table(name).to_arrow()) for name, versions in store.versions().items()}


def assert_unchanged(db, before: dict) -> None:
    after = snapshot(db)
    assert after.keys() == before.keys()
    for name, (versions, rows) in before.items():
        assert after[name][0] == versions, f"{name}: its versions changed"
        assert after[name][1].equals(rows), f"{name}: its current rows changed"


def files_under(folder: Path) -> set[str]:
    """Every file below ``folder`` (Lance's staging files included), as relative paths."""
    found = set()
    for root, _, names in os.walk(folder):
        found.update(os.path.relpath(os.path.join(root, name), folder) for name in names)
    return found


def copy_store(db: Path, folder: Path) -> Path:
    target = folder / f"db-{uuid.uuid4().hex[:6]}"
    shutil.copytree(db, target)
    return target


def answer(db: Path, data: Data, scratch: Path, **options) -> np.ndarray:
    """What `query` answers from ``db`` at the reference's spots (run on a copy: ``db`` gets no
    predictions version)."""
    copy = copy_store(db, scratch)
    try:
        return api.query(data.slide, db=copy, spots=data.h5ad, tissue="breast", k=5, precision="fp32", workers=0, **options).predictions
    finally:
        shutil.rmtree(copy)


def assert_models_complete(db) -> None:
    """The models table holds complete rows only: each row's weights load into its model, whose
    content hash is the row's id."""
    store = Store(db)
    records = store.models()
    assert store.table("models").count_rows() == len(records) > 0
    for record in records:
        model = load_model(record.cfg, record.weights())
        assert f"{record.cfg.method}-{state_digest(model, record.cfg)}" == record.model_id


def assert_dataset_rows(db, dataset: str, n: int) -> None:
    """``dataset`` has exactly ``n`` spots under each model that has it, none repeated."""
    rows = Store(db).table("spots").to_arrow().select(["model_id", "dataset", "spot_id"]).to_pylist()
    keys = [(r["model_id"], r["spot_id"]) for r in rows if r["dataset"] == dataset]
    assert len(keys) == len(set(keys)), f"{dataset}: repeated spots"
    per_model: dict[str, int] = {}
    for model, _ in keys:
        per_model[model] = per_model.get(model, 0) + 1
    assert per_model and set(per_model.values()) == {n}, per_model


# ---- data and the store every test copies --------------------------------------------------
@dataclass(frozen=True)
class Data:
    h5ad: Path  # the reference (309 spots) the stores here are trained on and ingest
    slide: Path  # its slide
    mosaic: Path | None = None  # a slide two sections wide: ~4,600 tissue tiles of 32 µm, three search/write chunks


def make_data(sections, folder: Path | None = None) -> Data:
    """The test sections; with ``folder``, also the mosaic slide, written there."""
    if folder is None:
        return Data(h5ad=sections.train_h5ad, slide=sections.train_tif)
    import tifffile

    image = tifffile.imread(sections.heldout_tif)
    mpp = open_slide(sections.heldout_tif).mpp
    mosaic = write_pyramidal_tiff(folder / "mosaic.tif", np.concatenate([image, image[:, ::-1]], axis=1), mpp=mpp)
    return Data(h5ad=sections.train_h5ad, slide=sections.train_tif, mosaic=mosaic)


@pytest.fixture(scope="module")
def data(sections, tmp_path_factory) -> Data:
    return make_data(sections, tmp_path_factory.mktemp("mosaic"))


def ingest_args(data: Data, db, dataset: str) -> list:
    return ["ingest", data.h5ad, "--tissue", "breast", "--platform", "visium", "--dataset", dataset, "--db", db]


KILL, INT = signal.SIGKILL, signal.SIGINT


@dataclass(frozen=True)
class Base:
    db: Path  # model trained, dataset "train" ingested: spots@2, models@2
    killed: Cli  # its first ingest, SIGKILLed while training
    interrupted: Cli  # the same first ingest into another empty folder, interrupted (SIGINT) while training
    left: tuple[bool, bool]  # whether each left its folder behind
    n_spots: int


@pytest.fixture(scope="module")
def base(data, tmp_path_factory) -> Base:
    """A store made the hard way: its first ingest (which trains the model: the store is empty) is
    SIGKILLed while training, then run again to the end. Beside it, the same ingest into another
    empty folder is interrupted (Ctrl-C) while training. Tests write to copies of the store."""
    folder = tmp_path_factory.mktemp("crash")
    db, other = folder / "db", folder / "interrupted-db"
    killed = Cli(*ingest_args(data, db, "train"), *tiny(epochs=200))  # long enough that the stop lands in training
    interrupted = Cli(*ingest_args(data, other, "train"), *tiny(epochs=200))
    stop_when((killed, after_line(killed, r"^training ", 0.5), KILL), (interrupted, after_line(interrupted, r"^training ", 0.5), INT), what="training")
    left = (db.exists() or Store.exists(db), other.exists() or Store.exists(other))
    run(*ingest_args(data, db, "train"), *tiny())
    return Base(db=db, killed=killed, interrupted=interrupted, left=left, n_spots=Store(db).table("spots").count_rows())


@pytest.fixture(scope="module")
def base_answer(base, data, tmp_path_factory) -> np.ndarray:
    return answer(base.db, data, tmp_path_factory.mktemp("answers"))


# ---- ingest ---------------------------------------------------------------------------------
def test_first_ingest_stopped_while_training_leaves_nothing_and_runs_again(base):
    for cli in (base.killed, base.interrupted):
        assert not cli.saw(r"^registered model"), "stopped while training"
    assert base.left == (False, False), "the store is created only when the model is registered"
    # the same ingest run again (in the fixture) trained, registered and wrote everything
    assert base.n_spots > 0
    assert_dataset_rows(base.db, "train", base.n_spots)
    assert [(v["version"], v["tags"]) for v in Store(base.db).versions()["spots"]] == [(1, []), (2, ["ingest-train-v2"])]
    assert_models_complete(base.db)


def test_ingest_stopped_while_embedding_or_writing_leaves_the_store_as_it_was(base, base_answer, data, tmp_path):
    """SIGKILL and Ctrl-C, each on its own copy of the store, side by side."""
    dbs = {KILL: copy_store(base.db, tmp_path), INT: copy_store(base.db, tmp_path)}
    before = {sig: snapshot(db) for sig, db in dbs.items()}

    # while embedding: right after it says so (309 patches to read and embed)
    clis = {sig: Cli(*ingest_args(data, db, "other")) for sig, db in dbs.items()}
    stop_when(*((cli, after_line(cli, r"^embedding \d+ spots of other"), sig) for sig, cli in clis.items()), what="embedding")
    for sig, cli in clis.items():
        assert not cli.saw(r"^wrote "), "stopped while embedding"
        assert_unchanged(dbs[sig], before[sig])

    # while writing: the moment its first file (Lance's staging file for the new rows) appears
    existing = {sig: files_under(db / "spots.lance") for sig, db in dbs.items()}

    def writing(sig):
        return lambda: files_under(dbs[sig] / "spots.lance") - existing[sig]

    clis = {sig: Cli(*ingest_args(data, db, "other")) for sig, db in dbs.items()}
    stop_when(*((cli, writing(sig), sig) for sig, cli in clis.items()), what="a new file under spots.lance")
    for sig, db in dbs.items():
        after = snapshot(db)
        if after["spots"][0] == before[sig]["spots"][0]:  # stopped before its commit: nothing of it is visible
            assert_unchanged(db, before[sig])
            np.testing.assert_array_equal(answer(db, data, tmp_path), base_answer)
            outcome = "nothing committed"
        else:  # the commit landed as it was stopped: then it is whole, one version holding every row
            versions = after["spots"][0]
            assert [v["version"] for v in versions[:-1]] == [v["version"] for v in before[sig]["spots"][0]]
            assert versions[-1]["rows"] == before[sig]["spots"][0][-1]["rows"] + base.n_spots
            assert_dataset_rows(db, "other", base.n_spots)
            outcome = "committed whole, as it was stopped"
        print(f"{sig.name} while writing: {outcome}; {len(files_under(db / 'spots.lance') - existing[sig])} files left under spots.lance")

        # and the same ingest again: one new version, the right rows, nothing repeated
        versions_before = [v["version"] for v in Store(db).versions()["spots"]]
        result = run(*ingest_args(data, db, "other"))
        version = Store(db).table("spots").version
        assert f"other: {base.n_spots} spots, spots@{version}" in result.stdout
        assert [v["version"] for v in Store(db).versions()["spots"]] == versions_before + [version]
        assert_dataset_rows(db, "other", base.n_spots)
        assert_dataset_rows(db, "train", base.n_spots)
        assert f"ingest-other-v{version}" in Store(db).table("spots").tags.list()


# ---- train ----------------------------------------------------------------------------------
def test_train_stopped_while_training_registers_nothing(base, data, tmp_path):
    dbs = {KILL: copy_store(base.db, tmp_path), INT: copy_store(base.db, tmp_path)}
    before = {sig: snapshot(db) for sig, db in dbs.items()}
    clis = {sig: Cli("train", data.h5ad, "--db", db, *tiny(epochs=200, seed=1)) for sig, db in dbs.items()}
    stop_when(*((cli, after_line(cli, r"^training ", 0.5), sig) for sig, cli in clis.items()), what="training")
    for sig, db in dbs.items():
        assert not clis[sig].saw(r"^registered model")
        assert_unchanged(db, before[sig])
        assert_models_complete(db)
    # and training again registers one complete model
    model_id = run("train", data.h5ad, "--db", dbs[KILL], *tiny(seed=1)).stdout.strip().splitlines()[-1]
    assert {m.model_id for m in Store(dbs[KILL]).models()} == {Store(base.db).model().model_id, model_id}
    assert_models_complete(dbs[KILL])


# ---- query ----------------------------------------------------------------------------------
def test_query_stopped_while_streaming_commits_nothing_and_writes_no_out_file(base, data, tmp_path):
    dbs = {KILL: copy_store(base.db, tmp_path), INT: copy_store(base.db, tmp_path)}
    before = {sig: snapshot(db) for sig, db in dbs.items()}
    outs = {sig: tmp_path / f"pred-{sig.name}.parquet" for sig in dbs}
    partials = {sig: out.with_name(out.name + ".tmp") for sig, out in outs.items()}  # where the Parquet file grows until complete

    def query(sig):
        return ["query", data.mosaic, "--tissue", "breast", "--db", dbs[sig], "--out", outs[sig]]

    clis = {sig: Cli(*query(sig)) for sig in dbs}
    # the first of three chunks is in the --out file: 2,500 tiles to go before the commit
    stop_when(*((cli, partials[sig].exists, sig) for sig, cli in clis.items()), what="the first chunk in the --out file")
    for sig, cli in clis.items():
        assert cli.saw(r"tissue tiles of 32 µm on mosaic.tif") and not cli.saw(r"^predicted "), "stopped while streaming"
        assert not outs[sig].exists(), "no --out file, not a partial one"
        assert_unchanged(dbs[sig], before[sig])
    assert not partials[INT].exists(), "Ctrl-C removes the partial file"
    size = partials[KILL].stat().st_size if partials[KILL].exists() else 0
    print(f"SIGKILL left {partials[KILL].name} ({size} bytes) beside the absent --out file")

    # again (over what SIGKILL left): the whole slide, in one predictions version and one complete file
    db, out = dbs[KILL], outs[KILL]
    result = run(*query(KILL))
    n_tiles = int(re.search(r"^(\d+) tiles", result.stdout, re.MULTILINE).group(1))
    assert n_tiles > 4096, "three chunks"
    predictions = Store(db).table("predictions")
    assert [v["version"] for v in Store(db).versions()["predictions"]] == [v["version"] for v in before[KILL]["predictions"][0]] + [predictions.version]
    rows = predictions.to_arrow()
    assert before[KILL]["predictions"][1].num_rows == 0 and rows.num_rows == n_tiles and len(set(rows.column("run_id").to_pylist())) == 1
    assert pq.read_table(out).column("tile_id").to_pylist() == rows.column("tile_id").to_pylist()
    assert not partials[KILL].exists()
