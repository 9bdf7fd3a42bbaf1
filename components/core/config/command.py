"""The config of a command line: conf/ composed with its overrides, a params file, or params.yaml;
then this machine's settings (local.yaml) on top."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from components.core.config.compose import compose
from components.core.config.params_file import check_params, load_config
from components.core.config.sections import flat
from components.core.config.validation import validate
from components.core.errors import ConfigError
from components.core.paths import ROOT

LOCAL_FILE = ROOT / "local.yaml"  # gitignored: this machine's settings, never an experiment's
LOCAL_SECTIONS = ("serve", "events", "pipeline.submit")  # what it may set: ports, state folder, webhooks, the KFP host


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


def with_local_settings(cfg: DictConfig, local_file: Path = LOCAL_FILE) -> DictConfig:
    """`cfg` with this machine's settings from local.yaml on top: read by every command, never part
    of params.yaml, so changing them dirties no tracked file and re-runs no stage (no step reads them)."""
    if not local_file.exists():
        return cfg
    local = yaml.safe_load(local_file.read_text()) or {}
    outside = [key for key in flat(local) if not key.startswith(tuple(f"{section}." for section in LOCAL_SECTIONS))]
    if outside:
        raise ConfigError(f"{local_file}: {', '.join(outside)}: only {', '.join(LOCAL_SECTIONS)} settings belong to this machine; "
                          "the rest is an experiment's (conf/, `dvc exp run -S`)")
    return validate(OmegaConf.merge(OmegaConf.to_container(cfg), local), f"{local_file.name} over params.yaml")
