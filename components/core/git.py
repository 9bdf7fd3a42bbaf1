"""The one way the project runs git: a failure is an error naming the command and git's own message."""

from __future__ import annotations

import subprocess
from pathlib import Path

from components.core.errors import StepError


class GitError(StepError):
    pass


def git(repo: Path, *args: str) -> str:
    """`git <args>` in `repo`: its output, stripped. GitError when git fails or is not installed; a caller
    to whom a failure means something (no commit, no remote) catches it and says so."""
    try:
        result = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    except FileNotFoundError:
        raise GitError(f"git {' '.join(args)}: git is not installed") from None
    if result.returncode != 0:
        raise GitError(f"git {' '.join(args)} in {repo}: {result.stderr.strip() or f'exit status {result.returncode}'}")
    return result.stdout.strip()
