"""Bring your own data: one file in conf/data/ configures a different dataset end to end, and
nothing of the sample (its name, its classes' story, its simulated attribute) leaks out."""

from __future__ import annotations

import fnmatch
import json
import re
import sys
import zipfile

import pytest
import yaml

from components.core.config.params_file import load_config
from tests.helpers.datasets import make_image_dataset
from tests.helpers.project import copy_project, git_commit, run
from tests.helpers.workflow import run_job

SAMPLE_WORDS = re.compile(r"\b(digits?|handwritten|site(_[ab])?|scikit-learn)\b", re.IGNORECASE)

SHAPES_YAML = """
name: shapes
root: {root}
format: imagefolder
metadata: metadata.csv
file_column: file
label_column: label
classes: [circle, square, star]
sensitive_attributes: [camera]
channels: 3
image_size: [20, 20]
split:
  val: 0.2
  test: 0.25
warn_below: 5
histogram_bins: 10
intended_use: Sorts photos of hand-drawn shapes for a classroom game.
limitations:
  - Photographed with two cameras only.
"""


@pytest.mark.integration
def test_a_second_dataset_is_one_config_file_and_no_output_mentions_the_sample(tmp_path):
    repo = copy_project(tmp_path / "repo", with_data=False)
    data = make_image_dataset(tmp_path / "shapes", classes=("circle", "square", "star"), per_class=20, channels=3,
                              size=(24, 24), fmt="imagefolder", attribute="camera")
    (repo / "conf" / "data" / "shapes.yaml").write_text(SHAPES_YAML.format(root=data))
    overrides = ["data=shapes", "train.epochs=2", "evaluate.attribution_samples=2", "evaluate.bootstrap_samples=50",
                 "gate.on_fail=warn"]  # 2 epochs on 60 images: the quality gate would close
    for step, paths in (("prepare", []), ("train", []), ("evaluate", []), ("package", [])):
        run(["python", "-m", f"components.{step}", *paths, *overrides], repo)

    package = json.loads((repo / "artifacts" / "package" / "package.json").read_text())
    assert package["model_name"] == "shapes"
    with zipfile.ZipFile(repo / "artifacts" / "package" / "shapes.mar") as mar:
        manifest = mar.read("MAR-INF/MANIFEST.json").decode()
        signature = mar.read("signature.json").decode()
    card = (repo / "reports" / "model_card.md").read_text()
    assert "Sorts photos of hand-drawn shapes" in card and "Photographed with two cameras only." in card
    outputs = {
        "model card": card,
        "evaluation.html": (repo / "reports" / "evaluation.html").read_text(),
        "metrics.json": (repo / "reports" / "metrics.json").read_text(),
        "fairness.json": (repo / "reports" / "fairness.json").read_text(),
        "package.json": json.dumps(package),
        "MANIFEST.json": manifest,
        "signature.json": signature,
    }
    leaks = {name: sorted({m.group(0) for m in SAMPLE_WORDS.finditer(text)}) for name, text in outputs.items() if SAMPLE_WORDS.search(text)}
    assert leaks == {}


