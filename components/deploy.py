"""deploy: register a packaged .mar on a TorchServe by version, make it the default, smoke test
it on the package's sample images, and roll back to the previous default if that fails.

One behaviour wherever it runs (`serve up`, `serve up --stage`, the KFP deploy component,
`run-local`): the local server of conf/serve is started when needed (no URL given; with the
package loaded as it starts, no separate registration), or any remote TorchServe is used given
its management URL + token; afterwards the server keeps the
new default and the one before it (for a rollback), and nothing older. Every deployment
appends a record (when, what, from which commit or tag) to the server's deploy log.

The archive is checked against the md5 the pipeline recorded outside its folder (components/core/recorded.py):
dvc.lock for a package of this repository (at the commit the deploy record claims), the registry tag's commit's
dvc.lock, or the KFP package artifact's metadata; a replaced .mar with a package.json to match is refused.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import requests
from omegaconf import DictConfig

from components.core.errors import ConfigError, StepError
from components.core.events import emit
from components.core.git import GitError, git
from components.core.io import file_digest
from components.core.paths import ROOT
from components.core.recorded import Recorded, in_repository, verify
from components.torchserve import server
from components.torchserve.management import TIMEOUT_S, copy_checked, default_version, list_versions, register, set_default, unregister
from components.torchserve.server import Endpoint, bearer


class DeployError(StepError):
    pass


def read_package(package_dir: Path) -> dict:
    manifest = Path(package_dir) / "package.json"
    if not manifest.exists():
        raise DeployError(f"{package_dir}: no package.json; run the package step first")
    return json.loads(manifest.read_text())


def smoke_test(endpoint: Endpoint, model_name: str, package_dir: Path, samples: list[dict]) -> None:
    """Every sample image must come back with the top-1 label the package predicted in-process."""
    url = f"{endpoint.inference_url}/predictions/{model_name}"
    failures = []
    for sample in samples:
        try:
            response = requests.post(url, data=(package_dir / sample["file"]).read_bytes(),
                                     headers=bearer(endpoint.inference_token), timeout=TIMEOUT_S)
            got = response.json()[0]["label"] if response.ok else f"HTTP {response.status_code}"
        except (requests.RequestException, ValueError, KeyError, IndexError, TypeError) as exc:
            got = f"bad answer ({exc})"
        if got != sample["expected"]:
            failures.append(f"{sample['file']}: expected {sample['expected']!r}, got {got!r}")
    if failures:
        raise DeployError(f"smoke test failed on {len(failures)}/{len(samples)} sample(s): " + "; ".join(failures))


def source_commit(repo: Path = ROOT) -> dict:
    """The commit the working tree is at, and whether it has uncommitted changes (for the deploy record)."""
    try:
        return {"commit": git(repo, "rev-parse", "HEAD"),
                "uncommitted_changes": bool(git(repo, "status", "--porcelain", "--untracked-files=no"))}
    except GitError:  # not a git checkout (e.g. a component image): the record says so
        return {"commit": "unknown", "uncommitted_changes": None}


def check_package(mar_path: Path, version: str, recorded: Recorded | None) -> dict:
    package = read_package(mar_path.parent)
    if not mar_path.exists():
        raise DeployError(f"{mar_path}: archive not found")
    if recorded:
        verify(mar_path, recorded)
    if package["version"] != version:
        raise DeployError(f"{mar_path}: the archive holds version {package['version']}, not {version}")
    if file_digest(mar_path) != package["mar"]["sha256"]:
        raise DeployError(f"{mar_path}: sha256 differs from package.json; the archive is corrupt or was replaced")
    return package


def target(cfg: DictConfig, package: dict, package_dir: Path, management_url: str | None, token: str | None,
           inference_url: str | None, inference_token: str | None, model_store: str | Path | None) -> tuple[Endpoint, Path, bool]:
    """The server to deploy to, its model store, and whether the package is already registered on it: the local server
    (when it is not running, started with the package loaded as it starts: no separate registration) or a remote one."""
    if management_url is None:
        store = server.state_dir(cfg).model_store
        if server.running_pid(cfg) is None:
            archive = copy_checked(package_dir / package["mar"]["file"], package["mar"]["sha256"], store, archive_name(package))
            server.start(cfg, server.Preload(archive.name, package["model_name"], package["version"]))
            return server.local_endpoint(cfg), store, True
        return server.local_endpoint(cfg), store, False
    if inference_url is None or model_store is None:
        raise ConfigError("deploy to a remote TorchServe needs inference_url (smoke test) and model_store (shared with the server)")
    return Endpoint(inference_url, management_url, inference_token, token), Path(model_store), False


def archive_name(package: dict) -> str:
    return f"{package['model_name']}-{package['version']}.mar"


def switch_default(cfg: DictConfig, endpoint: Endpoint, store: Path, package: dict, package_dir: Path,
                   preloaded: bool = False) -> str | None:
    """Register and make `package` the default (`preloaded`: the server loaded it as it started, as its only model);
    on a failed smoke test, put the previous default back."""
    name, version = package["model_name"], package["version"]
    previous, newly_registered = None, True
    if not preloaded:
        archive = copy_checked(package_dir / package["mar"]["file"], package["mar"]["sha256"], store, archive_name(package))
        previous = default_version(endpoint, name)
        newly_registered = version not in list_versions(endpoint, name)
        if newly_registered:
            register(endpoint, archive.name, cfg.serve)
        set_default(endpoint, name, version)
    try:
        smoke_test(endpoint, name, package_dir, package["samples"])
    except DeployError as failure:
        rolled_back = bool(previous) and previous != version
        if rolled_back:
            set_default(endpoint, name, previous)
        if newly_registered:
            unregister(endpoint, name, version)
        outcome = f"the default version is back to {previous}" if rolled_back else "no previous version to roll back to"
        if rolled_back:
            emit(cfg.events, "rolled_back", f"{name} {version} failed its smoke test; {outcome}", model=name, version=previous,
                 details={"replaced": version, "failure": str(failure)})
        raise DeployError(f"{name} version {version}: {failure}; {outcome}") from None
    return previous


def deploy(cfg: DictConfig, mar_path: str | Path, version: str, management_url: str | None = None, token: str | None = None,
           *, inference_url: str | None = None, inference_token: str | None = None, model_store: str | Path | None = None,
           source: dict | None = None, recorded: Recorded | None = None) -> dict:
    """Deploy `version` of the packaged model as the default; returns the deploy record.

    `source` says where the package came from (e.g. the git tag, stage and commit of a
    registry version); by default, the commit of this working tree. `recorded` is the archive's
    md5 as the pipeline recorded it; by default (no `source`), what this repository's dvc.lock records.
    """
    mar_path = Path(mar_path)
    if recorded is None and source is None:
        recorded = in_repository(mar_path, ROOT)
    package = check_package(mar_path, version, recorded)
    endpoint, store, preloaded = target(cfg, package, mar_path.parent, management_url, token, inference_url, inference_token,
                                        model_store)
    name = package["model_name"]
    previous = switch_default(cfg, endpoint, store, package, mar_path.parent, preloaded)
    for old in [] if preloaded else list_versions(endpoint, name):  # keep the previous default for a rollback, nothing older
        if old not in (version, previous):
            unregister(endpoint, name, old)
    record = {"time": datetime.now(UTC).isoformat(timespec="seconds"), "model_name": name, "version": version,
              "previous_version": previous, "smoke_samples": len(package["samples"]),
              "endpoint": f"{endpoint.inference_url}/predictions/{name}", "management_url": endpoint.management_url,
              "package_lineage": package["lineage"], "source": source or source_commit(),
              "verified_against": recorded.where if recorded else "package.json only (no record outside the package's folder)"}
    if management_url is None:  # the record first: an event receiver, however slow, cannot lose it
        log = server.state_dir(cfg).deploy_log
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
    emit(cfg.events, "deployed", f"{name} {version} is the default on {endpoint.inference_url}", model=name, version=version,
         stage=record["source"].get("stage"), commit=record["source"].get("commit"), details=record)
    return record
