"""Training-loop efficiency, two measurements, each side by side in one process.

1. The template's train step (startup, DVCLive, checkpoints, lineage, saving included) vs a
   minimal hand-written PyTorch loop with batched validation, on the same model, data, batch
   size and threads, at each `--epochs` value. The two take turns, `--repeats` times, each
   going first in every other turn; printed: images/s min/median/max of each, and the ratio
   template / minimal of each turn (min/median/max). Target: >= 0.95 at 5 and at 15 epochs.
   Also printed, both far less noisy on a machine whose speed drifts: the loops alone, one
   epoch of each in turn (`--epoch-pairs`), and the template's fixed costs, its run time
   outside `train_epoch` and `validate` (loading, building, checkpoints, logging, lineage, saving).
   Before any clock, one untimed epoch of each pays what a process pays once whatever its
   loop: PyTorch's first optimizer imports torch._dynamo (printed; seconds here).
2. `--data-path`: the GPU data path (uint8 cache -> pinned batch -> non-blocking copy ->
   normalised on the device) vs the same training steps on one batch already resident on the
   device. Printed: images/s of each and the share of the step time spent waiting for data,
   1 - resident / full. Runs on CPU too (there the "copy" is the host gather).

    python bench/train_throughput.py [--epochs 5 15] [--repeats 5] [--epoch-pairs 40] [numerics.profile=native]

Both loops run under the numerics profile of the config (conf/numerics: the reference profile's
kernels and threads unless overridden); bench/numerics_cost.py compares the profiles.
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
from omegaconf import OmegaConf
from torch import nn

import components  # noqa: F401  (first: it pins the reference numerics before torch loads)
from components import train as train_module
from components.core.config.compose import compose
from components.core.numerics import activate
from components.core.numerics_env import restart_for
from components.data.dataset import load_prepared
from components.model.networks import Normalize, build_model
from components.training.loop import DeviceBatches, train_epoch, validate


def _model_and_data(cfg, prepared_dir: Path, device: torch.device):
    prepared = load_prepared(prepared_dir)
    meta = prepared.meta
    model = build_model(OmegaConf.to_container(cfg.model), meta["channels"], len(meta["classes"]), tuple(meta["image_size"])).to(device)
    norm = Normalize(**meta["normalization"]).to(device)
    return prepared, model, norm


class MinimalLoop:
    """The textbook loop: shuffle, forward, backward, step, and one batched validation pass per epoch."""

    def __init__(self, cfg, prepared_dir: Path):
        torch.manual_seed(cfg.seed)
        prepared, self.model, self.norm = _model_and_data(cfg, prepared_dir, torch.device("cpu"))
        x, index = prepared.split("train")
        self.images, self.labels = torch.from_numpy(x), torch.tensor(index["label_index"].to_numpy())
        self.val_images = torch.from_numpy(prepared.split("val")[0])
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.loss_fn, self.batch = nn.CrossEntropyLoss(), cfg.train.batch_size

    def epoch(self) -> None:
        model, batch = self.model, self.batch
        model.train()
        order = torch.randperm(len(self.images))
        for i in range(0, len(self.images), batch):
            ids = order[i : i + batch]
            loss = self.loss_fn(model(self.norm(self.images[ids])), self.labels[ids])
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        model.eval()
        with torch.no_grad():
            for i in range(0, len(self.val_images), batch):
                model(self.norm(self.val_images[i : i + batch])).argmax(1)


class TemplateLoop:
    """The template's epoch alone, as train._fit runs it: components.training.loop's train_epoch and validate."""

    def __init__(self, cfg, prepared_dir: Path):
        torch.manual_seed(cfg.seed)
        prepared, self.model, norm = _model_and_data(cfg, prepared_dir, torch.device("cpu"))
        self.data = DeviceBatches.of_split(*prepared.split("train"), norm, torch.device("cpu"))
        self.val = DeviceBatches.of_split(*prepared.split("val"), norm, torch.device("cpu"))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True)
        self.batch = cfg.train.batch_size

    def epoch(self) -> None:
        train_epoch(self.model, self.data, torch.randperm(len(self.data)), self.batch, self.opt, nn.CrossEntropyLoss())
        validate(self.model, self.val, self.batch)


def minimal_loop(cfg, prepared_dir: Path) -> float:
    loop = MinimalLoop(cfg, prepared_dir)
    start = time.perf_counter()
    for _ in range(cfg.train.epochs):
        loop.epoch()
    return len(loop.images) * cfg.train.epochs / (time.perf_counter() - start)


def loop_parity(pairs: int, prepared_dir: Path, overrides: list[str]) -> None:
    """The loops alone, one epoch of each in turn: on a machine whose speed drifts over seconds,
    pairs of adjacent epochs compare the loops far more tightly than pairs of whole runs."""
    cfg = bench_config(1, overrides)
    template, minimal = TemplateLoop(cfg, prepared_dir), MinimalLoop(cfg, prepared_dir)
    ratios = []
    for pair in range(pairs):
        seconds = {}
        for loop in (minimal, template) if pair % 2 else (template, minimal):
            start = time.perf_counter()
            loop.epoch()
            seconds[loop] = time.perf_counter() - start
        ratios.append(seconds[minimal] / seconds[template])
    print(f"the loops alone, one epoch of each in turn, {pairs} pairs: ratio template/minimal {spread(ratios, '.3f')}")


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
    cache = DeviceBatches.of_split(x, index, norm, device)
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
    parser.add_argument("--epoch-pairs", type=int, default=40, help="pairs of single epochs for the loops-alone comparison")
    parser.add_argument("--prepared", type=Path, default=Path("artifacts/prepared"))
    parser.add_argument("--data-path", action="store_true", help="measure the device data path instead")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, as for every command (e.g. model=resnet18)")
    args = parser.parse_args()
    numerics = compose(args.overrides).numerics
    restart_for(numerics.profile)
    print(f"numerics={activate(numerics.profile, numerics.threads)} repeats={args.repeats}")
    if args.data_path:
        data_path(torch.device(args.device), args.steps, args.repeats, args.prepared, args.overrides)
        return
    warm_up(args.prepared, args.overrides)
    loop_parity(args.epoch_pairs, args.prepared, args.overrides)
    for epochs in args.epochs:
        loop_efficiency(epochs, args.repeats, args.prepared, args.overrides)


if __name__ == "__main__":
    main()
