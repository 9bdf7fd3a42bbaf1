"""promote: assign a stage to a model version with git tags (GTO), and roll a stage back.
Deploying the version a stage holds is `python -m serve up --stage <stage>`.

Promotion checks, before any tag is written:
- the version's package can be fetched from the DVC remote (an empty cache proves it), and
  a commit registered from the working tree has no uncommitted pipeline changes;
- for a gated stage, the metrics and fairness verdicts committed at that commit pass the
  gate policy of conf/gate (`--force` with a reason overrides; the reason goes in the tag).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from components.core.config import ROOT, load_config
from components.core.errors import run_cli
from components.evaluation.gates import decide
from components.registry.tags import RegistryError, committed_json, fetch_package, git, holders, model_artifact, stage_holder, versions

METRICS_FILE = "reports/metrics.json"
FAIRNESS_FILE = "reports/fairness.json"
PIPELINE_FILES = ("dvc.yaml", "dvc.lock", "params.yaml", "conf", "reports", "dvclive")


def gate_failures(cfg: DictConfig, commit: str, repo: Path = ROOT) -> list[str]:
    """What blocks the reports committed at `commit` under the gate policy of conf/gate (empty list: the gate is open)."""
    metrics, fairness = committed_json(repo, commit, METRICS_FILE), committed_json(repo, commit, FAIRNESS_FILE)
    if metrics is None or fairness is None:
        return [f"no {METRICS_FILE} / {FAIRNESS_FILE} committed at {commit[:10]}: run the evaluate step and commit its reports"]
    if any("low" not in check for check in fairness["checks"]):
        return [f"{FAIRNESS_FILE} at {commit[:10]} has no check intervals (written before conf/gate's verdicts): "
                "run the evaluate step and commit its reports"]
    return decide(metrics, fairness["checks"], cfg.gate)["blocking"]


def _uncommitted_changes(repo: Path) -> list[str]:
    """Pipeline files changed in git, and stages whose workspace no longer matches dvc.lock."""
    changed = git(repo, "status", "--porcelain", "--", *PIPELINE_FILES).splitlines()
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
        commit = git(repo, "rev-parse", "HEAD")
    with tempfile.TemporaryDirectory() as tmp:
        fetch_package(commit, Path(tmp) / "package", repo)
    failures = gate_failures(cfg, commit, repo) if stage in cfg.registry.gated_stages else []
    if failures and not force_reason:
        raise RegistryError(f"{name} {version or commit[:10]} may not enter {stage!r}; failed gates:\n  " + "\n  ".join(failures)
                            + "\n(use --force --reason '...' to override; the reason is written into the tag)")
    if version in known and version in [h["version"] for h in holders(stage, repo)]:
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
    r = sub.add_parser("rollback", help="give a stage back to its previous version (deploy it with `python -m serve up --stage`)")
    r.add_argument("--stage", required=True)
    r.add_argument("--push", action="store_true")
    args = parser.parse_args()
    cfg = load_config(args.params)
    if args.command == "versions":
        _print_versions(versions())
    elif args.command == "promote":
        if args.force and not args.reason:
            raise RegistryError("--force needs --reason '...' (it is written into the tag message)")
        done = promote(cfg, args.version, args.stage, args.reason if args.force else None, args.push)
        print(f"{done['name']} {done['version']} ({done['commit'][:10]}) -> {done['stage']}: {done['verdict']}")
    else:
        done = rollback(cfg, args.stage, args.push)
        print(f"{done['name']} {done['stage']}: {done['replaced']} -> {done['version']}")


if __name__ == "__main__":
    run_cli(main)
