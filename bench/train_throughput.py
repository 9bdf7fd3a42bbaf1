"""Training-loop efficiency, two measurements, each side by side in one process.

1. The template's train step (startup, DVCLive, checkpoints, lineage, saving included) vs a
   minimal hand-written PyTorch loop with batched validation, on the same model, data, batch
   size and threads, at each `--epochs` value. The two take turns, `--repeats` times, each
   going first in every other turn; printed: images/s min/median/max of each, and the ratio
   template / minimal of each turn (min/median/max). Target: >= 0.95 at 5 and at 15 epochs.
   Also printed, far less noisy: the template's fixed costs, its run time outside
   `train_epoch` and `validate` (loading, building, checkpoints, logging, lineage, saving).
   Before any clock, one untimed epoch of each pays what a process pays once whatever its
   loop: PyTorch's first optimizer imports torch._dynamo (printed; seconds here).
2. `--data-path`: the GPU data path (uint8 cache -> pinned batch -> non-blocking copy ->
   normalised on the device) vs the same training steps on one batch already resident on the
   device. Printed: images/s of each and the share of the step time spent waiting for data,
   1 - resident / full. Runs on CPU too (there the "copy" is the host gather).

    python bench/train_throughput.py [--epochs 5 15] [--repeats 5] [--threads 1]
    python bench/train_throughput.py --data-path [--device cuda] [--steps 200]

Needs artifacts/prepared (`make run` or `dvc repro prepare` first).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from components import train as train_module
from components.core.config import compose
from components.data.dataset import load_prepared
from components.model.networks import Normalize, build_model
from components.training.loop import DeviceBatches, train_epoch


def _model_and_data(cfg, prepared_dir: Path, device: torch.device):
    prepared = load_prepared(prepared_dir)
    meta = prepared.meta
    model = build_model(cfg.model.name, meta["channels"], len(meta["classes"]), tuple(meta["image_size"]),
                        cfg.model.width, cfg.model.dropout).to(device)
    norm = Normalize(**meta["normalization"]).to(device)
    return prepared, model, norm


def minimal_loop(cfg, prepared_dir: Path) -> float:
    """The textbook loop: shuffle, forward, backward, step, and one batched validation pass per epoch."""
    torch.manual_seed(cfg.seed)
    prepared, model, norm = _model_and_data(cfg, prepared_dir, torch.device("cpu"))
    x, index = prepared.split("train")
    xv, _ = prepared.split("val")
    images, labels, val_images = torch.from_numpy(x), torch.tensor(index["label_index"].to_numpy()), torch.from_numpy(xv)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    loss_fn, batch = nn.CrossEntropyLoss(), cfg.train.batch_size
    start = time.perf_counter()
    for _ in range(cfg.train.epochs):
        model.train()
        order = torch.randperm(len(images))
        for i in range(0, len(images), batch):
            ids = order[i : i + batch]
            loss = loss_fn(model(norm(images[ids])), labels[ids])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            for i in range(0, len(val_images), batch):
                model(norm(val_images[i : i + batch])).argmax(1)
    return len(images) * cfg.train.epochs / (time.perf_counter() - start)


@contextmanager
def time_spent_in(module, names: tuple[str, ...]) -> Iterator[list[float]]:
    """Seconds spent in `module`'s functions `names` while the block runs (one running total)."""
    spent, originals = [0.0], {name: getattr(module, name) for name in names}

    def timed(function):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
        return call

    for name, function in originals.items():
        setattr(module, name, timed(function))
    try:
        yield spent
    finally:
        for name, function in originals.items():
            setattr(module, name, function)


def template_step(cfg, prepared_dir: Path) -> tuple[float, float]:
    """(images/s, seconds of the run spent outside the epochs' training and validation)."""
    n_train = load_prepared(prepared_dir).meta["counts"]["train"]
    with tempfile.TemporaryDirectory() as tmp, time_spent_in(train_module, ("train_epoch", "validate")) as in_epochs:
        start = time.perf_counter()
        train_module.train(cfg, prepared_dir, Path(tmp) / "model", Path(tmp) / "live", Path(tmp) / "ckpt")
        elapsed = time.perf_counter() - start
    return n_train * cfg.train.epochs / elapsed, elapsed - in_epochs[0]


