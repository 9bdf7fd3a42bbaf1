"""params.yaml, what DVC tracks: conf/ composed with the overrides its first line records, a digest
of conf/ and of its body in its second line. Written from conf/, read validated, refused when stale."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from components.core.config.compose import compose, compose_to
from components.core.config.sections import flat
from components.core.config.validation import validate
from components.core.errors import ConfigError
from components.core.io import write_bytes_atomic
from components.core.paths import CONF_DIR, PARAMS_FILE

OVERRIDES_HEADER = "# Generated from conf/ with overrides: "  # first line of params.yaml; never edit the file
DIGEST_HEADER = "# Digests of conf/ and of the lines below: "  # its second line: lets a check skip recomposing conf/


def load_config(params_file: str | os.PathLike = PARAMS_FILE) -> DictConfig:
    """The config in a params file (params.yaml as DVC wrote it, by default), validated."""
    path = Path(params_file)
    if not path.exists():
        raise ConfigError(f"{path}: not found (run `make params` to generate it from conf/)")
    return validate(OmegaConf.load(path), str(path))


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
        compose_to(out, overrides)
        validate(OmegaConf.load(out), "conf/")
        body = out.read_bytes()
        new = (OVERRIDES_HEADER + json.dumps(list(overrides)) + "\n").encode() + _digest_line(body) + b"\n" + body
        if params_file.exists() and params_file.read_bytes() == new:
            return False
        out.write_bytes(new)
        os.replace(out, params_file)
        return True


def _overrides_in(first_line: str) -> list[str]:
    return json.loads(first_line[len(OVERRIDES_HEADER):]) if first_line.startswith(OVERRIDES_HEADER) else []


def recorded_overrides(params_file: Path) -> list[str]:
    return _overrides_in(params_file.read_text().split("\n", 1)[0] if params_file.exists() else "")


def baseline_overrides(params_file: Path = PARAMS_FILE) -> list[str]:
    """The overrides recorded in params.yaml as committed at HEAD (the experiment's baseline)."""
    shown = subprocess.run(["git", "show", f"HEAD:{params_file.name}"], cwd=params_file.parent, capture_output=True, text=True)
    return _overrides_in(shown.stdout.split("\n", 1)[0] if shown.returncode == 0 else "")


def stale_keys(params_file: Path = PARAMS_FILE) -> list[str]:
    """Keys whose value in params.yaml differs from conf/ composed with the overrides params.yaml
    was written with (as `key: params.yaml value -> conf/ value`)."""
    fresh = flat(OmegaConf.to_container(compose(recorded_overrides(params_file))))
    current = flat(OmegaConf.to_container(validate(OmegaConf.load(params_file), str(params_file)))) if params_file.exists() else {}
    return [f"{key}: {current.get(key, '(absent)')!r} -> {fresh.get(key, '(absent)')!r}"
            for key in sorted(fresh.keys() | current.keys()) if fresh.get(key, MISSING) != current.get(key, MISSING)]


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


def _override(key: str, value: Any, present: bool) -> str:
    """A Hydra override that sets `key` to `value` (`+key` when conf/ lacks the key)."""
    return f"{'' if present else '+'}{key}={json.dumps(value)}"


def overrides_between(base: DictConfig, target: DictConfig) -> list[str]:
    """The key overrides that turn `base` into `target` (both validated configs, same schema)."""
    before, after = flat(OmegaConf.to_container(base)), flat(OmegaConf.to_container(target))
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
