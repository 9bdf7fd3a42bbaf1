"""Lineage recorded inside every artifact: git commit, data hash (data.dvc), config hash."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml
from omegaconf import DictConfig

from components.core.config import ROOT, config_hash


# Inside a component image there is no git checkout: the pipeline compiler passes the
# lineage of the checkout it compiled from through these variables.
COMMIT_ENV, DIRTY_ENV, DATA_HASH_ENV = "LINEAGE_GIT_COMMIT", "LINEAGE_GIT_DIRTY", "LINEAGE_DATA_HASH"


def git_commit(repo: Path = ROOT) -> dict[str, object]:
    if COMMIT_ENV in os.environ:
        return {"git_commit": os.environ[COMMIT_ENV], "git_dirty": os.environ.get(DIRTY_ENV) == "true"}

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"git_commit": "unknown", "git_dirty": None}
    # Generated files don't make a tree dirty: params.yaml (rewritten by `dvc exp run`), dvc.lock,
    # and the git-tracked metrics/reports that the pipeline itself rewrites while it runs.
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!params.yaml", ":!dvc.lock", ":!reports",
                     ":!dvclive"))
    return {"git_commit": commit, "git_dirty": dirty}


def data_hash(dvc_file: Path = ROOT / "data.dvc") -> str:
    """The md5 DVC recorded for the dataset (the `outs` of data.dvc)."""
    if DATA_HASH_ENV in os.environ:
        return os.environ[DATA_HASH_ENV]
    if not dvc_file.exists():
        return "unknown"
    outs = yaml.safe_load(dvc_file.read_text())["outs"]
    return ",".join(out["md5"] for out in outs)


def lineage(cfg: DictConfig) -> dict[str, object]:
    return {**git_commit(), "data_hash": data_hash(), "config_hash": config_hash(cfg)}
