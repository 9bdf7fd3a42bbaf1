"""Kubeflow Pipelines: the compiled spec carries the cluster settings (images by commit, GPU
scheduling only with GPUs, /dev/shm, timeouts, optional secret keys), typed run parameters and
per-step config sections; compile refuses what a cluster could not run; run-local on the
defaults reproduces the committed dvc.lock and reports bit for bit and goes green through package
and deploy, and a preset that disadvantages a site closes
the gate; an image of another commit fails at once; the prepare component fetches DVC data at
a revision from a real S3 server (SeaweedFS); upload and submit speak the KFP API (checked
against a fake server: a real one needs Kubernetes)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from unittest import mock

import pytest
import yaml
from kfp import local

from components.core.config.compose import compose
from components.core.config.schema import PORT_KEYS
from components.core.paths import ROOT
from components.core.errors import ConfigError, run_cli
from components.core.lineage import data_hash
from components.core.numerics import reference_host
from components.data.source import dvc_dir_hash
from pipelines import preflight
from pipelines.graph import step_configs
from pipelines.local import collect_results
from pipelines.wrappers import data_hash_op, prepare_op
from components.torchserve import server
from tests.helpers.datasets import make_image_dataset
from tests.helpers.project import copy_project, git_commit, run
from tests.helpers.servers import free_ports, seaweed_s3


HEAD = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
IMAGES = ["pipeline.image.cpu_repository=registry.example/cpu", "pipeline.image.gpu_repository=registry.example/gpu"]
CLUSTER = [*IMAGES, "pipeline.data.uri=s3://bucket/raw", "pipeline.deploy.management_url=http://torchserve.serving:8081",
           "pipeline.deploy.inference_url=http://torchserve.serving:8080", "pipeline.deploy.model_store_pvc=torchserve-store"]
OPEN_GATE = ["gate.on_fail=warn", "gate.on_inconclusive=warn"]


def run_local(out: Path, *overrides: str, sweep: bool = False, check: bool = True, env: dict | None = None):
    """`python -m pipelines run-local` with a private TorchServe (state dir, free loopback ports); returns (result, run dir)."""
    serve = [f"serve.state_dir={out / 'serve'}", *(f"serve.{key}={port}" for key, port in zip(PORT_KEYS, free_ports(len(PORT_KEYS))))]
    command = ["python", "-m", "pipelines", "run-local", "--output-dir", str(out / "kfp"), *(["--sweep"] if sweep else []), *serve, *overrides]
    result = run(command, ROOT, check=check, env=env)
    (run_dir,) = (out / "kfp").iterdir()
    return result, run_dir


def tiny_overrides(raw: Path) -> list[str]:
    return [f"pipeline.data.uri={raw}", "data.classes=[a,b,c]", "data.image_size=[16,16]", "train.epochs=2", "train.batch_size=8",
            "evaluate.bootstrap_samples=50", "evaluate.attribution_samples=2", "evaluate.attribution_steps=4"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_image_dataset(tmp_path_factory.mktemp("tiny") / "raw", per_class=20)


def compile_in_process(*args: str) -> tuple[int, str]:
    """`python -m pipelines compile <args>` in this process: (exit status, stderr). The command line itself, process
    start included, is what test_compiled_sweep_fans_out_one_trial_per_override_set and test_fast_refusal run."""
    from pipelines.__main__ import main

    stderr = io.StringIO()
    with (mock.patch.object(sys, "argv", ["python -m pipelines", "compile", *args]), contextlib.redirect_stderr(stderr),
          contextlib.redirect_stdout(io.StringIO())):
        try:
            run_cli(main)
        except SystemExit as exit:
            return exit.code, stderr.getvalue()
    return 0, stderr.getvalue()


def compiled(tmp_path: Path, *overrides: str) -> tuple[dict, dict]:
    out = tmp_path / "pipeline.yaml"
    status, stderr = compile_in_process("--out", str(out), *CLUSTER, *overrides)
    assert status == 0, stderr
    spec, platform = yaml.safe_load_all(out.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def tasks_of(spec: dict) -> dict[str, dict]:
    """Every task of the spec by name, whatever sub-DAG (exit handler, condition) holds it."""
    return {name: task for component in [*spec["components"].values(), spec["root"]]
            for name, task in component.get("dag", {}).get("tasks", {}).items()}


# --- compile -------------------------------------------------------------------------------

@pytest.mark.integration
def test_compiled_spec_names_images_by_commit_and_carries_cluster_settings(tmp_path):
    spec, k8s = compiled(tmp_path, "pipeline.train.accelerator_count=2", "pipeline.retry.num_retries=2",
                         "pipeline.image.pull_secrets=[regcred]")
    executors = spec["deploymentSpec"]["executors"]
    train = executors["exec-train-op"]["container"]
    assert train["image"] == f"registry.example/gpu:{HEAD}"
    assert {executors[e]["container"]["image"] for e in executors if e != "exec-train-op"} == {f"registry.example/cpu:{HEAD}"}
    assert all([s["secretName"] for s in k8s[e]["imagePullSecret"]] == ["regcred"] for e in executors)
    tasks = tasks_of(spec)
    for name in ("data-hash-op", "prepare-op", "train-op", "evaluate-op", "gate-op", "package-op", "deploy-op"):
        assert tasks[name]["inputs"]["parameters"]["expected_commit"] == {"runtimeValue": {"constant": HEAD}}
        role = {"kfp-dvc-template/role": "deploy"} if name == "deploy-op" else {}  # serve/k8s/networkpolicy.yaml admits it
        assert k8s[f"exec-{name}"]["podMetadata"]["labels"] == {"git-commit": HEAD, **role}
    assert train["resources"]["accelerator"] == {"count": "2", "resourceCount": "2", "resourceType": "nvidia.com/gpu", "type": "nvidia.com/gpu"}
    assert k8s["exec-train-op"]["nodeSelector"] == {"labels": {"nvidia.com/gpu.present": "true"}}
    assert k8s["exec-train-op"]["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    assert k8s["exec-train-op"]["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "8Gi", "volumeName": "dshm"}]
    assert k8s["exec-train-op"]["activeDeadlineSeconds"] == "86400" and k8s["exec-evaluate-op"]["activeDeadlineSeconds"] == "3600"
    assert k8s["exec-data-hash-op"]["secretAsEnv"] == k8s["exec-prepare-op"]["secretAsEnv"]  # it reads the data where prepare does
    required, optional = k8s["exec-prepare-op"]["secretAsEnv"]
    assert (required["secretName"], required["optional"], optional["optional"]) == ("kfp-dvc-template-s3", False, True)
    assert [m["secretKey"] for m in required["keyToEnv"]] == ["access_key_id", "secret_access_key"]
    assert optional["keyToEnv"] == [{"envVar": "AWS_ENDPOINT_URL", "secretKey": "endpoint_url"}]  # absent for AWS S3
    assert k8s["exec-deploy-op"]["pvcMount"][0]["mountPath"] == "/mnt/torchserve"
    assert tasks["deploy-op"]["inputs"]["parameters"]["key_file"] == {"runtimeValue": {"constant": "/mnt/torchserve/state/key_file.json"}}
    assert tasks["train-op"]["retryPolicy"] == {"backoffDuration": "60s", "backoffFactor": 2.0, "backoffMaxDuration": "3600s", "maxRetryCount": 2}
    assert tasks["deploy-op"]["cachingOptions"] == {} and "retryPolicy" not in tasks["deploy-op"]
    assert tasks["package-op"]["dependentTasks"] == ["data-hash-op", "gate-op", "prepare-op", "train-op"]  # after the gate
    assert tasks["condition-2"]["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--deploy'] == true"
    assert spec["root"]["dag"]["tasks"]["record-outcome-op"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"


@pytest.mark.integration
def test_without_a_deploy_target_there_is_no_deploy_toggle_and_no_deploy_task(tmp_path):
    spec, _ = compiled(tmp_path, "pipeline.deploy.enabled=false")
    assert "deploy" not in spec["root"]["inputDefinitions"]["parameters"]
    tasks = tasks_of(spec)
    assert "package-op" in tasks and not {name for name in tasks if name.startswith(("deploy", "condition"))}
    assert spec["pipelineInfo"]["description"].endswith("-> package")


@pytest.mark.integration
def test_without_gpus_train_gets_no_gpu_scheduling_and_the_cpu_image(tmp_path):
    spec, k8s = compiled(tmp_path, "pipeline.train.accelerator_count=0")
    train = spec["deploymentSpec"]["executors"]["exec-train-op"]["container"]
    assert train["image"] == f"registry.example/cpu:{HEAD}" and "accelerator" not in train["resources"]
    assert not {"nodeSelector", "tolerations", "emptyDirMounts"} & set(k8s["exec-train-op"])
    assert tasks_of(spec)["train-op"]["inputs"]["parameters"]["gpus"] == {"runtimeValue": {"constant": 0.0}}


@pytest.mark.integration
def test_the_data_hash_is_read_at_run_time_and_keys_prepare_s_cache_and_every_lineage(tmp_path):
    """Not fixed at compile time: data_uri/data_rev may be changed in the UI, and an S3 prefix may get new objects under
    the same URI. The data-hash task is never cached; prepare's cache key has its output as an input."""
    spec, _ = compiled(tmp_path)
    tasks = tasks_of(spec)
    hashed = tasks["data-hash-op"]
    assert hashed["cachingOptions"] == {}  # never cached
    assert {name: value["componentInputParameter"] for name, value in hashed["inputs"]["parameters"].items()
            if name.startswith("data_")} == {name: f"pipelinechannel--{name}" for name in ("data_repo", "data_rev", "data_uri")}
    for name in ("prepare-op", "train-op", "evaluate-op", "package-op"):
        assert tasks[name]["inputs"]["parameters"]["data_hash"] == {
            "taskOutputParameter": {"outputParameterKey": "Output", "producerTask": "data-hash-op"}}, name
    assert tasks["prepare-op"]["cachingOptions"] == {"enableCache": True} and tasks["prepare-op"]["dependentTasks"] == ["data-hash-op"]
    executors = spec["deploymentSpec"]["executors"]
    assert not [e for e in executors if "LINEAGE_DATA_HASH" in str(executors[e]["container"].get("env"))]  # no compile-time hash


