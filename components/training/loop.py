"""The parts of the training loop: batches moved to the device, one epoch of optimisation,
validation on the device, and the epoch logger that runs off the training thread."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Executor, Future
from pathlib import Path

import torch
from torch import nn


class DeviceBatches:
    """uint8 images (N, C, H, W) and their labels, served to `device` one batch at a time and
    normalised there.

    On CUDA the cache stays in host memory: each batch is gathered into pinned memory and
    copied on a side stream one step ahead (non-blocking), so the copy of batch k+1 overlaps
    the compute of batch k; the images cross the bus as uint8 (4x fewer bytes than float).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, norm: nn.Module, device: torch.device):
        self.images, self.labels, self.norm, self.device = images, labels, norm, device
        on_host = device.type == "cuda" and not images.is_cuda
        self.copy_stream = torch.cuda.Stream(device) if on_host else None

    @classmethod
    def of_split(cls, images, index, norm: nn.Module, device: torch.device) -> DeviceBatches:
        """A split as Prepared.split returns it: its uint8 image array and its index table."""
        return cls(torch.from_numpy(images), torch.tensor(index["label_index"].to_numpy()), norm, device)

    def __len__(self) -> int:
        return len(self.images)

    def _send(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.copy_stream is None:
            return self.images[ids], self.labels[ids]
        x = torch.empty((len(ids), *self.images.shape[1:]), dtype=self.images.dtype, pin_memory=True)
        torch.index_select(self.images, 0, ids, out=x)
        with torch.cuda.stream(self.copy_stream):
            return x.to(self.device, non_blocking=True), self.labels[ids].pin_memory().to(self.device, non_blocking=True)

    def _ready(self, sent: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = sent
        if self.copy_stream is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self.copy_stream)
            x.record_stream(compute)  # the caching allocator must not reuse x before compute is done with it
            y.record_stream(compute)
        return self.norm(x), y

    def batches(self, order: torch.Tensor, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(normalised images, labels) on the device for order[0:batch], order[batch:2*batch], ..."""
        starts = range(0, len(order), batch)
        pending = self._send(order[:batch]) if len(order) else None
        for start in starts:
            sent = pending
            following = order[start + batch : start + 2 * batch]
            pending = self._send(following) if len(following) else None
            yield self._ready(sent)


def autocast(device: torch.device) -> torch.autocast:
    """bf16 on CUDA; full precision (and bit-exact reruns) on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train_epoch(trainer: nn.Module, data: DeviceBatches, order: torch.Tensor, batch: int,
                optimizer: torch.optim.Optimizer, loss_fn: nn.Module) -> float:
    """One pass over `order`; returns the mean training loss. The loss stays on the device until
    the end, so no step waits for the host."""
    trainer.train()
    total = torch.zeros((), dtype=torch.float64, device=data.device)
    for x, y in data.batches(order, batch):
        with autocast(data.device):
            loss = loss_fn(trainer(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach().double() * len(y)
    return total.item() / max(len(order), 1)


@torch.no_grad()
def validate(model: nn.Module, data: DeviceBatches, batch: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over every image of `data`, computed on the device."""
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=data.device)
    correct = torch.zeros((), dtype=torch.int64, device=data.device)
    for x, y in data.batches(torch.arange(len(data)), batch):
        with autocast(data.device):
            logits = model(x).float()
        loss += nn.functional.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    return loss.item() / len(data), correct.item() / len(data)


class EpochLogger:
    """DVCLive on a background thread: starting it, logging each epoch and writing the summary
    never hold up training. Calls run in order on the one worker of `background`."""

    def __init__(self, background: Executor, live_dir: str | Path, resume: bool):
        self.background = background
        self.calls: list[Future] = [background.submit(self._start, str(live_dir), resume)]

    def _start(self, live_dir: str, resume: bool) -> None:
        from dvclive import Live

        self.live = Live(live_dir, resume=resume, save_dvc_exp=False, dvcyaml=False)

    def _epoch(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.live.log_metric(name, value)
        self.live.next_step()

    def _finish(self, summary: dict) -> None:
        self.live.summary = summary
        self.live.make_summary()
        self.live.end()

    def epoch(self, values: dict[str, float]) -> None:
        self.calls.append(self.background.submit(self._epoch, values))

    def finish(self, summary: dict) -> None:
        """Write the summary and wait for every call, raising the first error one of them hit."""
        self.calls.append(self.background.submit(self._finish, summary))
        for call in self.calls:
            call.result()
