"""Typed view of the Hydra config in conf/ (and of params.yaml, which is generated from it).

The dataclasses are the schema: a key that is not declared here, or a value of the wrong
type, is rejected with the full dotted key in the message.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from components.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
PARAMS_FILE = ROOT / "params.yaml"
PORT_KEYS = ("inference_port", "management_port", "metrics_port", "grpc_inference_port", "grpc_management_port")


@dataclass
class SplitConfig:
    val: float = 0.15
    test: float = 0.15


@dataclass
class DataConfig:
    root: str = "data"
    format: str = "csv"
    metadata: str | None = "metadata.csv"
    file_column: str = "file"
    label_column: str = "label"
    classes: list[str] = field(default_factory=list)
    sensitive_attributes: list[str] = field(default_factory=list)
    channels: int = 1
    image_size: list[int] = field(default_factory=lambda: [32, 32])
    split: SplitConfig = field(default_factory=SplitConfig)
    histogram_bins: int = 20


@dataclass
class ModelConfig:
    name: str = "cnn"
    width: int = 32
    dropout: float = 0.25


@dataclass
class TrainConfig:
    epochs: int = 15
    batch_size: int = 64
    lr: float = 0.002
    weight_decay: float = 0.0001
    early_stopping_patience: int = 4
    balanced_sampling: bool = False
    device: str = "auto"
    num_threads: int = 0
    resume: bool = False


@dataclass
class FairnessThresholds:
    max_accuracy_difference: float = 0.05
    min_accuracy_ratio: float = 0.95
    max_recall_macro_difference: float = 0.05
    max_demographic_parity_difference: float = 0.05
    max_equalized_odds_difference: float = 0.10


@dataclass
class EvaluateConfig:
    sensitive_attributes: list[str] | None = None
    calibration_bins: int = 10
    thresholds: FairnessThresholds = field(default_factory=FairnessThresholds)
    fail_on_violation: bool = False
    bootstrap_samples: int = 1000
    bootstrap_confidence: float = 0.95
    error_analysis_interactions: int = 0
    error_analysis_term_plots: int = 4
    attribution_method: str = "integrated_gradients"
    attribution_samples: int = 16
    attribution_steps: int = 32
    occlusion_window: int = 4
    intended_use: str = ""
    limitations: list[str] = field(default_factory=list)


@dataclass
class PackageConfig:
    model_name: str = "digits"
    top_k: int = 3
    opset_version: int = 18
    parity_atol: float = 1e-4
    smoke_samples: int = 8


@dataclass
class PredictionLogConfig:
    sample_rate: float = 0.1
    file: str = "logs/predictions.jsonl"
    max_mb: float = 100.0
    backups: int = 5


@dataclass
class DriftConfig:
    window: int = 1000
    min_samples: int = 200
    psi_threshold: float = 0.2
    ks_threshold: float = 0.2
    class_psi_threshold: float = 0.2


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    inference_port: int = 8080
    management_port: int = 8081
    metrics_port: int = 8082
    grpc_inference_port: int = 7070
    grpc_management_port: int = 7071
    state_dir: str = ".serve"
    workers: int = 1
    onnx_threads: int = 1
    batch_size: int = 2
    max_batch_delay_ms: int = 0
    response_timeout_s: int = 30
    max_request_bytes: int = 1048576
    max_image_pixels: int = 1000000
    token_expiration_min: float = 1440
    startup_timeout_s: int = 120
    prediction_log: PredictionLogConfig = field(default_factory=PredictionLogConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)


@dataclass
class PipelineImages:
    cpu: str = "kfp-dvc-template:latest"
    gpu: str = "kfp-dvc-template-gpu:latest"
    pull_policy: str = "IfNotPresent"


@dataclass
class PipelineResources:
    cpu_request: str = "1"
    cpu_limit: str = "2"
    memory_request: str = "2G"
    memory_limit: str = "4G"


@dataclass
class Toleration:
    key: str = ""
    operator: str = "Exists"
    value: str | None = None
    effect: str | None = None


@dataclass
class PipelineTrainResources(PipelineResources):
    accelerator_type: str = "nvidia.com/gpu"
    accelerator_count: int = 1
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[Toleration] = field(default_factory=list)


@dataclass
class PipelineRetry:
    num_retries: int = 2
    backoff_duration: str = "60s"
    backoff_factor: float = 2.0
    backoff_max_duration: str = "3600s"


@dataclass
class SecretEnv:
    name: str = ""
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class PipelineData:
    repo: str = ""
    rev: str = ""
    uri: str = ""


@dataclass
class PipelineGate:
    require_fairness: bool = True
    min_accuracy: float = 0.0


@dataclass
class PipelineDeploy:
    management_url: str = ""
    inference_url: str = ""
    model_store_pvc: str = ""
    model_store: str = "/mnt/model-store"
    token_secret: str = ""


@dataclass
class PipelineSubmit:
    host: str = ""
    namespace: str = "kubeflow"
    experiment: str = "kfp-dvc-template"
    token_env: str = "KF_PIPELINES_TOKEN"
    token_file: str = ""


@dataclass
class PipelineSweep:
    trials: list[list[str]] = field(default_factory=list)
    metric: str = "accuracy"
    goal: str = "maximize"


@dataclass
class PipelineConfig:
    name: str = "kfp-dvc-template"
    image: PipelineImages = field(default_factory=PipelineImages)
    resources: PipelineResources = field(default_factory=PipelineResources)
    train: PipelineTrainResources = field(default_factory=PipelineTrainResources)
    retry: PipelineRetry = field(default_factory=PipelineRetry)
    caching: bool = True
    s3_secret: SecretEnv = field(default_factory=SecretEnv)
    data: PipelineData = field(default_factory=PipelineData)
    gate: PipelineGate = field(default_factory=PipelineGate)
    deploy: PipelineDeploy = field(default_factory=PipelineDeploy)
    submit: PipelineSubmit = field(default_factory=PipelineSubmit)
    sweep: PipelineSweep = field(default_factory=PipelineSweep)


@dataclass
class GatesConfig:
    min_accuracy: float = 0.95
    min_balanced_accuracy: float = 0.95
    max_ece: float = 0.05
    require_fairness_pass: bool = True


@dataclass
class RegistryConfig:
    stages: list[str] = field(default_factory=lambda: ["staging", "prod"])
    gated_stages: list[str] = field(default_factory=lambda: ["prod"])
    gates: GatesConfig = field(default_factory=GatesConfig)


@dataclass
class Config:
    seed: int = 42
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    package: PackageConfig = field(default_factory=PackageConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)


def _check(cfg: DictConfig) -> None:
    d, t = cfg.data, cfg.train
    problems = []
    if d.format not in ("csv", "imagefolder"):
        problems.append(f"data.format must be 'csv' or 'imagefolder', got {d.format!r}")
    if d.format == "csv" and not d.metadata:
        problems.append("data.metadata is required when data.format is 'csv'")
    if d.channels not in (1, 3):
        problems.append(f"data.channels must be 1 or 3, got {d.channels}")
    if len(d.image_size) != 2 or min(d.image_size) < 1:
        problems.append(f"data.image_size must be [height, width], got {list(d.image_size)}")
    if len(set(d.classes)) != len(d.classes) or len(d.classes) < 2:
        problems.append("data.classes must list at least two distinct class names")
    if not (0 <= d.split.val < 1 and 0 < d.split.test < 1 and d.split.val + d.split.test < 1):
        problems.append("data.split.val and data.split.test must be fractions that sum below 1")
    if t.device not in ("auto", "cpu", "cuda"):
        problems.append(f"train.device must be auto, cpu or cuda, got {t.device!r}")
    for key in ("epochs", "batch_size"):
        if t[key] < 1:
            problems.append(f"train.{key} must be at least 1, got {t[key]}")
    problems += _evaluate_problems(cfg.evaluate)
    problems += _package_and_serve_problems(cfg.package, cfg.serve)
    if problems:
        raise ConfigError("; ".join(problems))


def _package_and_serve_problems(p: DictConfig, s: DictConfig) -> list[str]:
    problems = []
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", p.model_name):
        problems.append(f"package.model_name must be letters, digits, '_' or '-', got {p.model_name!r}")
    for key, low in (("top_k", 1), ("smoke_samples", 1)):
        if p[key] < low:
            problems.append(f"package.{key} must be at least {low}, got {p[key]}")
    if p.parity_atol <= 0:
        problems.append(f"package.parity_atol must be positive, got {p.parity_atol}")
    try:
        loopback = ipaddress.ip_address(s.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        problems.append(f"serve.host must be a loopback IP address (e.g. 127.0.0.1), got {s.host!r}")
    ports = [s[k] for k in PORT_KEYS]
    if len(set(ports)) != len(ports) or not all(1 <= port <= 65535 for port in ports):
        problems.append(f"serve ports {', '.join(PORT_KEYS)} must be distinct numbers in 1-65535, got {ports}")
    for key in ("workers", "batch_size", "max_request_bytes", "max_image_pixels"):
        if s[key] < 1:
            problems.append(f"serve.{key} must be at least 1, got {s[key]}")
    if s.token_expiration_min <= 0:
        problems.append(f"serve.token_expiration_min must be positive, got {s.token_expiration_min}")
    if s.max_batch_delay_ms < 0:
        problems.append(f"serve.max_batch_delay_ms must be 0 or more, got {s.max_batch_delay_ms}")
    if not 0 <= s.prediction_log.sample_rate <= 1:
        problems.append(f"serve.prediction_log.sample_rate must be in [0, 1], got {s.prediction_log.sample_rate}")
    if s.prediction_log.max_mb <= 0 or s.prediction_log.backups < 1:
        problems.append("serve.prediction_log.max_mb must be positive and serve.prediction_log.backups at least 1, "
                        f"got {s.prediction_log.max_mb} and {s.prediction_log.backups}")
    if not 1 <= s.drift.min_samples <= s.drift.window:
        problems.append("serve.drift.min_samples must be between 1 and serve.drift.window")
    return problems


def _evaluate_problems(e: DictConfig) -> list[str]:
    problems = []
    if e.attribution_method not in ("integrated_gradients", "occlusion"):
        problems.append(f"evaluate.attribution_method must be integrated_gradients or occlusion, got {e.attribution_method!r}")
    if not 0 < e.bootstrap_confidence < 1:
        problems.append(f"evaluate.bootstrap_confidence must be a fraction between 0 and 1, got {e.bootstrap_confidence}")
    for key in ("calibration_bins", "bootstrap_samples", "attribution_steps", "occlusion_window"):
        if e[key] < 1:
            problems.append(f"evaluate.{key} must be at least 1, got {e[key]}")
    for key in ("attribution_samples", "error_analysis_interactions", "error_analysis_term_plots"):
        if e[key] < 0:
            problems.append(f"evaluate.{key} must not be negative, got {e[key]}")
    return problems


def validate(raw: Any, source: str) -> DictConfig:
    """Merge raw config onto the schema; unknown keys and wrong types raise ConfigError."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), raw)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"{source}: {reason}" + (f" (key: {key})" if key else "")) from None
    _check(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def load_config(params_file: str | os.PathLike = PARAMS_FILE, overrides: list[str] = ()) -> DictConfig:
    """Load params.yaml (plus `key=value` overrides) and validate it against the schema."""
    path = Path(params_file)
    if not path.exists():
        raise ConfigError(f"{path}: not found (run `make params` to generate it from conf/)")
    raw = OmegaConf.load(path)
    if overrides:
        try:
            raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"overrides {list(overrides)}: {exc}") from None
    return validate(raw, str(path))


