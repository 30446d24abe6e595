"""Issue 20.4: a query's mistakes fail in the first second, before the model, the references or
torch load (checked by what the process imported), each in one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import SHARED_DATA

HEAVY = ("torch", "timm", "torchvision")

PROBE = """
import json, sys
from click.testing import CliRunner
from histoindex.cli import cli
result = CliRunner().invoke(cli, json.loads(sys.argv[1]))
print(json.dumps({"code": result.exit_code, "output": result.output,
                  "heavy": sorted({m.split('.')[0] for m in sys.modules} & set(json.loads(sys.argv[2])))}))
"""


def _query(*args) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(["query", *map(str, args)]), json.dumps(HEAVY)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fails_early(result: dict, *naming: str) -> str:
    assert result["code"] != 0, result["output"]
    assert "Traceback" not in result["output"]
    lines = [line for line in result["output"].splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result["output"]
    for text in naming:
        assert text in lines[0], (text, lines[0])
    assert result["heavy"] == [], f"loaded {result['heavy']} before failing"
    return lines[0]


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("jpeg") / "photo.jpg"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(path)
    return path


def test_a_missing_slide(trained_store, tmp_path):
    _fails_early(_query(tmp_path / "nope.svs", "--db", trained_store), "slide not found", "nope.svs")


def test_a_reference_given_as_a_slide(trained_store, sections):
    _fails_early(_query(sections.heldout_h5ad, "--db", trained_store), sections.heldout_h5ad.name, "not a slide", "--spots")


def test_mpp_zero(trained_store, sections):
    _fails_early(_query(sections.heldout_tif, "--mpp", "0", "--db", trained_store), "--mpp must be a positive number")


def test_a_jpeg_without_pixel_size(trained_store, jpeg):
    _fails_early(_query(jpeg, "--db", trained_store), "photo.jpg has no pixel size", "--mpp")


def test_a_truncated_svs(trained_store, tmp_path):
    svs = SHARED_DATA / "slides" / "CMU-1-Small-Region.svs"
    if not svs.is_file():
        pytest.skip(f"real data not available: {svs} is absent")
    broken = tmp_path / "broken.svs"
    broken.write_bytes(svs.read_bytes()[:500_000])
    result = _query(broken, "--db", trained_store)
    line = _fails_early(result, "broken.svs", "damaged or truncated")
    assert "invalid offset" not in result["output"].replace(line, "")  # no stray tifffile line


def test_an_existing_out_is_replaced_and_said(store, sections, tmp_path):
    from .conftest import run

    out = tmp_path / "p.parquet"
    out.write_bytes(b"old")
    result = run("query", sections.heldout_tif, "--tissue", "breast", "--out", out, "--db", store)
    assert f"{out} exists: it is replaced" in result.output
    assert out.read_bytes()[:4] == b"PAR1"


def test_an_empty_h5ad_says_it_has_no_spots(tmp_path):
    import anndata as ad

    from .conftest import error_line, run

    empty = tmp_path / "empty.h5ad"
    ad.AnnData(X=np.zeros((0, 5), np.float32)).write_h5ad(empty)
    result = run("ingest", empty, "--tissue", "breast", "--db", tmp_path / "db", ok=False)
    error_line(result, "empty.h5ad has no spots")
