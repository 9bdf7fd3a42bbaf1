"""The pipeline graphs, built from a composed config: the training pipeline (data hash -> prepare
-> train -> evaluate -> gate -> package -> deploy, inside an exit handler) and the sweep
(data hash -> prepare -> train -> evaluate per trial in a ParallelFor, then the best trial).

Everything the cluster needs (images by commit, resources, GPU, node selector, tolerations,
/dev/shm, timeouts, retries, caching, secrets) comes from `cfg.pipeline` and is written
into the compiled spec. Each step gets only the config sections it reads (its SECTIONS), so
its cache key changes only with them; what users change per run (epochs, learning rate,
batch size, model, gate thresholds, deploy) are typed pipeline parameters.
"""

# No `from __future__ import annotations`: KFP reads the pipelines' real annotation objects.
import inspect
import json
from dataclasses import dataclass

from kfp import dsl, kubernetes
from kfp.dsl import PipelineTask
from omegaconf import DictConfig, OmegaConf

from components import evaluate as evaluate_step
from components import package as package_step
from components import prepare as prepare_step
from components import train as train_step
from components.core.config.schema import gate_parameters
from components.core.config.sections import select
from components.core.errors import ConfigError
from pipelines.in_pod import GIT_CREDENTIALS_ENV, GIT_SSH_KEY_ENV, RUN_PARAMETERS
from pipelines.trainjob import trainjob_op, trainjob_template
from pipelines.wrappers import (data_hash_op, deploy_op, evaluate_op, gate_op, package_op, prepare_op, record_outcome_op,
                                select_best_op, train_op)

COMMIT_LABEL, DEPLOY_ROLE_LABEL = "git-commit", "kfp-dvc-template/role"
DEPLOY_SECTIONS = ("serve",)  # what components.deploy reads


@dataclass(frozen=True)
class Build:
    """What every task of one compiled pipeline shares."""

    cfg: DictConfig
    commit: str     # the images' commit: their tag, and what each component checks at start
    retries: bool

    def image(self, gpu: bool) -> str:
        i = self.cfg.pipeline.image
        return f"{i.gpu_repository if gpu else i.cpu_repository}:{self.commit}"


def sections_json(cfg: DictConfig, sections: tuple[str, ...]) -> str:
    return json.dumps(OmegaConf.to_container(select(cfg, sections), resolve=True), sort_keys=True)


DATA_PARAMETERS = {
    "data_repo": "git URL of the project: prepare fetches the data its data.dvc names at data_rev (pipeline.data.repo)",
    "data_rev": "git revision of data_repo whose data.dvc names the data (pipeline.data.rev)",
    "data_uri": "instead of data_repo: s3://bucket/prefix holding the raw data (pipeline.data.uri)",
}


def run_parameters(cfg: DictConfig, data: dict) -> inspect.Signature:
    """The training pipeline's typed run parameters, defaults from `cfg`: the data (`data`), the train step's
    (RUN_PARAMETERS), every key of the gate policy (from its schema) and, when a deploy target was compiled
    in (pipeline.deploy.enabled), whether to deploy."""
    typed = {name: (str, data[name]) for name in DATA_PARAMETERS}
    typed |= {name: (type(OmegaConf.select(cfg, key)), OmegaConf.select(cfg, key)) for name, key in RUN_PARAMETERS.items()}
    typed |= {name: (kind, kind(OmegaConf.select(cfg, key))) for name, (key, kind) in gate_parameters().items()}
    if cfg.pipeline.deploy.enabled:
        typed["deploy"] = (bool, True)
    return inspect.Signature([inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=kind)
                              for name, (kind, default) in typed.items()])


