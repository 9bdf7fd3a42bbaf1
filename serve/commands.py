"""What each command of `python -m serve` does, once its command line (serve/__main__.py) has parsed its
arguments and checked its config: the server client, deploy and the registry load only then."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import requests
import yaml

from components.core.config.schema import PORT_KEYS
from components.core.errors import ConfigError, StepError
from components.core.events import emit
from components.core.paths import ROOT
from components.core.recorded import locked
from components.deploy import deploy, read_package
from components.promote import check_stage
from components.registry.tags import fetch_package, model_artifact
from components.torchserve import server
from components.torchserve.management import default_version


def deploy_stage(cfg, stage: str, repo: Path = ROOT, policy_ref: str | None = None, **remote) -> tuple[dict, Path]:
    """Deploy exactly the version a git tag assigns to `stage`, fetched from the DVC remote, once `promote check`
    passes that tag under the policy of `policy_ref` (the branch that deploys; default: the working tree's)."""
    checked = check_stage(cfg, stage, repo, policy_ref)
    print(f"serve: stage {stage} -> {checked['version']} (commit {checked['commit'][:10]}, {checked['tag']}): {checked['verdict']}")
    release = server.state_dir(cfg).releases / checked["version"]
    shutil.rmtree(release, ignore_errors=True)
    package_dir = fetch_package(checked["commit"], release, repo)
    print(f"serve: package of {checked['version']} fetched from the DVC remote")
    package = read_package(package_dir)
    source = {"stage": stage, "registry_version": checked["version"], "commit": checked["commit"], "tag": checked["tag"],
              "gate_verdict": checked["verdict"]}
    mar = package_dir / package["mar"]["file"]  # checked against the tag's commit's dvc.lock; a missing one is deploy's to refuse
    recorded = locked(repo, f"{model_artifact(repo)[1]}/{mar.name}", checked["commit"]) if mar.exists() else None
    return deploy(cfg, mar, package["version"], source=source, recorded=recorded, **remote), package_dir


def up(cfg, args) -> None:
    remote = {}
    if args.management_url:
        remote = {"management_url": args.management_url, "token": os.environ.get("TORCHSERVE_MANAGEMENT_TOKEN"),
                  "inference_url": args.inference_url, "inference_token": os.environ.get("TORCHSERVE_INFERENCE_TOKEN"),
                  "model_store": args.model_store}
    if args.policy_ref and not args.stage:
        raise ConfigError("--policy-ref names the policy a stage is checked against: give --stage too")
    if args.stage:
        result, package_dir = deploy_stage(cfg, args.stage, policy_ref=args.policy_ref, **remote)
    else:
        package_dir = Path(args.package)
        package = read_package(package_dir)
        if not remote and _already_serving(cfg, package):  # a no-op `make run` stays fast
            print(f"serve: {package['model_name']} version {package['version']} is already the default")
            return
        result = deploy(cfg, package_dir / package["mar"]["file"], package["version"], **remote)
    print(f"serve: {result['model_name']} version {result['version']} is the default "
          f"(smoke test passed on {result['smoke_samples']} images)")
    if not remote:
        endpoint = server.local_endpoint(cfg)
        sample = package_dir / read_package(package_dir)["samples"][0]["file"]
        # The key stays in the key file (mode 0600): a log that keeps this output keeps no secret.
        print(f"  predict:  curl -X POST {result['endpoint']} -T {_shown(sample)} "
              f"-H \"Authorization: Bearer $(.venv/bin/python -m serve token)\"\n"
              f"            .venv/bin/python -m serve predict {_shown(sample)}\n"
              f"  metrics:  curl {endpoint.metrics_url}\n"
              f"  stop:     make stop")


def _already_serving(cfg, package: dict) -> bool:
    """The local server runs and answers with this package version as its default (its smoke test passed when it was deployed)."""
    if server.running_pid(cfg) is None:
        return False
    try:
        return default_version(server.local_endpoint(cfg), package["model_name"]) == package["version"]
    except StepError:
        return False


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def down(cfg, args) -> None:
    print("serve: TorchServe stopped" if server.stop(cfg) else "serve: TorchServe was not running")


STATUS_EXIT_CODES = {"serving": 0, "stopped": 1, "degraded": 3, "down": 4}  # 2: an error (message on stderr)


def status(cfg, args) -> None:
    pid = server.running_pid(cfg)
    if pid is None:
        print("serve: TorchServe is not running")
        sys.exit(STATUS_EXIT_CODES["stopped"])
    endpoint = server.local_endpoint(cfg)
    state, lines = server.serving_state(endpoint, cfg.package.model_name)
    print(f"serve: {cfg.package.model_name} {state}; TorchServe pid {pid}, inference {endpoint.inference_url}, "
          f"metrics {endpoint.metrics_url}")
    print("\n".join(lines))
    sys.exit(STATUS_EXIT_CODES[state])


def predict(cfg, args) -> None:
    endpoint = server.local_endpoint(cfg)
    url = f"{endpoint.inference_url}/predictions/{cfg.package.model_name}" + (f"/{args.version}" if args.version else "")
    response = requests.post(url, data=Path(args.file).read_bytes(), headers=server.bearer(endpoint.inference_token), timeout=30)
    print(json.dumps(response.json() if response.content else {"status": response.status_code}, indent=2))
    if not response.ok:
        sys.exit(1)


def _taken(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def check(cfg, args) -> None:
    """Before `make run` trains anything: the local server runs, or every port it needs is free."""
    if server.running_pid(cfg):
        return
    taken = [f"{cfg.serve[key]} (serve.{key})" for key in PORT_KEYS if _taken(cfg.serve.host, cfg.serve[key])]
    if taken:
        raise ConfigError(f"port {', '.join(taken)} on {cfg.serve.host} is in use by another program: choose free ones in "
                          f"local.yaml, e.g. `serve: {{{PORT_KEYS[0]}: 9080}}` (this machine's settings, docs/serving.md)")


def prometheus_config(cfg, args) -> None:
    """serve/prometheus/prometheus.yml with its scrape target at this machine's serve.metrics_port."""
    config = yaml.safe_load((ROOT / "serve" / "prometheus" / "prometheus.yml").read_text())
    config["rule_files"] = [str(ROOT / "serve" / "prometheus" / name) for name in config["rule_files"]]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"{cfg.serve.host}:{cfg.serve.metrics_port}"]}]
    out = Path(cfg.serve.state_dir) / "prometheus.yml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"prometheus --config.file={out} --web.listen-address=127.0.0.1:9090")


