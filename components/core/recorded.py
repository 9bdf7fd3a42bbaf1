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


def _locked_outputs(repo: Path, rev: str | None) -> dict[str, str]:
    """Every stage output's md5 (a folder's ends in .dir) that dvc.lock at `rev` (None: the working tree's) records."""
    try:
        text = git(repo, "show", f"{rev}:dvc.lock") if rev else (repo / "dvc.lock").read_text()
    except (GitError, FileNotFoundError):
        return {}
    stages = (yaml.safe_load(text) or {}).get("stages") or {}
    return {out["path"]: out["md5"] for stage in stages.values() for out in stage.get("outs") or [] if out.get("md5")}


def _listed_in_manifest(repo: Path, folder_md5: str, name: str) -> str | None:
    """The md5 that DVC's manifest of a folder (its .dir object in the project's DVC cache) lists for `name`.
    dvc_data reads it in milliseconds; dvc.api would take half a second of a deploy's cold start to import."""
    from dvc.config import Config
    from dvc_data.hashfile.db.local import LocalHashFileDB
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree
    from dvc_objects.fs.local import LocalFileSystem

    cache = Config(dvc_dir=str(repo / ".dvc"))["cache"].get("dir") or str(repo / ".dvc" / "cache")
    try:
        tree = Tree.load(LocalHashFileDB(LocalFileSystem(), f"{cache}/files/md5"), HashInfo("md5", folder_md5))
    except (FileNotFoundError, ValueError):
        return None
    return next((info.value for key, (_, info) in tree.iteritems() if "/".join(key) == name), None)


def locked(repo: Path, path: str, rev: str | None) -> Recorded:
    """The md5 that dvc.lock at `rev` (None: the working tree's) records for `path` (relative to `repo`), a file a
    stage writes alone (a cached output or one git tracks) or inside a folder output (listed in the folder's manifest,
    read from the DVC cache). IntegrityError when it records none."""
    where = f"dvc.lock at {rev[:10]}" if rev else "dvc.lock of the working tree"
    outputs = _locked_outputs(repo, rev)
    md5 = outputs.get(path)
    if md5 is None:
        folder = next((out for out in outputs if path.startswith(f"{out}/")), None)
        md5 = _listed_in_manifest(repo, outputs[folder], path[len(folder) + 1:]) if folder else None
    if not md5:
        raise IntegrityError(f"{path}: {where} records no hash for it (not a stage output there, or its folder's manifest "
                             "is not in the DVC cache); run the stage that writes it (`dvc repro`) or `dvc pull`, or "
                             "deploy/score a version by its tag")
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
