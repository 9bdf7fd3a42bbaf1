"""The pipeline graphs, built from a composed config: the training pipeline (prepare ->
train -> evaluate -> gate -> package -> deploy, inside an exit handler) and the sweep
(prepare -> train -> evaluate per trial in a ParallelFor, then the best trial).

Everything the cluster needs (images, resources, GPU, node selector, tolerations, retries,
caching, secrets) comes from `cfg.pipeline` and is written into the compiled spec.
"""

# No `from __future__ import annotations`: KFP reads the pipelines' real annotation objects.
import json

from kfp import dsl, kubernetes
from kfp.dsl import PipelineTask
from omegaconf import DictConfig, OmegaConf

from components.core.errors import ConfigError
from components.core.lineage import DATA_HASH_ENV, data_hash
from pipelines.trainjob import trainjob_op
from pipelines.wrappers import (INFERENCE_TOKEN_ENV, MANAGEMENT_TOKEN_ENV, deploy_op, evaluate_op, gate_closed_op,
                                  package_op, prepare_op, record_outcome_op, select_best_op, train_op)


def config_json(cfg: DictConfig) -> str:
    return json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True)


def _with_cluster_settings(task: PipelineTask, p: DictConfig, resources: DictConfig, image: str, retries: bool, cache: bool = True) -> PipelineTask:
    task.set_container_image(image)
    task.set_env_variable(DATA_HASH_ENV, data_hash())  # the image holds no data.dvc of the run's revision
    kubernetes.set_image_pull_policy(task, p.image.pull_policy)
    task.set_cpu_request(resources.cpu_request).set_cpu_limit(resources.cpu_limit)
    task.set_memory_request(resources.memory_request).set_memory_limit(resources.memory_limit)
    task.set_caching_options(cache and p.caching)
    if retries and p.retry.num_retries > 0:
        r = p.retry
        task.set_retry(r.num_retries, r.backoff_duration, r.backoff_factor, r.backoff_max_duration)
    return task


def _on_gpu_nodes(task: PipelineTask, t: DictConfig) -> PipelineTask:
    if t.accelerator_count > 0:
        task.set_accelerator_type(t.accelerator_type).set_accelerator_limit(t.accelerator_count)
    for label, value in t.node_selector.items():
        kubernetes.add_node_selector(task, label, value)
    for toleration in t.tolerations:
        kubernetes.add_toleration(task, toleration.key, toleration.operator, toleration.value, toleration.effect)
    return task


def _steps_to_evaluate(cfg: DictConfig, config: str, data_repo: str, data_rev: str, data_uri: str, retries: bool):
    p = cfg.pipeline
    gpu = p.train.accelerator_count > 0
    prepare = _with_cluster_settings(prepare_op(config=config, data_repo=data_repo, data_rev=data_rev, data_uri=data_uri),
                          p, p.resources, p.image.cpu, retries).set_display_name("prepare")
    if p.s3_secret.name:
        kubernetes.use_secret_as_env(prepare, p.s3_secret.name, dict(p.s3_secret.env))
    if p.train.nodes > 1:  # Kubeflow Trainer trains on the GPU nodes; this task only creates and awaits the TrainJob
        train = _with_cluster_settings(trainjob_op(config=config, prepared=prepare.outputs["prepared"]), p, p.resources,
                                       p.image.cpu, retries).set_display_name("train")
        if p.s3_secret.name:  # it reads the job's outputs from the artifact store
            kubernetes.use_secret_as_env(train, p.s3_secret.name, dict(p.s3_secret.env))
    else:
        train = _with_cluster_settings(train_op(config=config, prepared=prepare.outputs["prepared"]), p, p.train,
                            p.image.gpu if gpu else p.image.cpu, retries).set_display_name("train")
        _on_gpu_nodes(train, p.train)
    evaluate = _with_cluster_settings(evaluate_op(config=config, prepared=prepare.outputs["prepared"], model=train.outputs["model"]),
                           p, p.resources, p.image.cpu, retries).set_display_name("evaluate")
    return prepare, train, evaluate


def _gate_closed(cfg: DictConfig, reason: str, evaluate: PipelineTask) -> None:
    task = gate_closed_op(reason=reason, accuracy=evaluate.outputs["accuracy"],
                          fairness_violations=evaluate.outputs["fairness_violations"])
    p = cfg.pipeline
    _with_cluster_settings(task, p, p.resources, p.image.cpu, retries=False, cache=False).set_display_name("gate-closed")


