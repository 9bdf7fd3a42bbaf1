"""The gate that guards production, probed as an attacker or a careless operator would: a tag message
that claims an override, a hand-edited report, a policy relaxed in the candidate commit itself, and
`serve up --stage` around the check. A copy of this project whose pipeline is one real DVC stage that
writes the real committed reports and a stand-in package, a local DVC remote, real git, GTO and the
deploy workflow's own `run:` steps."""

from __future__ import annotations

import json
import re
import sys
from functools import cache
from pathlib import Path

import pytest

from components.core.paths import ROOT
from components.registry.overrides import override_message
from tests.helpers.project import copy_project, git_commit, run
from tests.helpers.workflow import run_job

REPORTS = ("metrics.json", "quality.json", "fairness.json")
RELAXED = 0.5  # the sample model's committed accuracy (about 0.978) passes it, and fails strict() just above its whole interval
PIPELINE = """stages:
  evaluate:
    cmd: mkdir -p artifacts/package reports && cp evidence/metrics.json evidence/quality.json evidence/fairness.json reports/
      && cp evidence/package.json artifacts/package/
    deps:
      - evidence
    outs:
      - artifacts/package
      - reports/metrics.json:
          cache: false
      - reports/quality.json:
          cache: false
      - reports/fairness.json:
          cache: false
artifacts:
  digits:
    path: artifacts/package
    type: model
"""


@cache
def strict() -> float:
    """A min_accuracy just above the whole interval of the committed accuracy."""
    checks = json.loads(run(["git", "show", "HEAD:reports/quality.json"], ROOT).stdout)["checks"]
    return round(next(c for c in checks if c["check"] == "accuracy")["high"] + 0.001, 4)


STAND_IN_PACKAGE = {"model_name": "digits", "version": "stand-in", "mar": {"file": "digits.mar", "sha256": "0" * 64}}  # no .mar


def set_policy(repo: Path, min_accuracy: float) -> None:
    """Change conf/gate's min_accuracy and regenerate params.yaml, as a team changes its policy."""
    policy = repo / "conf/gate/default.yaml"
    policy.write_text(re.sub(r"(?m)^  min_accuracy: .*$", f"  min_accuracy: {min_accuracy}", policy.read_text(), count=1))
    run(["python", "-m", "components.core.config"], repo)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """main: the real committed reports and a stand-in package pushed to a local DVC remote, under a strict policy."""
    root = tmp_path_factory.mktemp("gate")
    repo = copy_project(root / "template", with_data=False)
    (repo / "evidence").mkdir()
    for name in REPORTS:
        (repo / "evidence" / name).write_text(run(["git", "show", f"HEAD:reports/{name}"], ROOT).stdout)
    (repo / "evidence" / "package.json").write_text(json.dumps(STAND_IN_PACKAGE))
    (repo / "dvc.yaml").write_text(PIPELINE)
    (repo / "dvc.lock").unlink()
    set_policy(repo, strict())
    run(["dvc", "remote", "add", "-f", "-d", "storage", str(root / "remote")], repo)
    run(["dvc", "repro", "evaluate"], repo)
    run(["dvc", "push", "evaluate"], repo)
    git_commit(repo, f"model v1 under a {strict()} policy")
    return repo


@pytest.fixture
def repo(template: Path, tmp_path: Path) -> Path:
    """A clone of the template (its origin: the template, whose main is the branch that deploys)."""
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(template), str(clone)], tmp_path)
    (clone / ".venv").symlink_to(Path(sys.prefix))  # the workflow's `make setup`
    return clone


def assign(repo: Path, version: str, message: str | None = None) -> str:
    """A plain `gto register` + `gto assign` of HEAD to prod, past the project's CLI; the new stage tag."""
    run(["gto", "register", "digits", "--version", version], repo)
    run(["gto", "assign", "digits", "--version", version, "--stage", "prod", *(["-m", message] if message else [])], repo)
    return newest_tag(repo)


def newest_tag(repo: Path) -> str:
    return max(run(["git", "tag", "-l", "digits#prod#*"], repo).stdout.split(), key=lambda tag: int(tag.rsplit("#", 1)[1]))


def check(repo: Path, tag: str, *args: str):
    return run(["python", "-m", "components.promote", "check", "--tag", tag, *args], repo, check=False)


def head(repo: Path) -> str:
    return run(["git", "rev-parse", "HEAD"], repo).stdout.strip()


def accuracy_failure(repo: Path) -> str:
    """The gate failure the committed reports show under the strict policy."""
    accuracy = next(c for c in json.loads((repo / "reports/quality.json").read_text())["checks"] if c["check"] == "accuracy")
    assert accuracy["high"] < strict() <= 1
    return (f"quality: accuracy {accuracy['value']:.4f} (interval {accuracy['low']:.4f} to {accuracy['high']:.4f}; must be >= {strict()}, "
            "gate.quality.min_accuracy): fail, the whole interval is beyond the tolerance")


