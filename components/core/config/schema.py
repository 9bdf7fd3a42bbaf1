"""The schema of the config: one dataclass per section of conf/, declaring every key, its type
and its valid range or choices, and holding no values (conf/ holds every one).

A key that is not declared here, a value of the wrong type or a choice not offered is rejected
with the full dotted key in the message (validation.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from enum import StrEnum
from typing import Any, get_type_hints

from omegaconf import MISSING

PORT_KEYS = ("inference_port", "management_port", "metrics_port", "grpc_inference_port", "grpc_management_port")


def _setting(low: float | None, high: float | None, low_open: bool = False) -> Any:
    """A config key with no default (conf/ holds every value) and the range its value must lie in."""
    return field(default=MISSING, metadata={"range": (low, high, low_open)})


def at_least(low: float) -> Any:
    return _setting(low, None)


def above(low: float) -> Any:
    return _setting(low, None, low_open=True)


def between(low: float, high: float) -> Any:
    return _setting(low, high)


def threshold(low: float, high: float) -> Any:
    """A gate threshold: `min_<measure>` (the measure must be at least it) or `max_<measure>` (at most it).
    The gate's rules, the KFP run parameters and the docs table are derived from these fields."""
    return field(default=MISSING, metadata={"range": (low, high, False), "threshold": True})


# Choices: a value not offered is rejected as `<key> must be <a>, <b> or <c>, got <value>`.
class DataFormat(StrEnum):
    csv = "csv"
    imagefolder = "imagefolder"


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class NumericsProfile(StrEnum):
    reference = "reference"
    native = "native"


class AttributionMethod(StrEnum):
    integrated_gradients = "integrated_gradients"
    occlusion = "occlusion"


class GateAction(StrEnum):
    block = "block"
    warn = "warn"


class SweepGoal(StrEnum):
    maximize = "maximize"
    minimize = "minimize"


class AccessMode(StrEnum):
    ReadWriteMany = "ReadWriteMany"
    ReadWriteOnce = "ReadWriteOnce"


@dataclass
class SplitConfig:
    val: float = between(0, 0.9)
    test: float = between(0.01, 0.9)


@dataclass
class DataConfig:
    name: str = MISSING
    root: str = MISSING
    format: DataFormat = MISSING
    metadata: str | None = MISSING
    file_column: str = MISSING
    label_column: str = MISSING
    classes: list[str] = MISSING
    sensitive_attributes: list[str] = MISSING
    channels: int = between(1, 3)
    image_size: list[int] = MISSING
    split: SplitConfig = field(default_factory=SplitConfig)
    histogram_bins: int = at_least(2)
    intended_use: str = MISSING
    limitations: list[str] = MISSING
    warn_below: int = at_least(0)


@dataclass
class ModelConfig:
    """What every model has: its name. Settings of one model only are its own subclass in MODEL_SETTINGS."""

    name: str = MISSING


@dataclass
class CnnConfig(ModelConfig):
    width: int = at_least(1)
    dropout: float = between(0, 0.99)


# model.name -> the schema of that model's section; a model with no settings of its own needs no entry.
MODEL_SETTINGS: dict[str, type[ModelConfig]] = {"cnn": CnnConfig}


@dataclass
class TrainConfig:
    epochs: int = at_least(1)
    batch_size: int = at_least(1)
    lr: float = above(0)
    weight_decay: float = at_least(0)
    early_stopping_patience: int = at_least(0)
    balanced_sampling: bool = MISSING
    exclude_groups: list[str] = MISSING
    device: Device = MISSING
    processes: int = at_least(1)
    resume: bool = MISSING


@dataclass
class NumericsConfig:
    profile: NumericsProfile = MISSING
    threads: int = at_least(1)
    metric_tolerance: float = above(0)


