"""train: determinism, resume, balanced sampling, model zoo, lineage, pickle-free weights."""

from __future__ import annotations

import json
import os

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file

from components.core.config.compose import compose
from components.core.errors import ConfigError
from components.model.networks import build_model, load_trained
from components.prepare import prepare
from components.train import balanced_weights, train
from tests.helpers.datasets import small_config, small_overrides


def _run(cfg, data, out, name):
    prepare(cfg, data, out / "prepared")
    return train(cfg, out / "prepared", out / name, out / f"live_{name}", out / f"ckpt_{name}")


@pytest.mark.integration
def test_two_clean_runs_give_identical_weights_and_metrics(tiny_dataset, tmp_path):
    cfg = small_config(tiny_dataset, "train.epochs=3")
    first = _run(cfg, tiny_dataset, tmp_path / "one", "model")
    second = _run(cfg, tiny_dataset, tmp_path / "two", "model")
    assert first == second
    weights = [(tmp_path / d / "model" / "model.safetensors").read_bytes() for d in ("one", "two")]
    assert weights[0] == weights[1]
    live = [(tmp_path / d / "live_model" / "metrics.json").read_text() for d in ("one", "two")]
    assert live[0] == live[1]


def _interrupted_after(epochs_done: int, monkeypatch):
    """Make the next training run die at the start of validation of epoch `epochs_done + 1`."""
    import components.train

    calls = {"n": 0}
    real = components.train.distributed.sync_buffers

    def sync_then_maybe_die(*args):
        calls["n"] += 1
        if calls["n"] > epochs_done:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(components.train.distributed, "sync_buffers", sync_then_maybe_die)


@pytest.mark.integration
def test_resume_continues_only_a_matching_checkpoint_and_a_finished_run_leaves_none(tiny_dataset, tmp_path, monkeypatch, capsys):
    fixed = ("train.early_stopping_patience=0", "train.epochs=4")
    _run(small_config(tiny_dataset, *fixed), tiny_dataset, tmp_path, "full")
    ckpt = tmp_path / "ckpt_part"
    assert not (tmp_path / "ckpt_full" / "last.pt").exists()

    def interrupted_run() -> None:
        with monkeypatch.context() as patch:
            _interrupted_after(2, patch)
            with pytest.raises(KeyboardInterrupt):
                train(small_config(tiny_dataset, *fixed), tmp_path / "prepared", tmp_path / "part", tmp_path / "live_part", ckpt)
        assert torch.load(ckpt / "last.pt", weights_only=True)["state"]["epoch"] == 2

    interrupted_run()
    other = small_config(tiny_dataset, *fixed, "train.lr=0.5", "train.resume=true")
    assert train(other, tmp_path / "prepared", tmp_path / "x", tmp_path / "live_x", ckpt)["epochs_run"] == 4
    assert "was written for other data, config or code; training starts afresh" in capsys.readouterr().err

    interrupted_run()
    prepare(small_config(tiny_dataset, *fixed, "data.split.test=0.25"), tiny_dataset, tmp_path / "other_data")
    train(small_config(tiny_dataset, *fixed, "train.resume=true"), tmp_path / "other_data", tmp_path / "y", tmp_path / "live_y", ckpt)
    assert "training starts afresh" in capsys.readouterr().err

    interrupted_run()
    metrics = train(small_config(tiny_dataset, *fixed, "train.resume=true"), tmp_path / "prepared", tmp_path / "resumed",
                    tmp_path / "live_part", ckpt)
    assert "afresh" not in capsys.readouterr().err
    assert metrics["epochs_run"] == 4 and not (ckpt / "last.pt").exists()
    full = load_file(tmp_path / "full" / "model.safetensors")
    again = load_file(tmp_path / "resumed" / "model.safetensors")
    assert full.keys() == again.keys()
    assert all(torch.equal(full[k], again[k]) for k in full)

def test_weights_load_without_pickle_and_carry_lineage(tiny_dataset, tmp_path):
    cfg = small_config(tiny_dataset)
    _run(cfg, tiny_dataset, tmp_path, "model")
    with safe_open(tmp_path / "model" / "model.safetensors", "pt") as f:
        spec = json.loads(f.metadata()["spec"])
    assert set(spec["lineage"]) == {"data_hash", "config_hash", "code_hash", "environment", "numerics"}
    assert spec["lineage"]["environment"]["device"] == "cpu"
    assert spec["classes"] == ["a", "b", "c"]
    model, norm, loaded_spec = load_trained(tmp_path / "model")
    assert loaded_spec == spec
    logits = model(norm(torch.zeros(2, 1, 16, 16, dtype=torch.uint8)))
    assert logits.shape == (2, 3)


@pytest.mark.integration
def test_training_learns_the_tiny_task(tiny_dataset, tmp_path):
    metrics = _run(small_config(tiny_dataset, "train.epochs=15", "train.lr=0.01"), tiny_dataset, tmp_path, "model")
    assert metrics["val_accuracy"] >= 0.8


