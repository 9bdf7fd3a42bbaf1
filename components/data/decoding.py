"""Decode a listing of image files into a uint8 (N, C, H, W) `.npy` cache on every core.

Rows are cut into contiguous chunks; each worker process opens the same memory-mapped file
and writes its chunk in place, so memory stays bounded by the pages of the output array and
the result is byte-identical whatever the number of processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from components.core.lifetime import die_with_parent
from components.core.progress import progress
from components.drift.features import FEATURES, image_features

CHUNK_ROWS = 1024  # large enough to amortise a task's overhead (~0.1 s of work), small enough to even out the cores' last chunks
BLOCK_ELEMENTS = 1 << 18  # pixels per block of row_stats: its temporary copies (~1 MB each) stay in the CPU cache, 2x faster than 16 MB


def decode(path: str | Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    """Decode one image to uint8 (C, H, W), converted to `channels` and resized to `size` (H, W)."""
    with Image.open(path) as img:
        img.load()
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        array = np.asarray(img, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def decode_error(path: str | Path, channels: int, size: tuple[int, int]) -> tuple[np.ndarray | None, str | None]:
    try:
        return decode(path, channels, size), None
    except FileNotFoundError:
        return None, "file not found"
    except Image.DecompressionBombError as exc:
        return None, f"too many pixels to decode safely ({exc})"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        return None, f"cannot decode image ({exc.__class__.__name__}: {exc})"


def available_cores() -> int:
    """The cores this process may run on (the affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class RowStats:
    """Per-image statistics taken while a decoded chunk is still in cache, so nothing reads the
    array again: per-channel pixel sums and sums of squares (exact integers, for the
    normalisation) and the drift features of components.drift.features."""

    sums: np.ndarray  # (N, C) uint64
    squares: np.ndarray  # (N, C) uint64
    features: dict[str, np.ndarray]  # name -> (N,)

    @classmethod
    def concat(cls, parts: list[RowStats]) -> RowStats:
        """The parts' rows one after the other (each feature keeps the dtype components.drift.features gives it)."""
        return cls(np.concatenate([p.sums for p in parts]), np.concatenate([p.squares for p in parts]),
                   {name: np.concatenate([p.features[name] for p in parts]) for name in FEATURES})


def row_stats(images: np.ndarray) -> RowStats:
    """RowStats of a uint8 (N, C, H, W) block, a few MB at a time (the float copies stay small)."""
    block = max(1, BLOCK_ELEMENTS // max(images[0].size, 1)) if len(images) else 1
    parts = []
    for i in range(0, len(images), block):
        x = images[i : i + block]
        squares = x.astype(np.uint32)
        squares *= squares  # in place: a second temporary would cost a fresh mapping, and the page faults, per block
        parts.append(RowStats(x.sum(axis=(2, 3), dtype=np.uint64), squares.sum(axis=(2, 3), dtype=np.uint64), image_features(x)))
    return RowStats.concat(parts)


def decode_chunk(cache: str, root: str, files: Sequence[str | None], start: int, channels: int,
                 size: tuple[int, int]) -> tuple[list[tuple[int, str]], RowStats]:
    """Decode files into rows start.. of the .npy at `cache` (a None file is skipped: its row stays
    zero); returns (row, problem) for the failures, and the chunk's RowStats."""
    images = np.load(cache, mmap_mode="r+")
    problems = []
    for offset, file in enumerate(files):
        if file is None:
            continue
        array, problem = decode_error(os.path.join(root, file), channels, size)  # str, not Path: no objects per image
        if problem:
            problems.append((start + offset, f"{Path(root) / file}: {problem}"))
        else:
            images[start + offset] = array
    images.flush()
    return problems, row_stats(images[start : start + len(files)])


def _ready() -> None:
    """A worker's first task: unpickling it imports this module (numpy, PIL) in the worker."""


@contextmanager
def decoding_pool(rows: int, workers: int = 0) -> Iterator[ProcessPoolExecutor | None]:
    """The processes that will decode `rows` rows (workers=0: every core; None when one process is
    enough: small datasets pay no start-up). They start at once and import what they need while the
    caller still reads and checks its listing, so that serial part is off the decoding's critical path."""
    workers = min(workers or available_cores(), -(-rows // CHUNK_ROWS))
    if workers <= 1:
        yield None
        return
    # spawn, not fork: a forked child could inherit a lock held by another thread of the caller
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=die_with_parent)
    try:
        for _ in range(workers):  # each submit to an idle-less pool spawns one more worker
            pool.submit(_ready)
        yield pool
    finally:  # every result is in (or the step failed): the workers exit while the caller writes the rest
        pool.shutdown(wait=False, cancel_futures=True)


class Decoding:
    """Decoding `files` into a new `cache` (N, channels, *size uint8), under way on `pool` (None: in this
    process, when result() is called) while the caller does other work; result() waits for it.

    A None file is a row not to read, left zero."""

    def __init__(self, cache: Path, root: Path, files: Sequence[str | None], channels: int, size: tuple[int, int],
                 pool: ProcessPoolExecutor | None = None) -> None:
        np.lib.format.open_memmap(cache, mode="w+", dtype=np.uint8, shape=(len(files), channels, *size)).flush()
        self.rows = len(files)
        self.chunks = [(start, list(files[start : start + CHUNK_ROWS])) for start in range(0, len(files), CHUNK_ROWS)]
        self.decode_part = partial(decode_chunk, str(cache), str(root), channels=channels, size=size)
        self.futures = [pool.submit(self.decode_part, part, start) for start, part in self.chunks] if pool else None

    def _results(self) -> Iterator[tuple[list, RowStats]]:
        if self.futures is None:
            yield from (self.decode_part(part, start) for start, part in self.chunks)
        else:
            yield from (future.result() for future in self.futures)

    def result(self) -> tuple[list[str], RowStats]:
        """One message per file that could not be decoded, in row order, and every row's RowStats."""
        done = progress((), "prepare: decoding", total=self.rows, unit="img")
        found: list[tuple[int, str]] = []
        parts: list[RowStats] = []
        for (problems, part_stats), (_, part) in zip(self._results(), self.chunks):
            found += problems
            parts.append(part_stats)
            done.step(len(part))
        done.close()
        return [message for _, message in sorted(found)], RowStats.concat(parts)


def decode_all(cache: Path, root: Path, files: Sequence[str | None], channels: int, size: tuple[int, int],
               workers: int = 0) -> tuple[list[str], RowStats]:
    """Create `cache` and decode every file into it (None: a row not to read, left zero); workers=0 uses
    every core. Returns Decoding.result()."""
    with decoding_pool(len(files), workers) as pool:
        return Decoding(cache, root, files, channels, size, pool).result()
