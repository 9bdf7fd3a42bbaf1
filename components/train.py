"""train: fit the configured model on the prepared cache, with early stopping,
checkpoint/resume and DVCLive logging.

Outputs: `out_dir`/model.safetensors (weights, no pickle; lineage in its metadata),
`out_dir`/model.json (architecture, classes, preprocessing, metrics, lineage), DVCLive
metrics and plots in `live_dir`, and a resumable checkpoint in `checkpoint_dir`.
"""

from __future__ import annotations

from components.core.cli import run_step, step_command

if __name__ == "__main__":  # before the imports below (torch): a bad config is refused at once
    command = step_command("Train the configured model on the prepared data.",
                           prepared="artifacts/prepared", out="artifacts/model", live="dvclive", checkpoints="artifacts/checkpoints")

import copy
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from components.training import distributed
from components.core.config.sections import config_hash, select
from components.data.dataset import Prepared, load_prepared
from components.core.errors import ConfigError, DataError, StepError
from components.core.io import atomic_dir, replace_dir, scratch_beside, write_json
from components.core.lineage import lineage
from components.core.numerics import activate
from components.core.progress import progress
from components.model.networks import Normalize, build_model, resolve_device
from components.training.loop import DeviceBatches, EpochLogger, train_epoch, validate

CHECKPOINT = "last.pt"


class TrainingError(StepError):
    """A training process failed (its own error is in the log above)."""


SECTIONS = ("seed", "data", "model", "train", "numerics")  # the config this step reads: its DVC params and its config hash


def seed_everything(seed: int, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)


def group_keys(index, attributes: list[str]) -> np.ndarray:
    return index["label"].str.cat([index[a] for a in attributes], sep="|").to_numpy() if attributes else index["label"].to_numpy()


def balanced_weights(keys: np.ndarray) -> torch.Tensor:
    """Sampling weight 1/|cell| so every (label, sensitive group) cell is drawn equally often."""
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return torch.tensor(1.0 / counts[inverse], dtype=torch.float64)


def without_groups(x: np.ndarray, index, excluded: list[str], attributes: list[str]) -> tuple[np.ndarray, object]:
    """The training images minus those of the excluded `attribute=group`s (train.exclude_groups)."""
    keep = np.ones(len(index), dtype=bool)
    for item in excluded:
        attribute, _, group = item.partition("=")
        if attribute not in attributes:
            raise ConfigError(f"train.exclude_groups: {item!r} is not attribute=group of a sensitive attribute {attributes}")
        keep &= (index[attribute] != group).to_numpy()
    return x[keep], index[keep]


def model_spec(cfg: DictConfig, prepared: Prepared) -> dict:
    meta = prepared.meta
    return {
        "model": OmegaConf.to_container(cfg.model),
        "classes": meta["classes"],
        "channels": meta["channels"],
        "image_size": meta["image_size"],
        "normalization": meta["normalization"],
        "sensitive_attributes": meta["sensitive_attributes"],
    }


