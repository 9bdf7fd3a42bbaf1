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
import sys
import time
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
from components.core.lineage import code_hash, lineage
from components.core.progress import progress
from components.model.networks import Normalize, build_model, predict_logits, resolve_device

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


def _resume_key(cfg: DictConfig, prepared: Prepared) -> str:
    """What a checkpoint must share with this run to be continued: the prepared data, the config
    (but for the knobs allowed to change between a run and its resume) and the training code."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container["train"].pop("resume")
    container["train"].pop("epochs")  # resuming may extend a run
    container["resume_of"] = {"data": prepared.meta["lineage"], "code": code_hash(__spec__.name)}
    return config_hash(OmegaConf.create(container))


def train(cfg: DictConfig, prepared_dir: str | Path, out_dir: str | Path, live_dir: str | Path = "dvclive",
          checkpoint_dir: str | Path = "artifacts/checkpoints") -> dict:
    from dvclive import Live

    cfg = select(cfg, SECTIONS)
    t = cfg.train
    prepared = load_prepared(prepared_dir)
    if prepared.meta["classes"] != list(cfg.data.classes) or prepared.meta["channels"] != cfg.data.channels:
        raise DataError(f"{prepared_dir}: prepared with other classes/channels than the config; re-run prepare")
    processes, device = distributed.setup(resolve_device(t.device))
    seed_everything(cfg.seed, device)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)

    x_train, index_train = without_groups(*prepared.split("train"), t.exclude_groups, prepared.meta["sensitive_attributes"])
    x_val, index_val = prepared.split("val")
    if len(x_train) == 0 or len(x_val) == 0:
        raise DataError(f"{prepared_dir}: the train or validation split is empty; add data or change data.split")
    images, labels = torch.from_numpy(x_train), torch.tensor(index_train["label_index"].to_numpy())
    val_images, val_labels = torch.from_numpy(x_val), torch.tensor(index_val["label_index"].to_numpy())
    spec = model_spec(cfg, prepared)
    model = build_model(cfg.model.name, spec["channels"], len(spec["classes"]), tuple(spec["image_size"]), cfg.model.width, cfg.model.dropout).to(device)
    trainer = distributed.wrap(model, processes, device)
    norm = Normalize(**spec["normalization"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    weights = balanced_weights(group_keys(index_train, spec["sensitive_attributes"])) if t.balanced_sampling else None
    generator = torch.Generator().manual_seed(cfg.seed)

    state = {"epoch": 0, "best_loss": math.inf, "best_accuracy": 0.0, "best_epoch": -1, "bad_epochs": 0, "best_state": None}
    checkpoint = Path(checkpoint_dir) / CHECKPOINT
    resume_key = _resume_key(cfg, prepared)
    saved = torch.load(checkpoint, weights_only=True) if t.resume and checkpoint.exists() else None
    if saved is not None and saved["resume_key"] != resume_key:
        print(f"warning: {checkpoint} was written for other data, config or code; training starts afresh", file=sys.stderr)
        saved = None
    resumed = saved is not None
    if resumed:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        state = saved["state"]

    live = Live(str(live_dir), resume=resumed, save_dvc_exp=False, dvcyaml=False) if processes.is_main else None
    n, batch = len(images), t.batch_size
    epochs = progress(range(state["epoch"], t.epochs), "train", total=t.epochs, unit="epoch", initial=state["epoch"], every_s=0,
                      disable=not processes.is_main)
    for epoch in epochs:
        epoch_start = time.perf_counter()
        trainer.train()
        order = torch.multinomial(weights, n, replacement=True, generator=generator) if weights is not None else torch.randperm(n, generator=generator)
        order = distributed.shard(order, processes)
        n_local = len(order)
        total_loss = 0.0
        for i in range(0, n_local, batch):
            ids = order[i : i + batch]
            x, y = norm(images[ids].to(device, non_blocking=True)), labels[ids].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = loss_fn(trainer(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(ids)
        distributed.sync_buffers(model, processes)
        logits = predict_logits(model, norm, val_images, device)
        val_loss = loss_fn(logits, val_labels).item()
        val_acc = (logits.argmax(1) == val_labels).float().mean().item()
        if live:
            live.log_metric("train/loss", total_loss / n_local)
            live.log_metric("val/loss", val_loss)
            live.log_metric("val/accuracy", val_acc)
            live.next_step()
        epochs.note(train_loss=total_loss / n_local, val_loss=val_loss, val_accuracy=val_acc,
                    images_per_s=round(n_local / (time.perf_counter() - epoch_start)))

        if val_loss < state["best_loss"]:
            state.update(best_loss=val_loss, best_accuracy=val_acc, best_epoch=epoch, bad_epochs=0,
                         best_state=copy.deepcopy(model.state_dict()))
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        if processes.is_main:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                        "torch_rng": torch.get_rng_state(), "state": state, "resume_key": resume_key}, tmp)
            tmp.replace(checkpoint)
        if t.early_stopping_patience and state["bad_epochs"] >= t.early_stopping_patience:
            tqdm.write(f"train: early stop after epoch {epoch + 1} (best epoch {state['best_epoch'] + 1})")
            break

    model.load_state_dict(state["best_state"])
    if processes.is_main:
        checkpoint.unlink(missing_ok=True)  # a finished run leaves no checkpoint behind to resume by mistake
    metrics = {
        "val_loss": round(state["best_loss"], 6),
        "val_accuracy": round(state["best_accuracy"], 6),
        "best_epoch": state["best_epoch"] + 1,
        "epochs_run": state["epoch"],
    }
    distributed.teardown(processes)
    if not processes.is_main:
        return metrics
    # The summary names each quantity once: the best epoch's validation numbers (the per-epoch
    # values stay in the plots).
    live.summary = {"val": {"loss": metrics["val_loss"], "accuracy": metrics["val_accuracy"]},
                    "best_epoch": metrics["best_epoch"], "epochs_run": metrics["epochs_run"]}
    live.make_summary()
    live.end()

    spec.update(metrics=metrics, lineage=lineage(cfg, __spec__.name, device.type))
    with atomic_dir(out_dir) as tmp_dir:
        weights_cpu = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights_cpu, str(tmp_dir / "model.safetensors"), metadata={"spec": json.dumps(spec, sort_keys=True)})
        write_json(tmp_dir / "model.json", spec)
    return metrics


if __name__ == "__main__":
    # under torchrun, rank 0 speaks for all
    run_step(train, "Train the configured model on the prepared data.",
             lambda metrics, args: f"train: {metrics} -> {args.out}" if os.environ.get("RANK", "0") == "0" else None,
             prepared="artifacts/prepared", out="artifacts/model", live="dvclive", checkpoints="artifacts/checkpoints")
