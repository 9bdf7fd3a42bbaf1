"""Pipeline steps: each step is one plain function called by DVC, KFP and the tests.

DVC runs a stage's command with the `python` first on the caller's PATH: when that is not this
project's environment, say so in one line instead of failing deep inside an import. Then the
reference numerics are pinned before any step uses torch (components/core/numerics_env.py).
"""

import importlib.util
import sys

_NEEDED = ("omegaconf", "numpy", "torch", "dvc")
_missing = [name for name in _NEEDED if importlib.util.find_spec(name) is None]
if sys.version_info[:2] != (3, 11) or _missing:
    _lacks = f" (it lacks {', '.join(_missing)})" if _missing else ""
    sys.exit(f"error: {sys.executable} (Python {sys.version.split()[0]}) is not this project's environment{_lacks}: "
             "run `make run`, or `source .venv/bin/activate` before `dvc repro` / `dvc exp run` "
             "(DVC runs stages with the python on your PATH)")

from components.core import lifetime  # noqa: E402, F401  (records who started the step, before slow imports)
from components.core.numerics_env import pin_environment  # noqa: E402  (after the environment check)

pin_environment()
