"""Lineage recorded inside every artifact, content-addressed: what determined it, never when or
where it was built. A DVC output records the data hash (data.dvc), the hash of the config
sections its step reads, a hash of exactly the project source files its step imports, and the
environment. No git commit: a commit cannot name its own hash, so an output that embedded it
would be stale in every commit. The commit is recorded where it is true: the GTO tag, the KFP
run, the deploy record.
"""

from __future__ import annotations

import ast
import hashlib
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml
from omegaconf import DictConfig

from components.core.config.sections import config_hash
from components.core.paths import ROOT

# Inside a component image there is no data.dvc of the run's revision: the pipeline passes the hash.
DATA_HASH_ENV = "LINEAGE_DATA_HASH"
ENVIRONMENT_PACKAGES = ("torch", "onnxruntime")


def data_hash(dvc_file: Path = ROOT / "data.dvc") -> str:
    """The md5 DVC recorded for the dataset (the `outs` of data.dvc)."""
    if DATA_HASH_ENV in os.environ:
        return os.environ[DATA_HASH_ENV]
    if not dvc_file.exists():
        return "unknown"
    outs = yaml.safe_load(dvc_file.read_text())["outs"]
    return ",".join(out["md5"] for out in outs)


def module_file(module: str) -> Path | None:
    parts = module.split(".")
    for candidate in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
        if candidate.exists():
            return candidate
    return None


def _project_imports(path: Path) -> set[str]:
    """Project modules a file imports, anywhere in it (lazy imports inside functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] == "components"}


def source_files(module: str, code_files: tuple[str, ...] = ()) -> list[str]:
    """The project source files `module` runs (its transitive project imports and their packages'
    __init__ files) plus the other code it reads or ships (`CODE_FILES` of a step: report templates,
    the handler in the .mar), relative to the project root: exactly the code deps of its DVC stage."""
    seen: set[Path] = {ROOT / name for name in code_files}
    todo = [module]
    while todo:
        name = todo.pop()
        for prefix in (".".join(name.split(".")[: i + 1]) for i in range(name.count(".") + 1)):
            path = module_file(prefix)
            if path and path not in seen:
                seen.add(path)
                todo.extend(_project_imports(path))
    return sorted(str(path.relative_to(ROOT)) for path in seen)


def code_hash(module: str, code_files: tuple[str, ...] = ()) -> str:
    """Hash of the step's source files. Pass the module's `__spec__.name`: under `python -m`,
    `__name__` is "__main__", which names no file."""
    if module_file(module) is None:
        raise ValueError(f"{module!r} is not a module of this project")
    digest = hashlib.sha256()
    for name in source_files(module, code_files):
        paths = sorted((ROOT / name).rglob("*")) if (ROOT / name).is_dir() else [ROOT / name]
        for path in (p for p in paths if p.is_file() and "__pycache__" not in p.parts):
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def environment(device: str | None = None) -> dict[str, str]:
    lock = ROOT / "requirements.lock"
    env = {"requirements_lock": hashlib.sha256(lock.read_bytes()).hexdigest()[:16] if lock.exists() else "unknown",
           "python": platform.python_version()}
    for package in ENVIRONMENT_PACKAGES:
        try:
            env[package] = version(package)
        except PackageNotFoundError:
            env[package] = "absent"
    if device:
        env["device"] = device
    return env


def lineage(cfg: DictConfig, module: str, device: str | None = None, code_files: tuple[str, ...] = (),
            numerics: dict | None = None) -> dict[str, object]:
    """What determined a step's outputs: `cfg` is the step's own config sections (see config.sections.select);
    `numerics` is the profile the step's floats came from (numerics.activate), for steps that compute them."""
    record = {"data_hash": data_hash(), "config_hash": config_hash(cfg), "code_hash": code_hash(module, code_files),
              "environment": environment(device)}
    return record | {"numerics": numerics} if numerics else record
