"""Lineage recorded inside every artifact: git commit, data hash (data.dvc), config hash."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from omegaconf import DictConfig

from components.config import ROOT, config_hash


def git_commit(repo: Path = ROOT) -> dict[str, object]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"git_commit": "unknown", "git_dirty": None}
    # Generated outputs and params.yaml (rewritten by `dvc exp run`) don't make a tree dirty.
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!params.yaml", ":!dvc.lock"))
    return {"git_commit": commit, "git_dirty": dirty}


def data_hash(dvc_file: Path = ROOT / "data.dvc") -> str:
    """The md5 DVC recorded for the dataset (the `outs` of data.dvc)."""
    if not dvc_file.exists():
        return "unknown"
    outs = yaml.safe_load(dvc_file.read_text())["outs"]
    return ",".join(out["md5"] for out in outs)


def lineage(cfg: DictConfig) -> dict[str, object]:
    return {**git_commit(), "data_hash": data_hash(), "config_hash": config_hash(cfg)}
