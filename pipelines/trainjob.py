"""Training across nodes: with `pipeline.train.nodes > 1` the pipeline's train task hands the
train step to Kubeflow Trainer.

- `trainjob_template` (at compile time) builds the TrainJob from `cfg.pipeline`, checked with the
  Kubeflow Trainer API models, so a wrong field fails at compile and not on the cluster:
  `nodes` pods of the training image (by commit) on `trainer_runtime`, each with the train
  task's resources, node placement and one process per GPU.
- `trainjob_op` (the KFP component) names it, gives it its command, creates it, waits for it,
  and copies what node 0 wrote into its own `model` and `training_log` artifacts, where
  evaluate and package expect them.
- `python -m pipelines.trainjob launch` is what each pod runs: it fetches the prepared data,
  runs the train step (`python -m components.train`) under torchrun with the rank, world size
  and rendezvous Kubeflow Trainer put in the environment (PET_*), and on node 0 uploads the outputs.
"""

# No `from __future__ import annotations`: KFP reads the component's real annotation objects.
import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output
from omegaconf import DictConfig, OmegaConf

from components.core.errors import ConfigError, StepError
from components.core.lineage import DATA_HASH_ENV, data_hash
from components.core.remote import download_folder, fsspec_url
from components.training.distributed import torchrun_command

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
NODE_JOB = "node"  # the replicated job of the torch runtimes: one pod per node
RENDEZVOUS_ENV = ("PET_NNODES", "PET_NODE_RANK", "PET_NPROC_PER_NODE", "PET_MASTER_ADDR", "PET_MASTER_PORT")


class TrainJobError(StepError):
    """The TrainJob failed or did not finish in time (the message says which, and why)."""


def _resources(t: DictConfig) -> dict:
    limits = {"cpu": t.cpu_limit, "memory": t.memory_limit}
    if t.accelerator_count > 0:
        limits[t.accelerator_type] = str(t.accelerator_count)
    return {"requests": {"cpu": t.cpu_request, "memory": t.memory_request}, "limits": limits}


def _env(p: DictConfig) -> list[dict]:
    """The artifact store's credentials (optional keys may be absent); trainjob_for_run adds the run's data hash."""
    s = p.artifact_secret if p.artifact_secret.name else p.s3_secret
    return [] if not s.name else [
        {"name": var, "valueFrom": {"secretKeyRef": {"name": s.name, "key": key, **({"optional": True} if optional else {})}}}
        for mapping, optional in ((s.env, False), (s.optional_env, True)) for key, var in mapping.items()]


