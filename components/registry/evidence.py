"""What a gate verdict that guards production rests on, read from git objects and nothing else:
the reports a commit's dvc.lock vouches for (their bytes hash to the md5 DVC recorded when the
stage that writes them ran), and the gate policy of the branch that deploys (params.yaml as
committed at a named ref), never the candidate commit's own."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from components.core.config.validation import validate
from components.core.recorded import IntegrityError, locked
from components.registry.tags import RegistryError

POLICY_SECTIONS = ("gate", "registry")  # what a policy ref decides: thresholds, and which stages are gated


def committed_bytes(repo: Path, rev: str, path: str) -> bytes | None:
    """The bytes of `path` as committed at `rev` (None when it is not there)."""
    result = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True)
    return result.stdout if result.returncode == 0 else None


def require_locked(repo: Path, commit: str, paths: tuple[str, ...]) -> None:
    """Refuse reports whose committed bytes are not the ones dvc.lock records (edited after their stage ran)."""
    for path in paths:
        data = committed_bytes(repo, commit, path)
        if data is None:
            continue  # a missing report is the gate's to refuse, with its own message
        try:
            recorded = locked(repo, path, commit).md5
        except IntegrityError:
            recorded = None
        actual = hashlib.md5(data).hexdigest()
        if recorded != actual:
            raise RegistryError(
                f"{path} at {commit[:10]} does not match dvc.lock (md5 {actual} committed, "
                f"{recorded or 'none'} recorded): it changed after the stage that writes it ran, so no gate can be judged on it; "
                "run `dvc repro` and commit its outputs with dvc.lock")


def policy_at(cfg: DictConfig, ref: str, repo: Path) -> DictConfig:
    """`cfg` with the gate policy (sections gate and registry) of params.yaml as committed at `ref`."""
    text = committed_bytes(repo, ref, "params.yaml")
    committed = yaml.safe_load(text) if text is not None else None
    if not isinstance(committed, dict) or not all(section in committed for section in POLICY_SECTIONS):
        raise RegistryError(f"--policy-ref {ref}: no params.yaml with {' and '.join(POLICY_SECTIONS)} sections committed there "
                            f"(`git show {ref}:params.yaml`); name the branch that deploys, e.g. origin/main")
    merged = OmegaConf.merge(OmegaConf.to_container(cfg), {section: committed[section] for section in POLICY_SECTIONS})
    return validate(merged, f"{ref}:params.yaml")
