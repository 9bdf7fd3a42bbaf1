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

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from components.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"
PARAMS_FILE = ROOT / "params.yaml"
PORT_KEYS = ("inference_port", "management_port", "metrics_port", "grpc_inference_port", "grpc_management_port")


@dataclass
class SplitConfig:
    val: float = MISSING
    test: float = MISSING


@dataclass
class DataConfig:
    root: str = MISSING
    format: str = MISSING
    metadata: str | None = MISSING
    file_column: str = MISSING
    label_column: str = MISSING
    classes: list[str] = MISSING
    sensitive_attributes: list[str] = MISSING
    channels: int = MISSING
    image_size: list[int] = MISSING
    split: SplitConfig = field(default_factory=SplitConfig)
    histogram_bins: int = MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    width: int = MISSING
    dropout: float = MISSING


@dataclass
class TrainConfig:
    epochs: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    early_stopping_patience: int = MISSING
    balanced_sampling: bool = MISSING
    device: str = MISSING
    num_threads: int = MISSING
    resume: bool = MISSING


@dataclass
class FairnessThresholds:
    max_accuracy_difference: float = MISSING
    min_accuracy_ratio: float = MISSING
    max_recall_macro_difference: float = MISSING
    max_demographic_parity_difference: float = MISSING
    max_equalized_odds_difference: float = MISSING


@dataclass
class EvaluateConfig:
    sensitive_attributes: list[str] | None = MISSING
    calibration_bins: int = MISSING
    thresholds: FairnessThresholds = field(default_factory=FairnessThresholds)
    fail_on_violation: bool = MISSING
    bootstrap_samples: int = MISSING
    bootstrap_confidence: float = MISSING
    error_analysis_interactions: int = MISSING
    error_analysis_term_plots: int = MISSING
    attribution_method: str = MISSING
    attribution_samples: int = MISSING
    attribution_steps: int = MISSING
    occlusion_window: int = MISSING
    intended_use: str = MISSING
    limitations: list[str] = MISSING


@dataclass
class PackageConfig:
    model_name: str = MISSING
    top_k: int = MISSING
    opset_version: int = MISSING
    parity_atol: float = MISSING
    smoke_samples: int = MISSING


@dataclass
class PredictionLogConfig:
    sample_rate: float = MISSING
    file: str = MISSING
    max_mb: float = MISSING
    backups: int = MISSING


@dataclass
class DriftConfig:
    window: int = MISSING
    min_samples: int = MISSING
    psi_threshold: float = MISSING
    ks_threshold: float = MISSING
    class_psi_threshold: float = MISSING


@dataclass
class ServeConfig:
    host: str = MISSING
    inference_port: int = MISSING
    management_port: int = MISSING
    metrics_port: int = MISSING
    grpc_inference_port: int = MISSING
    grpc_management_port: int = MISSING
    state_dir: str = MISSING
    workers: int = MISSING
    onnx_threads: int = MISSING
    batch_size: int = MISSING
    max_batch_delay_ms: int = MISSING
    response_timeout_s: int = MISSING
    max_request_bytes: int = MISSING
    token_expiration_min: int = MISSING
    startup_timeout_s: int = MISSING
    prediction_log: PredictionLogConfig = field(default_factory=PredictionLogConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)


@dataclass
class PipelineImages:
    cpu: str = MISSING
    gpu: str = MISSING
    pull_policy: str = MISSING


@dataclass
class PipelineResources:
    cpu_request: str = MISSING
    cpu_limit: str = MISSING
    memory_request: str = MISSING
    memory_limit: str = MISSING


@dataclass
class Toleration:
    key: str = MISSING
    operator: str = MISSING
    value: str | None = None  # optional Kubernetes fields: absent means unset
    effect: str | None = None


@dataclass
class PipelineTrainResources(PipelineResources):
    accelerator_type: str = MISSING
    accelerator_count: int = MISSING
    node_selector: dict[str, str] = MISSING
    tolerations: list[Toleration] = MISSING
    nodes: int = MISSING
    trainer_runtime: str = MISSING
    trainer_timeout_s: int = MISSING
    trainer_poll_s: int = MISSING


@dataclass
class PipelineRetry:
    num_retries: int = MISSING
    backoff_duration: str = MISSING
    backoff_factor: float = MISSING
    backoff_max_duration: str = MISSING


@dataclass
class SecretEnv:
    name: str = MISSING
    env: dict[str, str] = MISSING


@dataclass
class PipelineData:
    repo: str = MISSING
    rev: str = MISSING
    uri: str = MISSING


@dataclass
class PipelineGate:
    require_fairness: bool = MISSING
    min_accuracy: float = MISSING


@dataclass
class PipelineDeploy:
    management_url: str = MISSING
    inference_url: str = MISSING
    model_store_pvc: str = MISSING
    model_store: str = MISSING
    token_secret: str = MISSING


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
    goal: str = MISSING


@dataclass
class PipelineConfig:
    name: str = MISSING
    image: PipelineImages = field(default_factory=PipelineImages)
    resources: PipelineResources = field(default_factory=PipelineResources)
    train: PipelineTrainResources = field(default_factory=PipelineTrainResources)
    retry: PipelineRetry = field(default_factory=PipelineRetry)
    caching: bool = MISSING
    s3_secret: SecretEnv = field(default_factory=SecretEnv)
    data: PipelineData = field(default_factory=PipelineData)
    gate: PipelineGate = field(default_factory=PipelineGate)
    deploy: PipelineDeploy = field(default_factory=PipelineDeploy)
    submit: PipelineSubmit = field(default_factory=PipelineSubmit)
    sweep: PipelineSweep = field(default_factory=PipelineSweep)


