"""conf/ composed with Hydra overrides (keys, group choices such as `model=resnet18`, presets such
as `experiment=quick`) exactly as `dvc exp run -S` does, then validated."""

from __future__ import annotations

import difflib
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from components.core.config.sections import flat
from components.core.config.validation import validate
from components.core.errors import ConfigError
from components.core.paths import CONF_DIR, ROOT


def compose(overrides: list[str] = ()) -> DictConfig:
    """Compose conf/ with Hydra overrides exactly as `dvc exp run -S` does, then validate."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        compose_to(out, overrides)
        return validate(OmegaConf.load(out), _source(overrides))


def compose_to(out: Path, overrides: list[str]) -> None:
    """Write conf/ composed with `overrides` to `out`, as DVC writes params.yaml (not validated)."""
    from dvc.utils.hydra import compose_and_dump
    from hydra.errors import HydraException

    try:
        compose_and_dump(out, str(CONF_DIR), None, "config", str(ROOT / ".dvc" / "hydra_plugins"), list(overrides))
    except HydraException as exc:
        raise ConfigError(f"{_source(overrides)}: {exc}{_did_you_mean(exc)}") from None


def _source(overrides: list[str]) -> str:
    return f"command-line overrides {list(overrides)}" if overrides else "conf/"


def _did_you_mean(exc: Exception) -> str:
    """` (did you mean train.epochs?)` for an override of a key conf/ does not have, when one is close."""
    unknown = getattr(exc.__cause__, "full_key", None) or getattr(exc, "full_key", None)
    if not unknown:
        return ""
    close = difflib.get_close_matches(unknown, list(flat(OmegaConf.to_container(compose([])))), n=1)
    return f" (did you mean {close[0]}?)" if close else ""