def _resume_key(cfg: DictConfig, prepared: Prepared, provenance: Future[dict]) -> str:
    """What a checkpoint must share with this run to be continued: the prepared data, the config
    (but for the knobs allowed to change between a run and its resume) and the training code
    (the code hash of this run's lineage)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container["train"].pop("resume")
    container["train"].pop("epochs")  # resuming may extend a run
    container["resume_of"] = {"data": prepared.meta["lineage"], "code": provenance.result()["code_hash"]}
    return config_hash(OmegaConf.create(container))


@dataclass
class Run:
    """Everything one training run updates: the model (and its DDP wrapper), optimiser, data, sampling."""

    model: nn.Module
    trainer: nn.Module
    optimizer: torch.optim.Optimizer
    data: DeviceBatches
    val: DeviceBatches
    weights: torch.Tensor | None
    generator: torch.Generator
    spec: dict
    resume_key: Future[str]  # computed off the training thread; waited for only to read or write a checkpoint


def _load(cfg: DictConfig, prepared_dir: str | Path) -> Prepared:
    prepared = load_prepared(prepared_dir)
    if prepared.meta["classes"] != list(cfg.data.classes) or prepared.meta["channels"] != cfg.data.channels:
        raise DataError(f"{prepared_dir}: prepared with other classes/channels than the config; re-run prepare")
    return prepared


def _build(cfg: DictConfig, prepared: Prepared, prepared_dir, processes: distributed.Processes, device: torch.device,
           resume_key: Future[str]) -> Run:
    t, spec = cfg.train, model_spec(cfg, prepared)
    norm = Normalize(**spec["normalization"]).to(device)
    x_train, index_train = without_groups(*prepared.split("train"), t.exclude_groups, prepared.meta["sensitive_attributes"])
    data = DeviceBatches.of_split(x_train, index_train, norm, device)
    val = DeviceBatches.of_split(*prepared.split("val"), norm, device)
    if len(data) == 0 or len(val) == 0:
        raise DataError(f"{prepared_dir}: the train or validation split is empty; add data or change data.split")
    model = build_model(spec["model"], spec["channels"], len(spec["classes"]), tuple(spec["image_size"])).to(device)
    # fused: its own vectorised kernel, not MKL's vendor-dispatched sqrt (reference numerics, docs/reproducibility.md)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, fused=True)
    weights = balanced_weights(group_keys(index_train, spec["sensitive_attributes"])) if t.balanced_sampling else None
    return Run(model, distributed.wrap(model, processes, device), optimizer, data, val, weights,
               torch.Generator().manual_seed(cfg.seed), spec, resume_key)


def _restore(resume: bool, checkpoint: Path, run: Run) -> tuple[dict, bool]:
    """The loop state to start from: a fresh one, or the checkpoint's when train.resume is on and
    the checkpoint was written for this run's data, config and code."""
    state = {"epoch": 0, "best_loss": math.inf, "best_accuracy": 0.0, "best_epoch": -1, "bad_epochs": 0, "best_state": None}
    saved = torch.load(checkpoint, weights_only=True) if resume and checkpoint.exists() else None
    if saved is not None and saved["resume_key"] != run.resume_key.result():
        print(f"warning: {checkpoint} was written for other data, config or code; training starts afresh", file=sys.stderr)
        saved = None
    if saved is None:
        return state, False
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.generator.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    return saved["state"], True


def _save_checkpoint(checkpoint: Path, run: Run, state: dict) -> None:
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint.with_suffix(".tmp")
    torch.save({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "generator": run.generator.get_state(),
                "torch_rng": torch.get_rng_state(), "state": state, "resume_key": run.resume_key.result()}, tmp)
    tmp.replace(checkpoint)


def _epoch_order(run: Run, processes: distributed.Processes) -> torch.Tensor:
    n = len(run.data)
    order = torch.multinomial(run.weights, n, replacement=True, generator=run.generator) if run.weights is not None \
        else torch.randperm(n, generator=run.generator)
    return distributed.shard(order, processes)


def _track_best(state: dict, epoch: int, val_loss: float, val_acc: float, model: nn.Module) -> None:
    if val_loss < state["best_loss"]:
        state.update(best_loss=val_loss, best_accuracy=val_acc, best_epoch=epoch, bad_epochs=0,
                     best_state=copy.deepcopy(model.state_dict()))
    else:
        state["bad_epochs"] += 1
    state["epoch"] = epoch + 1


def _fit(cfg: DictConfig, run: Run, state: dict, checkpoint: Path, processes: distributed.Processes,
         logger: EpochLogger | None) -> None:
    """The epochs: train, validate, log (off this thread), keep the best weights, checkpoint, stop early."""
    t = cfg.train
    epochs = progress(range(state["epoch"], t.epochs), "train", total=t.epochs, unit="epoch", initial=state["epoch"], every_s=0,
                      disable=not processes.is_main)
    for epoch in epochs:
        epoch_start = time.perf_counter()
        order = _epoch_order(run, processes)
        train_loss = train_epoch(run.trainer, run.data, order, t.batch_size, run.optimizer, nn.CrossEntropyLoss())
        distributed.sync_buffers(run.model, processes)
        val_loss, val_acc = validate(run.model, run.val, t.batch_size)
        if logger:
            logger.epoch({"train/loss": train_loss, "val/loss": val_loss, "val/accuracy": val_acc})
        epochs.note(train_loss=train_loss, val_loss=val_loss, val_accuracy=val_acc,
                    images_per_s=round(len(order) / (time.perf_counter() - epoch_start)))
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            raise TrainingError(f"train: the loss is not finite after epoch {epoch + 1} (training {train_loss}, validation "
                                f"{val_loss}): training diverged; lower train.lr (now {t.lr})")
        _track_best(state, epoch, val_loss, val_acc, run.model)
        if processes.is_main:
            _save_checkpoint(checkpoint, run, state)
        if t.early_stopping_patience and state["bad_epochs"] >= t.early_stopping_patience:
            tqdm.write(f"train: early stop after epoch {epoch + 1} (best epoch {state['best_epoch'] + 1})")
            break


