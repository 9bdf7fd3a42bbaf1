"""A throw-away copy of this project as its own git repository, for DVC/git integration tests."""

from __future__ import annotations

from pathlib import Path

from bench.support import copy_project, run

__all__ = ["copy_project", "git_commit", "run"]


def git_commit(repo: Path, message: str) -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", message], repo)