@pytest.mark.integration
def test_run_parameters_are_typed_and_each_step_gets_only_its_config_sections(tmp_path):
    spec, _ = compiled(tmp_path)
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert {name: p["parameterType"] for name, p in parameters.items() if name in ("epochs", "lr", "batch_size", "model_name",
            "min_accuracy", "max_equalized_odds_difference", "min_group_size", "on_inconclusive", "deploy")} == {
        "epochs": "NUMBER_INTEGER", "lr": "NUMBER_DOUBLE", "batch_size": "NUMBER_INTEGER", "model_name": "STRING",
        "min_accuracy": "NUMBER_DOUBLE", "max_equalized_odds_difference": "NUMBER_DOUBLE", "min_group_size": "NUMBER_INTEGER",
        "on_inconclusive": "STRING", "deploy": "BOOLEAN"}
    assert "config" not in parameters and parameters["min_accuracy"]["defaultValue"] == compose([]).gate.quality.min_accuracy
    assert all(p.get("description") for p in parameters.values()), "every run parameter is described in the UI"
    assert parameters["lr"]["description"] == "train.lr of conf/ (the train step)"
    assert parameters["min_accuracy"]["description"] == "gate.quality.min_accuracy of the gate policy (conf/gate)"
    assert "http://torchserve.serving:8081" in parameters["deploy"]["description"]
    tasks = tasks_of(spec)
    assert tasks["gate-op"]["inputs"]["parameters"]["min_accuracy"] == {"componentInputParameter": "pipelinechannel--min_accuracy"}
    assert tasks["train-op"]["inputs"]["parameters"]["epochs"] == {"componentInputParameter": "pipelinechannel--epochs"}
    sections = {name: set(json.loads(tasks[f"{name}-op"]["inputs"]["parameters"]["config"]["runtimeValue"]["constant"]))
                for name in ("prepare", "train", "evaluate", "package", "deploy")}
    assert sections == {"prepare": {"seed", "data"}, "train": {"seed", "data", "model", "train", "numerics"},
                        "evaluate": {"seed", "data", "train", "evaluate", "gate", "numerics"}, "package": {"package", "numerics"},
                        "deploy": {"serve"}}


