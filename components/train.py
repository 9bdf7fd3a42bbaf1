"""train: fit the configured model on the prepared cache, with early stopping,
checkpoint/resume and DVCLive logging.

Outputs: `out_dir`/model.safetensors (weights, no pickle; lineage in its metadata),
`out_dir`/model.json (architecture, classes, preprocessing, metrics, lineage), DVCLive
metrics and plots in `live_dir`, and a resumable checkpoint in `checkpoint_dir`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from components.training import distributed
from components.core.cli import run_step
from components.core.config import config_hash, select
from components.data.dataset import Prepared, load_prepared
from components.core.errors import ConfigError, DataError
from components.core.io import atomic_dir, write_json
from components.core.lineage import lineage
from components.model.networks import Normalize, build_model, resolve_device
from components.training.loop import DeviceBatches, EpochLogger, train_epoch, validate

CHECKPOINT = "last.pt"
SECTIONS = ("seed", "data", "model", "train")  # the config this step reads: its DVC params and its config hash


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


def _resume_key(cfg: DictConfig) -> str:
    """Config hash that ignores the knobs allowed to change between a run and its resume."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container["train"].pop("resume")
    container["train"].pop("epochs")  # resuming may extend a run
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


def _load(cfg: DictConfig, prepared_dir: str | Path) -> Prepared:
    prepared = load_prepared(prepared_dir)
    if prepared.meta["classes"] != list(cfg.data.classes) or prepared.meta["channels"] != cfg.data.channels:
        raise DataError(f"{prepared_dir}: prepared with other classes/channels than the config; re-run prepare")
    return prepared


def _device_data(prepared: Prepared, split: str, norm: nn.Module, device: torch.device) -> tuple[DeviceBatches, object]:
    x, index = prepared.split(split)
    return DeviceBatches(torch.from_numpy(x), torch.tensor(index["label_index"].to_numpy()), norm, device), index


def _build(cfg: DictConfig, prepared: Prepared, prepared_dir, processes: distributed.Processes, device: torch.device) -> Run:
    t, spec = cfg.train, model_spec(cfg, prepared)
    norm = Normalize(**spec["normalization"]).to(device)
    data, index_train = _device_data(prepared, "train", norm, device)
    val, _ = _device_data(prepared, "val", norm, device)
    if len(data) == 0 or len(val) == 0:
        raise DataError(f"{prepared_dir}: the train or validation split is empty; add data or change data.split")
    model = build_model(cfg.model.name, spec["channels"], len(spec["classes"]), tuple(spec["image_size"]), cfg.model.width, cfg.model.dropout).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    weights = balanced_weights(group_keys(index_train, spec["sensitive_attributes"])) if t.balanced_sampling else None
    return Run(model, distributed.wrap(model, processes, device), optimizer, data, val, weights,
               torch.Generator().manual_seed(cfg.seed), spec)


def _restore(cfg: DictConfig, checkpoint: Path, model: nn.Module, optimizer, generator: torch.Generator) -> tuple[dict, bool]:
    """The loop state to start from: a fresh one, or the checkpoint's when train.resume matches it."""
    t = cfg.train
    state = {"epoch": 0, "best_loss": math.inf, "best_accuracy": 0.0, "best_epoch": -1, "bad_epochs": 0, "best_state": None}
    resumed = t.resume and checkpoint.exists()
    if resumed:
        saved = torch.load(checkpoint, weights_only=True)
        if saved["resume_key"] != _resume_key(cfg):
            raise ConfigError(f"{checkpoint}: checkpoint was written with another config; delete it or set train.resume=false")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        state = saved["state"]
    return state, resumed


def _save_checkpoint(cfg: DictConfig, checkpoint: Path, model: nn.Module, optimizer, generator: torch.Generator, state: dict) -> None:
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    tmp = checkpoint.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(), "state": state, "resume_key": _resume_key(cfg)}, tmp)
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
    epochs = tqdm(range(state["epoch"], t.epochs), desc="train", unit="epoch", initial=state["epoch"], total=t.epochs,
                  disable=None if processes.is_main else True)
    for epoch in epochs:
        train_loss = train_epoch(run.trainer, run.data, _epoch_order(run, processes), t.batch_size, run.optimizer, nn.CrossEntropyLoss())
        distributed.sync_buffers(run.model, processes)
        val_loss, val_acc = validate(run.model, run.val, t.batch_size)
        if logger:
            logger.epoch({"train/loss": train_loss, "val/loss": val_loss, "val/accuracy": val_acc})
        epochs.set_postfix(train_loss=f"{train_loss:.4f}", val_loss=f"{val_loss:.4f}", val_acc=f"{val_acc:.4f}")
        _track_best(state, epoch, val_loss, val_acc, run.model)
        if processes.is_main:
            _save_checkpoint(cfg, checkpoint, run.model, run.optimizer, run.generator, state)
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
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    run = _build(cfg, prepared, prepared_dir, processes, device)
    checkpoint = Path(checkpoint_dir) / CHECKPOINT
    state, resumed = _restore(cfg, checkpoint, run.model, run.optimizer, run.generator)
    # Fixed costs (DVCLive's start and writes, the code hash of the lineage) run on one background
    # thread while the epochs run on this one.
    with ThreadPoolExecutor(1, thread_name_prefix="train-background") as background:
        provenance = background.submit(lineage, cfg, __name__, device.type) if processes.is_main else None
        logger = EpochLogger(background, live_dir, resumed) if processes.is_main else None
        _fit(cfg, run, state, checkpoint, processes, logger)
        run.model.load_state_dict(state["best_state"])
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
    _save_model(out_dir, run.model, run.spec)
    return metrics


if __name__ == "__main__":
    # under torchrun, rank 0 speaks for all
    run_step(train, "Train the configured model on the prepared data.",
             lambda metrics, args: f"train: {metrics} -> {args.out}" if os.environ.get("RANK", "0") == "0" else None,
             prepared="artifacts/prepared", out="artifacts/model", live="dvclive", checkpoints="artifacts/checkpoints")
