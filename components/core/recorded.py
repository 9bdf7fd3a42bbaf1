"""The hash the pipeline recorded for an artifact outside the artifact's own folder, and the check of a file against it.

A hash beside the file (package.json next to the .mar) is replaced with the file. These records are not: dvc.lock,
tracked by git, names each stage output's md5, and for a folder DVC's .dir manifest (content-addressed by that md5)
lists each file's md5; a KFP run keeps an output artifact's metadata in its own store, not in the artifact's folder.
A server or a scorer loads a file only when its bytes hash to such a record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from components.core.errors import StepError
from components.core.git import GitError, git
from components.core.io import file_digest


class IntegrityError(StepError):
    pass


@dataclass(frozen=True)
class Recorded:
    """The md5 recorded for a file, and where it was recorded (for messages and deploy/score records)."""

    md5: str
    where: str


def clean_commit(repo: Path) -> str | None:
    """The commit a working tree with no uncommitted changes to tracked files is at; None otherwise (or outside git)."""
    try:
        return None if git(repo, "status", "--porcelain", "--untracked-files=no") else git(repo, "rev-parse", "HEAD")
    except GitError:
        return None


def _stage_output_md5(repo: Path, path: str, rev: str | None) -> str | None:
    """The md5 dvc.lock at `rev` (None: the working tree's) records for `path` as a stage output of its own."""
    try:
        text = git(repo, "show", f"{rev}:dvc.lock") if rev else (repo / "dvc.lock").read_text()
    except (GitError, FileNotFoundError):
        return None
    stages = (yaml.safe_load(text) or {}).get("stages") or {}
    return next((out.get("md5") for stage in stages.values() for out in stage.get("outs") or [] if out.get("path") == path), None)


def _md5_inside_folder_output(repo: Path, path: str, rev: str | None) -> str | None:
    """The md5 DVC's .dir manifest of a folder output (dvc.lock at `rev`) lists for the file `path` inside it."""
    from dvc.api import DVCFileSystem  # slow to import: only where a folder's manifest is read

    try:
        return DVCFileSystem(str(repo), rev=rev).info(path).get("dvc_info", {}).get("md5")
    except FileNotFoundError:
        return None


def locked(repo: Path, path: str, rev: str | None) -> Recorded:
    """The md5 that dvc.lock at `rev` (None: the working tree's) records for `path` (relative to `repo`), a file a
    stage writes alone (a cached output or one git tracks) or inside a folder output. IntegrityError when it records none."""
    where = f"dvc.lock at {rev[:10]}" if rev else "dvc.lock of the working tree"
    md5 = _stage_output_md5(repo, path, rev) or _md5_inside_folder_output(repo, path, rev)
    if not md5:
        raise IntegrityError(f"{path}: {where} records no hash for it (not a stage output there); "
                             "run the stage that writes it (`dvc repro`), or deploy/score a version by its tag")
    return Recorded(md5, where)


def in_repository(file: Path, repo: Path) -> Recorded | None:
    """What dvc.lock records for a file inside `repo`, at the commit a deploy or score record claims (the working
    tree's dvc.lock when the tree has uncommitted changes, which such a record says); None for a file outside it."""
    path, repo = Path(file).resolve(), repo.resolve()
    return locked(repo, str(path.relative_to(repo)), clean_commit(repo)) if path.is_relative_to(repo) else None


def verify(file: Path, recorded: Recorded) -> None:
    """IntegrityError naming the file, the recorded and the actual md5 unless `file`'s bytes hash to `recorded`."""
    actual = file_digest(file, "md5")
    if actual != recorded.md5:
        raise IntegrityError(f"{file}: md5 {actual}, but {recorded.where} records {recorded.md5}: the file changed after "
                             "the pipeline wrote it; refusing to load it (`dvc checkout` restores the recorded one)")