@pytest.mark.integration
def test_a_gate_or_evaluate_change_leaves_the_training_cache_key_alone():
    base, stricter = step_configs(compose([])), step_configs(compose(["gate.fairness.max_accuracy_difference=0.01",
                                                                       "evaluate.bootstrap_samples=10"]))
    assert base["prepare"] == stricter["prepare"] and base["train"] == stricter["train"]
    assert base["evaluate"] != stricter["evaluate"]
    assert step_configs(compose(["train.lr=0.01"]))["prepare"] == base["prepare"]


@pytest.mark.integration
@pytest.mark.parametrize("overrides,message", [
    (["pipeline.data.uri=/data/raw"], "pipeline.data.uri='/data/raw': a cluster pod reaches only s3:// URIs"),
    (["pipeline.data.uri=", f"pipeline.data.repo={ROOT}"], "not a URL a pod can clone (https://, ssh:// or git@host:path)"),
    (["pipeline.data.uri=", "pipeline.data.repo=git@git.example.com:team/project.git"],
     "is an SSH URL: set pipeline.data.git_secret to a Kubernetes secret with key ssh-privatekey"),
    (["pipeline.deploy.inference_url=", "pipeline.deploy.model_store_pvc="],
     "pipeline.deploy.inference_url, pipeline.deploy.model_store_pvc empty: a cluster run deploys to the TorchServe of serve/k8s/"),
    (["gate.on_inconclusive=ignore"], "gate.on_inconclusive must be block or warn, got 'ignore'"),
])
def test_compile_refuses_what_a_cluster_could_not_run_and_writes_nothing(tmp_path, overrides, message):
    out = tmp_path / "pipeline.yaml"
    status, stderr = compile_in_process("--out", str(out), *CLUSTER, *overrides)
    assert status == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.integration
