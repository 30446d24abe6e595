"""Shared fixtures: real synthetic slides and h5ad files, a real LanceDB store trained through the
real CLI, and the location of the shared real data."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub

if os.environ.get("PYTHONDONTWRITEBYTECODE") and not os.environ.get("PYTHONPYCACHEPREFIX"):
    # Where bytecode is not written (some sandboxes set PYTHONDONTWRITEBYTECODE and uv installs no
    # .pyc), this process and every Python process the tests start (the CLI, Ray workers, torchrun
    # ranks, spawned writers) would compile torch & co. again: ~10 s of CPU each. It is cached in a
    # folder of its own instead, outside the environment's packages and the repository.
    _PYCACHE = str(Path(tempfile.gettempdir()) / f"histoindex-tests-pycache-{os.getuid()}")
    del os.environ["PYTHONDONTWRITEBYTECODE"]
    os.environ["PYTHONPYCACHEPREFIX"] = _PYCACHE
    sys.dont_write_bytecode = False
    sys.pycache_prefix = _PYCACHE

from click.testing import CliRunner  # noqa: E402

from histoindex.cli import cli  # noqa: E402
from histoindex.synthetic import make_section, write_section  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

#: a fast model for tests: light backbone, small patches, a few epochs
TRAIN_ARGS = [
    "--backbone",
    "resnet10t",
    "--weights",
    "none",
    "--fine-tune",
    "--views",
    "1",
    "--batch-size",
    "64",
    "--patch-px",
    "64",
    "--patch-um",
    "110",
    "--epochs",
    "8",
    "--n-genes",
    "48",
    "--lr",
    "1e-3",
    "--stain",  # the fast model is not the default recipe; --stain macenko is tested in test_stain,
    "none",  # test_evaluate (the CLI chain) and test_demo (the default recipe end to end)
    "--seed",  # last: some tests replace it
    "0",
]


#: a tiny random-init timm backbone, for tests that need the pipeline to run, not to learn
TINY_BACKBONE = ["--backbone", "test_resnet", "--weights", "none", "--fine-tune", "--views", "1", "--patch-px", "32"]
#: the tiny backbone trained for one epoch on 20 genes (the tests on ../shared/data)
ONE_EPOCH_MODEL = [*TINY_BACKBONE, "--patch-um", "110", "--epochs", "1", "--n-genes", "20", "--batch-size", "16"]


def run(*args: str, ok: bool = True):
    """Invoke the real CLI; with ok=True, fail the test (showing output) on a non-zero exit."""
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if ok and result.exit_code != 0:
        raise AssertionError(f"histoindex {' '.join(map(str, args))} exited {result.exit_code}:\n{result.output}")
    return result


@dataclass(frozen=True)
class Sections:
    train_h5ad: Path
    train_tif: Path
    heldout_h5ad: Path
    heldout_tif: Path
    other_h5ad: Path  # a third section, ingested under another tissue in some tests
    other_tif: Path


@pytest.fixture(scope="session")
def sections(tmp_path_factory) -> Sections:
    directory = tmp_path_factory.mktemp("synthetic")
    paths = {}
    for key, seed in (("train", 1), ("heldout", 2), ("other", 3)):
        h5ad, tif = write_section(make_section(seed=seed, size_px=2600), directory, name=f"syn-{key}")
        paths[f"{key}_h5ad"], paths[f"{key}_tif"] = h5ad, tif
    return Sections(**paths)


@pytest.fixture(scope="session")
def trained_store(tmp_path_factory, sections) -> Path:
    """A store with one model trained on the train section and that section ingested (tissue
    breast). Tests that write must work on a copy (``store`` fixture)."""
    db = tmp_path_factory.mktemp("store") / "db"
    run("train", sections.train_h5ad, "--db", db, *TRAIN_ARGS)
    run("ingest", sections.train_h5ad, "--tissue", "breast", "--platform", "visium", "--dataset", "train", "--db", db)
    return db


@pytest.fixture
def store(trained_store, tmp_path) -> Path:
    """A private copy of the trained store."""
    db = tmp_path / "db"
    shutil.copytree(trained_store, db)
    return db


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available: {SHARED_DATA} is absent")
    return SHARED_DATA


def error_line(result, *naming: str) -> str:
    """The one `Error:` line of a failed command, which must name what it says (file and problem)."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.output
    for text in naming:
        assert str(text) in lines[0], (text, lines[0])
    return lines[0]
