"""Training across nodes: with `pipeline.train.nodes > 1` the pipeline's train task hands the
train step to Kubeflow Trainer.

- `trainjob_manifest` builds the TrainJob (Kubeflow Trainer API models, so a wrong field fails
  here and not on the cluster): `nodes` pods of the training image on `trainer_runtime`, each
  with the train task's resources and one process per GPU.
- `trainjob_op` (the KFP component) creates it, waits for it, and copies what node 0 wrote into
  its own `model` and `training_log` artifacts, where evaluate and package expect them.
- `python -m pipelines.trainjob launch` is what each pod runs: it fetches the prepared data,
  starts torchrun with the rank, world size and rendezvous Kubeflow Trainer put in the
  environment (PET_*), and on node 0 uploads the outputs.
"""

# No `from __future__ import annotations`: KFP reads the component's real annotation objects.
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output
from omegaconf import DictConfig

from components.core.errors import ConfigError
from components.core.lineage import DATA_HASH_ENV
from pipelines.wrappers import IMAGE

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
NODE_JOB = "node"  # the replicated job of the torch runtimes: one pod per node


class TrainJobError(RuntimeError):
    """The TrainJob failed or did not finish in time (the message says which, and why)."""


RENDEZVOUS_ENV = ("PET_NNODES", "PET_NODE_RANK", "PET_NPROC_PER_NODE", "PET_MASTER_ADDR", "PET_MASTER_PORT")


def _resources(t: DictConfig) -> dict:
    limits = {"cpu": t.cpu_limit, "memory": t.memory_limit}
    if t.accelerator_count > 0:
        limits[t.accelerator_type] = str(t.accelerator_count)
    return {"requests": {"cpu": t.cpu_request, "memory": t.memory_request}, "limits": limits}


def _env(p: DictConfig) -> list[dict]:
    """The artifact store's credentials (the s3 secret) and the run's data hash (lineage)."""
    env = [{"name": var, "valueFrom": {"secretKeyRef": {"name": p.s3_secret.name, "key": key}}}
           for key, var in p.s3_secret.env.items()] if p.s3_secret.name else []
    if os.environ.get(DATA_HASH_ENV):
        env.append({"name": DATA_HASH_ENV, "value": os.environ[DATA_HASH_ENV]})
    return env


