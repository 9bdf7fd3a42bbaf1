"""A step's processes live no longer than whoever started them: killing `dvc repro` (even with
SIGKILL, which it cannot pass on) stops the step it was running and that step's worker processes,
instead of leaving them to write beside the next run."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

import psutil

PR_SET_PDEATHSIG = 1  # linux/prctl.h
SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "mksh", "ash", "busybox"})


def _exit_on_sigterm(signum: int, frame: object) -> None:
    sys.exit(128 + signum)  # SystemExit unwinds: `finally` blocks remove the step's scratch folders


def _launchers() -> tuple[int, int | None]:
    """This process's parent, and when that parent is a shell (DVC runs a stage as `$SHELL -c cmd`,
    and Debian's dash does not exec the command), the shell's parent, which owns the step."""
    parent = os.getppid()
    try:
        shell = psutil.Process(parent)
        return parent, shell.ppid() if shell.name() in SHELLS else None
    except psutil.Error:
        return parent, None


# Read when the step's first module loads, not when it has imported torch: a parent killed meanwhile
# would otherwise go unnoticed (the orphan's parent is already the reaper). A pool worker forked
# later inherits these values: its parent is the step's process (STEP_PID), never a shell.
STEP_PID = os.getpid()
PARENT, SHELL_OWNER = _launchers()


def die_with_parent() -> None:
    """On Linux, ask the kernel for SIGTERM when the parent process ends (or the shell's parent, when
    the parent is a shell), and turn SIGTERM into a clean exit; elsewhere nothing (a step started
    there outlives a killed parent)."""
    if not sys.platform.startswith("linux"):
        return
    parent, shell_owner = (PARENT, SHELL_OWNER) if os.getpid() == STEP_PID else (STEP_PID, None)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if os.getppid() != parent:  # the parent ended before the request took effect
        sys.exit(128 + signal.SIGTERM)
    if shell_owner is not None:
        threading.Thread(target=_end_when_orphaned, args=(psutil.Process(parent), shell_owner), name="lifetime", daemon=True).start()


def _end_when_orphaned(shell: psutil.Process, owner: int, poll_s: float = 0.5) -> None:
    while True:
        time.sleep(poll_s)
        try:
            if shell.ppid() != owner:  # the owner died: the shell was re-parented to a reaper
                break
        except psutil.NoSuchProcess:
            break
    os.kill(os.getpid(), signal.SIGTERM)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