@pytest.mark.integration
def test_the_registry_artifact_follows_data_name(tmp_path):
    """`gto register`, the project's registry and the deploy workflow go by the artifact conf/ derives from data.name."""
    sample = load_config().package.model_name
    repo = copy_project(tmp_path / "repo", with_data=False)
    (repo / "conf" / "data" / "shapes.yaml").write_text(SHAPES_YAML.format(root="data"))
    printed = run(["python", "-m", "components.core.config", "data=shapes"], repo).stdout
    assert "model artifact 'shapes': artifacts.yaml and dvc.yaml rewritten" in printed
    run(["python", "-m", "components.core.config", "--check"], repo)  # what the `config` stage runs
    declared = {"type": "model", "path": "artifacts/package", "labels": ["onnx", "torchserve"],
                "description": "Image classifier packaged as ONNX + TorchServe archive (model.onnx, signature.json, shapes.mar)"}
    assert yaml.safe_load((repo / "artifacts.yaml").read_text()) == {"shapes": declared}
    dvc_artifacts = yaml.safe_load((repo / "dvc.yaml").read_text())["artifacts"]
    assert dvc_artifacts == {"shapes": {**{k: v for k, v in declared.items() if k != "description"}, "desc": declared["description"]}}
    assert not SAMPLE_WORDS.search((repo / "artifacts.yaml").read_text() + json.dumps(dvc_artifacts))
    git_commit(repo, "data: shapes")
    head = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()

    run(["gto", "register", "shapes", "--version", "v1.0.0"], repo)
    assigned = run(["gto", "assign", "shapes", "--version", "v1.0.0", "--stage", "prod"], repo).stdout
    assert "Created git tag 'shapes#prod#1'" in assigned
    shown = json.loads(run(["gto", "show", "--json"], repo).stdout)
    assert list(shown) == ["shapes"] and (shown["shapes"]["version"], shown["shapes"]["stage"]["prod"]) == ("v1.0.0", "v1.0.0")
    listed = run(["python", "-m", "components.promote", "versions"], repo).stdout.splitlines()
    assert listed[1].split() == ["v1.0.0", head[:10], "prod"]  # the project's registry reads the same artifact

    # The deploy workflow fires on the stage tag and its check accepts the artifact: it gets as far as the
    # remote (empty here, so the package cannot be fetched), while a tag of the sample's artifact is refused.
    workflow = yaml.safe_load((repo / ".github/workflows/deploy-on-stage-tag.yml").read_text())
    assert any(fnmatch.fnmatchcase("shapes#prod#1", pattern) for pattern in workflow[True]["push"]["tags"])  # YAML 1.1: `on` is True
    run(["dvc", "remote", "modify", "--local", "storage", "url", str(tmp_path / "empty-remote")], repo)
    (repo / ".venv").symlink_to(sys.prefix)
    run(["git", "clone", "-q", "--bare", str(repo), str(tmp_path / "origin.git")], tmp_path)  # its default branch's policy decides
    run(["git", "remote", "add", "origin", str(tmp_path / "origin.git")], repo)
    job = run_job(repo / ".github/workflows/deploy-on-stage-tag.yml", "deploy", repo, env={"GITHUB_REF_NAME": "shapes#prod#1"},
                  skip=("Set up the locked environment",))
    assert job.names == ["Which stage did this tag assign?", "Which branch's policy decides?", "Re-check gates and remote retrievability"]
    checked = job.steps[-1][1]
    assert checked.returncode == 2 and f"artifacts/package at {head[:10]} cannot be fetched from the DVC remote" in checked.stderr
    run(["gto", "register", sample, "--version", "v1.0.0"], repo)
    run(["gto", "assign", sample, "--version", "v1.0.0", "--stage", "prod"], repo)
    other = run(["python", "-m", "components.promote", "check", "--tag", f"{sample}#prod#1"], repo, check=False)
    assert other.returncode == 2 and other.stderr.strip() == (
        f"error: {sample}#prod#1: assigns a stage to artifact {sample!r}, but this repository's model artifact is 'shapes' "
        "(dvc.yaml `artifacts:`, named by data.name); nothing to deploy")


@pytest.mark.e2e
def test_an_experiment_cannot_rename_the_artifact(tmp_path):
    """The artifact is declared in the committed dvc.yaml: `dvc exp run -S data.name=...` stops at the `config` stage."""
    repo = copy_project(tmp_path / "repo")
    sample = load_config().package.model_name
    result = run(["dvc", "exp", "run", "-S", "data.name=shapes"], repo, check=False)
    assert result.returncode != 0 and "Running stage 'prepare'" not in result.stdout
    assert (f"error: artifacts.yaml is stale (declares [{sample!r}]); dvc.yaml is stale (declares [{sample!r}]): "
            "params.yaml names the model artifact 'shapes'") in result.stderr + result.stdout
