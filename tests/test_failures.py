"""Failures that must neither destroy nor linger: a diverging run leaves the last good outputs, an
oversized image is one per-file error, a killed `dvc repro` stops the step it ran, and the scratch
of killed processes does not pile up."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from components.core.errors import StepError
from components.core.io import atomic_dir, scratch_beside
from components.core.lifetime import die_with_parent
from components.data.decoding import decode_error
from components.prepare import prepare
from components.train import train
from tests.helpers.datasets import small_config
from tests.helpers.project import copy_project, run


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.integration
def test_a_diverging_run_is_one_clear_error_and_keeps_the_last_good_outputs(tiny_dataset, tmp_path):
    cfg = small_config(tiny_dataset)
    prepare(cfg, tiny_dataset, tmp_path / "prepared")
    train(cfg, tmp_path / "prepared", tmp_path / "model", tmp_path / "live", tmp_path / "ckpt")
    before = {"model": _tree(tmp_path / "model"), "live": _tree(tmp_path / "live")}
    for lr in (1e30, 1e308):
        with pytest.raises(StepError, match="the loss is not finite after epoch 1 .*training diverged; lower train.lr") as err:
            train(small_config(tiny_dataset, f"train.lr={lr}"), tmp_path / "prepared", tmp_path / "model", tmp_path / "live",
                  tmp_path / "ckpt")
        assert str(err.value).endswith(f"(now {lr})")
    assert {"model": _tree(tmp_path / "model"), "live": _tree(tmp_path / "live")} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no scratch left behind


def test_an_image_with_too_many_pixels_is_a_per_file_error(tmp_path, monkeypatch):
    Image.new("L", (64, 64)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4,096 pixels: twice the limit and more, a decompression bomb
    pixels, error = decode_error(tmp_path / "huge.png", 1, (16, 16))
    assert pixels is None and error.startswith("too many pixels to decode safely (Image size (4096 pixels) exceeds limit")


def test_scratch_of_killed_processes_is_swept_and_a_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "model"
    stale = tmp_path / f".model.{dead.pid}.abc"
    live = tmp_path / f".model.{os.getppid()}.def"  # another process still running
    for folder in (stale, live):
        (folder / "part").mkdir(parents=True)
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("w")
        assert tmp.name.startswith(f".model.{os.getpid()}.")
    assert not stale.exists() and live.exists()
    assert (target / "weights").read_text() == "w"
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "model"]
    with scratch_beside(tmp_path / "reports") as scratch:
        assert scratch.parent == tmp_path
    assert not scratch.exists()


def _processes(needle: str, cwd: Path) -> list[int]:
    """pids whose command line contains `needle` and whose working directory is `cwd`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and needle in (entry / "cmdline").read_bytes().decode(errors="replace") \
                    and Path(os.readlink(entry / "cwd")) == cwd:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_pool_worker_forked_by_the_step_lives_as_long_as_the_step():
    """A forked worker inherits the step's launchers; its own parent is the step (prepare's decoding, batch scoring)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"), initializer=die_with_parent) as pool:
        assert pool.submit(os.getppid).result() == os.getpid()


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.parametrize("shell", ["/bin/bash", None], ids=["bash-execs-the-step", "no-SHELL-so-dash-stays-between"])
def test_killing_dvc_repro_stops_the_step_it_was_running(tmp_path, shell):
    """DVC runs the stage as `$SHELL -c cmd` (`/bin/sh` without $SHELL): bash execs the step, Debian's
    dash stays in between as its parent and outlives DVC."""
    repo = copy_project(tmp_path / "repo")
    conf = repo / "conf" / "train" / "default.yaml"  # a run that lasts minutes, so only the kill can end it
    conf.write_text(conf.read_text().replace("epochs: 15", "epochs: 500")
                    .replace("early_stopping_patience: 4", "early_stopping_patience: 0"))
    run(["python", "-m", "components.core.config"], repo)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("SHELL", None)
    if shell:
        env["SHELL"] = shell
    dvc = subprocess.Popen([str(Path(sys.executable).parent / "dvc"), "repro", "-f", "train"], cwd=repo, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_for(lambda: _processes("components.train", repo), 120), "the train stage never started"
    time.sleep(2)  # well into training
    dvc.send_signal(signal.SIGKILL)  # what a CI timeout or an OOM killer does: DVC cannot pass it on
    dvc.wait()
    assert _wait_for(lambda: not _processes("components.train", repo), 20), "the trainer outlived dvc"


@pytest.mark.integration
def test_a_hand_run_with_overrides_says_which_pipeline_outputs_it_replaced(tmp_path):
    from tests.helpers.project import run

    repo = copy_project(tmp_path / "repo")
    run(["python", "-m", "components.prepare", "--out", "artifacts/prepared"], repo)  # params.yaml's config: no note
    hand = run(["python", "-m", "components.prepare", "--out", "artifacts/prepared", "data.split.test=0.2"], repo)
    assert ("note: this run's config is not params.yaml, and it replaced pipeline outputs that dvc.lock records "
            "(artifacts/prepared); bring the pipeline's back with `dvc checkout --force artifacts/prepared`") in hand.stdout
    elsewhere = run(["python", "-m", "components.prepare", "--out", str(tmp_path / "mine"), "data.split.test=0.2"], repo)
    assert "note:" not in elsewhere.stdout
