"""The model registry as git tags, read and written the GTO way: `<name>@vX.Y.Z` registers a
version at a commit, `<name>#<stage>#N` assigns a stage. Tags are read with the gto package, so
`gto show` and `dvc artifacts get --stage` see exactly what this module sees."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import yaml
from omegaconf import DictConfig

from components.core.errors import StepError
from components.core.git import GitError, git
from components.core.paths import ROOT


class RegistryError(StepError):
    pass


def model_artifact(repo: Path = ROOT) -> tuple[str, str]:
    """(name, path) of the model artifact declared in dvc.yaml's `artifacts:` section."""
    artifacts = (yaml.safe_load((repo / "dvc.yaml").read_text()) or {}).get("artifacts") or {}
    models = [(name, spec["path"]) for name, spec in artifacts.items() if spec.get("type") == "model"]
    if len(models) != 1:
        raise RegistryError(f"{repo / 'dvc.yaml'}: declare exactly one artifact of type model under `artifacts:`")
    return models[0]


def versions(repo: Path = ROOT) -> list[dict]:
    """Every registered version, newest first: version, commit, stages."""
    name, _ = model_artifact(repo)
    rows = show(repo, name)
    stages = {}
    for stage in {s["stage"] for row in rows for s in row["stages"]}:
        for holder in show(repo, f"{name}#{stage}"):
            stages.setdefault(holder["version"], []).append(stage)
    return [{"version": row["version"], "commit": row["commit_hexsha"], "stages": sorted(stages.get(row["version"], []))}
            for row in rows]


def show(repo: Path, query: str) -> list[dict]:
    """`gto show <query>` as data (registered versions only); nothing registered yet is an empty list."""
    import gto.api
    from gto.exceptions import ArtifactNotFound

    try:
        rows = gto.api.show(str(repo), query, registered_only=True)
    except ArtifactNotFound:
        return []
    return [row for row in rows if not row.get("discovered")]  # GTO still lists an unregistered branch head (e.g. an override record)


def holders(stage: str, repo: Path) -> list[dict]:
    name, _ = model_artifact(repo)
    return show(repo, f"{name}#{stage}")


def stage_holder(stage: str, repo: Path = ROOT) -> dict:
    """The version that holds `stage` now (as `gto show <name>#<stage>` reports it)."""
    current = holders(stage, repo)
    if not current:
        name, _ = model_artifact(repo)
        raise RegistryError(f"no version of {name} is in stage {stage!r}; promote one first")
    return {"version": current[0]["version"], "commit": current[0]["commit_hexsha"]}


def committed_json(repo: Path, commit: str, path: str) -> dict | None:
    """The JSON file `path` as committed at `commit` (None when it was not)."""
    try:
        return json.loads(git(repo, "show", f"{commit}:{path}"))
    except GitError:
        return None


def fetch_package(commit: str, dest: Path, repo: Path = ROOT) -> Path:
    """Download the model artifact as committed at `commit` from the DVC remote only.

    An empty, throw-away DVC cache forces every byte to come from the remote, which proves
    that anyone with the remote's credentials can retrieve this version.
    """
    from dvc.api import DVCFileSystem

    _, path = model_artifact(repo)
    with tempfile.TemporaryDirectory() as empty_cache:
        try:
            fs = DVCFileSystem(str(repo), rev=commit, config={"cache": {"dir": empty_cache}})
            fs.get(path, str(dest), recursive=True)
        except Exception as exc:  # DVC raises many types here; all mean "not retrievable"
            raise RegistryError(
                f"{path} at {commit[:10]} cannot be fetched from the DVC remote ({exc.__class__.__name__}: {exc}); "
                "run `dvc push` (`dvc commit` first if `dvc push` reports missing cache files; "
                "and check the remote's endpoint/credentials)") from None
    return dest


def check_gto_stages(cfg: DictConfig, repo: Path = ROOT) -> None:
    """`gto assign` refuses stages .gto does not declare; the registry must allow the same ones."""
    declared = (yaml.safe_load((repo / ".gto").read_text()) or {}).get("stages") if (repo / ".gto").exists() else None
    if declared != list(cfg.registry.stages):
        raise RegistryError(f"{repo / '.gto'} declares stages {declared}, conf/registry registry.stages has "
                            f"{list(cfg.registry.stages)}; make them equal so `gto assign` and this CLI accept the same stages")


def read_tag(tag: str, repo: Path = ROOT) -> dict:
    """name, version, stage (None for a registration) and commit of a GTO tag (`<name>@vX.Y.Z`, `<name>#<stage>#N`)."""
    import gto.api
    from gto.exceptions import GTOException

    try:
        events = gto.api.check_ref(str(repo), tag)
    except GTOException as exc:
        raise RegistryError(f"{tag}: not a GTO tag of this repository ({exc})") from None
    if not events:
        raise RegistryError(f"{tag}: not a GTO tag of this repository (expected <name>@vX.Y.Z or <name>#<stage>#N)")
    event = events[0]
    return {"name": event.artifact, "version": event.version, "stage": getattr(event, "stage", None), "commit": event.commit_hexsha}


def stage_tag(tag: str, repo: Path = ROOT) -> dict:
    """read_tag of a stage-assignment tag (`<name>#<stage>#N`)."""
    read = read_tag(tag, repo)
    if read["stage"] is None:
        raise RegistryError(f"{tag}: not a stage assignment tag (expected <name>#<stage>#N)")
    return read


def current_stage_tag(stage: str, repo: Path = ROOT) -> str:
    """The tag through which the current holder of `stage` holds it: the newest `<name>#<stage>#N` naming its version."""
    name, _ = model_artifact(repo)
    holder = stage_holder(stage, repo)
    tags = [t for t in git(repo, "tag", "-l", f"{name}#{stage}#*").split() if re.fullmatch(r".*#\d+", t)]
    for tag in sorted(tags, key=lambda t: int(t.rsplit("#", 1)[1]), reverse=True):
        if read_tag(tag, repo)["version"] == holder["version"]:
            return tag
    raise RegistryError(f"{holder['version']} holds {stage!r}, but no tag {name}#{stage}#N assigns it there")