def token(cfg, args) -> None:
    """The local server's inference key, for `$(python -m serve token)` in a command line."""
    key = server.local_endpoint(cfg).inference_token
    if not key:
        raise ConfigError(f"no inference key: the local server is not running (state folder {cfg.serve.state_dir}); `make run` starts it")
    print(key)


def drift(cfg, args) -> None:
    from components.drift.report import check_drift  # scipy: imported only by the command that needs it

    log_file = Path(args.log) if args.log else server.prediction_log(cfg)
    out = Path(args.out or Path(cfg.serve.state_dir) / "drift")  # runtime output: never in a tracked folder
    report = check_drift(cfg, log_file, Path(args.package) / "reference_stats.json", out)
    for name, f in report["features"].items():
        print(f"  {name:<10} PSI {f['psi']:.4f}  KS {f['ks_statistic']:.4f}  {'DRIFT' if f['drifted'] else 'ok'}")
    classes = report["predicted_classes"]
    print(f"  {'classes':<10} PSI {classes['psi']:.4f}              {'DRIFT' if classes['drifted'] else 'ok'}")
    if report["skipped_lines"]:
        print(f"serve: skipped {report['skipped_lines']} malformed lines of {log_file} (half-written: a full disk or a killed worker)")
    print(f"serve: {'drift detected' if report['drift'] else 'no drift'} in the last {report['samples']} logged predictions "
          f"-> {out}/drift.json, {out}/drift.html")
    if report["drift"]:
        emit(cfg.events, "drift_detected", f"drift in the last {report['samples']} logged predictions of {cfg.package.model_name}",
             model=cfg.package.model_name, details={"report": str(out / "drift.json"), "features": report["features"],
                                                    "predicted_classes": report["predicted_classes"]})
        sys.exit(1)
