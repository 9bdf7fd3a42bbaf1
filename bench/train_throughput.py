"""Training-loop efficiency: the template's train step vs a minimal hand-written PyTorch loop
on the same model, data, batch size and threads, run side by side (alternating, median of N).

    .venv/bin/python bench/train_throughput.py [--epochs 15] [--repeats 3]

Needs artifacts/prepared (run `make run` or `dvc repro prepare` first). Prints images/s for
each and the ratio template / minimal (target >= 0.95).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from components.core.config import compose
from components.data.dataset import load_prepared
from components.model.networks import Normalize, build_model
from components.train import train


def minimal_loop(cfg, prepared_dir: Path, validate: bool) -> float:
    """The textbook loop: shuffle, forward, backward, step (+ one validation pass per epoch)."""
    torch.manual_seed(cfg.seed)
    prepared = load_prepared(prepared_dir)
    x, index = prepared.split("train")
    xv, index_val = prepared.split("val")
    images, labels = torch.from_numpy(x), torch.tensor(index["label_index"].to_numpy())
    val_images = torch.from_numpy(xv)
    meta = prepared.meta
    model = build_model(cfg.model.name, meta["channels"], len(meta["classes"]), tuple(meta["image_size"]), cfg.model.width, cfg.model.dropout)
    norm = Normalize(**meta["normalization"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for _ in range(cfg.train.epochs):
        model.train()
        order = torch.randperm(len(images))
        for i in range(0, len(images), cfg.train.batch_size):
            ids = order[i : i + cfg.train.batch_size]
            loss = loss_fn(model(norm(images[ids])), labels[ids])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if validate:
            model.eval()
            with torch.no_grad():
                for i in range(0, len(val_images), cfg.train.batch_size):
                    model(norm(val_images[i : i + cfg.train.batch_size])).argmax(1)
    return len(images) * cfg.train.epochs / (time.perf_counter() - start)


def template_step(cfg, prepared_dir: Path) -> float:
    n_train = load_prepared(prepared_dir).meta["counts"]["train"]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train(cfg, prepared_dir, Path(tmp) / "model", Path(tmp) / "live", Path(tmp) / "ckpt")
        return n_train * cfg.train.epochs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=15)  # the default config
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prepared", type=Path, default=Path("artifacts/prepared"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, as for every command (e.g. model=resnet18)")
    args = parser.parse_args()
    cfg = compose([f"train.epochs={args.epochs}", "train.early_stopping_patience=0", "train.device=cpu", *args.overrides])
    torch.set_num_threads(torch.get_num_threads())
    results: dict[str, list[float]] = {"template": [], "minimal+val": [], "minimal": []}
    for _ in range(args.repeats):
        results["template"].append(template_step(cfg, args.prepared))
        results["minimal+val"].append(minimal_loop(cfg, args.prepared, validate=True))
        results["minimal"].append(minimal_loop(cfg, args.prepared, validate=False))
    medians = {k: statistics.median(v) for k, v in results.items()}
    print(f"threads={torch.get_num_threads()} epochs={args.epochs} batch={cfg.train.batch_size} repeats={args.repeats}")
    for name, value in medians.items():
        print(f"{name:>12}: {value:8.0f} images/s")
    print(f"ratio template / minimal+val: {medians['template'] / medians['minimal+val']:.3f}  (target >= 0.95)")
    print(f"ratio template / minimal (no validation pass): {medians['template'] / medians['minimal']:.3f}")


if __name__ == "__main__":
    main()
