"""A throw-away copy of this project as its own git repository, for DVC/git integration tests."""

from __future__ import annotations

from pathlib import Path

from bench.support import copy_project, run  # noqa: F401 (re-exported for the tests)


def git_commit(repo: Path, message: str) -> None:
    run(["git", "add", "-A"], repo)
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", message], repo)
