"""prepare on a synthetic dataset: images/s and peak memory, side by side with the floor, a
single-thread loop that only decodes the same files into a preallocated memory-mapped array.

    python -m bench.prepare_throughput [--images 100000] [--kind png|jpeg] [--repeats 1]

png: grayscale 32x32 like the sample. jpeg: 224x224 RGB "photos" (smooth noise, quality 90),
decoded to (3, 224, 224). Each run is a fresh process (floor and prepare alternate); printed:
images/s of each, the ratio prepare / (floor x cores) (1.0 = every core as fast as the
single-thread floor), and peak memory growth of the main process and of the largest worker
against the decoded array. A projection to 1M images uses the measured per-image time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from components.core.paths import ROOT
from components.data.decoding import available_cores

CHILD = r"""
import json, multiprocessing, resource, sys, time
from pathlib import Path
import numpy as np
import pandas as pd
from components.core.config.compose import compose
from components.data.decoding import decode
from components.prepare import prepare
mode, root, out, size, channels = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
cfg = compose([f"data.root={root}", "data.classes=[a,b,c,d]", f"data.image_size=[{size},{size}]", f"data.channels={channels}",
               *sys.argv[6:]])
files = pd.read_csv(root / "metadata.csv")["file"]
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
if mode == "prepare":
    prepare(cfg, root, out)
else:
    array = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=(len(files), channels, size, size))
    for i, f in enumerate(files):
        array[i] = decode(root / f, channels, (size, size))
    array.flush()
for child in multiprocessing.active_children():  # prepare's workers exit after it returns: a command waits for them
    child.join()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"images": len(files), "seconds": seconds, "growth_mb": peak - rss_before, "worker_peak_mb": worker}))
"""

KINDS = {"png": (32, 1, "png"), "jpeg": (224, 3, "jpg")}  # size, channels, file suffix


def _write_images(root: str, kind: str, start: int, stop: int) -> list[str]:
    size, channels, suffix = KINDS[kind]
    rng = np.random.default_rng(start)
    rows = []
    for i in range(start, stop):
        name = f"img/{i // 10000:03d}/{i:07d}.{suffix}"
        if kind == "png":
            Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(Path(root) / name, compress_level=1)
        else:  # low-frequency noise upscaled: compresses and decodes like a photo, not like white noise
            small = rng.integers(0, 255, (size // 8, size // 8, channels), dtype=np.uint8)
            Image.fromarray(small).resize((size, size), Image.BICUBIC).save(Path(root) / name, quality=90)
        rows.append(f"{name},{'abcd'[i % 4]},site_{i % 3}")
    return rows


def make_dataset(root: Path, n: int, kind: str) -> None:
    for folder in range(0, n, 10000):
        (root / "img" / f"{folder // 10000:03d}").mkdir(parents=True)
    chunks = [(str(root), kind, s, min(s + 5000, n)) for s in range(0, n, 5000)]
    with ProcessPoolExecutor() as pool:
        rows = [row for part in pool.map(_write_images, *zip(*chunks)) for row in part]
    (root / "metadata.csv").write_text("file,label,site\n" + "\n".join(rows) + "\n")


def run(mode: str, root: Path, out: Path, kind: str, overrides: list[str]) -> dict:
    size, channels, _ = KINDS[kind]
    result = subprocess.run([sys.executable, "-c", CHILD, mode, str(root), str(out), str(size), str(channels), *overrides],
                            cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def report(n: int, kind: str, floors: list[dict], prepares: list[dict]) -> None:
    size, channels, _ = KINDS[kind]
    cores, array_mb = available_cores(), n * channels * size * size / 2**20
    floor_rate = statistics.median(r["images"] / r["seconds"] for r in floors)
    rates = [r["images"] / r["seconds"] for r in prepares]
    ratios = [rate / (floor_rate * cores) for rate in rates]
    spread = lambda v, f: "/".join(format(x, f) for x in (min(v), statistics.median(v), max(v)))  # noqa: E731
    print(f"{n} {kind} images {channels}x{size}x{size}, {cores} cores, decoded array {array_mb:.0f} MB, "
          f"{len(prepares)} repeat(s) (min/median/max)")
    print(f"  floor (1 thread, decode only): {spread([r['images'] / r['seconds'] for r in floors], '.0f')} images/s")
    print(f"  prepare ({cores} processes):     {spread(rates, '.0f')} images/s")
    print(f"  ratio prepare / (floor x {cores}): {spread(ratios, '.2f')}   "
          f"prepare / floor: {spread([r / floor_rate for r in rates], '.2f')}")
    print(f"  memory growth / array: main {spread([r['growth_mb'] / array_mb for r in prepares], '.2f')}, "
          f"largest worker {spread([r['worker_peak_mb'] / array_mb for r in prepares], '.2f')} "
          f"({statistics.median(r['worker_peak_mb'] for r in prepares):.0f} MB); "
          f"floor {spread([r['growth_mb'] / array_mb for r in floors], '.2f')}")
    per_image = 1 / statistics.median(rates)
    print(f"  projected at 1,000,000 images: {per_image * 1e6 / 60:.0f} min, decoded array {1e6 * channels * size * size / 2**30:.1f} GB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--kind", choices=sorted(KINDS), default="png")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, as for every command (e.g. data.histogram_bins=40)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "raw"
        t0 = time.perf_counter()
        make_dataset(root, args.images, args.kind)
        print(f"generated {args.images} {args.kind} files in {time.perf_counter() - t0:.0f}s")
        floors, prepares = [], []
        for i in range(args.repeats):  # alternating, so a burst of load from elsewhere hits both
            floors.append(run("decode", root, Path(tmp) / f"floor{i}.npy", args.kind, args.overrides))
            (Path(tmp) / f"floor{i}.npy").unlink()
            prepares.append(run("prepare", root, Path(tmp) / f"prepared{i}", args.kind, args.overrides))
            shutil.rmtree(Path(tmp) / f"prepared{i}")
    report(args.images, args.kind, floors, prepares)


if __name__ == "__main__":
    main()
