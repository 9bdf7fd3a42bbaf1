"""Progress that shows wherever the output goes: a tqdm bar on a terminal; anywhere else (CI logs,
KFP pod logs, `| tee`) plain log lines with the count, rate, ETA and the step's own numbers, so a
long run is never silent until it ends.

    epochs = progress(range(first, total), "train", total=total, unit="epoch", every_s=0)
    for epoch in epochs:
        ...
        epochs.note(loss=0.31, accuracy=0.93)   # shown on the bar, or in the epoch's log line

    phases = progress((), "evaluate", total=4, unit="phase", every_s=0)
    phases.step(done="predictions")             # code that is not a loop: one call per phase
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO

from tqdm import tqdm

# Log lines (no terminal) at most this often; 0 = one line per item. A logging cadence, not a
# setting of any result, hence not in conf/.
EVERY_S = 10.0


class Progress:
    def __init__(self, iterable: Iterable, desc: str, total: int | None, unit: str, initial: int, every_s: float,
                 disable: bool, stream: TextIO):
        self.iterable, self.desc, self.unit, self.every_s, self.stream = iterable, desc, unit, every_s, stream
        self.total = total if total is not None else len(iterable)  # type: ignore[arg-type]
        self.initial = self.done = initial
        self.disable = disable
        self.stats: dict[str, object] = {}
        self.started = self.last = time.monotonic()
        self.bar = tqdm(total=self.total, initial=initial, desc=desc, unit=unit, file=stream) if stream.isatty() and not disable else None

    def note(self, **stats: object) -> None:
        """Numbers to show with the current item (loss, accuracy, ...)."""
        self.stats = stats

    def __iter__(self) -> Iterator:
        self.started = self.last = time.monotonic()
        try:
            for item in self.iterable:
                yield item
                self.step(**self.stats)
        finally:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def step(self, count: int = 1, **stats: object) -> None:
        """`count` items done (for code that is not a loop: one phase done), with their numbers."""
        self.stats = stats
        self.done += count
        if self.bar is not None:
            self.bar.set_postfix({k: _shown(v) for k, v in self.stats.items()}, refresh=False)
            self.bar.update(count)
            return
        now = time.monotonic()
        if self.disable or (now - self.last < self.every_s and self.done < self.total):
            return
        self.last = now
        print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float) -> str:
        elapsed = now - self.started
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        stats = "".join(f" {k}={_shown(v)}" for k, v in self.stats.items())
        return (f"{self.desc}: {self.unit} {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.0f}%){stats}"
                f" | {rate:.3g} {self.unit}/s, elapsed {_duration(elapsed)}, ETA {_duration(eta)}")


def progress(iterable: Iterable, desc: str, total: int | None = None, unit: str = "it", initial: int = 0,
             every_s: float = EVERY_S, disable: bool = False, stream: TextIO | None = None) -> Progress:
    return Progress(iterable, desc, total, unit, initial, every_s, disable, stream or sys.stderr)


def _shown(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
