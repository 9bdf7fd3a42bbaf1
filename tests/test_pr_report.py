"""The pull-request comment (.ci/pr_report.py) on two real commits of a temporary DVC repository,
with the real `dvc params/metrics/plots diff`; and the workflow that posts it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from components.core.paths import ROOT
from tests.helpers.project import git_commit, run

SCRIPT = ROOT / ".ci" / "pr_report.py"
DVC_YAML = """stages:
  train:
    cmd: python train.py
    params: [train.lr, train.epochs]
    metrics:
      - metrics.json: {cache: false}
    plots:
      - plots/loss.tsv: {cache: false, x: step, y: loss}
      - plots/confusion.json: {cache: false, template: confusion, x: actual, y: predicted}
"""


def write_results(repo: Path, lr: float, accuracy: float, losses: list[float]) -> None:
    (repo / "params.yaml").write_text(f"train:\n  lr: {lr}\n  epochs: 2\n")
    (repo / "metrics.json").write_text(f'{{"accuracy": {accuracy}, "ece": 0.02}}\n')
    (repo / "plots" / "loss.tsv").write_text("step\tloss\n" + "".join(f"{i}\t{v}\n" for i, v in enumerate(losses)))


def two_commits(repo: Path) -> Path:
    repo.mkdir()
    run(["git", "init", "-q", "-b", "main"], repo)
    run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    (repo / "plots").mkdir()
    (repo / "dvc.yaml").write_text(DVC_YAML)
    (repo / "train.py").write_text("print('trained')\n")
    (repo / "plots" / "confusion.json").write_text('[{"actual": "0", "predicted": "0"}]\n')
    write_results(repo, 0.01, 0.9, [1.0, 0.5])
    git_commit(repo, "base: lr 0.01")
    write_results(repo, 0.005, 0.93, [0.9, 0.4])
    git_commit(repo, "change: lr 0.005")
    return repo


@pytest.mark.integration
def test_the_comment_shows_params_metrics_and_changed_plots_of_a_change(tmp_path):
    repo = two_commits(tmp_path / "repo")
    run([sys.executable, str(SCRIPT), "--base", "HEAD~1", "--out", "report.md", "--plots-dir", "pr-plots"], repo)
    report = (repo / "report.md").read_text()
    assert "| params.yaml | train.lr | 0.01     | 0.005       |" in report
    assert "train.epochs" not in report  # unchanged params are not listed
    assert "| metrics.json | accuracy | 0.9      | 0.93        | 0.03     |" in report and "ece" not in report
    assert "### Plots\n\n- `plots/loss.tsv`\n\n" in report  # the confusion plot did not change
    assert (repo / "pr-plots" / "index.html").exists()
    assert report.startswith("<!-- model-report -->")


@pytest.mark.integration
def test_a_change_that_does_not_touch_the_model_says_so(tmp_path):
    repo = two_commits(tmp_path / "repo")
    run([sys.executable, str(SCRIPT), "--base", "HEAD", "--out", "report.md", "--plots-dir", "pr-plots"], repo)
    report = (repo / "report.md").read_text()
    assert "No parameter changed." in report and "No metric changed." in report and "No plot changed." in report


@pytest.mark.integration
def test_the_workflow_tests_runs_the_pipeline_then_comments_the_report():
    workflow = yaml.safe_load((ROOT / ".github/workflows/pull-request.yml").read_text())
    assert list(workflow[True]) == ["pull_request"]  # YAML 1.1 reads the key `on` as True
    runs = [step.get("run", "") for step in workflow["jobs"]["test-and-report"]["steps"]]
    order = [next(i for i, r in enumerate(runs) if needle in r)
             for needle in (".ci/run", "dvc repro", ".ci/pr_report.py --base \"origin/${{ github.base_ref }}\"", "gh pr comment")]
    assert order == sorted(order)
    assert (ROOT / ".ci/run").read_text().strip().endswith("make test")
