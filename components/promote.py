"""promote: assign a stage to a model version with git tags (GTO), and roll a stage back.
Deploying the version a stage holds is `python -m serve up --stage <stage>`.

Promotion checks, before any tag is written:
- the version's package can be fetched from the DVC remote (an empty cache proves it), and
  a commit registered from the working tree has no uncommitted pipeline changes;
- for a gated stage, the reports committed at that commit are the ones its dvc.lock records, and
  their quality and fairness checks pass the gate policy of conf/gate (`--force --reason`
  overrides, recorded in a commit on the current branch: components/registry/overrides.py).

A stage tag can also appear without this CLI (a plain `gto assign`, a `git push` of a hand-made
tag): `check --tag <tag>` re-checks it (stage declared in .gto, package retrievable, reports as
dvc.lock records them, gates under the policy of the branch that deploys, or an override recorded
in that branch) and is what every path to a serving stage runs first: the deploy-on-stage-tag
workflow and `python -m serve up --stage` (through `check_stage`).
Registering, assigning, rolling back and a closed gate each emit a lifecycle event.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from components.core.config.command import command_config
from components.core.errors import ConfigError, run_cli
from components.core.events import emit
from components.core.paths import ROOT
from components.evaluation.gates import decide
from components.registry.evidence import POLICY_SECTIONS, policy_at, require_locked
from components.registry.overrides import find_override, record_override
from components.registry.tags import (
    RegistryError,
    check_gto_stages,
    committed_json,
    current_stage_tag,
    fetch_package,
    git,
    holders,
    model_artifact,
    stage_holder,
    stage_tag,
    versions,
)

QUALITY_FILE = "reports/quality.json"
FAIRNESS_FILE = "reports/fairness.json"
REPORTS = (QUALITY_FILE, FAIRNESS_FILE)  # the checks the gate judges
LOCKED_REPORTS = ("reports/metrics.json", *REPORTS)  # what dvc.lock must vouch for: the checks, and the headline shown beside them
PIPELINE_FILES = ("dvc.yaml", "dvc.lock", "params.yaml", "conf", "reports", "dvclive")
FORCED = "FORCED past failed gates"  # the verdict of a promotion that overrides the gates (its record: registry/overrides.py)


def committed_decision(cfg: DictConfig, commit: str, repo: Path = ROOT) -> dict:
    """The gate's decision (conf/gate) on the reports committed at `commit`: what blocks, what warns."""
    quality, fairness = (committed_json(repo, commit, path) for path in REPORTS)
    if quality is None or fairness is None:
        return {"blocking": [f"no {QUALITY_FILE} / {FAIRNESS_FILE} committed at {commit[:10]}: "
                             "run the evaluate step and commit its reports"],
                "warnings": []}
    for path, report in zip(REPORTS, (quality, fairness)):
        if "checks" not in report or any("low" not in check for check in report["checks"]):
            return {"blocking": [f"{path} at {commit[:10]} has no check intervals (written before conf/gate's verdicts from "
                                 "intervals): run the evaluate step and commit its reports"], "warnings": []}
    return decide(quality["checks"], fairness["checks"], cfg.gate)


def gate_failures(cfg: DictConfig, commit: str, repo: Path = ROOT) -> list[str]:
    """What blocks the reports committed at `commit` under the gate policy of conf/gate (empty list: the gate is open)."""
    return committed_decision(cfg, commit, repo)["blocking"]


def open_verdict(cfg: DictConfig, stage: str, commit: str, repo: Path) -> str:
    """What an open gate says: "gates passed" only when every check passed, else each warning's verdict."""
    if stage not in cfg.registry.gated_stages:
        return "stage not gated"
    warnings = committed_decision(cfg, commit, repo)["warnings"]
    return f"gates open with {len(warnings)} warning(s): {'; '.join(warnings)}" if warnings else "gates passed"


def judged_failures(cfg: DictConfig, stage: str, commit: str, repo: Path) -> list[str]:
    """gate_failures for a gated stage, once the committed reports are shown to be the ones dvc.lock records."""
    if stage not in cfg.registry.gated_stages:
        return []
    require_locked(repo, commit, LOCKED_REPORTS)
    return gate_failures(cfg, commit, repo)


