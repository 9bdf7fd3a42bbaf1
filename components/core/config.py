"""Typed view of the Hydra config in conf/ (and of params.yaml, which is generated from it, as are the
model artifact's declarations in artifacts.yaml and dvc.yaml).

The dataclasses are the schema: a key that is not declared here, or a value of the wrong
type, is rejected with the full dotted key in the message.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import json
import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from components.core.errors import ConfigError
from components.core.io import write_bytes_atomic

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"
PARAMS_FILE = ROOT / "params.yaml"
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


@dataclass
class SplitConfig:
    val: float = between(0, 0.9)
    test: float = between(0.01, 0.9)


@dataclass
class DataConfig:
    name: str = MISSING
    root: str = MISSING
    format: str = MISSING
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
    name: str = MISSING
    width: int = at_least(1)
    dropout: float = between(0, 0.99)


@dataclass
class TrainConfig:
    epochs: int = at_least(1)
    batch_size: int = at_least(1)
    lr: float = above(0)
    weight_decay: float = at_least(0)
    early_stopping_patience: int = at_least(0)
    balanced_sampling: bool = MISSING
    exclude_groups: list[str] = MISSING
    device: str = MISSING
    processes: int = at_least(1)
    resume: bool = MISSING


@dataclass
class NumericsConfig:
    profile: str = MISSING
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
    attribution_method: str = MISSING
    attribution_samples: int = at_least(0)
    attribution_steps: int = at_least(1)
    occlusion_window: int = at_least(1)


@dataclass
class QualityGate:
    min_accuracy: float = between(0, 1)
    min_balanced_accuracy: float = between(0, 1)
    max_ece: float = between(0, 1)


@dataclass
class FairnessGate:
    max_accuracy_difference: float = between(0, 1)
    min_accuracy_ratio: float = between(0, 1)
    max_recall_macro_difference: float = between(0, 1)
    max_demographic_parity_difference: float = between(0, 1)
    max_equalized_odds_difference: float = between(0, 1)
    min_group_size: int = at_least(1)


@dataclass
class GateConfig:
    quality: QualityGate = field(default_factory=QualityGate)
    fairness: FairnessGate = field(default_factory=FairnessGate)
    on_fail: str = MISSING
    on_inconclusive: str = MISSING


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
    token_expiration_min: float = above(0)
    startup_timeout_s: int = at_least(1)
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
    access_mode: str = MISSING
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


def range_problems(cfg: DictConfig, schema: type = None, prefix: str = "") -> list[str]:
    """Every number outside the range its schema field declares (NaN and infinity never pass)."""
    problems = []
    for f in fields(schema or Config):
        value, key = cfg[f.name], prefix + f.name
        if is_dataclass(f.default_factory):
            problems += range_problems(value, f.default_factory, key + ".")
        elif "range" in f.metadata and value is not None:
            low, high, low_open = f.metadata["range"]
            if not (math.isfinite(value) and (value > low if low_open else value >= low) and (high is None or value <= high)):
                bounds = f"above {low}" if low_open else f"at least {low}" if high is None else f"between {low} and {high}"
                problems.append(f"{key} must be {bounds}, got {value}")
    return problems


def _check(cfg: DictConfig) -> list[str]:
    d = cfg.data
    problems = range_problems(cfg)
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
    if d.split.val + d.split.test >= 1:
        problems.append("data.split.val and data.split.test must sum below 1 (the rest is the training split)")
    if cfg.train.device not in ("auto", "cpu", "cuda"):
        problems.append(f"train.device must be auto, cpu or cuda, got {cfg.train.device!r}")
    if cfg.numerics.profile not in ("reference", "native"):
        problems.append(f"numerics.profile must be reference or native, got {cfg.numerics.profile!r}")
    if cfg.evaluate.attribution_method not in ("integrated_gradients", "occlusion"):
        problems.append(f"evaluate.attribution_method must be integrated_gradients or occlusion, got {cfg.evaluate.attribution_method!r}")
    problems += [f"gate.{key} must be block or warn, got {cfg.gate[key]!r}" for key in ("on_fail", "on_inconclusive")
                 if cfg.gate[key] not in ("block", "warn")]
    return problems + _serve_problems(cfg.package, cfg.serve) + _events_and_score_problems(cfg.events, cfg.score)


def _serve_problems(p: DictConfig, s: DictConfig) -> list[str]:
    problems = []
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9_-]*[A-Za-z0-9])?", p.model_name):  # also a valid GTO/DVC artifact name
        problems.append(f"package.model_name must be letters, digits, '_' or '-', starting and ending with a letter or digit, "
                        f"got {p.model_name!r}")
    try:
        loopback = ipaddress.ip_address(s.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        problems.append(f"serve.host must be a loopback IP address (e.g. 127.0.0.1), got {s.host!r}")
    ports = [s[k] for k in PORT_KEYS]
    if len(set(ports)) != len(ports):
        problems.append(f"serve ports {', '.join(PORT_KEYS)} must be distinct, got {ports}")
    if s.drift.min_samples > s.drift.window:
        problems.append("serve.drift.min_samples must not exceed serve.drift.window")
    return problems


def _events_and_score_problems(e: DictConfig, s: DictConfig) -> list[str]:
    problems = [f"events.webhooks: {url!r} is not an http(s) URL" for url in e.webhooks if not re.match(r"https?://", url)]
    if not s.extensions or not all(ext.startswith(".") for ext in s.extensions):
        problems.append(f"score.extensions must list suffixes starting with '.', got {list(s.extensions)}")
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
    problems = _check(cfg)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    OmegaConf.set_readonly(cfg, True)
    return cfg


def load_config(params_file: str | os.PathLike = PARAMS_FILE) -> DictConfig:
    """The config in a params file (params.yaml as DVC wrote it, by default), validated."""
    path = Path(params_file)
    if not path.exists():
        raise ConfigError(f"{path}: not found (run `make params` to generate it from conf/)")
    return validate(OmegaConf.load(path), str(path))


def command_config(params_file: str | os.PathLike | None, overrides: list[str], refuse_stale: bool = True) -> DictConfig:
    """The config of a command line: conf/ composed with Hydra overrides exactly as `dvc exp run -S`
    does (keys, group choices such as `model=resnet18`, presets such as `experiment=quick`); or a
    params file; or, given neither, params.yaml. A step refuses a params.yaml that conf/ changed
    since (it would make outputs conf/ disagrees with); serve and promote read params.yaml as the
    committed experiment ran with it (`refuse_stale=False`), `dvc exp run -S` overrides included."""
    if overrides and params_file is not None:
        raise ConfigError(f"give either --params {params_file} or overrides of conf/ {list(overrides)}, not both")
    if overrides:
        return with_local_settings(compose(list(overrides)))
    if params_file is None:
        if refuse_stale:
            check_params()
        return with_local_settings(load_config())
    return with_local_settings(load_config(params_file))


LOCAL_FILE = ROOT / "local.yaml"  # gitignored: this machine's settings, never an experiment's
LOCAL_SECTIONS = ("serve", "events", "pipeline.submit")  # what it may set: ports, state folder, webhooks, the KFP host


def with_local_settings(cfg: DictConfig, local_file: Path = LOCAL_FILE) -> DictConfig:
    """`cfg` with this machine's settings from local.yaml on top: read by every command, never part
    of params.yaml, so changing them dirties no tracked file and re-runs no stage (no step reads them)."""
    if not local_file.exists():
        return cfg
    local = yaml.safe_load(local_file.read_text()) or {}
    outside = [key for key in _flat(local) if not key.startswith(tuple(f"{section}." for section in LOCAL_SECTIONS))]
    if outside:
        raise ConfigError(f"{local_file}: {', '.join(outside)}: only {', '.join(LOCAL_SECTIONS)} settings belong to this machine; "
                          "the rest is an experiment's (conf/, `dvc exp run -S`)")
    return validate(OmegaConf.merge(OmegaConf.to_container(cfg), local), f"{local_file.name} over {'params.yaml'}")


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
        raise ConfigError(f"{source}: {exc}{_did_you_mean(exc)}") from None


def _did_you_mean(exc: Exception) -> str:
    """` (did you mean train.epochs?)` for an override of a key conf/ does not have, when one is close."""
    unknown = getattr(exc.__cause__, "full_key", None) or getattr(exc, "full_key", None)
    if not unknown:
        return ""
    close = difflib.get_close_matches(unknown, list(_flat(OmegaConf.to_container(compose([])))), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


OVERRIDES_HEADER = "# Generated from conf/ with overrides: "  # first line of params.yaml; never edit the file
DIGEST_HEADER = "# Digests of conf/ and of the lines below: "  # its second line: lets a check skip recomposing conf/


def _digest_line(body: bytes) -> bytes:
    digest = hashlib.sha256()
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        digest.update(f"{path.relative_to(CONF_DIR)}\0".encode() + path.read_bytes() + b"\0")
    return f"{DIGEST_HEADER}{digest.hexdigest()[:16]} {hashlib.sha256(body).hexdigest()[:16]}".encode()


def _unchanged_since_written(params_file: Path) -> bool:
    """params.yaml is byte for byte what write_params made, from conf/ as it is now (milliseconds,
    where recomposing conf/ takes a large part of a second)."""
    if not params_file.exists():
        return False
    _, digests, body = (params_file.read_bytes().split(b"\n", 2) + [b"", b""])[:3]
    return digests == _digest_line(body)


def write_params(overrides: list[str] = (), params_file: Path = PARAMS_FILE) -> bool:
    """Regenerate params.yaml from conf/ (plus overrides, recorded in its first line so the
    `config` stage can recompose it); returns True when the file changed."""
    with tempfile.TemporaryDirectory(dir=params_file.parent) as tmp:
        out = Path(tmp) / "params.yaml"
        _compose_to(out, overrides)
        validate(OmegaConf.load(out), "conf/")
        body = out.read_bytes()
        new = (OVERRIDES_HEADER + json.dumps(list(overrides)) + "\n").encode() + _digest_line(body) + b"\n" + body
        if params_file.exists() and params_file.read_bytes() == new:
            return False
        out.write_bytes(new)
        os.replace(out, params_file)
        return True


def recorded_overrides(params_file: Path) -> list[str]:
    first = params_file.read_text().split("\n", 1)[0] if params_file.exists() else ""
    return json.loads(first[len(OVERRIDES_HEADER):]) if first.startswith(OVERRIDES_HEADER) else []


def stale_keys(params_file: Path = PARAMS_FILE) -> list[str]:
    """Keys whose value in params.yaml differs from conf/ composed with the overrides params.yaml
    was written with (as `key: params.yaml value -> conf/ value`)."""
    fresh = _flat(OmegaConf.to_container(compose(recorded_overrides(params_file))))
    current = _flat(OmegaConf.to_container(validate(OmegaConf.load(params_file), str(params_file)))) if params_file.exists() else {}
    return [f"{key}: {current.get(key, '(absent)')!r} -> {fresh.get(key, '(absent)')!r}"
            for key in sorted(fresh.keys() | current.keys()) if fresh.get(key, MISSING) != current.get(key, MISSING)]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()} if tree else {prefix: {}}


def check_params(params_file: Path = PARAMS_FILE) -> None:
    """Refuse a params.yaml that conf/ (with the overrides it records) no longer matches: plain
    `dvc repro` never recomposes it."""
    if _unchanged_since_written(params_file):
        return
    stale = stale_keys(params_file)
    if stale:
        raise ConfigError(f"{params_file.name} is stale: conf/ changed {len(stale)} key(s) since it was generated "
                          f"with overrides {recorded_overrides(params_file)} "
                          f"({'; '.join(stale[:10])}{'; ...' if len(stale) > 10 else ''}). "
                          "Run `make params` (it keeps those overrides; then `dvc repro`), or `dvc exp run`.")


def _override(key: str, value: Any, present: bool) -> str:
    """A Hydra override that sets `key` to `value` (`+key` when conf/ lacks the key)."""
    return f"{'' if present else '+'}{key}={json.dumps(value)}"


def overrides_between(base: DictConfig, target: DictConfig) -> list[str]:
    """The key overrides that turn `base` into `target` (both validated configs, same schema)."""
    before, after = _flat(OmegaConf.to_container(base)), _flat(OmegaConf.to_container(target))
    return [_override(key, after[key], key in before) for key in sorted(after) if before.get(key, MISSING) != after[key]]


def record_experiment(params_file: Path = PARAMS_FILE, baseline: list[str] = ()) -> list[str]:
    """Under `dvc exp run`: DVC has just composed params.yaml from conf/ and the -S overrides, without
    this project's header. Validate it (a bad value restores the last good file and names the key),
    keep the baseline's recorded overrides that -S did not change, and rewrite params.yaml with its
    header, so `dvc exp apply` and a commit leave a params.yaml every command accepts."""
    try:
        composed = validate(OmegaConf.load(params_file), f"{params_file.name} (composed by dvc exp run from conf/ and -S)")
    except ConfigError:
        _restore_baseline_params(params_file)
        raise
    from_s = overrides_between(compose([]), composed)  # what -S changed in conf/
    changed = {item.split("=", 1)[0].lstrip("+") for item in from_s}
    kept = [item for item in baseline if item.split("=", 1)[0].lstrip("+~") not in changed]
    write_params([*kept, *from_s], params_file)
    return kept


def _restore_baseline_params(params_file: Path) -> None:
    shown = subprocess.run(["git", "show", f"HEAD:{params_file.name}"], cwd=params_file.parent, capture_output=True)
    if shown.returncode == 0:
        write_bytes_atomic(params_file, shown.stdout)


def baseline_overrides(params_file: Path = PARAMS_FILE) -> list[str]:
    """The overrides recorded in params.yaml as committed at HEAD (the experiment's baseline)."""
    shown = subprocess.run(["git", "show", f"HEAD:{params_file.name}"], cwd=params_file.parent, capture_output=True, text=True)
    first = shown.stdout.split("\n", 1)[0] if shown.returncode == 0 else ""
    return json.loads(first[len(OVERRIDES_HEADER):]) if first.startswith(OVERRIDES_HEADER) else []


def refresh_params(reset: bool = False, params_file: Path = PARAMS_FILE) -> str:
    """`make params`: regenerate params.yaml from conf/ and the overrides it records (an applied
    experiment stays applied; `reset` drops them), deciding by content, not by file times."""
    if not reset and _unchanged_since_written(params_file):
        return "already up to date"
    try:
        overrides = [] if reset else recorded_overrides(params_file)
    except ValueError:  # a first line that is this project's header in name only
        overrides = []
    write_params(overrides, params_file)
    return f"regenerated from conf/ with overrides {overrides}"


ARTIFACTS_HEADER = ("# GTO's index of this repository's artifacts, generated from conf/ (package.model_name) by\n"
                    "# `python -m components.core.config` with `artifacts:` in dvc.yaml; never hand-edited.\n")


def stale_artifact_files(model_name: str, root: Path = ROOT) -> dict[Path, str]:
    """The files that do not declare the model artifact (the package) as `model_name`, with the text they must
    read: GTO's index artifacts.yaml whole, dvc.yaml with only its `artifacts:` section replaced (the rest stays)."""
    desc = f"Image classifier packaged as ONNX + TorchServe archive (model.onnx, signature.json, {model_name}.mar)"
    index = f"{ARTIFACTS_HEADER}{model_name}:\n  type: model\n  path: artifacts/package\n  description: {desc}\n  labels: [onnx, torchserve]\n"
    section = ["artifacts:", f"  {model_name}:", "    path: artifacts/package", "    type: model", f"    desc: {desc}",
               "    labels: [onnx, torchserve]"]
    lines = (root / "dvc.yaml").read_text().splitlines()
    start = lines.index("artifacts:") if "artifacts:" in lines else len(lines)
    end = next((i for i in range(start + 1, len(lines)) if lines[i][:1] not in ("", " ", "#")), len(lines))
    while end > start + 1 and lines[end - 1][:1] in ("", "#"):  # blank lines and comments before the next key are its own
        end -= 1
    wanted = {root / "artifacts.yaml": index, root / "dvc.yaml": "\n".join(lines[:start] + section + lines[end:]) + "\n"}
    return {path: text for path, text in wanted.items() if not path.exists() or path.read_text() != text}


def write_artifacts(model_name: str, root: Path = ROOT) -> list[str]:
    """Declare the model artifact as `model_name` in artifacts.yaml and dvc.yaml; returns the files rewritten."""
    stale = stale_artifact_files(model_name, root)
    for path, text in stale.items():
        write_bytes_atomic(path, text.encode())
    return [path.name for path in stale]


def check_artifacts(model_name: str, root: Path = ROOT) -> None:
    """Refuse artifact declarations that do not name the model as conf/ does (`gto register <name>`,
    `dvc artifacts get . <name>` and the stage tags the deploy workflow reads all go by them)."""
    stale = []
    for path in stale_artifact_files(model_name, root):
        loaded = (yaml.safe_load(path.read_text()) if path.exists() else None) or {}
        declared = list((loaded.get("artifacts") if path.name == "dvc.yaml" else loaded) or {})
        stale.append(f"{path.name} is stale (declares {declared}{' with other fields' if declared == [model_name] else ''})")
    if stale:
        raise ConfigError(f"{'; '.join(stale)}: params.yaml names the model artifact {model_name!r} (package.model_name, from data.name). "
                          "Run `make params`, which writes the declarations from conf/ (choose the dataset in conf/config.yaml: "
                          "`dvc exp run -S data...` cannot declare its artifact).")


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

    parser = argparse.ArgumentParser(description="params.yaml and the model artifact's declarations from conf/: regenerate them, "
                                                 "or check that they are current.")
    parser.add_argument("--check", action="store_true", help="only check that they match conf/ (the `config` stage)")
    parser.add_argument("--reset", action="store_true", help="drop the overrides params.yaml records (an applied experiment)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides written into params.yaml, e.g. train.lr=0.01")

    def _main() -> None:
        args = parser.parse_args()
        if args.check and os.environ.get("DVC_EXP_BASELINE_REV"):
            kept = record_experiment(baseline=baseline_overrides())
            print(f"params.yaml: this experiment's overrides recorded{f', the baseline overrides {kept} kept' if kept else ''}")
        if args.check:
            check_params()
            check_artifacts(load_config().package.model_name)
            print("params.yaml, artifacts.yaml and dvc.yaml's `artifacts:` match conf/")
            return
        if args.overrides:
            status = f"{'regenerated' if write_params(args.overrides) else 'already up to date'} with overrides {args.overrides}"
        else:
            status = refresh_params(args.reset)
        name = load_config().package.model_name
        written = write_artifacts(name)
        print(f"params.yaml {status}")
        print(f"model artifact {name!r}: {' and '.join(written) + ' rewritten' if written else 'artifacts.yaml and dvc.yaml already declare it'}")

    run_cli(_main)
