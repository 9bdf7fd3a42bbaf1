"""Shared fixtures: small hand-made datasets, and what several modules need built once per session
(a hand-made dataset packaged in seconds for the unit tier; the sample data trained briefly and its
package, a project copy with the quick experiment reproduced, for the integration and e2e tiers).
Under pytest-xdist the session fixtures are built once for all workers: the first worker to need
one builds it under a file lock, the others wait and read it."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from components.core.config.compose import compose
from components.core.paths import ROOT
from components.package import package
from components.prepare import prepare
from components.train import train
from tests.helpers.datasets import make_image_dataset, small_config
from tests.helpers.project import copy_project, git_commit, run

os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return make_image_dataset(tmp_path / "raw")


@pytest.fixture(scope="session")
def built_once(tmp_path_factory, pytestconfig) -> Callable[[str, Callable[[Path], None]], Path]:
    """built_once(name, build): the folder `build` filled, built by one worker of this session only."""
    # Each xdist worker's base temp is <session temp>/popen-gwN: their common parent is this session's.
    # (Not the `worker_id` fixture: it is missing under `-p no:xdist`.)
    in_worker = hasattr(pytestconfig, "workerinput")
    shared = tmp_path_factory.getbasetemp().parent if in_worker else tmp_path_factory.getbasetemp()

    def get(name: str, build: Callable[[Path], None]) -> Path:
        folder, done = shared / name, shared / f"{name}.done"
        with FileLock(shared / f"{name}.lock"):
            if not done.exists():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
                build(folder)
                done.touch()
        return folder

    return get


@pytest.fixture(scope="session")
def tiny_package(built_once) -> dict:
    """make_image_dataset's images (3 classes, 1x16x16) prepared, trained for 2 epochs and packaged: seconds."""

    def build(out: Path) -> None:
        cfg = small_config(make_image_dataset(out / "raw"))
        prepare(cfg, out / "raw", out / "prepared")
        train(cfg, out / "prepared", out / "model", out / "dvclive", out / "checkpoints")
        package(cfg, out / "prepared", out / "model", out / "package")

    out = built_once("tiny_package", build)
    return {"cfg": small_config(out / "raw"), "raw": out / "raw", "prepared": out / "prepared", "model": out / "model",
            "out": out / "package", "manifest": json.loads((out / "package" / "package.json").read_text())}


DIGITS_OVERRIDES = ["train.epochs=3"]


@pytest.fixture(scope="session")
def digits_run(built_once) -> dict:
    """The real sample data, prepared and trained for 3 epochs once per session."""
    cfg = compose(DIGITS_OVERRIDES)

    def build(out: Path) -> None:
        prepare(cfg, ROOT / "data", out / "prepared")
        train(cfg, out / "prepared", out / "model", out / "dvclive", out / "checkpoints")

    out = built_once("digits_run", build)
    return {"cfg": cfg, "prepared": out / "prepared", "model": out / "model", "root": out}


@pytest.fixture(scope="session")
def digits_subset(built_once) -> Path:
    """The sample data's first 400 images (every class, both sites) as a data folder: the sample's shapes
    and model at a fraction of its cost, for tests that run the pipeline many times (other hosts, emulation)."""

    def build(out: Path) -> None:
        rows = (ROOT / "data" / "metadata.csv").read_text().splitlines()[:401]
        (out / "images").mkdir()
        for row in rows[1:]:
            shutil.copy2(ROOT / "data" / row.split(",")[0], out / row.split(",")[0])
        (out / "metadata.csv").write_text("\n".join(rows) + "\n")

    return built_once("digits_subset", build)


@pytest.fixture(scope="session")
def packaged(digits_run, built_once) -> dict:
    """digits_run's model packaged once per session (read-only: copy it before changing anything)."""
    out = built_once("packaged", lambda folder: package(digits_run["cfg"], digits_run["prepared"], digits_run["model"], folder))
    return {**digits_run, "out": out, "manifest": json.loads((out / "package.json").read_text())}


@pytest.fixture(scope="session")
def quick_project(built_once) -> Path:
    """A project copy with `experiment=quick` reproduced and committed (read-only: tests take copy_of it)."""

    def build(folder: Path) -> None:
        repo = copy_project(folder / "repo")
        run(["python", "-m", "components.core.config", "experiment=quick"], repo)
        (folder / "first_repro.txt").write_text(run(["dvc", "repro"], repo).stdout)
        git_commit(repo, "quick experiment")

    return built_once("quick_project", build)
