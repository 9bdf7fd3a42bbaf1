"""Model promotion with git tags: a throw-away copy of the project, two trained versions, a
real S3 server (SeaweedFS) as DVC remote, the real gto CLI and a real TorchServe."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from components.core.config.compose import compose
from components.core.config.params_file import load_config, recorded_overrides
from components.deploy import default_version
from components.promote import promote, rollback
from components.registry.tags import RegistryError, versions
from components.torchserve import server
from serve.commands import deploy_stage
from tests.helpers.project import copy_of, git_commit, run
from tests.helpers.servers import S3Server, free_ports, seaweed_s3
from tests.helpers.workflow import run_job

DEPLOY_WORKFLOW = ".github/workflows/deploy-on-stage-tag.yml"


@dataclass
class Project:
    repo: Path
    s3: S3Server
    serve_overrides: list[str]

    def cfg(self, *overrides: str):
        return compose([*self.serve_overrides, *overrides])

    def quality(self) -> dict[str, dict]:
        """The quality checks of the committed reports, by name (value, interval, verdict)."""
        return {c["check"]: c for c in json.loads((self.repo / "reports/quality.json").read_text())["checks"]}

    def package_version(self) -> str:
        return json.loads((self.repo / "artifacts/package/package.json").read_text())["version"]


@pytest.fixture(scope="module")
def project(quick_project, tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    repo = copy_of(quick_project, root / "repo")  # model v1: the quick experiment, committed
    ports = free_ports(5)
    serve_overrides = [f"serve.state_dir={root / 'serve'}", f"serve.inference_port={ports[0]}", f"serve.management_port={ports[1]}",
                       f"serve.metrics_port={ports[2]}", f"serve.grpc_inference_port={ports[3]}", f"serve.grpc_management_port={ports[4]}"]
    with seaweed_s3(root / "s3") as s3:
        for key, value in (("endpointurl", s3.endpoint), ("access_key_id", s3.access_key), ("secret_access_key", s3.secret_key)):
            run(["dvc", "remote", "modify", "--local", "storage", key, value], repo)
        run(["dvc", "push"], repo)
        run(["git", "clone", "-q", "--bare", str(repo), str(root / "origin.git")], root)  # main there: the branch that deploys
        run(["git", "remote", "add", "origin", str(root / "origin.git")], repo)
        project = Project(repo, s3, serve_overrides)
        try:
            yield project
        finally:
            server.stop(project.cfg())


def gates_around(quality: dict[str, dict], passing: bool) -> list[str]:
    """Gate overrides placed just below (passing) or just above (failing) the measured accuracy's whole interval."""
    accuracy = quality["accuracy"]["low"] - 0.001 if passing else quality["accuracy"]["high"] + 0.001
    return [f"gate.quality.min_accuracy={accuracy}", f"gate.quality.min_balanced_accuracy={quality['balanced_accuracy']['low'] - 0.001}",
            f"gate.quality.max_ece={quality['ece']['high'] + 0.001}",
            "gate.on_fail=block", "gate.on_inconclusive=warn",
            *(f"gate.fairness.max_{check}=1" for check in ("accuracy_difference", "recall_macro_difference",
                                                            "demographic_parity_difference", "equalized_odds_difference")),
            "gate.fairness.min_accuracy_ratio=0", "gate.fairness.min_group_size=1"]  # quality decides here


def latest_stage_tag_message(repo: Path, stage: str) -> str:
    """Message of the newest `digits#<stage>#N` tag (GTO's N counts every assignment of the artifact)."""
    tags = run(["git", "tag", "-l", f"digits#{stage}#*"], repo).stdout.split()
    newest = max(tags, key=lambda tag: int(tag.rsplit("#", 1)[1]))
    return run(["git", "for-each-ref", f"refs/tags/{newest}", "--format=%(contents)"], repo).stdout.strip()


def test_artifact_declarations_agree():
    """dvc.yaml's `artifacts:` and GTO's artifacts.yaml declare the package as one model artifact named as conf/ names the model."""
    from components.core.config.dvc_yaml import stale_artifact_files
    from components.core.paths import ROOT

    name = load_config().package.model_name
    assert stale_artifact_files(name) == {}, "artifact declarations differ from what conf/ generates: run `make params` and commit"
    dvc_artifacts = yaml.safe_load((ROOT / "dvc.yaml").read_text())["artifacts"]
    gto_artifacts = yaml.safe_load((ROOT / "artifacts.yaml").read_text())
    assert dvc_artifacts.keys() == gto_artifacts.keys() == {name}
    assert gto_artifacts[name]["path"] == "artifacts/package" and f"{name}.mar" in gto_artifacts[name]["description"]
    for name, spec in dvc_artifacts.items():
        assert (spec["type"], spec["path"], spec["desc"], spec["labels"]) == (
            gto_artifacts[name]["type"], gto_artifacts[name]["path"], gto_artifacts[name]["description"], gto_artifacts[name]["labels"])


