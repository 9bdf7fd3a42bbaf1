"""Model registry on git tags, the GTO way: `<name>@vX.Y.Z` registers a version at a commit,
`<name>#<stage>#N` assigns a stage. Tags are read and written with the gto package, so
`gto show` and `dvc artifacts get --stage` see exactly what this module sees.

Promotion checks, before any tag is written:
- the version's package can be fetched from the DVC remote (an empty cache proves it), and
  a commit registered from the working tree has no uncommitted pipeline changes;
- for a gated stage, the metrics and fairness verdicts committed at that commit pass the
  gates in conf/registry (`--force` with a reason overrides; the reason goes in the tag).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from omegaconf import DictConfig

from components.config import ROOT, load_config
from components.errors import StepError, run_cli

METRICS_FILE = "reports/metrics.json"
FAIRNESS_FILE = "reports/fairness.json"
PIPELINE_FILES = ("dvc.yaml", "dvc.lock", "params.yaml", "conf", "reports", "dvclive")


class RegistryError(StepError):
    pass


def _git(repo: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if result.returncode != 0:
        raise RegistryError(f"git {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip()


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
    rows = _show(repo, name)
    stages = {}
    for stage in {s["stage"] for row in rows for s in row["stages"]}:
        for holder in _show(repo, f"{name}#{stage}"):
            stages.setdefault(holder["version"], []).append(stage)
    return [{"version": row["version"], "commit": row["commit_hexsha"], "stages": sorted(stages.get(row["version"], []))}
            for row in rows]


def _show(repo: Path, query: str) -> list[dict]:
    """`gto show <query>` as data (registered versions only); nothing registered yet is an empty list."""
    import gto.api
    from gto.exceptions import ArtifactNotFound

    try:
        return gto.api.show(str(repo), query, registered_only=True)
    except ArtifactNotFound:
        return []


def _holders(stage: str, repo: Path) -> list[dict]:
    name, _ = model_artifact(repo)
    return _show(repo, f"{name}#{stage}")


def stage_holder(stage: str, repo: Path = ROOT) -> dict:
    """The version that holds `stage` now (as `gto show <name>#<stage>` reports it)."""
    holders = _holders(stage, repo)
    if not holders:
        name, _ = model_artifact(repo)
        raise RegistryError(f"no version of {name} is in stage {stage!r}; promote one first")
    return {"version": holders[0]["version"], "commit": holders[0]["commit_hexsha"]}


def _committed_json(repo: Path, commit: str, path: str) -> dict | None:
    result = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=repo, capture_output=True, text=True)
    return json.loads(result.stdout) if result.returncode == 0 else None


def gate_failures(cfg: DictConfig, commit: str, repo: Path = ROOT) -> list[str]:
    """Every gate the reports committed at `commit` do not pass (empty list: all pass)."""
    gates = cfg.registry.gates
    metrics, fairness = _committed_json(repo, commit, METRICS_FILE), _committed_json(repo, commit, FAIRNESS_FILE)
    if metrics is None or fairness is None:
        return [f"no {METRICS_FILE} / {FAIRNESS_FILE} committed at {commit[:10]}: run the evaluate step and commit its reports"]
    failures = []
    for key, bound, passes in (("accuracy", gates.min_accuracy, lambda v, b: v >= b),
                               ("balanced_accuracy", gates.min_balanced_accuracy, lambda v, b: v >= b),
                               ("ece", gates.max_ece, lambda v, b: v <= b)):
        if not passes(metrics[key], bound):
            failures.append(f"{key} {metrics[key]:.4f} {'<' if key != 'ece' else '>'} {bound}")
    if gates.require_fairness_pass:
        failures += [f"fairness {c['check']} ({c['grouping']}) {c['value']:.4f} not {c['rule']} {c['threshold']}"
                     for c in fairness["checks"] if not c["passed"]]
    return failures


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


def _uncommitted_changes(repo: Path) -> list[str]:
    """Pipeline files changed in git, and stages whose workspace no longer matches dvc.lock."""
    changed = _git(repo, "status", "--porcelain", "--", *PIPELINE_FILES).splitlines()
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=repo, capture_output=True, text=True)
    stages = json.loads(status.stdout or "{}") if status.returncode == 0 else {}
    for stage, changes in stages.items():
        # "not in cache" only means never cached here; whether the remote has it is checked by fetching.
        real = [c for c in changes if not (isinstance(c, dict) and c.keys() == {"changed outs"}
                                           and set(c["changed outs"].values()) == {"not in cache"})]
        if real:
            changed.append(f"dvc status: {stage}: {json.dumps(real)}")
    return changed


def promote(cfg: DictConfig, version: str | None, stage: str, force_reason: str | None = None, push: bool = False,
            repo: Path = ROOT) -> dict:
    """Assign `stage` to `version` (registering the current commit as `version` when it is new)."""
    import gto.api

    if stage not in cfg.registry.stages:
        raise RegistryError(f"unknown stage {stage!r}; registry.stages allows {list(cfg.registry.stages)}")
    name, _ = model_artifact(repo)
    known = {v["version"]: v["commit"] for v in versions(repo)}
    commit = known.get(version) if version else None
    if commit is None:
        dirty = _uncommitted_changes(repo)
        if dirty:
            raise RegistryError("uncommitted pipeline changes; commit (and `dvc push`) them before registering a version:\n  "
                                + "\n  ".join(dirty))
        commit = _git(repo, "rev-parse", "HEAD")
    with tempfile.TemporaryDirectory() as tmp:
        fetch_package(commit, Path(tmp) / "package", repo)
    failures = gate_failures(cfg, commit, repo) if stage in cfg.registry.gated_stages else []
    if failures and not force_reason:
        raise RegistryError(f"{name} {version or commit[:10]} may not enter {stage!r}; failed gates:\n  " + "\n  ".join(failures)
                            + "\n(use --force --reason '...' to override; the reason is written into the tag)")
    if version in known and version in [h["version"] for h in _holders(stage, repo)]:
        return {"name": name, "version": version, "stage": stage, "commit": commit, "verdict": f"already in {stage!r}; nothing to do"}
    if version not in known:
        registered = gto.api.register(str(repo), name, commit, version=version, push=push,
                                      message=f"Register {name} {version or '(next version)'} at {commit[:10]}")
        version = registered.version
    verdict = "gates passed" if stage in cfg.registry.gated_stages else "stage not gated"
    if failures:
        verdict = f"FORCED past failed gates ({'; '.join(failures)}): {force_reason}"
    gto.api.assign(str(repo), name, stage, version=version, message=f"Promote {name} {version} to {stage}: {verdict}",
                   force=True, push=push)
    return {"name": name, "version": version, "stage": stage, "commit": commit, "verdict": verdict}


def rollback(cfg: DictConfig, stage: str, push: bool = False, repo: Path = ROOT) -> dict:
    """Give `stage` back to the version that held it before the current one."""
    import gto.api

    name, _ = model_artifact(repo)
    current = stage_holder(stage, repo)["version"]
    events = [e for e in gto.api.history(str(repo), name, ascending=True) if e["event"] == "assignment" and e["stage"] == stage]
    # Tags written in the same second tie on timestamp; GTO's counter N in `name#stage#N` orders them.
    events.sort(key=lambda e: int(e["ref"].rsplit("#", 1)[1]))
    holders = [e["version"] for e in events]
    while holders and holders[-1] == current:
        holders.pop()
    if not holders:
        raise RegistryError(f"{name}: no earlier version held {stage!r}; nothing to roll back to")
    previous = holders[-1]
    gto.api.assign(str(repo), name, stage, version=previous, force=True, push=push,
                   message=f"Roll back {name} {stage} from {current} to {previous}")
    return {"name": name, "stage": stage, "version": previous, "replaced": current}


def stage_package(cfg: DictConfig, stage: str, repo: Path = ROOT) -> tuple[Path, dict]:
    """Fetch the package of the version in `stage` from the DVC remote into the serve state folder."""
    from serve import server

    holder = stage_holder(stage, repo)
    release = server.state_dir(cfg).root / "releases" / holder["version"]
    shutil.rmtree(release, ignore_errors=True)
    return fetch_package(holder["commit"], release, repo), holder


def deploy_stage(cfg: DictConfig, stage: str, repo: Path = ROOT, **remote: str | None) -> dict:
    """Deploy exactly the version in `stage`: fetch its package from the remote, check, register, smoke test.

    Without `remote` arguments the local TorchServe is used (started if needed); otherwise they
    go to components.deploy.deploy (management_url, token, inference_url, inference_token, model_store).
    """
    from components.deploy import deploy, read_package
    from serve import server

    release, holder = stage_package(cfg, stage, repo)
    package = read_package(release)
    if not remote.get("management_url") and server.running_pid(cfg) is None:
        server.start(cfg)
    result = deploy(cfg, release / package["mar"]["file"], package["version"], **remote)
    return {**result, "stage": stage, "registry_version": holder["version"], "commit": holder["commit"]}


def _print_versions(rows: list[dict]) -> None:
    print(f"{'version':<12} {'commit':<12} stages")
    for row in rows:
        print(f"{row['version']:<12} {row['commit'][:10]:<12} {', '.join(row['stages']) or '-'}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Model registry on git tags (GTO-compatible).")
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("promote", help="assign a stage to a version (registers the current commit if the version is new)")
    p.add_argument("--version", help="vX.Y.Z; omitted: the next patch version, registered at the current commit")
    p.add_argument("--stage", required=True)
    p.add_argument("--force", action="store_true", help="promote despite failed gates (needs --reason)")
    p.add_argument("--reason", help="why the gates are overridden; written into the tag message")
    p.add_argument("--push", action="store_true", help="push the new tags to origin")
    sub.add_parser("versions", help="registered versions and their stages")
    r = sub.add_parser("rollback", help="give a stage back to its previous version, then redeploy it locally")
    r.add_argument("--stage", required=True)
    r.add_argument("--push", action="store_true")
    r.add_argument("--no-deploy", action="store_true", help="only move the tag (CI deploys on the tag push)")
    d = sub.add_parser("deploy", help="deploy the version in a stage (local TorchServe, or a remote one)")
    d.add_argument("--stage", required=True)
    d.add_argument("--management-url", help="remote TorchServe management API (token: $TORCHSERVE_MANAGEMENT_TOKEN)")
    d.add_argument("--inference-url", help="remote TorchServe inference API (token: $TORCHSERVE_INFERENCE_TOKEN)")
    d.add_argument("--model-store", help="the remote server's model store, mounted on this machine")
    args = parser.parse_args()
    cfg = load_config(args.params)
    if args.command == "versions":
        _print_versions(versions())
    elif args.command == "promote":
        if args.force and not args.reason:
            raise RegistryError("--force needs --reason '...' (it is written into the tag message)")
        done = promote(cfg, args.version, args.stage, args.reason if args.force else None, args.push)
        print(f"{done['name']} {done['version']} ({done['commit'][:10]}) -> {done['stage']}: {done['verdict']}")
    elif args.command == "deploy":
        remote = {}
        if args.management_url:
            remote = {"management_url": args.management_url, "token": os.environ.get("TORCHSERVE_MANAGEMENT_TOKEN"),
                      "inference_url": args.inference_url, "inference_token": os.environ.get("TORCHSERVE_INFERENCE_TOKEN"),
                      "model_store": args.model_store}
        deployed = deploy_stage(cfg, args.stage, **remote)
        print(f"{args.stage}: deployed {deployed['registry_version']} (package {deployed['version']}) at {deployed['endpoint']}")
    else:
        done = rollback(cfg, args.stage, args.push)
        print(f"{done['name']} {done['stage']}: {done['replaced']} -> {done['version']}")
        if not args.no_deploy:
            deployed = deploy_stage(cfg, args.stage)
            print(f"deployed {deployed['registry_version']} (package {deployed['version']}) at {deployed['endpoint']}")


if __name__ == "__main__":
    run_cli(main)