@pytest.mark.e2e
def test_a_tag_message_claiming_an_override_is_no_override(repo):
    claimed = assign(repo, "v1.0.0", message="Promote digits v1.0.0 to prod: FORCED past failed gates (accuracy): approved")
    run(["git", "tag", "-a", "digits#prod#9", "-m", "FORCED past failed gates: trust me", head(repo)], repo)
    for tag in (claimed, "digits#prod#9"):
        refused = check(repo, tag, "--policy-ref", "main")
        assert refused.returncode == 2, refused.stdout
        assert "digits v1.0.0 may not enter 'prod'" in refused.stderr and accuracy_failure(repo) in refused.stderr
        assert "no override record in the history of main" in refused.stderr

    # A record outside the branch that deploys (here a side branch) does not count either.
    record = {"artifact": "digits", "version": "v1.0.0", "stage": "prod", "commit": head(repo), "reason": "side door",
              "command": "hand-made", "failures": [accuracy_failure(repo)]}
    side = run(["git", "commit-tree", "HEAD^{tree}", "-p", "HEAD", "-m", override_message(record)], repo).stdout.strip()
    run(["git", "branch", "side", side], repo)
    assert check(repo, claimed, "--policy-ref", "main").returncode == 2
    assert check(repo, claimed, "--policy-ref", "side").returncode == 0  # the same record, in the branch named as deploying

    # The override on the record: `promote --force --reason` commits it on the current branch, then tags.
    before = head(repo)
    run(["python", "-m", "components.promote", "promote", "--version", "v1.0.0", "--stage", "prod", "--force",
         "--reason", "demo: 0.978 is enough for now"], repo)
    message = run(["git", "log", "-1", "--format=%B"], repo).stdout
    before_tree = run(["git", "rev-parse", f"{before}^{{tree}}"], repo).stdout.strip()
    assert run(["git", "rev-parse", "HEAD^", "HEAD^{tree}"], repo).stdout.split() == [before, before_tree]
    assert "Reason: demo: 0.978 is enough for now" in message
    assert "Command: python -m components.promote promote --version v1.0.0 --stage prod --force --reason" in message
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], repo).stdout == ""  # index and working tree untouched
    passed = check(repo, newest_tag(repo), "--policy-ref", "main")
    assert passed.returncode == 0, passed.stderr
    assert f"gates overridden by the record {head(repo)[:10]} in main" in passed.stdout and "demo: 0.978 is enough for now" in passed.stdout


def raise_accuracy(report: dict) -> dict:
    """An edit that would pass any policy: the headline accuracy, or the accuracy check's value and interval, at 0.999."""
    if "checks" not in report:
        return {**report, "accuracy": 0.999}
    return {**report, "checks": [{**c, "value": 0.999, "low": 0.999, "high": 0.999} if c["check"] == "accuracy" else c
                                 for c in report["checks"]]}


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["metrics.json", "quality.json"])
def test_a_hand_edited_report_is_refused(repo, name):
    report_file = repo / "reports" / name
    report_file.write_text(json.dumps(raise_accuracy(json.loads(report_file.read_text())), indent=2))
    git_commit(repo, "reports: accuracy 0.999")
    [changed] = json.loads(run(["dvc", "status", "--json", "evaluate"], repo).stdout)["evaluate"]
    assert changed["changed outs"][f"reports/{name}"] == "modified"  # DVC sees it too
    tag = assign(repo, "v1.1.0")
    refused = check(repo, tag, "--policy-ref", "main")
    assert refused.returncode == 2, refused.stdout
    assert f"reports/{name} at {head(repo)[:10]} does not match dvc.lock" in refused.stderr
    forced = run(["python", "-m", "components.promote", "promote", "--version", "v1.1.0", "--stage", "prod", "--force",
                  "--reason", "numbers look fine"], repo, check=False)
    assert forced.returncode == 2 and "does not match dvc.lock" in forced.stderr  # not something an override can accept


@pytest.mark.e2e
def test_a_policy_relaxed_in_the_candidate_commit_does_not_decide(repo):
    run(["git", "checkout", "-q", "-b", "candidate"], repo)
    set_policy(repo, RELAXED)
    git_commit(repo, f"gate: {RELAXED} is enough")
    tag = assign(repo, "v1.1.0")
    run(["git", "checkout", "-q", "--detach", tag], repo)  # what actions/checkout does on a tag push
    assert check(repo, tag).returncode == 0  # judged by its own policy, the candidate passes

    job = run_job(repo / ".github/workflows/deploy-on-stage-tag.yml", "deploy", repo, env={"GITHUB_REF_NAME": tag},
                  skip=("Set up the locked environment",))
    assert job.names == ["Which stage did this tag assign?", "Which branch's policy decides?", "Re-check gates and remote retrievability"]
    refused = job.steps[-1][1]
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "digits v1.1.0 may not enter 'prod'" in refused.stderr and accuracy_failure(repo) in refused.stderr
    ignored = check(repo, tag, "--policy-ref", "origin/main", f"gate.quality.min_accuracy={RELAXED}")
    assert ignored.returncode == 2 and "would be ignored" in ignored.stderr


@pytest.mark.e2e
def test_serve_up_stage_runs_the_same_check_first(repo):
    tag = assign(repo, "v1.0.0")
    refused = run(["python", "-m", "serve", "up", "--stage", "prod"], repo, check=False)
    assert refused.returncode == 2, refused.stdout
    assert "digits v1.0.0 may not enter 'prod'" in refused.stderr and f"{tag} is not deployed" in refused.stderr
    assert not (repo / ".serve").exists()  # nothing fetched, no server started

    set_policy(repo, RELAXED)  # the operator's own (working tree) policy: the check passes, then the deploy starts
    passed = run(["python", "-m", "serve", "up", "--stage", "prod"], repo, check=False)
    metrics = json.loads((repo / "evidence" / "metrics.json").read_text())
    inconclusive = metrics["fairness"]["inconclusive"] + list(metrics["quality"].values()).count("inconclusive")
    open_gate = f"serve: stage prod -> v1.0.0 (commit {head(repo)[:10]}, {tag}): gates open with {inconclusive} warning(s): site: "
    assert inconclusive and open_gate in passed.stdout, passed.stdout  # not "gates passed": each warning's verdict is named
    assert passed.returncode == 2 and "digits.mar: archive not found" in passed.stderr  # the stand-in package has no archive