def test_gto_and_the_registry_accept_the_same_stages():
    from components.core.paths import ROOT

    assert yaml.safe_load((ROOT / ".gto").read_text())["stages"] == list(load_config().registry.stages)


@pytest.mark.e2e
def test_promotion_lifecycle(project: Project):
    repo = project.repo
    quality_v1 = project.quality()
    package_v1 = project.package_version()

    # v1: register the current commit and promote it through staging into prod (gates pass).
    assert promote(project.cfg(), "v1.0.0", "staging", repo=repo)["verdict"] == "stage not gated"
    done = promote(project.cfg(*gates_around(quality_v1, passing=True)), "v1.0.0", "prod", repo=repo)
    assert done["verdict"] == "gates passed"
    assert "gates passed" in latest_stage_tag_message(repo, "prod")

    # v2: a new experiment; refused while uncommitted, then while not pushed to the remote.
    run(["dvc", "exp", "run", "-S", "experiment=quick", "-S", "train.lr=0.004"], repo)
    with pytest.raises(RegistryError, match="uncommitted pipeline changes"):
        promote(project.cfg(), "v1.1.0", "staging", repo=repo)
    git_commit(repo, "model v2")
    with pytest.raises(RegistryError, match="cannot be fetched from the DVC remote"):
        promote(project.cfg(), "v1.1.0", "staging", repo=repo)
    run(["dvc", "push"], repo)
    promote(project.cfg(), "v1.1.0", "staging", repo=repo)

    # prod is gated: refused on the measured values, then forced with a reason recorded in the tag.
    quality_v2 = project.quality()
    package_v2 = project.package_version()
    assert package_v2 != package_v1
    strict = project.cfg(*gates_around(quality_v2, passing=False))
    with pytest.raises(RegistryError) as refused:
        promote(strict, "v1.1.0", "prod", repo=repo)
    accuracy = quality_v2["accuracy"]
    assert (f"quality: accuracy {accuracy['value']:.4f} (interval {accuracy['low']:.4f} to {accuracy['high']:.4f}; must be >= "
            f"{accuracy['high'] + 0.001}, gate.quality.min_accuracy): fail, the whole interval is beyond the tolerance"
            ) in str(refused.value)
    forced = promote(strict, "v1.1.0", "prod", force_reason="demo: accept an accuracy below the gate", repo=repo)
    assert forced["verdict"].startswith("FORCED past failed gates")
    assert "demo: accept an accuracy below the gate" in latest_stage_tag_message(repo, "prod")

    # The project's view and the real gto CLI agree.
    ours = {v["version"]: (v["commit"], v["stages"]) for v in versions(repo)}
    assert ours == {"v1.0.0": (ours["v1.0.0"][0], []), "v1.1.0": (ours["v1.1.0"][0], ["prod", "staging"])}
    shown = json.loads(run(["gto", "show", "--json"], repo).stdout)["digits"]
    assert shown["stage"]["prod"] == "v1.1.0" and shown["version"] == "v1.1.0"
    assert json.loads(run(["gto", "show", "digits#prod", "--json"], repo).stdout)[0]["commit_hexsha"] == ours["v1.1.0"][0]

    # `dvc artifacts get --stage` reads the same truth, from the remote.
    out = project.repo.parent / "artifact_prod"
    run(["dvc", "artifacts", "get", ".", "digits", "--stage", "prod", "-o", str(out)], repo)
    assert json.loads((out / "package.json").read_text())["version"] == package_v2

    # Deploy prod: exactly v2's package, fetched from the remote, is the live default, once the check passes it
    # under the policy it was forced past (the override record accepts exactly those failures).
    deployed, _ = deploy_stage(strict, "prod", repo=repo)
    assert (deployed["source"]["registry_version"], deployed["version"]) == ("v1.1.0", package_v2)
    assert deployed["source"]["commit"] == ours["v1.1.0"][0]  # served version -> package -> tag -> commit
    assert live_default(project) == package_v2

    # Roll back: prod goes back to v1 and v1 is what serves.
    back = rollback(project.cfg(), "prod", repo=repo)
    assert (back["replaced"], back["version"]) == ("v1.1.0", "v1.0.0")
    assert json.loads(run(["gto", "show", "--json"], repo).stdout)["digits"]["stage"]["prod"] == "v1.0.0"
    redeployed = run(["python", "-m", "serve", "up", "--stage", "prod", *project.serve_overrides,
                      *gates_around(quality_v1, passing=True)], repo).stdout
    assert "serve: stage prod -> v1.0.0" in redeployed and f"version {package_v1} is the default" in redeployed
    assert live_default(project) == package_v1


