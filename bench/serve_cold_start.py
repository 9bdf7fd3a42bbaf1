"""Cold start: from nothing running to the first correct answer, the template's path (what `python -m serve up`
runs: components.deploy.deploy, which starts the local server, registers, smoke-tests) next to TorchServe on a
no-op handler through the same start + register + predict sequence (TorchServe's own floor), in turns.

    .venv/bin/python bench/serve_cold_start.py [--package artifacts/package] [--repeats 5] [--flow preload|api] [serve.key=value ...]

Each repeat starts a server on free loopback ports with a new temporary state folder and stops it. Phases:
server = until the frontend answers HTTP at all; registration = until the model's workers are ready (register()
returned, or server.start() when the model is loaded at start); deploy rest = setting the default and the smoke
test (the template only); first prediction = the first answer after that. `--flow api` starts an empty server and
registers through the management API afterwards (the template before the model was loaded at start).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from components import deploy as deploy_module  # noqa: E402
from components.core.config.compose import compose  # noqa: E402
from components.core.config.schema import PORT_KEYS  # noqa: E402
from components.package import ARCHIVER  # noqa: E402
from components.torchserve import server  # noqa: E402
from components.torchserve.management import register  # noqa: E402
from tests.helpers.servers import free_ports  # noqa: E402

NOOP_HANDLER = '''
def handle(data, context):
    return None if data is None else ['"ok"'] * len(data)
'''
PHASES = ("server", "registration", "deploy rest", "first prediction", "total")


def noop_mar(folder: Path) -> Path:
    """An archive whose handler returns a constant: what TorchServe costs by itself."""
    with tempfile.TemporaryDirectory() as scratch:
        handler = Path(scratch) / "noop.py"
        handler.write_text(NOOP_HANDLER)
        subprocess.run([ARCHIVER, "--model-name", "noop", "--version", "1", "--handler", str(handler),
                        "--export-path", str(folder), "--force"], check=True, env={**os.environ, "TMPDIR": scratch})
    return folder / "noop.mar"


class FrontendWatch:
    """Polls the inference port (no token: any HTTP answer, even a 400, means the frontend is up)."""

    def __init__(self, url: str):
        self.url, self.up_at, self.done = url, None, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.done.is_set():
            try:
                requests.get(self.url, timeout=1)
                self.up_at = time.perf_counter()
                return
            except requests.RequestException:
                time.sleep(0.01)

    def stop(self) -> float | None:
        self.done.set()
        self.thread.join()
        return self.up_at


def configure(overrides: list[str], state: Path):
    return compose([*overrides, f"serve.state_dir={state}",
                    *(f"serve.{key}={port}" for key, port in zip(PORT_KEYS, free_ports(len(PORT_KEYS)), strict=True))])


def predict(cfg, model_name: str, body: bytes) -> requests.Response:
    endpoint = server.local_endpoint(cfg, renew=False)
    return requests.post(f"{endpoint.inference_url}/predictions/{model_name}", data=body,
                         headers=server.bearer(endpoint.inference_token), timeout=30)


def template(overrides: list[str], package_dir: Path, flow: str) -> dict[str, float]:
    """deploy() as `serve up` calls it (with `--flow api`: an empty server started first), then one prediction."""
    package = deploy_module.read_package(package_dir)
    sample = package["samples"][0]
    body = (package_dir / sample["file"]).read_bytes()
    marks: dict[str, float] = {}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            result = function(*args, **kwargs)
            marks[name] = time.perf_counter()
            return result
        return wrapper

    originals = server.start, deploy_module.register
    with tempfile.TemporaryDirectory(prefix="cold-start-") as tmp:
        cfg = configure(overrides, Path(tmp) / "state")
        watch = FrontendWatch(f"http://{cfg.serve.host}:{cfg.serve.inference_port}/ping")
        server.start, deploy_module.register = timed("started", server.start), timed("registered", deploy_module.register)
        try:
            started = time.perf_counter()
            if flow == "api":
                server.start(cfg)
            deploy_module.deploy(cfg, package_dir / package["mar"]["file"], package["version"])
            deployed = time.perf_counter()
            response = predict(cfg, package["model_name"], body)
            answered = time.perf_counter()
            assert response.ok and response.json()[0]["label"] == sample["expected"], response.text
            up = watch.stop()
        finally:
            server.start, deploy_module.register = originals
            watch.stop()
            server.stop(cfg)
    ready = marks.get("registered", marks["started"])
    return {"server": up - started, "registration": ready - up, "deploy rest": deployed - ready,
            "first prediction": answered - deployed, "total": answered - started}


def noop(overrides: list[str], archive: Path, flow: str) -> dict[str, float]:
    """The no-op archive through the same sequence: loaded at start (`preload`) or registered after it (`api`)."""
    with tempfile.TemporaryDirectory(prefix="cold-start-noop-") as tmp:
        cfg = configure(overrides, Path(tmp) / "state")
        store = server.state_dir(cfg).model_store
        store.mkdir(parents=True)
        (store / archive.name).write_bytes(archive.read_bytes())
        watch = FrontendWatch(f"http://{cfg.serve.host}:{cfg.serve.inference_port}/ping")
        try:
            started = time.perf_counter()
            if flow == "api":
                endpoint = server.start(cfg)
                register(endpoint, archive.name, cfg.serve)
            else:
                server.start(cfg, server.Preload(archive.name, "noop", "1"))
            ready = time.perf_counter()
            response = predict(cfg, "noop", b"{}")
            answered = time.perf_counter()
            assert response.ok and response.json() == "ok", response.text
            up = watch.stop()
        finally:
            watch.stop()
            server.stop(cfg)
    return {"server": up - started, "registration": ready - up, "deploy rest": 0.0, "first prediction": answered - ready,
            "total": answered - started}


def summary(label: str, runs: list[dict[str, float]]) -> str:
    cells = []
    for phase in PHASES:
        values = [run[phase] for run in runs]
        cells.append(f"{min(values):5.2f} / {statistics.median(values):5.2f} / {max(values):5.2f}")
    return f"{label:<22}" + "".join(f"{cell:>22}" for cell in cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", default="artifacts/package")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--flow", choices=("preload", "api", "both"), default="preload",
                        help="preload: what deploy does (the model loaded at start); api: register after an empty start; "
                             "both: the two in turns")
    parser.add_argument("overrides", nargs="*", help="config overrides for both, e.g. serve.workers=2")
    args = parser.parse_args()
    overrides = [*args.overrides, "serve.prediction_log.sample_rate=0.01"]
    flows = ("preload", "api") if args.flow == "both" else (args.flow,)
    runs: dict[str, dict[str, list]] = {flow: {"template (serve up)": [], "TorchServe no-op": []} for flow in flows}
    with tempfile.TemporaryDirectory(prefix="cold-start-mar-") as scratch:
        archive = noop_mar(Path(scratch))
        for _ in range(args.repeats):  # in turns: load from elsewhere on the machine hits all alike
            for flow in flows:
                runs[flow]["template (serve up)"].append(template(overrides, Path(args.package), flow))
                runs[flow]["TorchServe no-op"].append(noop(overrides, archive, flow))
    for flow, by_target in runs.items():
        print(f"cold start to the first correct answer, seconds, min / median / max over {args.repeats} repeats (--flow {flow})")
        print(f"{'':<22}" + "".join(f"{phase:>22}" for phase in PHASES))
        for label, measured in by_target.items():
            print(summary(label, measured))
        ratios = [t["total"] / n["total"] for t, n in zip(*by_target.values(), strict=True)]
        print(f"template / no-op total (same repeat): {min(ratios):.2f} / {statistics.median(ratios):.2f} / {max(ratios):.2f}")

if __name__ == "__main__":
    main()
