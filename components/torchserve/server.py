"""The local TorchServe: its config generated from conf/serve, start / stop / status.

Everything a server writes (config, pid file, worker sockets, logs, key file, model store)
lives in one folder per project, `serve.state_dir` (TorchServe's /tmp defaults collide
between servers). Secure defaults: loopback addresses only, token authorization on, the
model API only on the loopback management address, downloads restricted to the model store,
and a request-size limit.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import requests
from omegaconf import DictConfig

from components.core.errors import StepError
from components.core.paths import ROOT
from components.handler.settings import (
    ERROR_INTERVAL_ENV,
    LOG_BACKUPS_ENV,
    LOG_MAX_BYTES_ENV,
    LOG_QUEUE_LINES_ENV,
    MAX_INSTANCES_ENV,
    MAX_PIXELS_ENV,
    PREDICTION_LOG_ENV,
    SAMPLE_RATE_ENV,
    THREADS_ENV,
)

JAVA_MAIN_CLASS = "org.pytorch.serve.ModelServer"
LOG_CONFIG = ROOT / "serve" / "log4j2.xml"
# A key with less than this (or half its lifetime, if shorter) left is renewed before use:
# the command using it must not outlive it.
KEY_RENEWAL_MARGIN_S = 300


class ServeError(StepError):
    pass


@dataclass(frozen=True)
class Endpoint:
    """Where a TorchServe answers and the keys it wants (None: no token sent)."""

    inference_url: str
    management_url: str
    inference_token: str | None = None
    management_token: str | None = None
    metrics_url: str | None = None


@dataclass(frozen=True)
class StateDir:
    root: Path

    config = property(lambda self: self.root / "config.properties")
    model_store = property(lambda self: self.root / "model-store")
    logs = property(lambda self: self.root / "logs")
    tmp = property(lambda self: self.root / "tmp")
    key_file = property(lambda self: self.root / "key_file.json")  # TorchServe writes it in its working dir
    pid_file = property(lambda self: self.root / "tmp" / ".model_server.pid")
    console = property(lambda self: self.root / "logs" / "console.log")
    deploy_log = property(lambda self: self.root / "deployments.jsonl")  # one JSON record per deployment
    releases = property(lambda self: self.root / "releases")  # packages of registered versions, fetched to be deployed


def handler_env(cfg: DictConfig, log_file: Path) -> dict[str, str]:
    """The handler's settings from conf/serve (components/handler/settings.py), for the local server and the cluster's."""
    s = cfg.serve
    return {PREDICTION_LOG_ENV: str(log_file), SAMPLE_RATE_ENV: str(s.prediction_log.sample_rate), THREADS_ENV: str(s.onnx_threads),
            LOG_MAX_BYTES_ENV: str(int(s.prediction_log.max_mb * 1e6)), LOG_BACKUPS_ENV: str(s.prediction_log.backups),
            LOG_QUEUE_LINES_ENV: str(s.prediction_log.max_queued_lines), ERROR_INTERVAL_ENV: str(s.error_report_interval_s),
            MAX_PIXELS_ENV: str(s.max_image_pixels), MAX_INSTANCES_ENV: str(s.max_instances)}


def state_dir(cfg: DictConfig) -> StateDir:
    root = Path(cfg.serve.state_dir)
    return StateDir(root if root.is_absolute() else ROOT / root)


def prediction_log(cfg: DictConfig) -> Path:
    return state_dir(cfg).root / cfg.serve.prediction_log.file


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host  # an IPv6 address in a URL


@dataclass(frozen=True)
class Preload:
    """A model the server loads as it starts (an archive already in its model store), its workers up before it answers."""

    archive: str
    model_name: str
    version: str


def config_properties(cfg: DictConfig, state: StateDir, preload: Preload | None = None) -> str:
    s = cfg.serve
    host = _url_host(s.host)
    store = state.model_store.resolve()
    settings = {
        "inference_address": f"http://{host}:{s.inference_port}",
        "management_address": f"http://{host}:{s.management_port}",
        "metrics_address": f"http://{host}:{s.metrics_port}",
        "grpc_inference_address": s.host,
        "grpc_inference_port": s.grpc_inference_port,
        "grpc_management_address": s.host,
        "grpc_management_port": s.grpc_management_port,
        "model_store": store,
        # Registration may only name archives inside the model store: no downloads from anywhere.
        "allowed_urls": f"file://{re.escape(str(store))}/[^/]+\\.mar",
        "enable_model_api": "true",
        "disable_token_authorization": "false",
        "token_expiration_min": s.token_expiration_min,
        "max_request_size": s.max_request_bytes,
        # The worker would json.loads application/json bodies itself, outside the handler's error
        # handling (a hostile body logs a traceback); the handler parses every body.
        "decode_input_request": "false",
        "default_workers_per_model": s.workers,
        "default_response_timeout": s.response_timeout_s,
        "metrics_mode": "prometheus",
        "model_metrics_auto_detect": "true",
        "install_py_dep_per_model": "false",
        "enable_envvars_config": "false",
    }
    if preload:
        # A model snapshot, not load_models + models: TorchServe 0.12 reads `models` values <= 0 as unset (a
        # max_batch_delay of 0 would become 100 ms); the snapshot takes the values register() gives a model.
        settings["model_snapshot"] = json.dumps({"name": "startup.cfg", "modelCount": 1, "models": {preload.model_name: {
            preload.version: {"defaultVersion": True, "marName": preload.archive, "minWorkers": s.workers, "maxWorkers": s.workers,
                              "batchSize": s.batch_size, "maxBatchDelay": s.max_batch_delay_ms,
                              "responseTimeout": s.response_timeout_s}}}})
    return "".join(f"{key}={value}\n" for key, value in settings.items())


def local_endpoint(cfg: DictConfig, renew: bool = True) -> Endpoint:
    """The local server's URLs and the keys from its key file, renewed first when expiring (fresh_keys) while it runs."""
    s, state = cfg.serve, state_dir(cfg)
    host = _url_host(s.host)
    management_url = f"http://{host}:{s.management_port}"
    keys = {}
    if state.key_file.exists() and renew and running_pid(cfg):
        keys = fresh_keys(state.key_file, management_url, s.token_expiration_min)
    elif state.key_file.exists():
        keys = read_keys(state.key_file)
    return Endpoint(f"http://{host}:{s.inference_port}", management_url,
                    keys.get("inference"), keys.get("management"), f"http://{host}:{s.metrics_port}/metrics")


