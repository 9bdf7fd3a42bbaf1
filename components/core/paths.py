"""Where the project is: every path of the repository is relative to ROOT."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"
PARAMS_FILE = ROOT / "params.yaml"
