"""The process environment of the reference numerics (components/core/numerics.py): variables that
torch, MKL and OpenBLAS read once, so they are set before any of them loads, from
`components/__init__.py`, and a command restarts itself when its config asks for the other profile."""

from __future__ import annotations

import json
import os
import sys

PROFILE_ENV = "NUMERICS_PROFILE"  # the profile this process's environment was pinned for
REFERENCE_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "MKL_DYNAMIC": "FALSE",
    "ONEDNN_DEFAULT_FPMATH_MODE": "STRICT",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OMP_DYNAMIC": "FALSE",
    "OPENBLAS_CORETYPE": "Haswell",
    "OPENBLAS_NUM_THREADS": "1",
}
# Under either profile: OpenMP threads waiting for work sleep instead of spinning. Results do not
# change; on a busy machine (parallel tests, DDP processes x threads above the cores) spinning threads
# take the cores the working ones need: two trainings side by side on 2 cores took 17.6 s, 8.0 s so.
SCHEDULING_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
SHELL_ENV = "NUMERICS_SHELL_ENV"  # the shell's own values of the pinned variables, for a native restart


def pin_environment() -> None:
    """Set the reference profile's variables before torch, MKL or OpenBLAS load (unless this process
    was started for native numerics). Whatever the shell exported for them is overridden, and kept
    (also for child processes, which inherit the pins) in case a step restarts for native numerics.
    SCHEDULING_ENV applies to both profiles, and what the shell exported for it wins."""
    for name, value in SCHEDULING_ENV.items():
        os.environ.setdefault(name, value)
    if os.environ.get(PROFILE_ENV) == "native":
        return
    os.environ.setdefault(SHELL_ENV, json.dumps({name: os.environ.get(name) for name in REFERENCE_ENV}))
    os.environ.update(REFERENCE_ENV)
    os.environ[PROFILE_ENV] = "reference"


def restart_for(profile: str) -> None:
    """Re-run this command line in an environment pinned for `profile` when it was pinned for the
    other one (a command-line entry point only: the process image is replaced)."""
    if os.environ.get(PROFILE_ENV) == profile:
        return
    env = dict(os.environ, **{PROFILE_ENV: profile})
    if profile == "reference":
        env.update(REFERENCE_ENV)
    for name, value in json.loads(env.get(SHELL_ENV, "{}")).items() if profile == "native" else ():
        env.pop(name, None) if value is None else env.__setitem__(name, value)
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