def test_a_private_https_repo_without_credentials_is_refused():
    (port,) = free_ports(1)
    cfg = compose(["pipeline.data.uri=", f"pipeline.data.repo=http://127.0.0.1:{port}/team/project.git"])
    with pytest.raises(ConfigError, match=r"cannot be read without credentials .*pipeline.data.git_secret"):
        preflight.cluster_data_source(cfg)


@pytest.mark.integration
def test_compiled_sweep_fans_out_one_trial_per_override_set(tmp_path):
    out = tmp_path / "sweep.yaml"
    run(["python", "-m", "pipelines", "compile", "--sweep", "--out", str(out), "--trial", "train.lr=0.001",
         "--trial", "train.lr=0.01 model.width=16", "experiment=quick", *CLUSTER], ROOT)
    spec, _ = yaml.safe_load_all(out.read_text())
    trials = spec["root"]["inputDefinitions"]["parameters"]["trials"]["defaultValue"]
    assert [t["name"] for t in trials] == ["train.lr=0.001", "train.lr=0.01 model.width=16"]
    assert [(t["lr"], t["epochs"], json.loads(t["train"])["model"]["width"]) for t in trials] == [(0.001, 2, 32), (0.01, 2, 16)]
    assert trials[0]["prepare"] == trials[1]["prepare"]  # one cache entry for both trials' prepare
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["for-loop-1"]["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--trials"
    assert tasks["select-best-op"]["inputs"]["artifacts"]["reports"]["taskOutputArtifact"] == {
        "outputArtifactKey": "pipelinechannel--evaluate-op-reports", "producerTask": "for-loop-1"}  # dsl.Collected


# --- run-local -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_defaults(tmp_path_factory):
    """One run-local on the defaults, what `dvc repro` ran to make the committed dvc.lock and reports."""
    out = tmp_path_factory.mktemp("run_local")
    result, run_dir = run_local(out)
    return {"out": out, "stdout": result.stdout, "run_dir": run_dir, "tasks": collect_results(run_dir)}


def locked_out(path: str) -> str:
    """The md5 the committed dvc.lock records for the stage output `path`."""
    stages = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    return next(out["md5"] for stage in stages.values() for out in stage["outs"] if out["path"] == path)


@pytest.mark.e2e
@pytest.mark.skipif(reference_host() is not None, reason=f"{reference_host()}: the committed bytes are the reference numerics'")
def test_run_local_reproduces_the_committed_dvc_lock_and_reports(local_defaults):
    tasks = local_defaults["tasks"]
    reports = Path(tasks["evaluate-op"].artifacts["reports"])
    for name in ("metrics.json", "quality.json", "fairness.json"):  # lineage included: each step hashes only its own sections,
        assert (reports / name).read_bytes() == (ROOT / "reports" / name).read_bytes(), name  # so serve ports never reach it
    assert dvc_dir_hash(Path(tasks["train-op"].artifacts["model"])) == locked_out("artifacts/model")  # every weight, bit for bit
    dvclive = json.loads((ROOT / "dvclive" / "metrics.json").read_text())
    assert tasks["train-op"].metrics["metrics"] == {"val_loss": dvclive["val"]["loss"], "val_accuracy": dvclive["val"]["accuracy"],
                                                    "best_epoch": dvclive["best_epoch"], "epochs_run": dvclive["epochs_run"]}


@pytest.mark.e2e
def test_run_local_passes_typed_artifacts_and_deploys_to_a_torchserve_it_stops(local_defaults):
    tasks, stdout = local_defaults["tasks"], local_defaults["stdout"]
    assert [name.rsplit("/", 1)[-1] for name in tasks] == ["data-hash-op", "prepare-op", "train-op", "evaluate-op", "gate-op", "package-op", "deploy-op",
                                                           "record-outcome-op"]
    evaluate = tasks["evaluate-op"]
    assert Path(evaluate.artifacts["evaluation_report"]).read_text().lstrip().lower().startswith("<!doctype html")
    card = Path(evaluate.artifacts["model_card"]).read_text()
    assert "## Checks: gate " in card and "## Fairness\n" in card
    matrix = evaluate.metrics["confusion_matrix"]["confusionMatrix"]
    assert [c["displayName"] for c in matrix["annotationSpecs"]] == [str(d) for d in range(10)]
    assert sum(map(sum, (row["row"] for row in matrix["rows"]))) == evaluate.metrics["metrics"]["n_test"]
    assert evaluate.parameters["Output"] == evaluate.metrics["metrics"]["accuracy"]

    package, deploy = tasks["package-op"], next(t for name, t in tasks.items() if name.endswith("deploy-op"))
    assert (Path(package.artifacts["package"]) / package.parameters["mar_file"]).is_file()
    cfg = compose([f"serve.state_dir={local_defaults['out'] / 'serve'}"])
    assert deploy.parameters["Output"].endswith("/predictions/digits") and deploy.parameters["Output"].startswith("http://127.0.0.1:")
    assert server.running_pid(cfg) is None  # stopped afterwards
    outcome = json.loads(Path(tasks["record-outcome-op"].artifacts["outcome"]).read_text())
    assert outcome["state"] == "SUCCEEDED"
    for path in (evaluate.artifacts["evaluation_report"], package.artifacts["package"]):
        assert path in stdout


@pytest.mark.e2e
def test_run_local_on_the_defaults_goes_green_with_inconclusive_checks_warned_about(local_defaults):
    """The sample's small site_b groups make some fairness checks inconclusive: warned about, not blocking."""
    tasks, stdout = local_defaults["tasks"], local_defaults["stdout"]
    assert tasks["gate-op"].parameters["Output"].startswith("open with ")
    assert "warns:  site: equalized_odds_difference" in stdout and "blocks:" not in stdout


def closed_run(result, run_dir) -> dict:
    """A run the gate closed: exit 2, the gate step failed, no package, no deploy, the outcome FAILED."""
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: Pipeline 'kfp-dvc-template' finished with status FAILURE. "
                                                              "Inner task failed: 'gate-op'")
    assert "The gate (conf/gate) closed: package and deploy did not run" in result.stderr
    tasks = collect_results(run_dir)
    assert list(tasks) == ["data-hash-op", "prepare-op", "train-op", "evaluate-op", "record-outcome-op"]
    assert json.loads(Path(tasks["record-outcome-op"].artifacts["outcome"]).read_text())["state"] == "FAILED"
    return tasks