def _uncommitted_changes(repo: Path) -> list[str]:
    """Pipeline files changed in git, and stages whose workspace no longer matches dvc.lock."""
    changed = git(repo, "status", "--porcelain", "--", *PIPELINE_FILES).splitlines()
    # The root dvc.yaml is the pipeline a version comes from; on-demand stages (serve/batch/dvc.yaml) are not part of it.
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", "dvc.yaml"], cwd=repo, capture_output=True, text=True)
    stages = json.loads(status.stdout or "{}") if status.returncode == 0 else {}
    for stage, changes in stages.items():
        # "not in cache" only means never cached here; whether the remote has it is checked by fetching.
        real = [c for c in changes if not (isinstance(c, dict) and c.keys() == {"changed outs"}
                                           and set(c["changed outs"].values()) == {"not in cache"})]
        if real:
            changed.append(f"dvc status: {stage}: {json.dumps(real)}")
    return changed


def _refuse(cfg: DictConfig, name: str, version: str | None, stage: str, commit: str, failures: list[str], hint: str) -> None:
    emit(cfg.events, "gate_closed", f"{name} {version or commit[:10]} refused for {stage}: " + "; ".join(failures),
         model=name, version=version, stage=stage, commit=commit, details={"failures": failures})
    raise RegistryError(f"{name} {version or commit[:10]} may not enter {stage!r}; failed gates:\n  " + "\n  ".join(failures)
                        + f"\n{hint}")


def _version_to_promote(version: str | None, known: dict[str, str], repo: Path) -> tuple[str | None, str]:
    """The version and its commit: a known version's, or the current commit when it has no uncommitted pipeline
    changes, under the version it is already registered as (a commit holds one version), else `version` (None: next)."""
    if version in known:
        return version, known[version]
    dirty = _uncommitted_changes(repo)
    if dirty:
        raise RegistryError("uncommitted pipeline changes; commit (and `dvc push`) them before registering a version:\n  "
                            + "\n  ".join(dirty))
    head = git(repo, "rev-parse", "HEAD")
    registered = [v for v, commit in known.items() if commit == head]
    if registered and version is not None:
        raise RegistryError(f"commit {head[:10]} is already registered as {registered[0]} and a commit holds one version: "
                            f"promote that one (--version {registered[0]}), or commit the new model first")
    return (registered[0] if registered else version), head


def _register(cfg: DictConfig, name: str, version: str | None, commit: str, push: bool, repo: Path) -> str:
    import gto.api

    registered = gto.api.register(str(repo), name, commit, version=version, push=push,
                                  message=f"Register {name} {version or '(next version)'} at {commit[:10]}")
    emit(cfg.events, "version_registered", f"{name} {registered.version} registered at {commit[:10]}",
         model=name, version=registered.version, commit=commit)
    return registered.version


def promote(cfg: DictConfig, version: str | None, stage: str, force_reason: str | None = None, push: bool = False,
            repo: Path = ROOT, command: str | None = None) -> dict:
    """Assign `stage` to `version` (registering the current commit as `version` when it is new). Overriding
    failed gates (`force_reason`) first commits the override record, naming `command` (default: sys.argv)."""
    import gto.api

    check_gto_stages(cfg, repo)
    if stage not in cfg.registry.stages:
        raise RegistryError(f"unknown stage {stage!r}; registry.stages allows {list(cfg.registry.stages)}")
    name, _ = model_artifact(repo)
    known = {v["version"]: v["commit"] for v in versions(repo)}
    version, commit = _version_to_promote(version, known, repo)
    with tempfile.TemporaryDirectory() as tmp:
        fetch_package(commit, Path(tmp) / "package", repo)
    failures = judged_failures(cfg, stage, commit, repo)
    if failures and not force_reason:
        _refuse(cfg, name, version, stage, commit, failures,
                "(use --force --reason '...' to override; the override is committed on the record)")
    if not failures and version in known and version in [h["version"] for h in holders(stage, repo)]:
        return {"name": name, "version": version, "stage": stage, "commit": commit, "verdict": f"already in {stage!r}; nothing to do"}
    if version not in known:
        version = _register(cfg, name, version, commit, push, repo)
    verdict = open_verdict(cfg, stage, commit, repo)
    if failures:
        record = record_override(repo, {"artifact": name, "version": version, "stage": stage, "commit": commit, "failures": failures,
                                        "reason": force_reason, "command": command or shlex.join(sys.argv)}, push)
        verdict = f"{FORCED} ({'; '.join(failures)}): {force_reason} (override record {record[:10]})"
    gto.api.assign(str(repo), name, stage, version=version, message=f"Promote {name} {version} to {stage}: {verdict}",
                   force=True, push=push)
    emit(cfg.events, "stage_assigned", f"{name} {version} assigned to {stage}: {verdict}", model=name, version=version,
         stage=stage, commit=commit, details={"verdict": verdict})
    return {"name": name, "version": version, "stage": stage, "commit": commit, "verdict": verdict}


