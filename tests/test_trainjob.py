"""Multi-node training as a Kubeflow Trainer TrainJob, tested as far as this machine allows:
the job object against the Trainer API models, the pipeline graph, and the job's pods run as
local processes (gloo on CPU, torchrun rendezvous over loopback) by a fake Kubernetes API that
reads the real manifest, with the artifacts on a real S3 server (SeaweedFS). No Kubernetes,
Kubeflow Trainer controller or GPU ran here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

from components.core.config.compose import compose
from components.core.paths import ROOT
from components.core.errors import ConfigError
from components.prepare import prepare
from components.training.distributed import torchrun_command
from pipelines.graph import Build, training_pipeline
from pipelines.in_pod import IMAGE_COMMIT_ENV
from pipelines.trainjob import (TrainJobError, await_trainjob, launch_command, run_trainjob, trainjob_for_run, trainjob_template,
                                upload)
from tests.helpers.datasets import small_overrides
from tests.helpers.servers import free_ports, seaweed_s3

MULTINODE = ("pipeline.train.nodes=2", "pipeline.train.accelerator_count=4")
COMMIT = "c0ffee"


def template(cfg) -> dict:
    return trainjob_template(cfg, Build(cfg, COMMIT, retries=False).image(gpu=cfg.pipeline.train.accelerator_count > 0), COMMIT)


def test_trainjob_is_a_valid_trainer_api_object_with_the_train_task_settings():
    cfg = compose(list(MULTINODE))
    manifest = trainjob_for_run(template(cfg), "train-0123", "team-a", ["--config", "{}"], "feedbeef.dir")
    assert TrainerV1alpha1TrainJob.from_dict(manifest).to_dict() == manifest
    trainer = manifest["spec"]["trainer"]
    assert manifest["metadata"]["name"] == "train-0123" and manifest["metadata"]["labels"]["git-commit"] == COMMIT
    assert manifest["spec"]["runtimeRef"] == {"name": "torch-distributed"}
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 4)
    assert trainer["image"] == f"{cfg.pipeline.image.gpu_repository}:{COMMIT}"
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    assert trainer["command"] == ["python", "-m", "pipelines.trainjob", "launch", "--config", "{}"]
    secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"].get("optional", False) for e in trainer["env"] if "valueFrom" in e}
    assert secret_env == {"AWS_ACCESS_KEY_ID": False, "AWS_SECRET_ACCESS_KEY": False, "AWS_ENDPOINT_URL": True}
    assert {e["name"]: e["value"] for e in trainer["env"] if "value" in e} == {"LINEAGE_DATA_HASH": "feedbeef.dir"}  # the run's
    pod = manifest["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]  # NCCL's /dev/shm
    assert pod["containers"] == [{"name": "node", "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}]


def test_cpu_nodes_get_the_cpu_image_one_process_each_and_no_gpu_placement():
    cfg = compose(["pipeline.train.nodes=3", "pipeline.train.accelerator_count=0"])
    manifest = template(cfg)
    trainer = manifest["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (3, 1)
    assert trainer["image"] == f"{cfg.pipeline.image.cpu_repository}:{COMMIT}"
    assert "nvidia.com/gpu" not in trainer["resourcesPerNode"]["limits"] and manifest["spec"]["runtimePatches"] == []


def test_a_field_the_trainer_api_lacks_is_refused_at_compile_time():
    manifest = template(compose(list(MULTINODE)))
    manifest["spec"]["trainer"]["numNodes"] = "two"
    with pytest.raises(ConfigError, match="TrainJob: the Trainer API models refuse it"):
        trainjob_for_run(manifest, "train-1", "ns", [], "feedbeef.dir")
    manifest["spec"]["trainer"]["numNodes"] = 2
    manifest["spec"]["trainer"]["gpusPerNode"] = 4
    with pytest.raises(ConfigError, match="TrainJob: the Trainer API models do not accept"):
        trainjob_for_run(manifest, "train-1", "ns", [], "feedbeef.dir")


def test_nodes_below_one_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="pipeline.train.nodes must be at least 1, got 0"):
        compose(["pipeline.train.nodes=0"])


@pytest.mark.integration
def test_compiled_pipeline_trains_through_a_trainjob_only_above_one_node(tmp_path):
    from kfp import compiler

    def compiled(overrides):
        out = tmp_path / f"{len(overrides)}.yaml"
        data = {"data_repo": "https://git.example/project.git", "data_rev": COMMIT, "data_uri": ""}
        compiler.Compiler().compile(training_pipeline(compose(overrides), COMMIT, data), str(out))
        spec = next(yaml.safe_load_all(out.read_text()))  # the pipeline spec, then the platform spec
        tasks = {name: task for component in [*spec["components"].values(), spec["root"]]
                 for name, task in component.get("dag", {}).get("tasks", {}).items()}
        return spec["deploymentSpec"]["executors"], tasks

    single, _ = compiled([])
    assert "def train_op" in "".join(single["exec-train-op"]["container"]["command"]) and "exec-trainjob-op" not in single
    multi, tasks = compiled(list(MULTINODE))
    assert "exec-train-op" not in multi and "def trainjob_op" in "".join(multi["exec-trainjob-op"]["container"]["command"])
    assert multi["exec-trainjob-op"]["container"]["image"] == f"{compose([]).pipeline.image.cpu_repository}:{COMMIT}"  # CPU task awaits
    job = json.loads(tasks["trainjob-op"]["inputs"]["parameters"]["job"]["runtimeValue"]["constant"])
    assert job == template(compose(list(MULTINODE)))  # the compile-time template, checked by the Trainer API models


def test_launcher_takes_rank_world_and_rendezvous_from_the_trainer_environment():
    env = {"PET_NNODES": "4", "PET_NODE_RANK": "2", "PET_NPROC_PER_NODE": "8", "PET_MASTER_ADDR": "train-x-node-0-0.train-x",
           "PET_MASTER_PORT": "29400"}
    command = launch_command(env, ["--params", "/tmp/w/params.json"])
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nnodes=4", "--node-rank=2", "--nproc-per-node=8", "--master-addr=train-x-node-0-0.train-x",
            "--master-port=29400"} <= set(command)
    assert command[-4:] == ["-m", "components.train", "--params", "/tmp/w/params.json"]  # the train step itself
    with pytest.raises(ConfigError, match="PET_NODE_RANK, PET_MASTER_PORT not set"):
        launch_command({k: v for k, v in env.items() if k not in ("PET_NODE_RANK", "PET_MASTER_PORT")}, [])


def test_one_torchrun_command_for_the_train_step_on_one_node_and_across_the_trainjob_nodes():
    env = {"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_NPROC_PER_NODE": "4", "PET_MASTER_ADDR": "node-0", "PET_MASTER_PORT": "29400"}
    nodes = {"nnodes": "2", "node-rank": "1", "master-addr": "node-0", "master-port": "29400"}
    assert launch_command(env, ["--out", "m"]) == torchrun_command("components.train", ["--out", "m"], "4", nodes)
    assert torchrun_command("components.train", ["--out", "m"], 2) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "components.train", "--out", "m"]


class FakeKubernetesTrainer:
    """Stands in for the Kubernetes API plus the Kubeflow Trainer controller (neither can run here):
    `create` starts one local process per node from the manifest's own command, image aside, with the
    PET_* rendezvous environment the torch runtime sets and the secrets the manifest references."""

    def __init__(self, secrets: dict[str, dict[str, str]]):
        self.secrets, self.jobs, self.deleted = secrets, {}, []

    def _env(self, trainer: dict, rank: int, port: int) -> dict:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PET_NNODES": str(trainer["numNodes"]),
               "PET_NODE_RANK": str(rank), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
               "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port)}
        for var in trainer["env"]:
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref is None:
                env[var["name"]] = var["value"]
            elif ref["key"] in self.secrets[ref["name"]] or not ref.get("optional"):
                env[var["name"]] = self.secrets[ref["name"]][ref["key"]]
        return env

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, field_validation=None):
        assert field_validation == "Strict"  # an older Trainer refuses a field it lacks instead of dropping it
        trainer, port = body["spec"]["trainer"], free_ports(1)[0]
        pods = [subprocess.Popen(trainer["command"], cwd=ROOT, env=self._env(trainer, rank, port), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for rank in range(trainer["numNodes"])]
        self.jobs[(namespace, body["metadata"]["name"])] = (body, pods)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        body, pods = self.jobs[(namespace, name)]
        codes = [pod.poll() for pod in pods]
        if any(code not in (None, 0) for code in codes):
            return {**body, "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "PodFailed", "message": str(codes)}]}}
        return {**body, "status": {"conditions": [{"type": "Complete", "status": "True"}] if codes == [0] * len(pods) else []}}

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.deleted.append(name)


@pytest.mark.integration
def test_two_node_trainjob_with_gloo_processes_fake_kubernetes_api(tiny_dataset, tmp_path, monkeypatch):
    """The graph's train task end to end: manifest -> two nodes rendezvous and train -> node 0
    uploads -> the task copies the model and log into its own artifacts on a real S3 server."""
    overrides = small_overrides(tiny_dataset, "train.epochs=6", "train.lr=0.01", "train.early_stopping_patience=0",
                                "pipeline.train.nodes=2", "pipeline.train.accelerator_count=0", "pipeline.train.trainer_poll_s=1")
    cfg = compose(overrides)
    prepare(cfg, tiny_dataset, tmp_path / "prepared")
    with seaweed_s3(tmp_path / "s3", bucket="mlpipeline") as s3:
        creds = {"access_key_id": s3.access_key, "secret_access_key": s3.secret_key, "endpoint_url": s3.endpoint}
        for key, var in {**cfg.pipeline.s3_secret.env, **cfg.pipeline.s3_secret.optional_env}.items():
            monkeypatch.setenv(var, creds[key])
        monkeypatch.setenv(IMAGE_COMMIT_ENV, COMMIT)  # this working tree plays the image of that commit (the pods inherit it)
        upload(str(tmp_path / "prepared"), "s3://mlpipeline/run-1/prepare/prepared")
        api = FakeKubernetesTrainer({cfg.pipeline.s3_secret.name: creds})
        metrics = run_trainjob(template(cfg), cfg, COMMIT, "minio://mlpipeline/run-1/prepare/prepared",
                               "minio://mlpipeline/run-1/train/model", str(tmp_path / "model"), str(tmp_path / "log"), api, poll_s=1)
    (body, pods), = api.jobs.values()
    logs = [pod.stdout.read() for pod in pods]
    assert metrics["epochs_run"] == 6 and metrics["val_accuracy"] >= 0.8, logs
    assert "train: {" in logs[0] and "train: {" not in logs[1]  # node 0 speaks for both nodes
    assert json.loads((tmp_path / "model" / "model.json").read_text())["metrics"] == metrics
    assert (tmp_path / "model" / "model.safetensors").stat().st_size > 0
    assert json.loads((tmp_path / "log" / "metrics.json").read_text())["step"] == 6
    assert api.deleted == []


class StaticJobApi:
    """A fake Kubernetes API whose TrainJob always reports the given conditions."""

    def __init__(self, conditions):
        self.conditions, self.deleted, self.polls = conditions, [], 0

    def get_namespaced_custom_object(self, *args):
        self.polls += 1
        return {"status": {"conditions": self.conditions}}

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.deleted.append(name)


def test_a_failed_trainjob_fails_the_task_with_its_reason_fake_kubernetes_api():
    api = StaticJobApi([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "node 1 exited 1"}])
    with pytest.raises(TrainJobError, match="ns/train-9 failed: BackoffLimitExceeded: node 1 exited 1"):
        await_trainjob(api, "ns", "train-9", 60, 1, sleep=lambda s: None)
    assert api.deleted == ["train-9"]


def test_a_trainjob_past_its_timeout_is_deleted_fake_kubernetes_api():
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    api = StaticJobApi([{"type": "Created", "status": "True"}])
    with pytest.raises(TrainJobError, match=r"did not finish within 120 s \(pipeline.train.trainer_timeout_s\)"):
        await_trainjob(api, "ns", "train-7", 120, 30, sleep=sleep, clock=lambda: now[0])
    assert api.deleted == ["train-7"] and api.polls == 5


# --- cleanup, through the real kubernetes client ------------------------------------------------

class FakeKubernetesApiServer(BaseHTTPRequestHandler):
    """Answers the TrainJob paths like the Kubernetes API would, with a 500 on the n-th GET; records every request."""

    seen: list[tuple[str, str]] = []
    fail_on_get = 2

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.seen.append(("GET", self.path))
        if sum(method == "GET" for method, _ in self.seen) >= self.fail_on_get:
            self._json(500, {"kind": "Status", "status": "Failure", "message": "etcdserver: request timed out", "code": 500})
        else:
            self._json(200, {"status": {"conditions": [{"type": "Created", "status": "True"}]}})

    def do_DELETE(self):
        self.seen.append(("DELETE", self.path))
        self._json(200, {"kind": "Status", "status": "Success"})

    def log_message(self, *args):
        pass


def test_a_polling_error_deletes_the_trainjob_with_kubernetes_client_and_fake_kubernetes_api():
    from kubernetes import client

    FakeKubernetesApiServer.seen = []
    httpd = next(ThreadingHTTPServer(("127.0.0.1", port), FakeKubernetesApiServer) for port in range(18750, 18800)
                 if _bindable(port))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        api = client.CustomObjectsApi(client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{httpd.server_address[1]}")))
        with pytest.raises(client.ApiException, match="etcdserver: request timed out"):
            await_trainjob(api, "team-a", "train-5", 600, 1, sleep=lambda s: None)
    finally:
        httpd.shutdown()
        httpd.server_close()
    path = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team-a/trainjobs/train-5"
    assert FakeKubernetesApiServer.seen == [("GET", path), ("GET", path), ("DELETE", path)]


def test_a_terminated_run_deletes_the_trainjob_fake_kubernetes_api():
    """KFP stops a terminated run's pod with SIGTERM: the wait ends and the job is deleted."""
    import signal

    from pipelines.trainjob import _terminate_on_sigterm

    previous = signal.getsignal(signal.SIGTERM)
    api = StaticJobApi([{"type": "Created", "status": "True"}])
    try:
        _terminate_on_sigterm()
        with pytest.raises(SystemExit, match="stopped by signal 15"):
            await_trainjob(api, "ns", "train-3", 600, 1, sleep=lambda s: os.kill(os.getpid(), signal.SIGTERM))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert api.deleted == ["train-3"]


def _bindable(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_the_trainjob_rbac_manifest_validates_and_grants_what_the_task_calls():
    import kubernetes_validate

    docs = list(yaml.safe_load_all((ROOT / "pipelines" / "k8s" / "trainjob-rbac.yaml").read_text()))
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    role, binding = docs
    (rule,) = role["rules"]
    assert (rule["apiGroups"], rule["resources"]) == (["trainer.kubeflow.org"], ["trainjobs"])
    assert {"create", "get", "delete"} <= set(rule["verbs"])  # run_trainjob and await_trainjob
    assert binding["roleRef"]["name"] == role["metadata"]["name"] and binding["subjects"][0]["name"] == "pipeline-runner"
