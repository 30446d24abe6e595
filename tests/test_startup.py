"""Start-up: `histoindex --help` and a usage error answer before the heavy libraries load; each
command imports what it needs when it runs (timings are in BENCHMARKS.md, not asserted here)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "timm", "lancedb", "lance", "duckdb", "anndata", "polars", "matplotlib", "scipy", "pandas", "torch_geometric")


def _loaded_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_importing_the_cli_loads_no_heavy_library():
    loaded = _loaded_after("import histoindex.cli")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_help_of_every_command_loads_no_heavy_library():
    code = (
        "from click.testing import CliRunner\n"
        "from histoindex.cli import cli\n"
        "for name in [None, *cli.commands]:\n"
        "    result = CliRunner().invoke(cli, ([name] if name else []) + ['--help'])\n"
        "    assert result.exit_code == 0, (name, result.output)\n"
    )
    loaded = _loaded_after(code)
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_the_package_exposes_its_api_on_first_use():
    import histoindex

    assert histoindex.TrainOptions().method == "bleep"
    assert histoindex.Store.__name__ == "Store" and callable(histoindex.query)