def run_parameter_docs(cfg: DictConfig, summary: str) -> str:
    """The pipeline's docstring: `summary` and an `Args:` section, which KFP turns into each run parameter's
    description in the UI."""
    described = dict(DATA_PARAMETERS)
    described |= {name: f"{key} of conf/ (the train step)" for name, key in RUN_PARAMETERS.items()}
    described |= {name: f"{key} of the gate policy (conf/gate)" for name, (key, _) in gate_parameters().items()}
    if cfg.pipeline.deploy.enabled:
        described["deploy"] = f"deploy the package to the TorchServe at {cfg.pipeline.deploy.management_url} once the gate opens"
    return f"{summary}\n\nArgs:\n" + "".join(f"    {name}: {text}\n" for name, text in described.items())


def _with_cluster_settings(task: PipelineTask, b: Build, resources: DictConfig, gpu: bool = False, retries: bool = True,
                           cache: bool = True) -> PipelineTask:
    p = b.cfg.pipeline
    task.set_container_image(b.image(gpu))
    kubernetes.set_image_pull_policy(task, p.image.pull_policy)
    if p.image.pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(p.image.pull_secrets))
    kubernetes.add_pod_label(task, COMMIT_LABEL, b.commit)  # the commit is recorded where it is true: the run's pods
    kubernetes.set_timeout(task, resources.timeout_s)
    task.set_cpu_request(resources.cpu_request).set_cpu_limit(resources.cpu_limit)
    task.set_memory_request(resources.memory_request).set_memory_limit(resources.memory_limit)
    task.set_caching_options(cache and p.caching)
    if retries and b.retries and p.retry.num_retries > 0:
        r = p.retry
        task.set_retry(r.num_retries, r.backoff_duration, r.backoff_factor, r.backoff_max_duration)
    return task


def _on_gpu_nodes(task: PipelineTask, t: DictConfig) -> PipelineTask:
    """GPU resources, node selector and tolerations only when GPUs are requested; /dev/shm for NCCL above one."""
    if t.accelerator_count == 0:
        return task
    task.set_accelerator_type(t.accelerator_type).set_accelerator_limit(t.accelerator_count)
    for label, value in t.node_selector.items():
        kubernetes.add_node_selector(task, label, value)
    for toleration in t.tolerations:
        kubernetes.add_toleration(task, toleration.key, toleration.operator, toleration.value, toleration.effect)
    if t.accelerator_count > 1:
        kubernetes.empty_dir_mount(task, "dshm", "/dev/shm", medium="Memory", size_limit=t.shm_size)
    return task


def artifact_secret(p: DictConfig) -> DictConfig:
    """The secret for KFP's artifact store: pipeline.artifact_secret, or when it names none, the DVC remote's s3_secret."""
    return p.artifact_secret if p.artifact_secret.name else p.s3_secret


def _with_secret_env(task: PipelineTask, s: DictConfig) -> PipelineTask:
    if s.name:
        kubernetes.use_secret_as_env(task, s.name, dict(s.env))
        if s.optional_env:
            kubernetes.use_secret_as_env(task, s.name, dict(s.optional_env), optional=True)
    return task


def _with_data_secrets(task: PipelineTask, p: DictConfig) -> PipelineTask:
    _with_secret_env(task, p.s3_secret)
    if p.data.git_secret:
        kubernetes.use_secret_as_env(task, p.data.git_secret, {"git-credentials": GIT_CREDENTIALS_ENV,
                                                               "ssh-privatekey": GIT_SSH_KEY_ENV}, optional=True)
    return task


