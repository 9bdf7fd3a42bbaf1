"""The one git helper (components/core/git.py) and what each caller makes of a failure."""

from __future__ import annotations

import pytest

from components.core.errors import ConfigError
from components.core.git import GitError, git
from components.deploy import source_commit
from pipelines import preflight
from tests.helpers.project import git_commit, run


def test_git_returns_its_output_and_fails_naming_the_command_and_gits_message(tmp_path):
    with pytest.raises(GitError, match=r"git rev-parse HEAD in .*: fatal: not a git repository"):
        git(tmp_path, "rev-parse", "HEAD")
    run(["git", "init", "-q", "-b", "main"], tmp_path)
    (tmp_path / "file").write_text("x")
    git_commit(tmp_path, "first")
    assert len(git(tmp_path, "rev-parse", "HEAD")) == 40  # stripped: no newline


def test_each_caller_says_what_a_failed_git_means(tmp_path):
    assert source_commit(tmp_path) == {"commit": "unknown", "uncommitted_changes": None}  # the deploy record says so
    with pytest.raises(ConfigError, match="not a git repository with a commit"):
        preflight.head_commit(tmp_path)
    with pytest.raises(ConfigError, match="no such commit"):
        preflight.pushed_commit("HEAD", tmp_path)