@pytest.mark.e2e
def test_a_model_that_disadvantages_a_site_closes_the_gate(tmp_path):
    """experiment=site_b_unseen trains without any site_b scan: the site gap's whole interval lies beyond its tolerance."""
    result, run_dir = run_local(tmp_path, "experiment=site_b_unseen", check=False)
    closed_run(result, run_dir)
    assert "blocks: site: accuracy_difference" in result.stdout and ": fail, the whole interval is beyond the tolerance" in result.stdout
    assert "gate closed: " in result.stdout


@pytest.mark.e2e
def test_a_quality_miss_closes_the_gate(tmp_path, tiny_data):
    """A model that learnt nothing: accuracy's whole interval lies below 0.9, even on the tiny data's 12 test images
    (judged here, by the run parameter min_test_size: fewer than the default 50 would make every quality check inconclusive)."""
    result, run_dir = run_local(tmp_path, *tiny_overrides(tiny_data), "train.lr=0.000001", "train.epochs=1", "gate.on_inconclusive=warn",
                                "gate.quality.min_test_size=10", check=False)
    tasks = closed_run(result, run_dir)
    assert tasks["evaluate-op"].parameters["Output"] < 0.9
    # The lineage is the data's this run read (DVC's md5 of the folder), not the checkout's data.dvc fixed at compile time.
    lineage = json.loads((Path(tasks["evaluate-op"].artifacts["reports"]) / "quality.json").read_text())["lineage"]
    assert lineage["data_hash"] == tasks["data-hash-op"].parameters["Output"] == dvc_dir_hash(tiny_data) != data_hash()
    assert "gate closed: quality: accuracy" in result.stdout
    assert "gate.quality.min_accuracy): fail, the whole interval is beyond the tolerance" in result.stdout