def live_default(project: Project) -> str:
    cfg = project.cfg()
    return default_version(server.local_endpoint(cfg), cfg.package.model_name)


@pytest.mark.e2e
def test_cli_refuses_force_without_reason_and_unknown_stage(project: Project):
    cli = ["python", "-m", "components.promote", "promote", "--version", "v9.0.0"]
    no_reason = run([*cli, "--stage", "prod", "--force"], project.repo, check=False)
    assert no_reason.returncode == 2 and "--force needs --reason" in no_reason.stderr
    unknown = run([*cli, "--stage", "production"], project.repo, check=False)
    assert unknown.returncode == 2 and "unknown stage 'production'" in unknown.stderr
    listed = run(["python", "-m", "components.promote", "versions"], project.repo)
    assert listed.stdout.splitlines()[0].split() == ["version", "commit", "stages"]


@pytest.mark.e2e
def test_a_second_stage_at_the_same_commit_reuses_its_version_and_gto_refusals_are_one_line(project: Project):
    staged = promote(project.cfg(), None, "staging", repo=project.repo)
    again = promote(project.cfg(), None, "staging", repo=project.repo)  # no --version: the commit's own version
    assert (again["version"], again["verdict"]) == (staged["version"], "already in 'staging'; nothing to do")
    cli = ["python", "-m", "components.promote", "promote", "--stage", "staging"]
    second = run([*cli, "--version", "v99.0.0"], project.repo, check=False)
    assert second.returncode == 2 and second.stderr.strip().splitlines() == [
        f"error: commit {staged['commit'][:10]} is already registered as {staged['version']} and a commit holds one version: "
        f"promote that one (--version {staged['version']}), or commit the new model first"]
    run(["git", "commit", "-q", "--allow-empty", "-m", "no model change"], project.repo)  # a commit without a version
    try:
        invalid = run([*cli, "--version", "1.0"], project.repo, check=False)  # GTO's own refusal of a non-semver name
        assert invalid.returncode == 2 and len(invalid.stderr.strip().splitlines()) == 1
        assert invalid.stderr.startswith("error: gto: ") and "1.0" in invalid.stderr and "Traceback" not in invalid.stderr
    finally:
        run(["git", "reset", "-q", "--hard", "HEAD~1"], project.repo)


@pytest.mark.e2e
def test_rollback_without_history_is_refused(project: Project, tmp_path):
    with pytest.raises(RegistryError, match="no earlier version held 'staging'|no version of digits is in stage 'staging'"):
        rollback(project.cfg(), "staging", repo=clean_copy(project.repo, tmp_path))


def clean_copy(repo: Path, tmp_path: Path) -> Path:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-tags", str(repo), str(clone)], check=True)
    return clone


def events_of(repo: Path, kind: str) -> list[dict]:
    log = repo / ".events" / "events.jsonl"
    return [e for e in map(json.loads, log.read_text().splitlines()) if e["type"] == kind] if log.exists() else []


def deploy_records(project: Project) -> list[str]:
    log = server.state_dir(project.cfg()).deploy_log
    return log.read_text().splitlines() if log.exists() else []


def run_deploy_workflow(project: Project, tag: str):
    """The deploy-on-stage-tag job as GitHub runs it on a push of `tag` (the checkout is the repo; its
    `make setup` is this venv)."""
    venv = project.repo / ".venv"
    if not venv.exists():
        venv.symlink_to(Path(sys.prefix))
    return run_job(project.repo / DEPLOY_WORKFLOW, "deploy", project.repo, env={"GITHUB_REF_NAME": tag},
                   secrets={"AWS_ACCESS_KEY_ID": project.s3.access_key, "AWS_SECRET_ACCESS_KEY": project.s3.secret_key},
                   skip=("Set up the locked environment",))


def newest_tag(repo: Path, pattern: str) -> str:
    return max(run(["git", "tag", "-l", pattern], repo).stdout.split(), key=lambda tag: int(tag.rsplit("#", 1)[1]))


