"""A throw-away copy of this project as its own git repository, and commands run in it with this
venv first on PATH: for the DVC/git integration tests and the benchmarks (bench/)."""

from __future__ import annotations

import os
import shutil
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


def git_commit(repo: Path, message: str) -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", message], repo)


def copy_of(built: Path, dst: Path) -> Path:
    """A private copy of a session-built project folder's repo (git history, DVC cache and outputs included)."""
    return Path(shutil.copytree(built / "repo", dst, symlinks=True))