def compose(overrides: list[str] = ()) -> DictConfig:
    """Compose conf/ with Hydra overrides exactly as `dvc exp run -S` does, then validate."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        _compose_to(out, overrides)
        return validate(OmegaConf.load(out), "conf/")


def _compose_to(out: Path, overrides: list[str]) -> None:
    from dvc.utils.hydra import compose_and_dump
    from hydra.errors import HydraException

    try:
        compose_and_dump(out, str(CONF_DIR), None, "config", str(ROOT / ".dvc" / "hydra_plugins"), list(overrides))
    except HydraException as exc:
        raise ConfigError(f"conf/: {exc}") from None


def write_params(overrides: list[str] = (), params_file: Path = PARAMS_FILE) -> bool:
    """Regenerate params.yaml from conf/; returns True when the file changed."""
    with tempfile.TemporaryDirectory(dir=params_file.parent) as tmp:
        out = Path(tmp) / "params.yaml"
        _compose_to(out, overrides)
        validate(OmegaConf.load(out), "conf/")
        new = out.read_bytes()
        if params_file.exists() and params_file.read_bytes() == new:
            return False
        os.replace(out, params_file)
        return True


def config_hash(cfg: DictConfig) -> str:
    """Hash of the resolved config, stable across key order and formatting."""
    blob = json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


if __name__ == "__main__":
    import argparse

    from components.errors import run_cli

    parser = argparse.ArgumentParser(description="Regenerate params.yaml from conf/.")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.lr=0.01")

    def _main() -> None:
        args = parser.parse_args()
        changed = write_params(args.overrides)
        print(f"params.yaml {'regenerated' if changed else 'already up to date'} from conf/")

    run_cli(_main)
