"""What the benchmarks (and the integration tests) need to run the project somewhere else:
a throw-away copy of this working tree as its own git repository, commands run in it with
this venv first on PATH, and free loopback ports."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from components.core.paths import ROOT

VENV_BIN = str(Path(sys.executable).parent)


def run(cmd: list[str], cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", **(env or {})}
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=full_env)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def copy_project(dst: Path, with_data: bool = True) -> Path:
    """Copy the working tree (tracked + untracked-not-ignored files) into a new git repo at dst."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    if with_data:
        shutil.copytree(ROOT / "data", dst / "data")
    (dst / ".dvc" / "config.local").unlink(missing_ok=True)
    run(["git", "init", "-q", "-b", "main"], dst)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "add", "-A"], dst)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "template copy"], dst)
    return dst



def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
