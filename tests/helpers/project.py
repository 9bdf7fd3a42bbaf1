"""A throw-away copy of this project as its own git repository, for DVC/git integration tests."""

from __future__ import annotations

import shutil
from pathlib import Path

from bench.support import copy_project, run

__all__ = ["copy_of", "copy_project", "git_commit", "run"]


def git_commit(repo: Path, message: str) -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", message], repo)


def copy_of(built: Path, dst: Path) -> Path:
    """A private copy of a session-built project folder's repo (git history, DVC cache and outputs included)."""
    return Path(shutil.copytree(built / "repo", dst, symlinks=True))