@pytest.mark.e2e
def test_plain_gto_assign_of_a_failing_version_is_not_deployed(project: Project):
    repo = project.repo
    # The team tightens its prod policy; the model at HEAD (already pushed: what the check must refuse is the gate, not a
    # missing package) no longer passes it. The policy's commit is the version registered below.
    policy = repo / "conf/gate/default.yaml"  # the one gate policy: evaluate, the pipeline and promotion read it
    policy.write_text(policy.read_text().replace("  min_accuracy: 0.9\n", "  min_accuracy: 0.9999\n", 1))
    assert "  min_accuracy: 0.9999\n" in policy.read_text()
    kept = recorded_overrides(repo / "params.yaml")  # the model's own overrides (experiment=quick, and a later lr)
    run(["python", "-m", "components.core.config", *kept, "gate.on_fail=block"], repo)  # quick only warns
    git_commit(repo, "gate: prod needs 99.99% accuracy")
    run(["git", "push", "-q", "origin", "HEAD:main"], repo)
    typo = run(["gto", "assign", "digits", "--version", "v1.1.0", "--stage", "production"], repo, check=False)
    assert typo.returncode != 0 and "Allowed stages" in typo.stdout + typo.stderr

    # Past the project's CLI: a plain `gto register` + `gto assign` pushes a stage tag anyway.
    run(["gto", "register", "digits", "--version", "v2.0.0"], repo)
    run(["gto", "assign", "digits", "--version", "v2.0.0", "--stage", "prod"], repo)
    tag = newest_tag(repo, "digits#prod#*")
    records_before = deploy_records(project)

    job = run_deploy_workflow(project, tag)
    assert job.names == ["Which stage did this tag assign?", "Which branch's policy decides?", "Re-check gates and remote retrievability"]
    refused = job.steps[-1][1]
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert project.quality()["accuracy"]["high"] < 0.9999  # the whole interval lies beyond the new policy
    assert "digits v2.0.0 may not enter 'prod'" in refused.stderr
    assert "must be >= 0.9999, gate.quality.min_accuracy): fail, the whole interval is beyond the tolerance" in refused.stderr
    assert deploy_records(project) == records_before  # the deploy step never ran
    closed = events_of(repo, "gate_closed")[-1]
    assert (closed["version"], closed["stage"]) == ("v2.0.0", "prod")

    # An override on the record (promote --force --reason, a commit on main) is the only way through, once it is in the
    # branch that deploys.
    run(["python", "-m", "components.promote", "promote", "--version", "v2.0.0", "--stage", "prod", "--force",
         "--reason", "demo: accepted below the new policy"], repo)
    forced = newest_tag(repo, "digits#prod#*")
    checked = run(["python", "-m", "components.promote", "check", "--tag", forced], repo)
    assert "may be deployed to prod" in checked.stdout and "demo: accepted below the new policy" in checked.stdout
    unpushed = run(["python", "-m", "components.promote", "check", "--tag", forced, "--policy-ref", "origin/main"], repo, check=False)
    assert unpushed.returncode == 2 and "no override record in the history of origin/main" in unpushed.stderr
    run(["git", "push", "-q", "origin", "HEAD:main"], repo)
    for assigned in (forced, tag):  # the record covers v2.0.0 in prod at its commit, whichever tag assigns it
        passed = run(["python", "-m", "components.promote", "check", "--tag", assigned, "--policy-ref", "origin/main"], repo)
        assert "gates overridden by the record" in passed.stdout and "demo: accepted below the new policy" in passed.stdout


@pytest.mark.e2e
def test_batch_scoring_by_tag_and_as_the_on_demand_dvc_stage(project: Project):
    repo = project.repo
    if not run(["git", "tag", "-l", "digits@v*"], repo).stdout.split():  # this test alone: nothing registered yet
        run(["gto", "register", "digits", "--version", "v1.0.0"], repo)
    tag = max(run(["git", "tag", "-l", "digits@v*"], repo).stdout.split(),
              key=lambda t: tuple(int(n) for n in t.split("@v")[1].split(".")))
    newest = {"version": tag.split("@")[1], "commit": run(["git", "rev-list", "-n1", tag], repo).stdout.strip()}
    out = repo.parent / "scored_by_tag"
    printed = run(["python", "-m", "components.score", "--tag", f"digits@{newest['version']}", "--input", "data/images",
                   "--out", str(out), f"events.log_file={repo.parent / 'events.jsonl'}"], repo).stdout
    assert "score: 1797 of 1797 files scored with digits" in printed
    summary = json.loads((out / "score.json").read_text())
    assert (summary["model"]["registry_version"], summary["model"]["commit"]) == (newest["version"], newest["commit"])

    # On demand only: the root pipeline never runs it; its own dvc.yaml does.
    assert "serve/batch/dvc.yaml:score" not in run(["dvc", "repro", "--dry"], repo, check=False).stdout
    # Steps refuse a params.yaml conf/ no longer matches; here `dvc exp run -S experiment=quick` composed it.
    run(["python", "-m", "components.core.config"], repo)
    staged = run(["dvc", "repro", "--single-item", "serve/batch/dvc.yaml:score"], repo).stdout
    assert "Running stage 'serve/batch/dvc.yaml:score'" in staged
    assert json.loads((repo / "artifacts/score/score.json").read_text())["scored"] == 1797
    assert "didn't change, skipping" in run(["dvc", "repro", "--single-item", "serve/batch/dvc.yaml:score"], repo).stdout
