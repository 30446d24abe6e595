"""The documentation that is generated: docs/CLI.md is what the click definitions say today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "cli_reference.py"


def test_cli_reference_is_current():
    """An option added, removed or reworded without `python docs/cli_reference.py` fails here (and CI)."""
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