@pytest.mark.e2e
def test_an_image_of_another_commit_fails_at_once_with_a_clear_error(tmp_path, tiny_data):
    result, run_dir = run_local(tmp_path, *tiny_overrides(tiny_data), check=False, env={"IMAGE_GIT_COMMIT": "0" * 40})
    assert result.returncode == 2 and "Inner task failed: 'data-hash-op'" in result.stderr
    assert (f"this image was built from commit {'0' * 40}, but the pipeline spec expects commit {HEAD}: "
            "build and push the images of that commit") in result.stdout + result.stderr
    assert list(collect_results(run_dir)) == ["record-outcome-op"]


@pytest.mark.e2e
def test_sweep_runs_locally_and_reports_the_best_trial(tmp_path, tiny_data):
    result, run_dir = run_local(tmp_path, *tiny_overrides(tiny_data), 'pipeline.sweep.trials=[["train.lr=0.000001"],["train.lr=0.01"]]',
                                "pipeline.sweep.metric=balanced_accuracy", sweep=True)
    tasks = collect_results(run_dir)
    scores = {i: json.loads((Path(tasks[f"for-loop-1-iteration-{i}/evaluate-op"].artifacts["reports"]) / "metrics.json").read_text())
              ["balanced_accuracy"] for i in (0, 1)}
    assert scores[1] > scores[0]
    best = tasks["select-best-op"]
    assert best.parameters["Output"] == "train.lr=0.01"
    assert best.metrics["best"] == {"balanced_accuracy": scores[1], "trial": "train.lr=0.01"}
    summary = Path(best.artifacts["summary"]).read_text()
    assert "| **best** | `train.lr=0.01` |" in summary and "`train.lr=0.000001`" in summary
    assert "sweep: best trial 'train.lr=0.01'" in result.stdout


# --- data: DVC at a git revision, or an S3 prefix, from a real S3 server ---------------------

def prepared_counts(task) -> dict:
    return json.loads((Path(task.outputs["prepared"].path) / "prepared.json").read_text())["counts"]


@pytest.mark.e2e
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")  # image name without "python"
def test_prepare_component_fetches_dvc_data_at_a_revision_and_an_s3_prefix_under_the_run_s_data_hash(tmp_path, monkeypatch,
                                                                                                   digits_subset):
    repo = copy_project(tmp_path / "repo", with_data=False)
    shutil.copytree(digits_subset, repo / "data")  # the sample's shapes, a quarter of its images to push, fetch and prepare
    monkeypatch.setenv("IMAGE_GIT_COMMIT", HEAD)  # this venv plays the image of this commit
    with seaweed_s3(tmp_path / "s3") as s3:
        for key, value in s3.client_env().items():
            monkeypatch.setenv(key, value)  # on a cluster: the Kubernetes secret mapped to env
        run(["dvc", "add", "data"], repo)
        git_commit(repo, "the subset")
        first = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
        origin = tmp_path / "origin.git"  # what a cluster sees: a git server without any DVC cache
        run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp_path)
        run(["git", "remote", "add", "origin", str(origin)], repo)
        with pytest.raises(ConfigError, match=f"commit {first[:10]} is on no remote branch"):
            preflight.pushed_commit(first, repo)
        run(["git", "push", "-q", "origin", "main"], repo)
        assert preflight.pushed_commit("HEAD", repo) == first
        with pytest.raises(ConfigError, match=r"data.dvc at .*: \d+ of \d+ DVC object\(s\) are not on the remote .*run `dvc push` first"):
            preflight.check_dvc_data_pushed(first, repo)
        run(["dvc", "push", "data.dvc"], repo)
        preflight.check_dvc_data_pushed(first, repo)
        metadata = repo / "data" / "metadata.csv"
        metadata.write_text("".join(metadata.read_text().splitlines(keepends=True)[:301]))  # header + 300 images
        run(["dvc", "add", "data"], repo)
        git_commit(repo, "fewer images")
        run(["dvc", "push", "data.dvc"], repo)
        run(["git", "push", "-q", "origin", "main"], repo)

        import s3fs
        s3fs.S3FileSystem().put(str(digits_subset), f"{s3.bucket}/raw/digits", recursive=True)

        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
        config = step_configs(compose([]))["prepare"]
        sources = {"first": {"data_repo": f"file://{origin}", "data_rev": first, "data_uri": ""},
                   "head": {"data_repo": f"file://{origin}", "data_rev": "", "data_uri": ""},
                   "s3": {"data_repo": "", "data_rev": "", "data_uri": f"s3://{s3.bucket}/raw/digits"}}
        hashes = {name: data_hash_op(config=config, expected_commit=HEAD, **source).output for name, source in sources.items()}
        prepared = {name: prepare_op(config=config, expected_commit=HEAD, data_hash=hashes[name], **source)
                    for name, source in sources.items()}
        # The same key rewritten with other bytes of the same size: the same URI, other data.
        image = f"{s3.bucket}/raw/digits/images/{sorted((digits_subset / 'images').iterdir())[0].name}"
        fs = s3fs.S3FileSystem()
        unchanged = data_hash_op(config=config, expected_commit=HEAD, **sources["s3"]).output
        original = fs.cat(image)
        fs.pipe(image, original[:-1] + bytes([original[-1] ^ 1]))
        rewritten = data_hash_op(config=config, expected_commit=HEAD, **sources["s3"]).output
    at_rev = {rev: yaml.safe_load(run(["git", "show", f"{rev}:data.dvc"], repo).stdout)["outs"][0]["md5"] for rev in (first, "HEAD")}
    assert (hashes["first"], hashes["head"]) == (at_rev[first], at_rev["HEAD"])  # DVC's own md5, read at the revision
    assert hashes["s3"].startswith("sha256:") and unchanged == hashes["s3"] and rewritten != hashes["s3"]
    for name, task in prepared.items():  # the lineage records the run's data hash, not one fixed at compile time
        assert json.loads((Path(task.outputs["prepared"].path) / "prepared.json").read_text())["lineage"]["data_hash"] == hashes[name]
    assert sum(prepared_counts(prepared["first"]).values()) == 400
    assert sum(prepared_counts(prepared["head"]).values()) == 300
    assert prepared_counts(prepared["s3"]) == prepared_counts(prepared["first"])


