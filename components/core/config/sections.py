"""Views of a validated config: the sections a step reads, their hash, and its keys flattened."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf


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


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """`{"train": {"lr": 0.1}}` as `{"train.lr": 0.1}` (an empty section keeps its key)."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}{key}.").items()} if tree else {prefix: {}}