def _placement(t: DictConfig) -> list[dict]:
    """The node selector and tolerations of the train task, patched onto every node's pod."""
    tolerations = [{k: v for k, v in dict(tol).items() if v is not None} for tol in t.tolerations]
    pod = {"nodeSelector": dict(t.node_selector), "tolerations": tolerations}
    job = {"name": NODE_JOB, "template": {"spec": {"template": {"spec": pod}}}}
    return [{"manager": "kfp-dvc-template", "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [job]}}}}]


def trainjob_manifest(cfg: DictConfig, name: str, namespace: str, config: str, prepared_uri: str, out_uri: str) -> dict:
    """The TrainJob running the train step on `pipeline.train.nodes` nodes, validated by the Trainer API models."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    p, t = cfg.pipeline, cfg.pipeline.train
    image = p.image.gpu if t.accelerator_count > 0 else p.image.cpu
    manifest = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainJob",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": p.name}},
        "spec": {
            "runtimeRef": {"name": t.trainer_runtime},
            "activeDeadlineSeconds": t.trainer_timeout_s,
            "trainer": {
                "image": image, "numNodes": t.nodes, "numProcPerNode": max(t.accelerator_count, 1),
                "command": ["python", "-m", "pipelines.trainjob", "launch", "--config", config,
                            "--prepared", prepared_uri, "--out", out_uri],
                "env": _env(p), "resourcesPerNode": _resources(t),
            },
            "runtimePatches": _placement(t),
        },
    }
    validated = TrainerV1alpha1TrainJob.from_dict(manifest).to_dict()  # raises on a value of the wrong type...
    if validated != manifest:  # ...and drops a field the API does not have
        raise TrainJobError(f"TrainJob {name}: the Trainer API models do not accept {json.dumps(manifest)}")
    return validated


def _condition(job: dict, kind: str) -> dict | None:
    conditions = (job.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == kind and c.get("status") == "True"), None)


def await_trainjob(api, namespace: str, name: str, timeout_s: float, poll_s: float, sleep=time.sleep, clock=time.monotonic) -> None:
    """Return when the TrainJob is Complete; raise TrainJobError (and delete the job) when it failed or timed out."""
    deadline = clock() + timeout_s
    while True:
        job = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        if _condition(job, "Complete"):
            return
        failed = _condition(job, "Failed")
        if failed or clock() >= deadline:
            api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            why = f"failed: {failed.get('reason')}: {failed.get('message')}" if failed else f"did not finish within {timeout_s:.0f} s (pipeline.train.trainer_timeout_s)"
            raise TrainJobError(f"TrainJob {namespace}/{name} {why}")
        sleep(poll_s)


def _fsspec_url(uri: str) -> str:
    """KFP names MinIO artifacts minio://bucket/key; fsspec reaches them as s3:// (AWS_ENDPOINT_URL set)."""
    return "s3://" + uri.removeprefix("minio://") if uri.startswith("minio://") else uri


def download(url: str, local: str) -> None:
    """Copy the folder at `url` (s3://, minio://, a local path, ...) into the local folder `local`."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(_fsspec_url(url))
    Path(local).mkdir(parents=True, exist_ok=True)
    fs.get(path.rstrip("/") + "/", local, recursive=True)


def upload(local: str, url: str) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(_fsspec_url(url))
    fs.put(local.rstrip("/") + "/", path, recursive=True)


def _namespace(cfg: DictConfig) -> str:
    """The namespace this task runs in (a multi-user KFP runs pipelines in the user's profile)."""
    mounted = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return mounted.read_text().strip() if mounted.exists() else cfg.pipeline.submit.namespace


def run_trainjob(cfg: DictConfig, config: str, prepared_uri: str, model_uri: str, model_dir: str, log_dir: str, api) -> dict:
    """Create the TrainJob, wait for it, copy node 0's outputs to model_dir and log_dir; returns the metrics."""
    t, namespace = cfg.pipeline.train, _namespace(cfg)
    name, staging = f"train-{uuid.uuid4().hex[:12]}", f"{model_uri.rstrip('/')}.trainjob"
    manifest = trainjob_manifest(cfg, name, namespace, config, prepared_uri, staging)
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    await_trainjob(api, namespace, name, t.trainer_timeout_s, t.trainer_poll_s)
    download(f"{staging}/model", model_dir)
    download(f"{staging}/live", log_dir)
    return json.loads((Path(model_dir) / "model.json").read_text())["metrics"]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def trainjob_op(config: str, prepared: Input[Dataset], model: Output[Model], metrics: Output[Metrics],
                training_log: Output[Artifact]):
    """The train task when pipeline.train.nodes > 1: a Kubeflow Trainer TrainJob does the training."""
    import json

    from kubernetes import client, config as kube_config

    from components.core.config import validate
    from pipelines.trainjob import run_trainjob

    cfg = validate(json.loads(config), "pipeline parameter 'config'")
    kube_config.load_incluster_config()
    results = run_trainjob(cfg, config, prepared.uri, model.uri, model.path, training_log.path, client.CustomObjectsApi())
    for name, value in results.items():
        metrics.log_metric(name, value)


def launch_command(env: dict, worker_args: list[str]) -> list[str]:
    """torchrun across the nodes Kubeflow Trainer describes in PET_* (node rank, world, rendezvous)."""
    missing = [var for var in RENDEZVOUS_ENV if not env.get(var)]
    if missing:
        raise ConfigError(f"launch runs inside a Kubeflow Trainer pod: {', '.join(missing)} not set in the environment")
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={env['PET_NNODES']}", f"--node-rank={env['PET_NODE_RANK']}",
            f"--nproc-per-node={env['PET_NPROC_PER_NODE']}", f"--master-addr={env['PET_MASTER_ADDR']}",
            f"--master-port={env['PET_MASTER_PORT']}", "-m", "pipelines.trainjob", "worker", *worker_args]


def launch(config: str, prepared_uri: str, out_uri: str, env: dict) -> None:
    """One node of the TrainJob: fetch the prepared data, train with torchrun, node 0 uploads model/ and live/."""
    with tempfile.TemporaryDirectory() as work:
        local = Path(work)
        download(prepared_uri, str(local / "prepared"))
        (local / "config.json").write_text(config)
        args = ["--config", str(local / "config.json"), "--prepared", str(local / "prepared"), "--work", str(local)]
        subprocess.run(launch_command(env, args), check=True)
        if env["PET_NODE_RANK"] == "0":
            upload(str(local / "model"), f"{out_uri}/model")
            upload(str(local / "live"), f"{out_uri}/live")


def worker(config_file: str, prepared: str, work: str) -> None:
    """One torchrun process: the train step, with rank and world size from torchrun's environment."""
    from components.core.config import validate
    from components.train import train

    cfg = validate(json.loads(Path(config_file).read_text()), config_file)
    out = Path(work)
    metrics = train(cfg, prepared, out / "model", out / "live", out / "checkpoints")
    if os.environ.get("RANK", "0") == "0":
        print(f"train: {metrics}")


def main() -> None:
    from components.core.errors import run_cli

    parser = argparse.ArgumentParser(description="Inside a Kubeflow Trainer pod: run this node's part of the train step.")
    sub = parser.add_subparsers(dest="command", required=True)
    launch_parser = sub.add_parser("launch", help="fetch data, torchrun this node, upload (node 0)")
    for option in ("--config", "--prepared", "--out"):
        launch_parser.add_argument(option, required=True)
    worker_parser = sub.add_parser("worker", help="one torchrun process (started by launch)")
    for option in ("--config", "--prepared", "--work"):
        worker_parser.add_argument(option, required=True)
    args = parser.parse_args()
    if args.command == "launch":
        run_cli(lambda: launch(args.config, args.prepared, args.out, dict(os.environ)))
    else:
        run_cli(lambda: worker(args.config, args.prepared, args.work))


if __name__ == "__main__":
    main()
