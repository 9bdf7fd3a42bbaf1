"""A client of TorchServe's management API (register, list, set default, unregister) and the
model store it reads archives from. Used by the deploy step; knows nothing of packages."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import requests
from omegaconf import DictConfig

from components.core.errors import StepError
from components.core.io import file_digest
from components.torchserve.server import Endpoint, bearer

TIMEOUT_S = 30


class TorchServeError(StepError):
    pass


def _call(method: str, url: str, token: str | None, timeout: float = TIMEOUT_S, **kwargs) -> requests.Response:
    try:
        response = requests.request(method, url, headers=bearer(token), timeout=timeout, **kwargs)
    except requests.RequestException as exc:
        raise TorchServeError(f"{method} {url}: TorchServe unreachable ({exc})") from None
    if not response.ok:
        raise TorchServeError(f"{method} {url}: HTTP {response.status_code}: {response.text.strip()}")
    return response


def list_versions(endpoint: Endpoint, model_name: str) -> list[str]:
    """Versions of `model_name` registered on the server ([] when none)."""
    try:
        described = _call("GET", f"{endpoint.management_url}/models/{model_name}/all", endpoint.management_token).json()
    except TorchServeError as exc:
        if "HTTP 404" in str(exc):
            return []
        raise
    return [d["modelVersion"] for d in described]


def default_version(endpoint: Endpoint, model_name: str) -> str | None:
    try:
        return _call("GET", f"{endpoint.management_url}/models/{model_name}", endpoint.management_token).json()[0]["modelVersion"]
    except TorchServeError as exc:
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


def copy_checked(mar_path: Path, sha256: str, model_store: Path, target_name: str) -> Path:
    """Copy the archive into the model store atomically; its sha256 must match the package."""
    target = model_store / target_name
    if not (target.exists() and file_digest(target) == sha256):
        model_store.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target_name}.", dir=model_store)
        os.close(fd)
        shutil.copyfile(mar_path, tmp)
        os.chmod(tmp, 0o644)  # the server may run as another user
        os.replace(tmp, target)
    if file_digest(target) != sha256:
        raise TorchServeError(f"{target}: sha256 differs from the package's ({sha256}); the archive is corrupt or was replaced")
    return target
