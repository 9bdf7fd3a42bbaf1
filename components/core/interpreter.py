"""Whether a step's command runs on this project's Python: DVC runs a stage's command with the
`python` first on the caller's PATH, and that may be the system's. Standard library only, so the
check itself runs anywhere; a wrong interpreter gets one line instead of a failure deep inside an import."""

from __future__ import annotations

import importlib.util
import sys

NEEDED = ("omegaconf", "numpy", "torch", "dvc")
PYTHON = (3, 11)


def check_interpreter() -> None:
    """Exit with one line naming the interpreter and what it lacks, unless it is this project's environment."""
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if sys.version_info[:2] == PYTHON and not missing:
        return
    lacks = f" (it lacks {', '.join(missing)})" if missing else ""
    sys.exit(f"error: {sys.executable} (Python {sys.version.split()[0]}) is not this project's environment{lacks}: "
             "run `make run`, or `source .venv/bin/activate` before `dvc repro` / `dvc exp run` "
             "(DVC runs stages with the python on your PATH)")