def _steps_to_evaluate(b: Build, configs: dict, data: dict, run: dict):
    """data hash -> prepare -> train -> evaluate; `configs` maps each step to its sections (JSON), `run` the typed run
    parameters. The data hash is read at run time from the data itself, never cached: prepare's cache key (an input) and
    every step's lineage change with the data, not only with the parameters that name it. Returns its output and the tasks."""
    p = b.cfg.pipeline
    gpus = p.train.accelerator_count
    hashed = data_hash_op(config=configs["prepare"], expected_commit=b.commit, **data)
    _with_data_secrets(_with_cluster_settings(hashed, b, p.resources, cache=False).set_display_name("data-hash"), p)
    data_hash = hashed.output
    prepare = prepare_op(config=configs["prepare"], expected_commit=b.commit, data_hash=data_hash, **data)
    _with_data_secrets(_with_cluster_settings(prepare, b, p.resources).set_display_name("prepare"), p)
    if p.train.nodes > 1:
        train = _trainjob(b, configs["train"], data_hash, prepare, run)
    else:
        train = train_op(config=configs["train"], expected_commit=b.commit, data_hash=data_hash, gpus=gpus,
                         prepared=prepare.outputs["prepared"], **run)
        _on_gpu_nodes(_with_cluster_settings(train, b, p.train, gpu=gpus > 0).set_display_name("train"), p.train)
    evaluate = evaluate_op(config=configs["evaluate"], expected_commit=b.commit, data_hash=data_hash,
                           prepared=prepare.outputs["prepared"], model=train.outputs["model"])
    _with_cluster_settings(evaluate, b, p.resources).set_display_name("evaluate")
    return data_hash, prepare, train, evaluate


def _trainjob(b: Build, config: str, data_hash, prepare: PipelineTask, run: dict) -> PipelineTask:
    """Above one node, a small CPU task runs the train step as a Kubeflow Trainer TrainJob and awaits it."""
    t = b.cfg.pipeline.train
    job = trainjob_template(b.cfg, b.image(gpu=t.accelerator_count > 0), b.commit)
    train = trainjob_op(config=config, expected_commit=b.commit, data_hash=data_hash, gpus=t.accelerator_count,
                        job=json.dumps(job), poll_s=t.trainer_poll_s, prepared=prepare.outputs["prepared"], **run)
    waiting = OmegaConf.merge(b.cfg.pipeline.resources, {"timeout_s": t.trainer_timeout_s + 600})  # outlives the job's deadline
    # It reads the job's outputs from the artifact store; no retries: a retry would start a second job.
    return _with_secret_env(_with_cluster_settings(train, b, waiting, retries=False).set_display_name("train"),
                            artifact_secret(b.cfg.pipeline))


def _package_and_deploy(b: Build, gate: PipelineTask, data_hash, prepare: PipelineTask, train: PipelineTask,
                        deploy_enabled) -> None:
    """package after the gate; deploy when the `deploy` run parameter says so (no deploy task without a compiled target)."""
    p, d = b.cfg.pipeline, b.cfg.pipeline.deploy
    package = package_op(config=sections_json(b.cfg, package_step.SECTIONS), expected_commit=b.commit, data_hash=data_hash,
                         prepared=prepare.outputs["prepared"], model=train.outputs["model"]).after(gate)
    _with_cluster_settings(package, b, p.resources).set_display_name("package")
    if deploy_enabled is None:
        return
    on_volume = bool(d.model_store_pvc)
    with dsl.If(deploy_enabled == True, name="deploy-enabled"):  # noqa: E712 (a KFP condition)
        deploy = deploy_op(config=sections_json(b.cfg, DEPLOY_SECTIONS), expected_commit=b.commit,
                           package=package.outputs["package"], version=package.outputs["version"],
                           mar_file=package.outputs["mar_file"], management_url=d.management_url, inference_url=d.inference_url,
                           model_store=f"{d.volume_path}/{d.model_store}" if on_volume else "",
                           key_file=f"{d.volume_path}/{d.key_file}" if on_volume else "")
        # Deploying is a side effect: never cached, never retried blindly (deploy rolls back itself).
        _with_cluster_settings(deploy, b, p.resources, retries=False, cache=False).set_display_name("deploy")
        kubernetes.add_pod_label(deploy, DEPLOY_ROLE_LABEL, "deploy")  # serve/k8s/networkpolicy.yaml lets it reach management
        if on_volume:
            _on_the_server_volume(deploy, d)


