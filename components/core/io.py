"""Atomic outputs: a step either leaves complete outputs behind or nothing at all."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from components.core.lifetime import alive


def _dead_scratch(target: Path) -> list[Path]:
    """Scratch folders beside `target` whose process no longer runs (a step killed mid-write)."""
    found = []
    for path in target.parent.glob(f".{target.name}.*"):
        pid = path.name[len(target.name) + 2 :].split(".")[0]
        if pid.isdigit() and not alive(int(pid)):
            found.append(path)
    return found


@contextlib.contextmanager
def scratch_beside(target: str | os.PathLike) -> Iterator[Path]:
    """A new empty folder beside `target`, named after this process, removed on exit; left-overs
    of killed processes are removed first, so scratch never accumulates."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in _dead_scratch(target):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", dir=target.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(source: Path, target: Path) -> None:
    """Move the folder `source` to `target`, replacing what was there."""
    if target.exists():
        with scratch_beside(target) as old:
            os.replace(target, old / target.name)
            os.replace(source, target)
    else:
        os.replace(source, target)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a scratch folder beside `target`; it replaces `target` only if the block succeeds."""
    with scratch_beside(target) as tmp:
        yield tmp
        replace_dir(tmp, Path(target))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: object) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes (md5 where it is compared with what DVC recorded)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()