def _package_and_deploy(cfg: DictConfig, config: str, prepare: PipelineTask, train: PipelineTask, retries: bool) -> None:
    p, d = cfg.pipeline, cfg.pipeline.deploy
    package = _with_cluster_settings(package_op(config=config, prepared=prepare.outputs["prepared"], model=train.outputs["model"]),
                          p, p.resources, p.image.cpu, retries).set_display_name("package")
    deploy = deploy_op(config=config, package=package.outputs["package"], version=package.outputs["version"],
                       mar_file=package.outputs["mar_file"], management_url=d.management_url, inference_url=d.inference_url,
                       model_store=d.model_store if d.model_store_pvc else "")
    # Deploying is a side effect: never cached, never retried blindly (deploy rolls back itself).
    _with_cluster_settings(deploy, p, p.resources, p.image.cpu, retries=False, cache=False).set_display_name("deploy")
    if d.token_secret:
        kubernetes.use_secret_as_env(deploy, d.token_secret, {"management": MANAGEMENT_TOKEN_ENV, "inference": INFERENCE_TOKEN_ENV})
    if d.model_store_pvc:
        kubernetes.mount_pvc(deploy, d.model_store_pvc, d.model_store)


def training_pipeline(cfg: DictConfig, retries: bool = True):
    """prepare -> train -> evaluate -> gate -> package -> deploy, with an exit handler recording the outcome."""
    p, gate = cfg.pipeline, cfg.pipeline.gate

    @dsl.pipeline(name=p.name, description="prepare -> train -> evaluate -> fairness/quality gate -> package -> deploy")
    def pipeline(config: str = config_json(cfg), data_repo: str = p.data.repo, data_rev: str = p.data.rev,
                 data_uri: str = p.data.uri):
        outcome = _with_cluster_settings(record_outcome_op(), p, p.resources, p.image.cpu, retries=False, cache=False)
        with dsl.ExitHandler(outcome.set_display_name("record-outcome"), name="run"):
            prepare, train, evaluate = _steps_to_evaluate(cfg, config, data_repo, data_rev, data_uri, retries)
            accuracy_too_low = evaluate.outputs["accuracy"] < gate.min_accuracy
            quality_reason = f"test accuracy below pipeline.gate.min_accuracy={gate.min_accuracy}"
            if gate.require_fairness:
                with dsl.If(evaluate.outputs["fairness_passed"] == False, name="fairness-gate-closed"):  # noqa: E712 (a KFP condition)
                    _gate_closed(cfg, "a fairness check failed", evaluate)
                with dsl.Elif(accuracy_too_low, name="quality-gate-closed"):
                    _gate_closed(cfg, quality_reason, evaluate)
            else:
                with dsl.If(accuracy_too_low, name="quality-gate-closed"):
                    _gate_closed(cfg, quality_reason, evaluate)
            with dsl.Else(name="gate-open"):
                _package_and_deploy(cfg, config, prepare, train, retries)

    return pipeline


def sweep_pipeline(cfg: DictConfig, trials: list[tuple[str, DictConfig]], retries: bool = True):
    """One prepare -> train -> evaluate per (name, config) trial, in parallel; then the best trial by cfg.pipeline.sweep.metric."""
    p, sweep = cfg.pipeline, cfg.pipeline.sweep
    if sweep.goal not in ("maximize", "minimize"):
        raise ConfigError(f"pipeline.sweep.goal must be maximize or minimize, got {sweep.goal!r}")
    if not trials:
        raise ConfigError("pipeline.sweep.trials is empty: give at least one list of overrides")
    items = [{"name": name, "config": config_json(trial_cfg)} for name, trial_cfg in trials]

    @dsl.pipeline(name=f"{p.name}-sweep", description=f"one training per override set, best by {sweep.metric}")
    def pipeline(trials: list = items, data_repo: str = p.data.repo, data_rev: str = p.data.rev, data_uri: str = p.data.uri):
        with dsl.ParallelFor(trials, name="trial") as trial:
            _, _, evaluate = _steps_to_evaluate(cfg, trial.config, data_repo, data_rev, data_uri, retries)
        best = select_best_op(trials=trials, reports=dsl.Collected(evaluate.outputs["reports"]), metric=sweep.metric, goal=sweep.goal)
        _with_cluster_settings(best, p, p.resources, p.image.cpu, retries=False).set_display_name("select-best")

    return pipeline