@dataclass
class GatesConfig:
    min_accuracy: float = MISSING
    min_balanced_accuracy: float = MISSING
    max_ece: float = MISSING
    require_fairness_pass: bool = MISSING


@dataclass
class RegistryConfig:
    stages: list[str] = MISSING
    gated_stages: list[str] = MISSING
    gates: GatesConfig = field(default_factory=GatesConfig)


@dataclass
class Config:
    seed: int = MISSING
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
    pt = cfg.pipeline.train
    for key in ("nodes", "trainer_timeout_s", "trainer_poll_s"):
        if pt[key] < 1:
            problems.append(f"pipeline.train.{key} must be at least 1, got {pt[key]}")
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
    for key in ("workers", "batch_size", "max_request_bytes", "token_expiration_min"):
        if s[key] < 1:
            problems.append(f"serve.{key} must be at least 1, got {s[key]}")
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
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{source}: no value for {', '.join(missing)} (every key needs one in conf/)")
    _check(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def load_config(params_file: str | os.PathLike = PARAMS_FILE, overrides: list[str] = ()) -> DictConfig:
    """The config a step runs with: params.yaml as DVC wrote it, or, given Hydra overrides,
    conf/ composed with them exactly as `dvc exp run -S` does (keys, group choices such as
    `model=resnet18`, presets such as `experiment=quick`)."""
    if overrides:
        return compose(list(overrides))
    path = Path(params_file)
    if not path.exists():
        raise ConfigError(f"{path}: not found (run `make params` to generate it from conf/)")
    return validate(OmegaConf.load(path), str(path))


def compose(overrides: list[str] = ()) -> DictConfig:
    """Compose conf/ with Hydra overrides exactly as `dvc exp run -S` does, then validate."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        _compose_to(out, overrides)
        source = f"command-line overrides {list(overrides)}" if overrides else "conf/"
        return validate(OmegaConf.load(out), source)


def _compose_to(out: Path, overrides: list[str]) -> None:
    from dvc.utils.hydra import compose_and_dump
    from hydra.errors import HydraException

    try:
        compose_and_dump(out, str(CONF_DIR), None, "config", str(ROOT / ".dvc" / "hydra_plugins"), list(overrides))
    except HydraException as exc:
        source = f"command-line overrides {list(overrides)}" if overrides else "conf/"
        raise ConfigError(f"{source}: {exc}") from None


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


def stale_keys(params_file: Path = PARAMS_FILE) -> list[str]:
    """Keys whose value in params.yaml differs from conf/ (as `key: params.yaml value -> conf/ value`)."""
    fresh = _flat(OmegaConf.to_container(compose([])))
    current = _flat(OmegaConf.to_container(validate(OmegaConf.load(params_file), str(params_file)))) if params_file.exists() else {}
    return [f"{key}: {current.get(key, '(absent)')!r} -> {fresh.get(key, '(absent)')!r}"
            for key in sorted(fresh.keys() | current.keys()) if fresh.get(key, MISSING) != current.get(key, MISSING)]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()} if tree else {prefix: {}}


def check_params(params_file: Path = PARAMS_FILE) -> None:
    """Refuse a params.yaml that conf/ no longer matches (plain `dvc repro` never recomposes it).
    Under `dvc exp run`, DVC has just composed params.yaml from conf/ and the -S overrides."""
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        return
    stale = stale_keys(params_file)
    if stale:
        raise ConfigError(f"{params_file.name} is stale: conf/ changed {len(stale)} key(s) since it was generated "
                          f"({'; '.join(stale[:10])}{'; ...' if len(stale) > 10 else ''}). "
                          "Run `make params` (then `dvc repro`), or `dvc exp run`, which composes conf/ itself.")


def select(cfg: DictConfig, sections: tuple[str, ...]) -> DictConfig:
    """Only the config sections a step reads (`seed`, `data`, `train.device`, ...): reading any other
    key fails, so a step's declared sections are exactly what it depends on."""
    view = OmegaConf.create({})
    for dotted in sections:
        OmegaConf.update(view, dotted, OmegaConf.select(cfg, dotted), force_add=True)
    OmegaConf.set_readonly(view, True)
    return view


def config_hash(cfg: DictConfig) -> str:
    """Hash of the resolved config, stable across key order and formatting."""
    blob = json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


if __name__ == "__main__":
    import argparse

    from components.core.errors import run_cli

    parser = argparse.ArgumentParser(description="params.yaml from conf/: regenerate it, or check that it is current.")
    parser.add_argument("command", nargs="?", choices=["write", "check"], default="write")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for `write`, e.g. train.lr=0.01")

    def _main() -> None:
        args = parser.parse_args()
        if args.command == "check":
            check_params()
            print("params.yaml matches conf/")
        else:
            changed = write_params(args.overrides)
            print(f"params.yaml {'regenerated' if changed else 'already up to date'} from conf/")

    run_cli(_main)
