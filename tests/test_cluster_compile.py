"""Failures that would hang or hide on a cluster are refused or settled at compile time, in-process:
the template's placeholder images, a ReadWriteOnce volume without a node to share, a DVC remote
that cannot be checked (one error, not botocore's traceback); deterministic failures are not
retried by default; image-pull secrets, the deploy step's node and uid, and a separate secret for
KFP's artifact store reach the compiled spec."""

from __future__ import annotations

import subprocess

import pytest
import yaml
from kfp import compiler

from components.core.config.compose import compose
from components.core.paths import ROOT
from components.core.errors import ConfigError
from pipelines import preflight
from pipelines.graph import training_pipeline
from tests.helpers.project import run

COMMIT = "c0ffee"
HEAD = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
IMAGES = ["pipeline.image.cpu_repository=registry.example/cpu", "pipeline.image.gpu_repository=registry.example/gpu"]
TARGET = ["pipeline.deploy.management_url=http://torchserve:8081", "pipeline.deploy.inference_url=http://torchserve:8080",
          "pipeline.deploy.model_store_pvc=torchserve-store"]


def compiled(tmp_path, *overrides: str) -> tuple[dict, dict]:
    """(every task by name, the Kubernetes settings of every executor) of the training pipeline."""
    out = tmp_path / "pipeline.yaml"
    data = {"data_repo": "", "data_rev": "", "data_uri": "s3://bucket/raw"}
    compiler.Compiler().compile(training_pipeline(compose([*IMAGES, *TARGET, *overrides]), COMMIT, data), str(out))
    spec, platform = yaml.safe_load_all(out.read_text())
    tasks = {name: task for component in [*spec["components"].values(), spec["root"]]
             for name, task in component.get("dag", {}).get("tasks", {}).items()}
    return tasks, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_the_placeholder_images_are_refused_at_compile_time():
    with pytest.raises(ConfigError, match=r"pipeline.image.cpu_repository='ghcr.io/example/kfp-dvc-template' is the template's "
                                          "placeholder: set it to your registry"):
        preflight.check_images(compose([]))
    with pytest.raises(ConfigError, match="pipeline.image.gpu_repository='ghcr.io/example/kfp-dvc-template-gpu'"):
        preflight.check_images(compose(["pipeline.image.cpu_repository=registry.example/cpu"]))
    preflight.check_images(compose(["pipeline.image.cpu_repository=registry.example/cpu", "pipeline.train.accelerator_count=0"]))


def test_the_score_pipeline_refuses_the_placeholder_images_too(tmp_path):
    out = tmp_path / "score.yaml"
    refused = run(["python", "-m", "pipelines.score", "compile", "--out", str(out)], ROOT, check=False)
    assert refused.returncode == 2 and not out.exists()
    assert refused.stderr.strip() == ("error: pipeline.image.cpu_repository='ghcr.io/example/kfp-dvc-template' is the template's "
                                      "placeholder: set it to your registry, where `make image` pushes the images (pods would wait "
                                      "for an image that does not exist)")
    run(["python", "-m", "pipelines.score", "compile", "--out", str(out), "pipeline.image.cpu_repository=registry.example/cpu"], ROOT)
    spec, _ = yaml.safe_load_all(out.read_text())
    assert spec["deploymentSpec"]["executors"]["exec-score-op"]["container"]["image"] == (
        f"registry.example/cpu:{HEAD}")


def test_no_step_is_retried_by_default_so_a_deterministic_failure_fails_at_once(tmp_path):
    tasks, _ = compiled(tmp_path)
    assert [name for name, task in tasks.items() if "retryPolicy" in task] == []
    tasks, _ = compiled(tmp_path, "pipeline.retry.num_retries=2")  # for preemptible nodes: every step but gate and deploy
    assert sorted(name for name, task in tasks.items() if "retryPolicy" in task) == ["data-hash-op", "evaluate-op", "package-op", "prepare-op",
                                                                                    "train-op"]


def test_pull_secrets_and_the_deploy_step_node_and_uid_reach_the_spec(tmp_path):
    _, executors = compiled(tmp_path, "pipeline.image.pull_secrets=[regcred]", "pipeline.deploy.run_as_user=1000",
                            "pipeline.deploy.access_mode=ReadWriteOnce", "+pipeline.deploy.node_selector={kubernetes.io/hostname: gpu-1}")
    assert all([s["secretName"] for s in e["imagePullSecret"]] == ["regcred"] for e in executors.values())
    deploy = executors["exec-deploy-op"]
    assert deploy["nodeSelector"] == {"labels": {"kubernetes.io/hostname": "gpu-1"}}
    assert deploy["securityContext"] == {"runAsUser": "1000", "runAsGroup": "1000"}
    _, executors = compiled(tmp_path)
    assert not {"imagePullSecret", "securityContext", "nodeSelector"} & set(executors["exec-deploy-op"])


def test_a_read_write_once_volume_needs_the_node_both_pods_share():
    cfg = compose([*IMAGES, *TARGET, "pipeline.deploy.access_mode=ReadWriteOnce"])
    with pytest.raises(ConfigError, match="pipeline.deploy.access_mode=ReadWriteOnce: TorchServe and the deploy step must share "
                                          "one node; set pipeline.deploy.node_selector"):
        preflight.check_deploy_target(cfg)
    with pytest.raises(ConfigError, match="pipeline.deploy.access_mode must be ReadWriteMany or ReadWriteOnce, got 'RWX'"):
        compose([*IMAGES, *TARGET, "pipeline.deploy.access_mode=RWX"])  # a choice of the schema


def test_the_trainjob_task_uses_the_artifact_store_secret_when_one_is_named(tmp_path):
    multinode = ["pipeline.train.nodes=2", "pipeline.train.accelerator_count=0"]
    _, executors = compiled(tmp_path, *multinode)
    assert {s["secretName"] for s in executors["exec-trainjob-op"]["secretAsEnv"]} == {"kfp-dvc-template-s3"}
    _, executors = compiled(tmp_path, *multinode, "pipeline.artifact_secret.name=mlpipeline-minio-artifact")
    assert {s["secretName"] for s in executors["exec-trainjob-op"]["secretAsEnv"]} == {"mlpipeline-minio-artifact"}
    assert {s["secretName"] for s in executors["exec-prepare-op"]["secretAsEnv"]} == {"kfp-dvc-template-s3"}  # the DVC remote's


def test_a_dvc_remote_that_cannot_be_checked_is_one_clear_error(monkeypatch):
    """No credentials for the S3 remote on this machine: a ConfigError naming the remote, not botocore's traceback."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in (("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"), ("AWS_CONFIG_FILE", "/nonexistent"),
                       ("AWS_EC2_METADATA_DISABLED", "true"), ("AWS_ENDPOINT_URL", "http://127.0.0.1:18799")):
        monkeypatch.setenv(var, value)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    with pytest.raises(ConfigError, match=r"cannot check the DVC remote s3://\S+ for the data of data.dvc: NoCredentialsError: "
                                          "Unable to locate credentials"):
        preflight.check_dvc_data_pushed(head)