def test_balanced_sampling_weights_equalise_cells():
    keys = ["a|x"] * 6 + ["a|y"] * 2 + ["b|x"] * 2
    weights = balanced_weights(__import__("numpy").array(keys))
    per_cell = {k: float(weights[[i for i, kk in enumerate(keys) if kk == k]].sum()) for k in set(keys)}
    assert per_cell == pytest.approx({"a|x": 1.0, "a|y": 1.0, "b|x": 1.0})


@pytest.mark.integration
def test_balanced_sampling_changes_the_model(tiny_dataset, tmp_path):
    plain = _run(small_config(tiny_dataset), tiny_dataset, tmp_path / "p", "model")
    balanced = _run(small_config(tiny_dataset, "train.balanced_sampling=true"), tiny_dataset, tmp_path / "b", "model")
    assert (tmp_path / "p/model/model.safetensors").read_bytes() != (tmp_path / "b/model/model.safetensors").read_bytes()
    assert plain.keys() == balanced.keys()


@pytest.mark.parametrize("name,channels,size", [("resnet18", 3, (16, 16)), ("resnet18", 1, (128, 96)), ("cnn", 3, (40, 30))])
def test_model_zoo_adapts_to_channels_and_size(name, channels, size):
    model = build_model(OmegaConf.to_container(compose([f"model={name}"]).model), channels, 7, size).eval()
    assert model(torch.zeros(2, channels, *size)).shape == (2, 7)


def test_unknown_model_name_is_a_config_error():
    with pytest.raises(ConfigError, match="model.name"):
        build_model({"name": "vgg_tiny"}, 1, 3, (16, 16))


@pytest.mark.integration
def test_resnet18_trains_end_to_end_on_rgb(tmp_path):
    from tests.helpers.datasets import make_image_dataset

    data = make_image_dataset(tmp_path / "rgb", channels=3, per_class=14)
    cfg = small_config(data, "model=resnet18", "train.epochs=1", channels=3)
    metrics = _run(cfg, data, tmp_path, "model")
    assert metrics["epochs_run"] == 1


@pytest.mark.e2e
def test_the_train_step_starts_its_own_data_parallel_processes(tiny_dataset, tmp_path):
    """train.processes=2: the step itself runs under torchrun (gloo on CPU, the same code path as one
    process per GPU), whether `dvc repro` or the KFP train task started it."""
    import subprocess
    import sys

    from components.core.config.compose import compose
    from components.core.paths import ROOT

    overrides = small_overrides(tiny_dataset, "train.epochs=12", "train.lr=0.01", "train.early_stopping_patience=0", "train.processes=2")
    prepare(compose(overrides), tiny_dataset, tmp_path / "prepared")
    result = subprocess.run(
        [sys.executable, "-m", "components.train", "--prepared", str(tmp_path / "prepared"), "--out", str(tmp_path / "model"),
         "--live", str(tmp_path / "live"), "--checkpoints", str(tmp_path / "ckpt"), *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Setting OMP_NUM_THREADS environment variable for each process" in result.stderr  # torchrun started > 1 process
    assert result.stdout.count("train: {") == 1  # the launcher reports; its torchrun processes stay quiet
    spec = json.loads((tmp_path / "model" / "model.json").read_text())
    assert spec["metrics"]["epochs_run"] == 12 and spec["metrics"]["val_accuracy"] >= 0.8
    live = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert live["step"] == 12
    model, norm, _ = load_trained(tmp_path / "model")
    assert model(norm(torch.zeros(1, 1, 16, 16, dtype=torch.uint8))).shape == (1, 3)


def test_data_hash_comes_from_the_environment_inside_a_component_image(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("LINEAGE_DATA_HASH", "feedbeef.dir")
    _run(small_config(tiny_dataset, "train.epochs=1"), tiny_dataset, tmp_path, "model")
    lineage = json.loads((tmp_path / "model" / "model.json").read_text())["lineage"]
    assert lineage["data_hash"] == "feedbeef.dir"


def test_device_batches_serve_the_order_once_normalised_on_the_device():
    """The data path (uint8 cache -> batch -> device -> normalised there); on CPU, as run here (no GPU)."""
    from components.model.networks import Normalize
    from components.training.loop import DeviceBatches

    images = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8)
    labels = torch.arange(10)
    norm = Normalize([0.5], [0.25])
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    served = list(DeviceBatches(images, labels, norm, torch.device("cpu")).batches(order, 4))
    assert [len(y) for _, y in served] == [4, 4, 2]
    assert torch.equal(torch.cat([y for _, y in served]), order)
    assert torch.allclose(torch.cat([x for x, _ in served]), (images[order].float() / 255 - 0.5) / 0.25, atol=1e-6)


def test_a_dvclive_failure_on_the_background_thread_fails_the_step(tiny_dataset, tmp_path, monkeypatch):
    from components.training.loop import EpochLogger

    cfg = small_config(tiny_dataset, "train.epochs=1")
    prepare(cfg, tiny_dataset, tmp_path / "prepared")

    def failing_write(self, values):
        raise OSError("live: no space left on device")

    monkeypatch.setattr(EpochLogger, "_epoch", failing_write)
    with pytest.raises(OSError, match="live"):
        train(cfg, tmp_path / "prepared", tmp_path / "model", tmp_path / "live", tmp_path / "ckpt")
    assert not (tmp_path / "model").exists()