def check(cfg: DictConfig, tag: str, repo: Path = ROOT, policy_ref: str | None = None) -> dict:
    """May the version a stage tag assigns be deployed? Whoever made the tag (this CLI, a plain `gto assign`,
    `git push`), the stage must be declared, the tag current, the package retrievable from the DVC remote
    and, for a gated stage, the reports those dvc.lock records and the gates passed or overridden by a record
    in the history of `policy_ref`. The policy (sections gate and registry) is params.yaml as committed at
    `policy_ref`, the branch that deploys; without it, `cfg` (the working tree's) and records in HEAD's history."""
    policy = policy_at(cfg, policy_ref, repo) if policy_ref else cfg
    check_gto_stages(policy, repo)
    assigned = stage_tag(tag, repo)
    name, version, stage = assigned["name"], assigned["version"], assigned["stage"]
    model, _ = model_artifact(repo)
    if name != model:  # the workflow runs on every stage tag; only the model artifact's are deployed
        raise RegistryError(f"{tag}: assigns a stage to artifact {name!r}, but this repository's model artifact is {model!r} "
                            "(dvc.yaml `artifacts:`, named by data.name); nothing to deploy")
    if stage not in policy.registry.stages:
        raise RegistryError(f"{tag}: stage {stage!r} is not declared (registry.stages and .gto allow {list(policy.registry.stages)})")
    holder = stage_holder(stage, repo)
    if holder["version"] != version:
        raise RegistryError(f"{tag}: assigns {version} to {stage}, but {stage} is now held by {holder['version']} (a newer tag); "
                            "that tag's deploy is the one to run")
    with tempfile.TemporaryDirectory() as tmp:
        fetch_package(assigned["commit"], Path(tmp) / "package", repo)
    failures = judged_failures(policy, stage, assigned["commit"], repo)
    verdict = open_verdict(policy, stage, assigned["commit"], repo)
    if failures:
        verdict = _overridden(cfg, tag, assigned, failures, policy_ref or "HEAD", repo)
    return {**assigned, "tag": tag, "verdict": verdict}


def _overridden(cfg: DictConfig, tag: str, assigned: dict, failures: list[str], ref: str, repo: Path) -> str:
    """The verdict of failed gates that an override record in `ref`'s history accepts; refused otherwise."""
    subject = {"artifact": assigned["name"], "version": assigned["version"], "stage": assigned["stage"], "commit": assigned["commit"]}
    record = find_override(repo, ref, subject, failures)
    if record is None:
        _refuse(cfg, assigned["name"], assigned["version"], assigned["stage"], assigned["commit"], failures,
                f"{tag} is not deployed: no override record in the history of {ref} accepts these failures (a tag message is not one); "
                f"promote with `python -m components.promote promote --stage {assigned['stage']} --force --reason '...'` "
                f"on that branch to override the gates on the record")
    return f"gates overridden by the record {record['record'][:10]} in {ref} ({record['command']}): {record['reason']}"


def check_stage(cfg: DictConfig, stage: str, repo: Path = ROOT, policy_ref: str | None = None) -> dict:
    """`check` of the tag through which the current holder of `stage` holds it: what deploying a stage runs first."""
    return check(cfg, current_stage_tag(stage, repo), repo, policy_ref)


def rollback(cfg: DictConfig, stage: str, push: bool = False, repo: Path = ROOT) -> dict:
    """Give `stage` back to the version that held it before the current one."""
    import gto.api

    name, _ = model_artifact(repo)
    current = stage_holder(stage, repo)["version"]
    events = [e for e in gto.api.history(str(repo), name, ascending=True) if e["event"] == "assignment" and e["stage"] == stage]
    # Tags written in the same second tie on timestamp; GTO's counter N in `name#stage#N` orders them.
    events.sort(key=lambda e: int(e["ref"].rsplit("#", 1)[1]))
    held = [e["version"] for e in events]
    while held and held[-1] == current:
        held.pop()
    if not held:
        raise RegistryError(f"{name}: no earlier version held {stage!r}; nothing to roll back to")
    previous = held[-1]
    gto.api.assign(str(repo), name, stage, version=previous, force=True, push=push,
                   message=f"Roll back {name} {stage} from {current} to {previous}")
    emit(cfg.events, "rolled_back", f"{name} {stage} rolled back from {current} to {previous}", model=name, version=previous,
         stage=stage, details={"replaced": current})
    return {"name": name, "stage": stage, "version": previous, "replaced": current}


