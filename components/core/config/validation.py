"""A raw config (composed conf/, a params file, pipeline parameters) checked against the schema:
unknown keys, wrong types, choices not offered, values out of range and inconsistent settings
are refused in one ConfigError naming each key."""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import fields
from typing import Any

from omegaconf import DictConfig, EnumNode, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from components.core.config.schema import MODEL_SETTINGS, PORT_KEYS, Config, ModelConfig
from components.core.errors import ConfigError


def validate(raw: Any, source: str) -> DictConfig:
    """Merge raw config onto the schema; unknown keys and wrong types raise ConfigError."""
    try:
        cfg = OmegaConf.merge(_schema_for(raw), raw)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: {_reason(exc)}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{source}: no value for {', '.join(missing)} (every key needs one in conf/)")
    problems = _check(cfg)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _schema_for(raw: Any) -> DictConfig:
    """The schema, with the model section of the model `raw` names (its own settings, if it has any)."""
    schema = OmegaConf.structured(Config)
    name = OmegaConf.select(OmegaConf.create(raw), "model.name", default=None)
    schema.model = OmegaConf.structured(MODEL_SETTINGS.get(name, ModelConfig))
    return schema


def _reason(exc: OmegaConfBaseException) -> str:
    key, value = getattr(exc, "full_key", None), getattr(exc, "value", None)
    choices = _choices(exc)
    if choices:
        return f"{key} must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}"
    return str(exc).splitlines()[0] + (f" (key: {key})" if key else "")


def _choices(exc: OmegaConfBaseException) -> list[str]:
    """The values a choice key offers, when `exc` refused a value it does not."""
    node = getattr(exc, "child_node", None)
    return [member.value for member in node.enum_type] if isinstance(exc, ValidationError) and isinstance(node, EnumNode) else []


def range_problems(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every number outside the range its schema field declares (NaN and infinity never pass)."""
    problems = []
    for f in fields(OmegaConf.get_type(cfg)):
        value, key = cfg[f.name], prefix + f.name
        if isinstance(value, DictConfig) and OmegaConf.get_type(value) not in (dict, None):
            problems += range_problems(value, key + ".")
        elif "range" in f.metadata and value is not None and not _within(value, *f.metadata["range"]):
            low, high, low_open = f.metadata["range"]
            bounds = f"above {low}" if low_open else f"at least {low}" if high is None else f"between {low} and {high}"
            problems.append(f"{key} must be {bounds}, got {value}")
    return problems


def _within(value: float, low: float, high: float | None, low_open: bool) -> bool:
    return math.isfinite(value) and (value > low if low_open else value >= low) and (high is None or value <= high)


def _check(cfg: DictConfig) -> list[str]:
    d = cfg.data
    problems = range_problems(cfg)
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


def check_shared_volume(d: DictConfig) -> None:
    """pipeline.deploy's volume: TorchServe and the deploy step both mount it, so on one node unless it is ReadWriteMany.
    The pipeline's compile and `python -m serve.k8s` (which pins TorchServe there) both check it."""
    if d.access_mode == "ReadWriteOnce" and not d.node_selector:
        raise ConfigError("pipeline.deploy.access_mode=ReadWriteOnce: TorchServe and the deploy step must share one node; set "
                          "pipeline.deploy.node_selector (e.g. {kubernetes.io/hostname: <node>}) and regenerate with `python -m serve.k8s`")
