"""Shared fixtures: small hand-made datasets, and the real sample data trained briefly once
per session for the steps downstream of train."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from components.core.config import ROOT, compose
from components.prepare import prepare
from components.train import train
from tests.helpers.datasets import make_image_dataset

os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return make_image_dataset(tmp_path / "raw")


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> dict[str, Path]:
    """The real sample data, prepared and trained for 3 epochs once per session."""
    out = tmp_path_factory.mktemp("digits_run")
    cfg = compose(["train.epochs=3"])
    prepare(cfg, ROOT / "data", out / "prepared")
    train(cfg, out / "prepared", out / "model", out / "dvclive", out / "checkpoints")
    return {"cfg": cfg, "prepared": out / "prepared", "model": out / "model", "root": out}
