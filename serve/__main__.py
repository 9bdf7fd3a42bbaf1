"""python -m serve up | down | status | predict FILE | drift

The local TorchServe of this project: `up` starts it (if needed) and deploys the package,
`down` stops it, `status` shows it, `predict` sends one image with the key from the key
file, `drift` compares the prediction log with the reference statistics.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import requests

from components.config import ROOT, load_config
from components.deploy import deploy, list_versions, read_package, unregister
from components.errors import run_cli
from components.registry import stage_package
from serve import server
from serve.drift import check_drift


def up(cfg, args) -> None:
    package_dir = Path(args.package)
    if args.stage:
        package_dir, holder = stage_package(cfg, args.stage)
        print(f"serve: stage {args.stage} -> {holder['version']} (commit {holder['commit'][:10]}), package fetched from the DVC remote")
    package = read_package(package_dir)
    if server.running_pid(cfg) is None:
        started = time.monotonic()
        server.start(cfg)
        print(f"serve: TorchServe started in {time.monotonic() - started:.1f} s (pid {server.running_pid(cfg)}, "
              f"state in {server.state_dir(cfg).root})")
    result = deploy(cfg, package_dir / package["mar"]["file"], package["version"])
    endpoint = server.local_endpoint(cfg)
    for version in list_versions(endpoint, result["model_name"]):  # keep the previous one for a rollback
        if version not in (result["version"], result["previous_version"]):
            unregister(endpoint, result["model_name"], version)
    sample = package_dir / package["samples"][0]["file"]
    print(f"serve: {result['model_name']} version {result['version']} is the default "
          f"(smoke test passed on {result['smoke_samples']} images)\n"
          f"  predict:  curl -X POST {result['endpoint']} -T {_shown(sample)} "
          f"-H \"Authorization: Bearer {endpoint.inference_token}\"\n"
          f"            .venv/bin/python -m serve predict {_shown(sample)}\n"
          f"  metrics:  curl {endpoint.metrics_url}\n"
          f"  stop:     make stop")


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def down(cfg, args) -> None:
    print("serve: TorchServe stopped" if server.stop(cfg) else "serve: TorchServe was not running")


STATUS_EXIT_CODES = {"serving": 0, "stopped": 1, "degraded": 3, "down": 4}  # 2: an error (message on stderr)
STATUS_HELP = """exit status: 0 serving (every worker of every version READY), 1 TorchServe not running,
2 error (message on stderr), 3 degraded (the default version answers, some worker is not READY,
e.g. restarting), 4 down (TorchServe runs but no worker of the default version is READY, or the
model is not registered)"""


def status(cfg, args) -> None:
    pid = server.running_pid(cfg)
    if pid is None:
        print("serve: TorchServe is not running")
        sys.exit(STATUS_EXIT_CODES["stopped"])
    endpoint = server.local_endpoint(cfg)
    state, lines = server.serving_state(endpoint, cfg.package.model_name)
    print(f"serve: {cfg.package.model_name} {state}; TorchServe pid {pid}, inference {endpoint.inference_url}, metrics {endpoint.metrics_url}")
    print("\n".join(lines))
    sys.exit(STATUS_EXIT_CODES[state])


def predict(cfg, args) -> None:
    endpoint = server.local_endpoint(cfg)
    url = f"{endpoint.inference_url}/predictions/{cfg.package.model_name}" + (f"/{args.version}" if args.version else "")
    response = requests.post(url, data=Path(args.file).read_bytes(), headers=server.bearer(endpoint.inference_token), timeout=30)
    print(json.dumps(response.json() if response.content else {"status": response.status_code}, indent=2))
    if not response.ok:
        sys.exit(1)


def drift(cfg, args) -> None:
    log_file = Path(args.log) if args.log else server.prediction_log(cfg)
    report = check_drift(cfg, log_file, Path(args.package) / "reference_stats.json", Path(args.out))
    for name, f in report["features"].items():
        print(f"  {name:<10} PSI {f['psi']:.4f}  KS {f['ks_statistic']:.4f}  {'DRIFT' if f['drifted'] else 'ok'}")
    classes = report["predicted_classes"]
    print(f"  {'classes':<10} PSI {classes['psi']:.4f}              {'DRIFT' if classes['drifted'] else 'ok'}")
    print(f"serve: {'drift detected' if report['drift'] else 'no drift'} in the last {report['samples']} logged predictions "
          f"-> {args.out}/drift.json, {args.out}/drift.html")
    if report["drift"]:
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m serve", description="The project's local TorchServe.")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, run, help: str, epilog: str | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, epilog=epilog)
        sub.add_argument("--params", default="params.yaml")
        sub.set_defaults(run=run)
        return sub

    sub = command("up", up, "start TorchServe if needed and deploy the package as the default version")
    sub.add_argument("--package", default="artifacts/package", help="package folder (output of the package step)")
    sub.add_argument("--stage", default=None, help="deploy the version a git tag assigns to this stage (e.g. prod) instead")
    command("down", down, "stop TorchServe")
    command("status", status, "show the server, its model versions and their workers", STATUS_HELP)
    sub = command("predict", predict, "send one PNG/JPEG image, print the top-k labels")
    sub.add_argument("file")
    sub.add_argument("--version", default=None, help="a registered version (default: the default version)")
    sub = command("drift", drift, "drift report of the prediction log; exit 1 above the thresholds")
    sub.add_argument("--log", default=None, help="prediction log (default: serve.state_dir/serve.prediction_log.file)")
    sub.add_argument("--package", default="artifacts/package", help="package folder holding reference_stats.json")
    sub.add_argument("--out", default="reports")
    for sub in commands.choices.values():
        sub.add_argument("overrides", nargs="*", help="config overrides, e.g. serve.inference_port=9080")
    args = parser.parse_args()
    args.run(load_config(args.params, args.overrides), args)


if __name__ == "__main__":
    run_cli(main)