def _save_model(out_dir: str | Path, model: nn.Module, spec: dict) -> None:
    with atomic_dir(out_dir) as tmp_dir:
        weights_cpu = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights_cpu, str(tmp_dir / "model.safetensors"), metadata={"spec": json.dumps(spec, sort_keys=True)})
        write_json(tmp_dir / "model.json", spec)


def train(cfg: DictConfig, prepared_dir: str | Path, out_dir: str | Path, live_dir: str | Path = "dvclive",
          checkpoint_dir: str | Path = "artifacts/checkpoints") -> dict:
    cfg = select(cfg, SECTIONS)
    prepared = _load(cfg, prepared_dir)
    processes, device = distributed.setup(resolve_device(cfg.train.device))
    seed_everything(cfg.seed, device)
    numerics = activate(cfg.numerics.profile, cfg.numerics.threads)
    # Fixed costs (the lineage and the resume key made from it, DVCLive's start and writes) run in
    # order on one background thread while the epochs run on this one. DVCLive writes to a scratch
    # copy of live_dir that replaces it only when the run succeeds: a failed run leaves the last
    # good curves and summary in place.
    with scratch_beside(live_dir) as live_scratch, ThreadPoolExecutor(1, thread_name_prefix="train-background") as background:
        provenance = background.submit(lineage, cfg, __spec__.name, device.type, numerics=numerics)
        run = _build(cfg, prepared, prepared_dir, processes, device, background.submit(_resume_key, cfg, prepared, provenance))
        checkpoint = Path(checkpoint_dir) / CHECKPOINT
        state, resumed = _restore(cfg.train.resume, checkpoint, run)
        if resumed and Path(live_dir).exists():
            shutil.copytree(live_dir, live_scratch, dirs_exist_ok=True)
        logger = EpochLogger(background, live_scratch, resumed) if processes.is_main else None
        _fit(cfg, run, state, checkpoint, processes, logger)
        run.model.load_state_dict(state["best_state"])
        if processes.is_main:
            checkpoint.unlink(missing_ok=True)  # a finished run leaves no checkpoint behind to resume by mistake
        metrics = {"val_loss": round(state["best_loss"], 6), "val_accuracy": round(state["best_accuracy"], 6),
                   "best_epoch": state["best_epoch"] + 1, "epochs_run": state["epoch"]}
        distributed.teardown(processes)
        if not processes.is_main:
            return metrics
        # The summary names each quantity once: the best epoch's validation numbers (the per-epoch
        # values stay in the plots).
        logger.finish({"val": {"loss": metrics["val_loss"], "accuracy": metrics["val_accuracy"]},
                       "best_epoch": metrics["best_epoch"], "epochs_run": metrics["epochs_run"]})
        run.spec.update(metrics=metrics, lineage=provenance.result())
        replace_dir(live_scratch, Path(live_dir))
    _save_model(out_dir, run.model, run.spec)
    return metrics


def launch(cfg: DictConfig, prepared_dir: str | Path, out_dir: str | Path, live_dir: str | Path = "dvclive",
           checkpoint_dir: str | Path = "artifacts/checkpoints") -> dict:
    """The train step as every path runs it (`dvc repro`, KFP): with train.processes above 1 it
    starts itself under torchrun, one process per GPU (gloo on CPU); under torchrun already, or with
    one process, it trains here."""
    if cfg.train.processes == 1 or "RANK" in os.environ:
        return train(cfg, prepared_dir, out_dir, live_dir, checkpoint_dir)
    with tempfile.TemporaryDirectory() as tmp:
        params = Path(tmp) / "params.yaml"
        OmegaConf.save(cfg, params)
        args = ["--params", str(params), "--prepared", str(prepared_dir), "--out", str(out_dir), "--live", str(live_dir),
                "--checkpoints", str(checkpoint_dir)]
        torchrun = subprocess.run(distributed.torchrun_command(__spec__.name, args, cfg.train.processes))
    if torchrun.returncode != 0:
        raise TrainingError(f"train: torchrun with train.processes={cfg.train.processes} exited with {torchrun.returncode} (its log is above)")
    return json.loads((Path(out_dir) / "model.json").read_text())["metrics"]


if __name__ == "__main__":
    # The processes torchrun starts stay quiet: whoever launched them reports.
    run_step(command, launch, lambda metrics, args: None if "RANK" in os.environ else f"train: {metrics} -> {args.out}")
