"""A step's processes live no longer than whoever started them: killing `dvc repro` (even with
SIGKILL, which it cannot pass on) stops the step it was running and that step's worker processes,
instead of leaving them to write beside the next run."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _exit_on_sigterm(signum: int, frame: object) -> None:
    sys.exit(128 + signum)  # SystemExit unwinds: `finally` blocks remove the step's scratch folders


def die_with_parent() -> None:
    """On Linux, ask the kernel for SIGTERM when the parent process ends, and turn SIGTERM into a
    clean exit; elsewhere nothing (a step started there outlives a killed parent)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if os.getppid() != parent:  # the parent ended before the request took effect
        sys.exit(128 + signal.SIGTERM)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
