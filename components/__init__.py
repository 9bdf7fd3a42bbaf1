"""Pipeline steps: each step is one plain function called by DVC, KFP and the tests.

A step's command line (`python -m components.<step>`, what a DVC stage runs) starts by checking the
interpreter (components/core/interpreter.py); importing the package does not. Then the reference
numerics are pinned before any step uses torch (components/core/numerics_env.py).
"""

import sys

from components.core.interpreter import check_interpreter

if sys.argv[:1] == ["-m"]:  # Python's value while it locates the module of `python -m components.<step>`
    check_interpreter()

from components.core import lifetime  # noqa: E402, F401  (records who started the step, before slow imports)
from components.core.numerics_env import pin_environment  # noqa: E402  (after the interpreter check)

pin_environment()