def _pod_patch(p: DictConfig) -> dict:
    """What every node's pod adds to the runtime's: the train task's node selector and tolerations (only with GPUs),
    an in-memory /dev/shm for NCCL (above one process per node), the image-pull secrets."""
    t, pod = p.train, {}
    if t.accelerator_count > 0:
        pod["nodeSelector"] = dict(t.node_selector)
        pod["tolerations"] = [{k: v for k, v in dict(tol).items() if v is not None} for tol in t.tolerations]
    if t.accelerator_count > 1:
        pod["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": t.shm_size}}]
        pod["containers"] = [{"name": NODE_JOB, "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}]
    if p.image.pull_secrets:
        pod["imagePullSecrets"] = [{"name": name} for name in p.image.pull_secrets]
    return pod


def _placement(p: DictConfig) -> list[dict]:
    pod = _pod_patch(p)
    if not pod:
        return []
    job = {"name": NODE_JOB, "template": {"spec": {"template": {"spec": pod}}}}
    return [{"manager": "kfp-dvc-template", "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [job]}}}}]


def validated(manifest: dict) -> dict:
    """`manifest` as the Kubeflow Trainer API models read it; an unknown field or a wrong type is an error."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    try:
        accepted = TrainerV1alpha1TrainJob.from_dict(manifest).to_dict()
    except ValueError as exc:  # pydantic's ValidationError
        raise ConfigError(f"TrainJob: the Trainer API models refuse it: {exc}") from None
    if accepted != manifest:  # from_dict drops a field the API does not have
        raise ConfigError(f"TrainJob: the Trainer API models do not accept {json.dumps(manifest)}")
    return accepted


def trainjob_template(cfg: DictConfig, image: str, commit: str) -> dict:
    """The TrainJob of `pipeline.train`, but for its name and command (the task sets them at run time)."""
    p, t = cfg.pipeline, cfg.pipeline.train
    return validated({
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainJob",
        "metadata": {"name": "train", "namespace": p.submit.namespace,
                     "labels": {"app.kubernetes.io/part-of": p.name, "git-commit": commit}},
        "spec": {
            "runtimeRef": {"name": t.trainer_runtime},
            "activeDeadlineSeconds": t.trainer_timeout_s,
            "trainer": {"image": image, "numNodes": t.nodes, "numProcPerNode": max(t.accelerator_count, 1),
                        "command": ["python", "-m", "pipelines.trainjob", "launch"], "env": _env(p),
                        "resourcesPerNode": _resources(t)},
            "runtimePatches": _placement(p),
        },
    })


def trainjob_for_run(template: dict, name: str, namespace: str, launch_args: list[str], data_hash: str) -> dict:
    """The run's TrainJob: its name, command and data hash (the data-hash task's; the image holds no data.dvc of the run's data)."""
    job = copy.deepcopy(template)
    job["metadata"].update(name=name, namespace=namespace)
    job["spec"]["trainer"]["command"] = ["python", "-m", "pipelines.trainjob", "launch", *launch_args]
    job["spec"]["trainer"]["env"] = [*job["spec"]["trainer"].get("env", []), {"name": DATA_HASH_ENV, "value": data_hash}]
    return validated(job)


def _condition(job: dict, kind: str) -> dict | None:
    conditions = (job.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == kind and c.get("status") == "True"), None)


def await_trainjob(api, namespace: str, name: str, timeout_s: float, poll_s: float, sleep=time.sleep, clock=time.monotonic) -> None:
    """Return when the TrainJob is Complete; raise TrainJobError when it failed or timed out. Whatever ends the wait
    but completion (a failure, the deadline, an API error while polling, the run terminated: SIGTERM) deletes the job,
    so it stops holding GPUs."""
    try:
        _wait(api, namespace, name, timeout_s, poll_s, sleep, clock)
    except BaseException:
        _delete(api, namespace, name)
        raise


def _wait(api, namespace: str, name: str, timeout_s: float, poll_s: float, sleep, clock) -> None:
    deadline = clock() + timeout_s
    while True:
        job = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        if _condition(job, "Complete"):
            return
        failed = _condition(job, "Failed")
        if failed or clock() >= deadline:
            why = f"failed: {failed.get('reason')}: {failed.get('message')}" if failed else f"did not finish within {timeout_s:.0f} s (pipeline.train.trainer_timeout_s)"
            raise TrainJobError(f"TrainJob {namespace}/{name} {why}")
        sleep(poll_s)


def _delete(api, namespace: str, name: str) -> None:
    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except Exception as exc:  # the first error is the one to report; this one only adds what is left behind
        print(f"train: could not delete TrainJob {namespace}/{name} ({type(exc).__name__}: {exc}): "
              f"`kubectl -n {namespace} delete trainjob {name}`", file=sys.stderr)


def _terminate_on_sigterm() -> None:
    """KFP stops a terminated run's pods with SIGTERM: raise, so the wait's cleanup deletes the job."""
    def stop(signum, frame):
        raise SystemExit(f"train: stopped by signal {signum} (the run was terminated)")
    signal.signal(signal.SIGTERM, stop)


def upload(local: str, url: str) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(fsspec_url(url))
    fs.put(local.rstrip("/") + "/", path, recursive=True)


def _namespace(template: dict) -> str:
    """The namespace this task runs in (a multi-user KFP runs pipelines in the user's profile)."""
    mounted = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return mounted.read_text().strip() if mounted.exists() else template["metadata"]["namespace"]


def run_trainjob(template: dict, cfg: DictConfig, expected_commit: str, prepared_uri: str, model_uri: str, model_dir: str,
                 log_dir: str, api, poll_s: float) -> dict:
    """Create the TrainJob for this run, wait for it, copy node 0's outputs to model_dir and log_dir; returns the metrics."""
    name, namespace, staging = f"train-{uuid.uuid4().hex[:12]}", _namespace(template), f"{model_uri.rstrip('/')}.trainjob"
    config = json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True)
    job = trainjob_for_run(template, name, namespace, ["--config", config, "--expected-commit", expected_commit,
                                                       "--prepared", prepared_uri, "--out", staging], data_hash())
    # Strict: a Trainer that does not know a field (runtimePatches, activeDeadlineSeconds before 2.2) refuses the job,
    # instead of dropping the field.
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job, field_validation="Strict")
    await_trainjob(api, namespace, name, job["spec"]["activeDeadlineSeconds"], poll_s)
    download_folder(f"{staging}/model", model_dir, "the TrainJob's model")
    download_folder(f"{staging}/live", log_dir, "the TrainJob's training log")
    return json.loads((Path(model_dir) / "model.json").read_text())["metrics"]


@dsl.component(base_image="python:3.11", install_kfp_package=False)  # the graph sets the image by commit
def trainjob_op(config: str, expected_commit: str, data_hash: str, gpus: int, epochs: int, lr: float, batch_size: int,
                model_name: str, job: str, poll_s: int, prepared: Input[Dataset], model: Output[Model], metrics: Output[Metrics],
                training_log: Output[Artifact]):
    """The train task when pipeline.train.nodes > 1: a Kubeflow Trainer TrainJob does the training."""
    import json

    from kubernetes import client, config as kube_config

    from pipelines.in_pod import train_step_config
    from pipelines.trainjob import run_trainjob

    from pipelines.trainjob import _terminate_on_sigterm

    cfg = train_step_config(config, expected_commit, gpus, data_hash, epochs=epochs, lr=lr, batch_size=batch_size,
                            model_name=model_name)
    _terminate_on_sigterm()
    kube_config.load_incluster_config()
    results = run_trainjob(json.loads(job), cfg, expected_commit, prepared.uri, model.uri, model.path, training_log.path,
                           client.CustomObjectsApi(), poll_s)
    for name, value in results.items():
        metrics.log_metric(name, value)


def launch_command(env: dict, train_args: list[str]) -> list[str]:
    """The train step under torchrun across the nodes Kubeflow Trainer describes in PET_* (node rank, world, rendezvous)."""
    missing = [var for var in RENDEZVOUS_ENV if not env.get(var)]
    if missing:
        raise ConfigError(f"launch runs inside a Kubeflow Trainer pod: {', '.join(missing)} not set in the environment")
    nodes = {"nnodes": env["PET_NNODES"], "node-rank": env["PET_NODE_RANK"], "master-addr": env["PET_MASTER_ADDR"],
             "master-port": env["PET_MASTER_PORT"]}
    return torchrun_command("components.train", train_args, env["PET_NPROC_PER_NODE"], nodes)


def launch(config: str, expected_commit: str, prepared_uri: str, out_uri: str, env: dict) -> None:
    """One node of the TrainJob: fetch the prepared data, run the train step under torchrun, node 0 uploads model/ and live/."""
    from pipelines.in_pod import check_image

    check_image(expected_commit)
    with tempfile.TemporaryDirectory() as work:
        local = Path(work)
        download_folder(prepared_uri, local / "prepared", "--prepared")
        (local / "params.json").write_text(config)  # JSON is YAML: the train step reads it with --params
        train_args = ["--params", str(local / "params.json"), "--prepared", str(local / "prepared"), "--out", str(local / "model"),
                      "--live", str(local / "live"), "--checkpoints", str(local / "checkpoints")]
        if subprocess.run(launch_command(env, train_args)).returncode != 0:
            raise TrainJobError(f"node {env['PET_NODE_RANK']}: the train step failed (its log is above)")
        if env["PET_NODE_RANK"] == "0":
            print(f"train: {json.loads((local / 'model' / 'model.json').read_text())['metrics']} -> {out_uri}/model")
            upload(str(local / "model"), f"{out_uri}/model")
            upload(str(local / "live"), f"{out_uri}/live")


def main() -> None:
    from components.core.errors import run_cli

    parser = argparse.ArgumentParser(description="Inside a Kubeflow Trainer pod: run this node's part of the train step.")
    sub = parser.add_subparsers(dest="command", required=True)
    launch_parser = sub.add_parser("launch", help="fetch the data, run the train step under torchrun, upload (node 0)")
    for option in ("--config", "--expected-commit", "--prepared", "--out"):
        launch_parser.add_argument(option, required=True)
    args = parser.parse_args()
    run_cli(lambda: launch(args.config, args.expected_commit, args.prepared, args.out, dict(os.environ)))


if __name__ == "__main__":
    main()
