"""The prediction log: JSON lines the serving handler appends (a sampled fraction of what it saw)
and the drift report and batch scoring read, rotated by size into <file>.1, <file>.2, ...
Standard library only: the TorchServe archive carries this file."""

from __future__ import annotations

import fcntl
import os
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
    """One O_APPEND write: lines from several workers never interleave."""
    fd = os.open(log.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, lines.encode())
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if size > log.max_bytes:
        rotate_log(log.file, log.max_bytes, log.backups)
