"""Model promotion with git tags: a throw-away copy of the project, two trained versions, a
real S3 server (SeaweedFS) as DVC remote, the real gto CLI and a real TorchServe."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from components.core.config import load_config
from components.deploy import default_version
from components.promote import promote, rollback
from components.registry.tags import RegistryError, versions
from serve.__main__ import deploy_stage
from components.serving import server
from tests.helpers.project import copy_project, git_commit, run
from tests.helpers.servers import S3Server, free_ports, seaweed_s3


@dataclass
class Project:
    repo: Path
    s3: S3Server
    serve_overrides: list[str]

    def cfg(self, *overrides: str):
        return load_config(self.repo / "params.yaml", [*self.serve_overrides, *overrides])

    def reports(self) -> tuple[dict, dict]:
        return (json.loads((self.repo / "reports/metrics.json").read_text()),
                json.loads((self.repo / "reports/fairness.json").read_text()))

    def package_version(self) -> str:
        return json.loads((self.repo / "artifacts/package/package.json").read_text())["version"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    repo = copy_project(root / "repo")
    ports = free_ports(5)
    serve_overrides = [f"serve.state_dir={root / 'serve'}", f"serve.inference_port={ports[0]}", f"serve.management_port={ports[1]}",
                       f"serve.metrics_port={ports[2]}", f"serve.grpc_inference_port={ports[3]}", f"serve.grpc_management_port={ports[4]}"]
    with seaweed_s3(root / "s3") as s3:
        for key, value in (("endpointurl", s3.endpoint), ("access_key_id", s3.access_key), ("secret_access_key", s3.secret_key)):
            run(["dvc", "remote", "modify", "--local", "storage", key, value], repo)
        run(["dvc", "exp", "run", "-S", "experiment=quick"], repo)
        git_commit(repo, "model v1")
        run(["dvc", "push"], repo)
        project = Project(repo, s3, serve_overrides)
        try:
            yield project
        finally:
            server.stop(project.cfg())


def gates_around(metrics: dict, fairness: dict, passing: bool) -> list[str]:
    """Gate overrides placed just below (passing) or just above (failing) the measured accuracy."""
    delta = -0.001 if passing else 0.001
    return [f"gate.quality.min_accuracy={metrics['accuracy'] + delta}",
            f"gate.quality.min_balanced_accuracy={metrics['balanced_accuracy'] - 0.001}",
            f"gate.quality.max_ece={metrics['ece'] + 0.001}", "gate.on_fail=block", "gate.on_inconclusive=warn",
            *(f"gate.fairness.max_{check}=1" for check in ("accuracy_difference", "recall_macro_difference", "demographic_parity_difference",
                                                            "equalized_odds_difference")), "gate.fairness.min_accuracy_ratio=0"]  # quality decides here


def latest_stage_tag_message(repo: Path, stage: str) -> str:
    """Message of the newest `digits#<stage>#N` tag (GTO's N counts every assignment of the artifact)."""
    tags = run(["git", "tag", "-l", f"digits#{stage}#*"], repo).stdout.split()
    newest = max(tags, key=lambda tag: int(tag.rsplit("#", 1)[1]))
    return run(["git", "for-each-ref", f"refs/tags/{newest}", "--format=%(contents)"], repo).stdout.strip()


def test_artifact_declarations_agree():
    from components.core.config import ROOT

    dvc_artifacts = yaml.safe_load((ROOT / "dvc.yaml").read_text())["artifacts"]
    gto_artifacts = yaml.safe_load((ROOT / "artifacts.yaml").read_text())
    assert dvc_artifacts.keys() == gto_artifacts.keys() == {load_config().package.model_name}
    for name, spec in dvc_artifacts.items():
        assert (spec["type"], spec["path"], spec["desc"], spec["labels"]) == (
            gto_artifacts[name]["type"], gto_artifacts[name]["path"], gto_artifacts[name]["description"], gto_artifacts[name]["labels"])


def test_promotion_lifecycle(project: Project):
    repo = project.repo
    metrics_v1, fairness_v1 = project.reports()
    package_v1 = project.package_version()

    # v1: register the current commit and promote it through staging into prod (gates pass).
    assert promote(project.cfg(), "v1.0.0", "staging", repo=repo)["verdict"] == "stage not gated"
    done = promote(project.cfg(*gates_around(metrics_v1, fairness_v1, passing=True)), "v1.0.0", "prod", repo=repo)
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
    metrics_v2, fairness_v2 = project.reports()
    package_v2 = project.package_version()
    assert package_v2 != package_v1
    strict = project.cfg(*gates_around(metrics_v2, fairness_v2, passing=False))
    with pytest.raises(RegistryError) as refused:
        promote(strict, "v1.1.0", "prod", repo=repo)
    assert f"quality: accuracy {metrics_v2['accuracy']:.4f} not >= " in str(refused.value)
    forced = promote(strict, "v1.1.0", "prod", force_reason="demo: accept a 0.1% accuracy shortfall", repo=repo)
    assert forced["verdict"].startswith("FORCED past failed gates")
    assert "demo: accept a 0.1% accuracy shortfall" in latest_stage_tag_message(repo, "prod")

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

    # Deploy prod: exactly v2's package, fetched from the remote, is the live default.
    deployed, _ = deploy_stage(project.cfg(), "prod", repo=repo)
    assert (deployed["source"]["registry_version"], deployed["version"]) == ("v1.1.0", package_v2)
    assert deployed["source"]["commit"] == ours["v1.1.0"][0]  # served version -> package -> tag -> commit
    assert live_default(project) == package_v2

    # Roll back: prod goes back to v1 and v1 is what serves.
    back = rollback(project.cfg(), "prod", repo=repo)
    assert (back["replaced"], back["version"]) == ("v1.1.0", "v1.0.0")
    assert json.loads(run(["gto", "show", "--json"], repo).stdout)["digits"]["stage"]["prod"] == "v1.0.0"
    redeployed = run(["python", "-m", "serve", "up", "--stage", "prod", *project.serve_overrides], repo).stdout
    assert "serve: stage prod -> v1.0.0" in redeployed and f"version {package_v1} is the default" in redeployed
    assert live_default(project) == package_v1


def live_default(project: Project) -> str:
    cfg = project.cfg()
    return default_version(server.local_endpoint(cfg), cfg.package.model_name)


def test_cli_refuses_force_without_reason_and_unknown_stage(project: Project):
    cli = ["python", "-m", "components.promote", "promote", "--version", "v9.0.0"]
    no_reason = run([*cli, "--stage", "prod", "--force"], project.repo, check=False)
    assert no_reason.returncode == 2 and "--force needs --reason" in no_reason.stderr
    unknown = run([*cli, "--stage", "production"], project.repo, check=False)
    assert unknown.returncode == 2 and "unknown stage 'production'" in unknown.stderr
    listed = run(["python", "-m", "components.promote", "versions"], project.repo)
    assert listed.stdout.splitlines()[0].split() == ["version", "commit", "stages"]


def test_rollback_without_history_is_refused(project: Project, tmp_path):
    with pytest.raises(RegistryError, match="no earlier version held 'staging'|no version of digits is in stage 'staging'"):
        rollback(project.cfg(), "staging", repo=clean_copy(project.repo, tmp_path))


def clean_copy(repo: Path, tmp_path: Path) -> Path:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-tags", str(repo), str(clone)], check=True)
    return clone