@dataclass
class EvaluateConfig:
    sensitive_attributes: list[str] | None = MISSING
    calibration_bins: int = at_least(1)
    bootstrap_samples: int = at_least(1)
    bootstrap_confidence: float = between(0.5, 0.999)
    error_analysis_interactions: int = at_least(0)
    error_analysis_term_plots: int = at_least(0)
    error_analysis_max_images: int = at_least(1)
    attribution_method: AttributionMethod = MISSING
    attribution_samples: int = at_least(0)
    attribution_steps: int = at_least(1)
    occlusion_window: int = at_least(1)


@dataclass
class QualityGate:
    min_accuracy: float = threshold(0, 1)
    min_balanced_accuracy: float = threshold(0, 1)
    max_ece: float = threshold(0, 1)
    min_test_size: int = at_least(1)


@dataclass
class FairnessGate:
    max_accuracy_difference: float = threshold(0, 1)
    min_accuracy_ratio: float = threshold(0, 1)
    max_recall_macro_difference: float = threshold(0, 1)
    max_demographic_parity_difference: float = threshold(0, 1)
    max_equalized_odds_difference: float = threshold(0, 1)
    min_group_size: int = at_least(1)


@dataclass
class GateConfig:
    quality: QualityGate = field(default_factory=QualityGate)
    fairness: FairnessGate = field(default_factory=FairnessGate)
    on_fail: GateAction = MISSING
    on_inconclusive: GateAction = MISSING


@dataclass
class PackageConfig:
    model_name: str = MISSING
    top_k: int = at_least(1)
    opset_version: int = between(18, 23)
    parity_atol: float = above(0)
    smoke_samples: int = at_least(1)


@dataclass
class PredictionLogConfig:
    sample_rate: float = between(0, 1)
    file: str = MISSING
    max_mb: float = above(0)
    backups: int = at_least(1)
    max_queued_lines: int = at_least(1)


@dataclass
class DriftConfig:
    window: int = at_least(1)
    min_samples: int = at_least(1)
    psi_threshold: float = above(0)
    ks_threshold: float = between(0, 1)
    class_psi_threshold: float = above(0)


@dataclass
class ServeConfig:
    host: str = MISSING
    inference_port: int = between(1, 65535)
    management_port: int = between(1, 65535)
    metrics_port: int = between(1, 65535)
    grpc_inference_port: int = between(1, 65535)
    grpc_management_port: int = between(1, 65535)
    state_dir: str = MISSING
    workers: int = at_least(1)
    onnx_threads: int = at_least(0)
    batch_size: int = at_least(1)
    max_batch_delay_ms: int = at_least(0)
    response_timeout_s: int = at_least(1)
    max_request_bytes: int = at_least(1)
    max_image_pixels: int = at_least(1)
    max_instances: int = at_least(1)
    token_expiration_min: float = above(0)
    startup_timeout_s: int = at_least(1)
    error_report_interval_s: float = above(0)
    prediction_log: PredictionLogConfig = field(default_factory=PredictionLogConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)


@dataclass
class PipelineImages:
    cpu_repository: str = MISSING
    gpu_repository: str = MISSING
    pull_policy: str = MISSING
    pull_secrets: list[str] = MISSING


@dataclass
class PipelineResources:
    cpu_request: str = MISSING
    cpu_limit: str = MISSING
    memory_request: str = MISSING
    memory_limit: str = MISSING
    timeout_s: int = at_least(1)


@dataclass
class Toleration:
    key: str = MISSING
    operator: str = MISSING
    value: str | None = None  # optional Kubernetes fields: absent means unset
    effect: str | None = None


@dataclass
class PipelineTrainResources(PipelineResources):
    accelerator_type: str = MISSING
    accelerator_count: int = at_least(0)
    node_selector: dict[str, str] = MISSING
    tolerations: list[Toleration] = MISSING
    shm_size: str = MISSING
    nodes: int = at_least(1)
    trainer_runtime: str = MISSING
    trainer_timeout_s: int = at_least(1)
    trainer_poll_s: int = at_least(1)


