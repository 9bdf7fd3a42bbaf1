"""deploy: register a packaged .mar on a TorchServe by version, make it the default, smoke
test it on the package's sample images, and roll back to the previous default if that fails.

Works on the local server started by `python -m serve up` (no URL given) and on any remote
TorchServe given its management URL + token (the KFP deploy component). The helpers below
(list_versions, default_version, set_default, unregister) serve promotion as well.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import requests
from omegaconf import DictConfig

from components.errors import ConfigError, StepError
from serve.server import Endpoint, bearer, local_endpoint, state_dir

TIMEOUT_S = 30


class DeployError(StepError):
    pass


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _call(method: str, url: str, token: str | None, timeout: float = TIMEOUT_S, **kwargs) -> requests.Response:
    try:
        response = requests.request(method, url, headers=bearer(token), timeout=timeout, **kwargs)
    except requests.RequestException as exc:
        raise DeployError(f"{method} {url}: TorchServe unreachable ({exc})") from None
    if not response.ok:
        raise DeployError(f"{method} {url}: HTTP {response.status_code}: {response.text.strip()}")
    return response


def list_versions(endpoint: Endpoint, model_name: str) -> list[str]:
    """Versions of `model_name` registered on the server ([] when none)."""
    try:
        described = _call("GET", f"{endpoint.management_url}/models/{model_name}/all", endpoint.management_token).json()
    except DeployError as exc:
        if "HTTP 404" in str(exc):
            return []
        raise
    return [d["modelVersion"] for d in described]


def default_version(endpoint: Endpoint, model_name: str) -> str | None:
    try:
        return _call("GET", f"{endpoint.management_url}/models/{model_name}", endpoint.management_token).json()[0]["modelVersion"]
    except DeployError as exc:
        if "HTTP 404" in str(exc):
            return None
        raise


def set_default(endpoint: Endpoint, model_name: str, version: str) -> None:
    _call("PUT", f"{endpoint.management_url}/models/{model_name}/{version}/set-default", endpoint.management_token)


def unregister(endpoint: Endpoint, model_name: str, version: str) -> None:
    _call("DELETE", f"{endpoint.management_url}/models/{model_name}/{version}", endpoint.management_token)


def register(endpoint: Endpoint, mar_file: str, serve: DictConfig, model_name: str | None = None) -> None:
    """Register an archive already in the server's model store (under its own name unless
    `model_name` is given), with its workers started."""
    params = {"url": mar_file, "initial_workers": serve.workers, "batch_size": serve.batch_size,
              "max_batch_delay": serve.max_batch_delay_ms, "response_timeout": serve.response_timeout_s, "synchronous": "true"}
    if model_name:
        params["model_name"] = model_name
    _call("POST", f"{endpoint.management_url}/models", endpoint.management_token, params=params, timeout=serve.startup_timeout_s)


def read_package(package_dir: Path) -> dict:
    manifest = Path(package_dir) / "package.json"
    if not manifest.exists():
        raise DeployError(f"{package_dir}: no package.json; run the package step first")
    return json.loads(manifest.read_text())


def copy_checked(mar_path: Path, sha256: str, model_store: Path, target_name: str) -> Path:
    """Copy the archive into the model store atomically; its sha256 must match the package."""
    target = model_store / target_name
    if not (target.exists() and sha256_file(target) == sha256):
        model_store.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target_name}.", dir=model_store)
        os.close(fd)
        shutil.copyfile(mar_path, tmp)
        os.chmod(tmp, 0o644)  # the server may run as another user
        os.replace(tmp, target)
    if sha256_file(target) != sha256:
        raise DeployError(f"{target}: sha256 differs from the package's ({sha256}); the archive is corrupt or was replaced")
    return target


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


def deploy(cfg: DictConfig, mar_path: str | Path, version: str, management_url: str | None = None, token: str | None = None,
           *, inference_url: str | None = None, inference_token: str | None = None, model_store: str | Path | None = None) -> dict:
    """Register `version` of the packaged model, make it the default and smoke test it.

    Without `management_url`, the local server of `serve.state_dir` is used. A remote server
    needs its management URL + token, its inference URL + token (for the smoke test) and a
    model store folder it shares with this machine.
    """
    mar_path = Path(mar_path)
    package = read_package(mar_path.parent)
    if not mar_path.exists():
        raise DeployError(f"{mar_path}: archive not found")
    if package["version"] != version:
        raise DeployError(f"{mar_path}: the archive holds version {package['version']}, not {version}")
    if sha256_file(mar_path) != package["mar"]["sha256"]:
        raise DeployError(f"{mar_path}: sha256 differs from package.json; the archive is corrupt or was replaced")
    if management_url is None:
        endpoint, store = local_endpoint(cfg), state_dir(cfg).model_store
    elif inference_url is None or model_store is None:
        raise ConfigError("deploy to a remote TorchServe needs inference_url (smoke test) and model_store (shared with the server)")
    else:
        endpoint, store = Endpoint(inference_url, management_url, inference_token, token), Path(model_store)

    name = package["model_name"]
    target = copy_checked(mar_path, package["mar"]["sha256"], store, f"{name}-{version}.mar")
    previous = default_version(endpoint, name)
    newly_registered = version not in list_versions(endpoint, name)
    if newly_registered:
        register(endpoint, target.name, cfg.serve)
    set_default(endpoint, name, version)
    try:
        smoke_test(endpoint, name, mar_path.parent, package["samples"])
    except DeployError as failure:
        rolled_back = bool(previous) and previous != version
        if rolled_back:
            set_default(endpoint, name, previous)
        if newly_registered:
            unregister(endpoint, name, version)
        outcome = f"the default version is back to {previous}" if rolled_back else "no previous version to roll back to"
        raise DeployError(f"{name} version {version}: {failure}; {outcome}") from None
    return {"model_name": name, "version": version, "previous_version": previous, "smoke_samples": len(package["samples"]),
            "endpoint": f"{endpoint.inference_url}/predictions/{name}"}
