"""dvc repro end to end in a fresh copy of the project, and the S3 remote round trip
against a real S3-compatible server (SeaweedFS on loopback)."""

from __future__ import annotations

import json

import pytest

from tests.helpers.project import copy_of, run
from tests.helpers.servers import seaweed_s3


@pytest.fixture(scope="module")
def reproduced(quick_project, tmp_path_factory):
    """A private copy of the session's project with the quick experiment reproduced and committed."""
    repo = copy_of(quick_project, tmp_path_factory.mktemp("pipeline") / "repo")
    return repo, (quick_project / "first_repro.txt").read_text()


@pytest.mark.e2e
def test_repro_runs_every_stage_then_is_up_to_date(reproduced):
    repo, first = reproduced
    assert "Running stage 'prepare'" in first and "Running stage 'train'" in first
    metrics = json.loads((repo / "dvclive" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2
    assert "Data and pipelines are up to date." in run(["dvc", "repro"], repo).stdout
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    assert shown[""]["data"]["dvclive/metrics.json"]["data"]["val"]["accuracy"] == metrics["val"]["accuracy"]


@pytest.mark.e2e
def test_changing_a_train_param_reruns_train_but_not_prepare(reproduced, tmp_path):
    repo, _ = reproduced
    run(["python", "-m", "components.core.config", "experiment=quick", "train.lr=0.001"], repo)
    out = run(["dvc", "repro"], repo).stdout
    assert "Stage 'prepare' didn't change, skipping" in out
    assert "Running stage 'train'" in out
    run(["git", "checkout", "HEAD", "--", "."], repo)
    run(["dvc", "checkout", "--force"], repo)
    assert "Data and pipelines are up to date." in run(["dvc", "repro"], repo).stdout


@pytest.mark.e2e
def test_push_clone_pull_reproduces_nothing(reproduced, tmp_path):
    repo, _ = reproduced
    with seaweed_s3(tmp_path / "s3") as s3:
        for key, value in (("endpointurl", s3.endpoint), ("access_key_id", s3.access_key), ("secret_access_key", s3.secret_key)):
            run(["dvc", "remote", "modify", "--local", "storage", key, value], repo)
        pushed = run(["dvc", "push"], repo)
        assert "pushed" in pushed.stdout
        clone = tmp_path / "clone"
        run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
        assert not (clone / "data").exists()
        (clone / ".dvc" / "config.local").write_text((repo / ".dvc" / "config.local").read_text())
        run(["dvc", "pull"], clone)
        assert (clone / "data" / "metadata.csv").exists() and (clone / "artifacts" / "model" / "model.safetensors").exists()
        assert "Data and pipelines are up to date." in run(["dvc", "repro"], clone).stdout
        assert (clone / "artifacts/model/model.safetensors").read_bytes() == (repo / "artifacts/model/model.safetensors").read_bytes()


@pytest.mark.e2e
def test_wrong_credentials_fail_clearly(reproduced, tmp_path):
    repo, _ = reproduced
    with seaweed_s3(tmp_path / "s3") as s3:
        run(["dvc", "remote", "modify", "--local", "storage", "endpointurl", s3.endpoint], repo)
        run(["dvc", "remote", "modify", "--local", "storage", "access_key_id", "wrong"], repo)
        run(["dvc", "remote", "modify", "--local", "storage", "secret_access_key", "wrong"], repo)
        result = run(["dvc", "push"], repo, check=False)
    (repo / ".dvc" / "config.local").unlink()
    assert result.returncode != 0
    assert "Forbidden" in result.stderr