@dataclass
class PipelineRetry:
    num_retries: int = at_least(0)
    backoff_duration: str = MISSING
    backoff_factor: float = at_least(1)
    backoff_max_duration: str = MISSING


@dataclass
class SecretEnv:
    name: str = MISSING
    env: dict[str, str] = MISSING
    optional_env: dict[str, str] = MISSING


@dataclass
class PipelineData:
    repo: str = MISSING
    rev: str = MISSING
    uri: str = MISSING
    git_secret: str = MISSING


@dataclass
class PipelineDeploy:
    enabled: bool = MISSING
    management_url: str = MISSING
    inference_url: str = MISSING
    model_store_pvc: str = MISSING
    volume_path: str = MISSING
    model_store: str = MISSING
    key_file: str = MISSING
    storage_class: str = MISSING
    access_mode: AccessMode = MISSING
    storage_size: str = MISSING
    node_selector: dict[str, str] = MISSING
    run_as_user: int = at_least(0)


@dataclass
class PipelineSubmit:
    host: str = MISSING
    namespace: str = MISSING
    experiment: str = MISSING
    token_env: str = MISSING
    token_file: str = MISSING


@dataclass
class PipelineSweep:
    trials: list[list[str]] = MISSING
    metric: str = MISSING
    goal: SweepGoal = MISSING


@dataclass
class PipelineConfig:
    name: str = MISSING
    image: PipelineImages = field(default_factory=PipelineImages)
    resources: PipelineResources = field(default_factory=PipelineResources)
    train: PipelineTrainResources = field(default_factory=PipelineTrainResources)
    retry: PipelineRetry = field(default_factory=PipelineRetry)
    caching: bool = MISSING
    s3_secret: SecretEnv = field(default_factory=SecretEnv)
    artifact_secret: SecretEnv = field(default_factory=SecretEnv)
    data: PipelineData = field(default_factory=PipelineData)
    deploy: PipelineDeploy = field(default_factory=PipelineDeploy)
    submit: PipelineSubmit = field(default_factory=PipelineSubmit)
    sweep: PipelineSweep = field(default_factory=PipelineSweep)


@dataclass
class RegistryConfig:
    stages: list[str] = MISSING
    gated_stages: list[str] = MISSING


@dataclass
class EventsConfig:
    log_file: str = MISSING
    webhooks: list[str] = MISSING
    timeout_s: float = above(0)
    allow_loopback: bool = MISSING
    allow_private: bool = MISSING


@dataclass
class ScoreConfig:
    input: str = MISSING
    extensions: list[str] = MISSING
    workers: int = at_least(0)
    chunk_size: int = at_least(1)


@dataclass
class Config:
    seed: int = at_least(0)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    numerics: NumericsConfig = field(default_factory=NumericsConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    package: PackageConfig = field(default_factory=PackageConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)


def threshold_rules(section: type) -> dict[str, tuple[str, str]]:
    """measure -> (key, rule) of a gate section's thresholds: `min_accuracy` is ("accuracy", ("min_accuracy", ">="))."""
    rule = {"min": ">=", "max": "<="}
    return {f.name.split("_", 1)[1]: (f.name, rule[f.name.split("_", 1)[0]]) for f in fields(section) if f.metadata.get("threshold")}


def gate_parameters(section: type | None = None, prefix: str = "gate.") -> dict[str, tuple[str, type]]:
    """Every key of the gate policy as a typed run parameter: its last name -> (dotted key, int/float/str)."""
    hints, found = get_type_hints(section or GateConfig), {}
    for f in fields(section or GateConfig):
        if is_dataclass(f.default_factory):
            found |= gate_parameters(f.default_factory, f"{prefix}{f.name}.")
        else:
            found[f.name] = (prefix + f.name, str if issubclass(hints[f.name], StrEnum) else hints[f.name])
    return found