# --- submit --------------------------------------------------------------------------------

class FakeKfpApi(BaseHTTPRequestHandler):
    """Records what the real kfp.Client sends; answers like the KFP v2beta1 API would."""

    requests: list[dict] = []
    pipelines: list[dict] = []

    def _answer(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self, body) -> None:
        self.requests.append({"method": self.command, "path": self.path, "auth": self.headers.get("Authorization"), "body": body})

    def do_GET(self):
        self._record(None)
        path = self.path.split("?")[0]
        if path == "/apis/v2beta1/healthz":
            self._answer({"commit_sha": "0" * 40, "tag_name": "2.17.3", "multi_user": False})
        elif path == "/apis/v2beta1/pipelines":
            self._answer({"pipelines": self.pipelines, "total_size": len(self.pipelines)} if self.pipelines else {})
        elif path.endswith("/versions"):
            self._answer({"pipeline_versions": [{"pipeline_id": "pipe-1", "pipeline_version_id": "ver-1"}], "total_size": 1})
        else:
            self._answer({})

    def do_POST(self):
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        is_json = self.headers.get("Content-Type", "").startswith("application/json")
        body = json.loads(raw) if is_json else raw.decode(errors="replace")
        self._record(body)
        path = self.path.split("?")[0]
        if path == "/apis/v2beta1/experiments":
            self._answer({"experiment_id": "exp-1", **body})
        elif path == "/apis/v2beta1/pipelines/upload":
            self.pipelines.append({"pipeline_id": "pipe-1", "display_name": "kfp-dvc-template"})
            self._answer(self.pipelines[-1])
        elif path == "/apis/v2beta1/pipelines/upload_version":
            self._answer({"pipeline_id": "pipe-1", "pipeline_version_id": "ver-1"})
        elif path == "/apis/v2beta1/recurringruns":
            self._answer({"recurring_run_id": "recurring-1", **body})
        else:
            self._answer({"run_id": "run-1", **body})

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_kfp_api_server():
    FakeKfpApi.requests, FakeKfpApi.pipelines = [], []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeKfpApi)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", FakeKfpApi.requests
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.integration
def test_submit_contract_with_fake_kfp_api_server(fake_kfp_api_server, tmp_path):
    host, requests = fake_kfp_api_server
    token_file = tmp_path / "token"
    token_file.write_text("token-from-file\n")
    result = run(["python", "-m", "pipelines", "submit", "--host", host, "--namespace", "team-a", "--experiment", "digits-lr",
                  "--token-file", str(token_file), "--no-cache", "experiment=quick", "train.lr=0.0123", *CLUSTER], ROOT)
    assert [(r["method"], r["path"].split("?")[0]) for r in requests] == [("GET", "/apis/v2beta1/healthz"),
        ("GET", "/apis/v2beta1/experiments"), ("POST", "/apis/v2beta1/experiments"), ("POST", "/apis/v2beta1/runs")]
    assert {r["auth"] for r in requests} == {"Bearer token-from-file"}
    assert "namespace=team-a" in requests[1]["path"] and "digits-lr" in requests[1]["path"]
    assert requests[2]["body"] == {"display_name": "digits-lr", "namespace": "team-a"}

    created = requests[3]["body"]
    assert created["experiment_id"] == "exp-1"
    assert created["display_name"].startswith(f"kfp-dvc-template commit {HEAD[:8]}")
    assert f" data {data_hash()[:8]} " in created["display_name"]
    spec = created["pipeline_spec"]["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "kfp-dvc-template"
    assert "exec-train-op" in created["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    steps = [task for task in tasks_of(spec).values() if "componentRef" in task and "cachingOptions" in task]
    assert len(steps) == 8 and all(task["cachingOptions"] == {} for task in steps)  # --no-cache reaches every step
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert (parameters["data_uri"]["defaultValue"], parameters["lr"]["defaultValue"], parameters["epochs"]["defaultValue"]) == (
        "s3://bucket/raw", 0.0123, 2)
    assert "submit: run run-1" in result.stdout


@pytest.mark.integration
def test_upload_registers_a_version_named_by_commit_and_submit_runs_and_schedules_it_with_fake_kfp_api_server(fake_kfp_api_server, tmp_path):
    host, requests = fake_kfp_api_server
    repo = copy_project(tmp_path / "repo", with_data=False)  # a clean checkout: a version is named by a commit
    commit = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    result = run(["python", "-m", "pipelines", "upload", "--host", host, *CLUSTER], repo)
    uploads = [r for r in requests if r["method"] == "POST"]
    assert [r["path"].split("?")[0] for r in uploads] == ["/apis/v2beta1/pipelines/upload", "/apis/v2beta1/pipelines/upload_version"]
    assert "name=kfp-dvc-template" in uploads[0]["path"] and f"name=commit-{commit[:12]}" in uploads[1]["path"]
    assert "pipelineid=pipe-1" in uploads[1]["path"].lower() and "exec-train-op" in uploads[1]["body"]
    assert f"upload: pipeline 'kfp-dvc-template' (pipe-1) version 'commit-{commit[:12]}' (ver-1)" in result.stdout
    requests.clear()
    result = run(["python", "-m", "pipelines", "submit", "--host", host, "--pipeline-version", "ver-1", *CLUSTER], repo)
    created = requests[-1]["body"]
    assert created["pipeline_version_reference"] == {"pipeline_id": "pipe-1", "pipeline_version_id": "ver-1"}
    assert "pipeline_spec" not in created and created["display_name"].startswith(f"kfp-dvc-template commit {commit[:8]}")
    assert "submit: run run-1" in result.stdout and "of registered version ver-1" in result.stdout
    result = run(["python", "-m", "pipelines", "submit", "--host", host, "--pipeline-version", "ver-1", "--schedule", "0 0 3 * * *",
                  *CLUSTER], repo)
    recurring = requests[-1]
    assert recurring["path"].startswith("/apis/v2beta1/recurringruns")
    assert recurring["body"]["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert recurring["body"]["pipeline_version_reference"] == {"pipeline_id": "pipe-1", "pipeline_version_id": "ver-1"}
    assert "submit: recurring run (0 0 3 * * *) recurring-1" in result.stdout
    (repo / "conf" / "seed.txt").write_text("dirty")
    run(["git", "add", "conf/seed.txt"], repo)
    refused = run(["python", "-m", "pipelines", "upload", "--host", host, *CLUSTER], repo, check=False)
    assert refused.returncode == 2 and "uncommitted changes: a pipeline version is named by its commit" in refused.stderr


@pytest.mark.integration
def test_submit_to_an_unreachable_host_fails_with_one_clear_error():
    (port,) = free_ports(1)  # nothing listens there any more
    result = run(["python", "-m", "pipelines", "submit", "--host", f"http://127.0.0.1:{port}", "experiment=quick", *CLUSTER],
                 ROOT, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: cannot reach the Kubeflow Pipelines API at http://127.0.0.1:{port}: "
                                     "Failed to establish a new connection: [Errno 111] Connection refused")