def _on_the_server_volume(deploy: PipelineTask, d: DictConfig) -> None:
    """The shared volume; on TorchServe's node (a ReadWriteOnce volume) and as its uid (NFS root_squash) when so configured."""
    kubernetes.mount_pvc(deploy, d.model_store_pvc, d.volume_path)
    for label, value in d.node_selector.items():
        kubernetes.add_node_selector(deploy, label, value)
    if d.run_as_user:
        kubernetes.set_security_context(deploy, run_as_user=d.run_as_user, run_as_group=d.run_as_user)


def step_configs(cfg: DictConfig) -> dict[str, str]:
    return {name: sections_json(cfg, step.SECTIONS) for name, step in
            (("prepare", prepare_step), ("train", train_step), ("evaluate", evaluate_step))}


def training_pipeline(cfg: DictConfig, commit: str, data: dict, retries: bool = True):
    """prepare -> train -> evaluate -> gate -> package -> deploy, with an exit handler recording the outcome.
    `data` holds the defaults of the data parameters (data_repo, data_rev, data_uri)."""
    b, p, signature = Build(cfg, commit, retries), cfg.pipeline, run_parameters(cfg, data)
    configs = step_configs(cfg)

    def pipeline(*arguments):  # KFP passes the run parameters in the order of its signature
        parameters = dict(zip(signature.parameters, arguments))
        outcome = _with_cluster_settings(record_outcome_op(), b, p.resources, retries=False, cache=False)
        with dsl.ExitHandler(outcome.set_display_name("record-outcome"), name="run"):
            data_args = {key: parameters[key] for key in ("data_repo", "data_rev", "data_uri")}
            data_hash, prepare, train, evaluate = _steps_to_evaluate(b, configs, data_args,
                                                                     {key: parameters[key] for key in RUN_PARAMETERS})
            closed = gate_op(expected_commit=commit, reports=evaluate.outputs["reports"], **{k: parameters[k] for k in gate_parameters()})
            _with_cluster_settings(closed, b, p.resources, retries=False).set_display_name("gate")
            _package_and_deploy(b, closed, data_hash, prepare, train, parameters.get("deploy"))

    summary = "prepare -> train -> evaluate -> gate (conf/gate) -> package" + (" -> deploy" if p.deploy.enabled else "")
    pipeline.__signature__, pipeline.__doc__ = signature, run_parameter_docs(cfg, summary)
    return dsl.pipeline(name=p.name, description=summary)(pipeline)


def sweep_pipeline(cfg: DictConfig, trials: list[tuple[str, DictConfig]], commit: str, data: dict, retries: bool = True):
    """One prepare -> train -> evaluate per (name, config) trial, in parallel; then the best trial by cfg.pipeline.sweep.metric."""
    b, p, sweep = Build(cfg, commit, retries), cfg.pipeline, cfg.pipeline.sweep
    if not trials:
        raise ConfigError("pipeline.sweep.trials is empty: give at least one list of overrides")
    items = [{"name": name, **step_configs(trial_cfg), **{k: OmegaConf.select(trial_cfg, key) for k, key in RUN_PARAMETERS.items()}}
             for name, trial_cfg in trials]

    @dsl.pipeline(name=f"{p.name}-sweep", description=f"one training per override set, best by {sweep.metric}")
    def pipeline(trials: list = items, data_repo: str = data["data_repo"], data_rev: str = data["data_rev"],
                 data_uri: str = data["data_uri"]):
        with dsl.ParallelFor(trials, name="trial") as trial:
            configs = {"prepare": trial.prepare, "train": trial.train, "evaluate": trial.evaluate}
            data_args = {"data_repo": data_repo, "data_rev": data_rev, "data_uri": data_uri}
            *_, evaluate = _steps_to_evaluate(b, configs, data_args, {k: getattr(trial, k) for k in RUN_PARAMETERS})
        best = select_best_op(trials=trials, reports=dsl.Collected(evaluate.outputs["reports"]), metric=sweep.metric, goal=str(sweep.goal))
        _with_cluster_settings(best, b, p.resources, retries=False).set_display_name("select-best")

    return pipeline