def read_keys(key_file: Path) -> dict[str, str]:
    data = json.loads(key_file.read_text())
    return {kind: data[kind]["key"] for kind in ("inference", "management", "API") if kind in data}


def expiring_keys(key_file: Path, margin_s: float) -> list[str]:
    """The kinds of key ("inference", "management") in the key file that expire within margin_s."""
    data = json.loads(key_file.read_text())
    horizon = datetime.now(UTC) + timedelta(seconds=margin_s)
    return [kind for kind in ("inference", "management")
            if kind in data and datetime.fromisoformat(data[kind]["expiration time"]) <= horizon]


def fresh_keys(key_file: Path, management_url: str, lifetime_min: float) -> dict[str, str]:
    """The keys of a TorchServe's key file (the local server's, or one on a volume shared with a remote server), those
    expiring within KEY_RENEWAL_MARGIN_S (or half their `lifetime_min`, if shorter) renewed first with the never-expiring
    API key: TorchServe answers an expired key with a bare 400, and writes the new key into the same file."""
    for kind in expiring_keys(key_file, min(KEY_RENEWAL_MARGIN_S, lifetime_min * 60 / 2)):
        try:
            response = requests.post(f"{management_url}/token", params={"type": kind}, headers=bearer(read_keys(key_file)["API"]),
                                     timeout=10)
        except requests.RequestException as exc:
            raise ServeError(f"the {kind} key in {key_file} has expired and TorchServe is unreachable to renew it ({exc})") from None
        if not response.ok:
            raise ServeError(f"the {kind} key in {key_file} has expired and TorchServe refused to renew it (HTTP {response.status_code}); "
                             "restart TorchServe (the local one: python -m serve down && python -m serve up)")
    return read_keys(key_file)


def serving_state(endpoint: Endpoint, model_name: str) -> tuple[str, list[str]]:
    """What the model's workers do: "serving" (every worker of every version READY), "degraded"
    (the default version answers, some worker does not), "down" (no READY worker of the default
    version, or the model is not registered); and one line per version."""
    versions = _describe(endpoint, f"{model_name}/all")
    if not versions:
        return "down", [f"  {model_name}: not registered"]
    default = _describe(endpoint, model_name)[0]["modelVersion"]
    lines, ready = [], {}
    for described in versions:
        version, workers = described["modelVersion"], described["workers"]
        ready[version] = [worker["status"] == "READY" for worker in workers]
        states = ", ".join(f"pid {worker.get('pid', '-')} {worker['status']}" for worker in workers) or "no workers"
        lines.append(f"  {model_name} {version}{' (default)' if version == default else ''}: "
                     f"{sum(ready[version])}/{len(workers)} workers READY ({states})")
    if not any(ready[default]):
        return "down", lines
    return ("serving" if all(all(r) for r in ready.values()) else "degraded"), lines


