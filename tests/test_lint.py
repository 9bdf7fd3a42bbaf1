"""ruff (configured in pyproject.toml) finds nothing in the project's Python files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from components.core.paths import ROOT


def test_ruff_finds_nothing():
    ruff = Path(sys.executable).parent / "ruff"
    result = subprocess.run([str(ruff), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
