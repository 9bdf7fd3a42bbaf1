"""The prediction log: JSON lines the serving handler appends (a sampled fraction of what it saw)
and the drift report and batch scoring read, rotated by size into <file>.1, <file>.2, ...
The handler hands its lines to a LogWriter, whose own thread writes them: a log that cannot keep up
costs dropped lines (counted), never memory nor the request path's time.
Standard library only: the TorchServe archive carries this file."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PredictionLog:
    """A `sample_rate` fraction of predictions goes to `file`, rotated beyond `max_bytes`."""

    file: Path
    sample_rate: float
    max_bytes: int
    backups: int


def rotated_logs(log_file: Path) -> list[Path]:
    """The log's older files, newest first: <file>.1, <file>.2, ..."""
    older = []
    while (path := log_file.with_name(f"{log_file.name}.{len(older) + 1}")).exists():
        older.append(path)
    return older


def rotate_log(log_file: Path, max_bytes: int, backups: int) -> None:
    """<file> -> <file>.1 -> <file>.2 ... once <file> is over max_bytes, keeping `backups` old files.
    Every worker appends to the same file, so the check and the renames happen under a lock."""
    with open(log_file.with_name(log_file.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not log_file.exists() or log_file.stat().st_size <= max_bytes:
            return  # another worker rotated it first
        for i in range(len(rotated_logs(log_file)), 0, -1):
            older = log_file.with_name(f"{log_file.name}.{i}")
            if i >= backups:
                older.unlink()
            else:
                older.replace(log_file.with_name(f"{log_file.name}.{i + 1}"))
        log_file.replace(log_file.with_name(f"{log_file.name}.1"))


def append_lines(log: PredictionLog, lines: str) -> None:
    """One O_APPEND write: lines from several workers never interleave. OSError when not all of it was written."""
    data = lines.encode()
    fd = os.open(log.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if written < len(data):  # a full disk (or file size limit) takes what fits
        raise OSError(f"wrote {written} of {len(data)} bytes")
    if size > log.max_bytes:
        rotate_log(log.file, log.max_bytes, log.backups)


class ErrorReport:
    """Failures of something retried without end, logged at most once per `interval_s` in one line with how many there
    were since the last line: a persistent error costs the server log one line per interval, never a traceback per try."""

    def __init__(self, subject: str, attempts: str, consequence: str, interval_s: float):
        self.subject, self.attempts, self.consequence, self.interval_s = subject, attempts, consequence, interval_s
        self.failures, self.last_report = 0, -interval_s

    def failed(self, error: str) -> None:
        self.failures += 1
        now = time.monotonic()
        if now - self.last_report >= self.interval_s:
            logging.warning("%s: %d %s in the last %.0f s, %s; last: %s", self.subject, self.failures, self.attempts,
                            self.interval_s, self.consequence, error)
            self.failures, self.last_report = 0, now


class LogWriter:
    """Appends lines to the prediction log on its own thread, so whatever holds the log up (another worker holding
    the rotation lock, a slow or full disk) holds up only that thread. At most `capacity` lines wait; lines beyond
    that, and the lines of a failed write, are dropped and counted (take_dropped), never accumulated. A failing
    write is logged once per `error_interval_s`, in one line. Both come from conf/serve (serve.prediction_log.max_queued_lines,
    serve.error_report_interval_s)."""

    def __init__(self, log: PredictionLog, capacity: int, error_interval_s: float):
        self.log, self.capacity = log, capacity
        self.waiting: queue.Queue[str] = queue.Queue(capacity)
        self.dropped, self.dropped_lock = 0, threading.Lock()
        self.errors = ErrorReport(f"prediction log {log.file}", "failed writes", "their lines dropped (PredictionLogDroppedTotal)",
                                  error_interval_s)
        self.broken_line = False  # a failed write may have left half a line: the next write starts a new one

    def start(self) -> None:
        threading.Thread(target=self._run_forever, name="prediction-log", daemon=True).start()

    def offer(self, lines: list[str]) -> None:
        """Queue `lines` (each ending in a newline) without waiting; those that do not fit are dropped."""
        for i, line in enumerate(lines):
            try:
                self.waiting.put_nowait(line)
            except queue.Full:
                self._count_dropped(len(lines) - i)
                return

    def take_dropped(self) -> int:
        """Lines dropped since the last call."""
        with self.dropped_lock:
            dropped, self.dropped = self.dropped, 0
        return dropped

    def _count_dropped(self, count: int) -> None:
        with self.dropped_lock:
            self.dropped += count

    def _run_forever(self) -> None:
        while True:
            self.write_waiting(self.waiting.get())

    def write_waiting(self, first: str) -> None:
        """`first` and every line waiting behind it, in one write."""
        lines = [first]
        with contextlib.suppress(queue.Empty):
            while len(lines) < self.capacity:
                lines.append(self.waiting.get_nowait())
        try:
            append_lines(self.log, ("\n" if self.broken_line else "") + "".join(lines))
            self.broken_line = False
        except OSError as exc:
            self.broken_line = True
            self._count_dropped(len(lines))
            self.errors.failed(str(exc))