def _describe(endpoint: Endpoint, path: str) -> list[dict]:
    """The management API's description of models/<path>; [] for an unknown model."""
    try:
        response = requests.get(f"{endpoint.management_url}/models/{path}", headers=bearer(endpoint.management_token), timeout=10)
    except requests.RequestException as exc:
        raise ServeError(f"TorchServe's management API at {endpoint.management_url} is unreachable ({exc})") from None
    if response.status_code == 404:
        return []
    if not response.ok:
        raise ServeError(f"GET {endpoint.management_url}/models/{path}: HTTP {response.status_code}: {response.text.strip()[:300]}")
    return response.json()


def running_pid(cfg: DictConfig) -> int | None:
    """Pid of this project's TorchServe frontend, None when it is not running."""
    pid_file = state_dir(cfg).pid_file
    try:
        process = psutil.Process(int(pid_file.read_text().strip()))
        return process.pid if JAVA_MAIN_CLASS in process.cmdline() else None
    except (FileNotFoundError, ValueError, psutil.Error):
        return None


def start(cfg: DictConfig, preload: Preload | None = None) -> Endpoint:
    """Start the local TorchServe (with `preload` registered as it starts, its workers ready; else no model) and wait
    until it answers."""
    if running_pid(cfg):
        raise ServeError(f"TorchServe is already running for {state_dir(cfg).root} (pid {running_pid(cfg)}); stop it first")
    state = state_dir(cfg)
    for folder in (state.model_store, state.logs, state.tmp):
        folder.mkdir(parents=True, exist_ok=True)
    state.root.chmod(0o700)  # the key file lands here
    state.key_file.unlink(missing_ok=True)
    state.config.write_text(config_properties(cfg, state, preload))
    env = {**os.environ, "TMPDIR": str(state.tmp), "TEMP": str(state.tmp), "LOG_LOCATION": str(state.logs),
           "METRICS_LOCATION": str(state.logs), **handler_env(cfg, prediction_log(cfg))}
    command = [sys.executable, "-m", "ts.model_server", "--start", "--ts-config", str(state.config),
               "--model-store", str(state.model_store), "--log-config", str(LOG_CONFIG), "--ncs"]
    # Java inherits the launcher's stdout: a file, never a pipe (a captured pipe never closes).
    with open(state.console, "ab") as console:
        subprocess.run(command, cwd=state.root, env=env, stdin=subprocess.DEVNULL, stdout=console, stderr=console,
                       start_new_session=True, check=False, timeout=60)
    deadline, answered = time.monotonic() + cfg.serve.startup_timeout_s, False
    while time.monotonic() < deadline:
        if running_pid(cfg) is None:
            raise ServeError(f"TorchServe exited during start; see {state.console}:\n{tail(state.console)}")
        endpoint = _ready(cfg)
        answered = answered or endpoint is not None
        # TorchServe answers /ping before the workers of the model it loads at start are up.
        if endpoint and (preload is None or serving_state(endpoint, preload.model_name)[0] == "serving"):
            return endpoint
        time.sleep(0.05)
    stop(cfg)
    if answered:  # only the preloaded model's workers were missing
        log = state.logs / "model_log.log"
        raise ServeError(f"the workers of {preload.model_name} {preload.version} were not ready within "
                         f"serve.startup_timeout_s={cfg.serve.startup_timeout_s}s; see {log}:\n{tail(log)}")
    raise ServeError(f"TorchServe did not answer within serve.startup_timeout_s={cfg.serve.startup_timeout_s}s; "
                     f"see {state.console}:\n{tail(state.console)}")


def _ready(cfg: DictConfig) -> Endpoint | None:
    try:
        endpoint = local_endpoint(cfg, renew=False)  # fresh keys
    except (OSError, ValueError, KeyError):  # the key file is still being written
        return None
    return endpoint if endpoint.inference_token and healthy(endpoint) else None


def healthy(endpoint: Endpoint) -> bool:
    try:
        return requests.get(endpoint.inference_url + "/ping", headers=bearer(endpoint.inference_token), timeout=2).ok
    except requests.RequestException:
        return False


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def stop(cfg: DictConfig, timeout_s: float = 30) -> bool:
    """Stop the local TorchServe and its workers; False when it was not running."""
    pid = running_pid(cfg)
    if pid is None:
        return False
    frontend = psutil.Process(pid)
    processes = [frontend, *frontend.children(recursive=True)]
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=5)
    state = state_dir(cfg)
    state.pid_file.unlink(missing_ok=True)
    state.key_file.unlink(missing_ok=True)
    return True


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"