def spread(values: list[float], fmt: str) -> str:
    return "/".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def bench_config(epochs: int, overrides: list[str]):
    return compose([f"train.epochs={epochs}", "train.early_stopping_patience=0", "train.device=cpu", *overrides])


def warm_up(prepared_dir: Path, overrides: list[str]) -> None:
    """Pay the once-per-process costs before any clock, so neither side of the first turn pays
    them for the other: a minimal loop in a fresh process pays them as the template step does."""
    start = time.perf_counter()
    import torch._dynamo  # noqa: F401  (what every torch.optim optimizer imports on first use)

    print(f"warm-up, not counted: torch._dynamo imported by the first optimizer {time.perf_counter() - start:.2f} s")
    template_step(bench_config(1, overrides), prepared_dir)
    minimal_loop(bench_config(1, overrides), prepared_dir)


def loop_efficiency(epochs: int, repeats: int, prepared_dir: Path, overrides: list[str]) -> None:
    cfg = bench_config(epochs, overrides)
    runs, minimal = [], []
    for turn in range(repeats):  # side by side: a burst of load from elsewhere hits both alike
        if turn % 2:  # each goes first in every other turn
            minimal.append(minimal_loop(cfg, prepared_dir))
        runs.append(template_step(cfg, prepared_dir))
        if not turn % 2:
            minimal.append(minimal_loop(cfg, prepared_dir))
    template, fixed = [speed for speed, _ in runs], [outside for _, outside in runs]
    ratios = [t / m for t, m in zip(template, minimal)]
    print(f"epochs={epochs:>3}  template {spread(template, '.0f')} images/s (min/median/max)  "
          f"minimal+val {spread(minimal, '.0f')}  ratio template/minimal {spread(ratios, '.3f')}  (target >= 0.95)")
    print(f"            template's fixed costs (run time outside training and validating the epochs): {spread(fixed, '.3f')} s")


def _steps_per_second(model, data: DeviceBatches, orders: list[torch.Tensor], batch: int, opt) -> float:
    start = time.perf_counter()
    for order in orders:
        train_epoch(model, data, order, batch, opt, nn.CrossEntropyLoss())  # ends with .item(): the device is drained
    return sum(len(o) for o in orders) / (time.perf_counter() - start)


def data_path(device: torch.device, steps: int, repeats: int, prepared_dir: Path, overrides: list[str]) -> None:
    cfg = compose(["train.device=cpu", *overrides])
    prepared, model, norm = _model_and_data(cfg, prepared_dir, device)
    x, index = prepared.split("train")
    batch = cfg.train.batch_size
    cache = DeviceBatches(torch.from_numpy(x), torch.tensor(index["label_index"].to_numpy()), norm, device)
    first = torch.arange(batch)
    resident = DeviceBatches(cache.images[first].to(device), cache.labels[first].to(device), norm, device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    full_orders = [torch.randint(len(cache), (steps * batch,))]
    resident_orders = [torch.randint(batch, (steps * batch,), device=device)]
    full, still = [], []
    for _ in range(repeats):
        full.append(_steps_per_second(model, cache, full_orders, batch, opt))
        still.append(_steps_per_second(model, resident, resident_orders, batch, opt))
    waiting = [1 - f / s for f, s in zip(full, still)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (no GPU here: the copy is a host gather)"
    print(f"data path on {name}: {steps} steps of {batch}, {repeats} repeats (min/median/max)")
    print(f"  from the uint8 cache: {spread(full, '.0f')} images/s")
    print(f"  batch resident on the device: {spread(still, '.0f')} images/s")
    print(f"  share of step time waiting for data: {spread(waiting, '.1%')}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, nargs="+", default=[5, 15])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    parser.add_argument("--prepared", type=Path, default=Path("artifacts/prepared"))
    parser.add_argument("--data-path", action="store_true", help="measure the device data path instead")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, as for every command (e.g. model=resnet18)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads={torch.get_num_threads()} repeats={args.repeats}")
    if args.data_path:
        data_path(torch.device(args.device), args.steps, args.repeats, args.prepared, args.overrides)
        return
    warm_up(args.prepared, args.overrides)
    for epochs in args.epochs:
        loop_efficiency(epochs, args.repeats, args.prepared, args.overrides)


if __name__ == "__main__":
    main()