def _print_versions(rows: list[dict]) -> None:
    print(f"{'version':<12} {'commit':<12} stages")
    for row in rows:
        print(f"{row['version']:<12} {row['commit'][:10]:<12} {', '.join(row['stages']) or '-'}")


def _run_promote(cfg: DictConfig, args: argparse.Namespace) -> None:
    if args.force and not args.reason:
        raise RegistryError("--force needs --reason '...' (it is committed in the override record)")
    done = promote(cfg, args.version, args.stage, args.reason if args.force else None, args.push,
                   command=shlex.join(["python", "-m", "components.promote", *sys.argv[1:]]))
    print(f"{done['name']} {done['version']} ({done['commit'][:10]}) -> {done['stage']}: {done['verdict']}")


def _run_check(cfg: DictConfig, args: argparse.Namespace) -> None:
    if args.policy_ref and any(o.lstrip("+~").startswith(POLICY_SECTIONS) for o in args.overrides):
        raise ConfigError(f"--policy-ref {args.policy_ref} is the gate policy; overrides of {' or '.join(POLICY_SECTIONS)} "
                          f"({[o for o in args.overrides if o.lstrip('+~').startswith(POLICY_SECTIONS)]}) would be ignored")
    done = check(cfg, args.tag, policy_ref=args.policy_ref)
    print(f"{args.tag}: {done['name']} {done['version']} (commit {done['commit'][:10]}) may be deployed to {done['stage']}: "
          f"package retrievable from the DVC remote; {done['verdict']}")


def _run_rollback(cfg: DictConfig, args: argparse.Namespace) -> None:
    done = rollback(cfg, args.stage, args.push)
    print(f"{done['name']} {done['stage']}: {done['replaced']} -> {done['version']}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Model registry on git tags (GTO-compatible).")
    parser.add_argument("--params", help="a params file instead of params.yaml (not with overrides)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("promote", help="assign a stage to a version (registers the current commit if the version is new)")
    p.add_argument("--version", help="vX.Y.Z; omitted: the next patch version, registered at the current commit")
    p.add_argument("--stage", required=True)
    p.add_argument("--force", action="store_true", help="promote despite failed gates (needs --reason)")
    p.add_argument("--reason", help="why the gates are overridden; committed in the override record on the current branch")
    p.add_argument("--push", action="store_true", help="push the new tags to origin")
    p.set_defaults(run=_run_promote)
    sub.add_parser("versions", help="registered versions and their stages").set_defaults(run=lambda cfg, args: _print_versions(versions()))
    c = sub.add_parser("check", help="may the version a stage tag assigns be deployed? (run by the deploy-on-stage-tag workflow)")
    c.add_argument("--tag", required=True, help="a stage tag <name>#<stage>#N, e.g. digits#prod#3 (<name>: package.model_name)")
    c.add_argument("--policy-ref", help="the branch that deploys, e.g. origin/main: its committed params.yaml is the gate policy "
                                        "and only override records in its history count (default: the working tree's config, HEAD)")
    c.set_defaults(run=_run_check)
    r = sub.add_parser("rollback", help="give a stage back to its previous version (deploy it with `python -m serve up --stage`)")
    r.add_argument("--stage", required=True)
    r.add_argument("--push", action="store_true")
    r.set_defaults(run=_run_rollback)
    for command in sub.choices.values():
        command.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, e.g. gate.quality.min_accuracy=0.97")
    return parser


def main() -> None:
    args = _parser().parse_args()
    cfg = command_config(args.params, args.overrides, refuse_stale=False)
    from gto.exceptions import GTOException  # after the config: gto takes longer to load than a bad config to refuse

    try:
        args.run(cfg, args)
    except GTOException as exc:  # GTO's own refusals (an invalid version name, a tag that exists...): one line
        raise RegistryError(f"gto: {' '.join(str(exc).split())}") from exc


if __name__ == "__main__":
    run_cli(main)
