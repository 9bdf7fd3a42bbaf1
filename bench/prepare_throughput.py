"""prepare on a synthetic 100k-image dataset: images/s and peak memory, side by side with a
baseline that only decodes the same files into a preallocated array (the floor).

    .venv/bin/python bench/prepare_throughput.py [--images 100000] [--size 32]

Each run is a separate process; memory growth is its peak RSS (ru_maxrss) minus its RSS
once imports and config are loaded. Target: prepare grows by no more than the decoded
array itself (the memory-mapped cache), like the floor.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np
import pandas as pd
from components.core.config import compose
from components.data.dataset import decode
from components.prepare import prepare
mode, root, out, size = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
cfg = compose([f"data.root={root}", "data.classes=[a,b,c,d]", f"data.image_size=[{size},{size}]", *sys.argv[5:]])
files = pd.read_csv(root / "metadata.csv")["file"]
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
if mode == "prepare":
    prepare(cfg, root, out)
else:
    array = np.lib.format.open_memmap(out, mode="w+", dtype=np.uint8, shape=(len(files), 1, size, size))
    for i, f in enumerate(files):
        array[i] = decode(root / f, 1, (size, size))
    array.flush()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"images": len(files), "seconds": seconds, "rss_before_mb": rss_before, "growth_mb": peak - rss_before}))
"""


def make_dataset(root: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    rows = ["file,label,site"]
    for i in range(n):
        name = f"img/{i:06d}.png"
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(root / name, compress_level=1)
        rows.append(f"{name},{'abcd'[i % 4]},site_{i % 3}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")


def run(mode: str, root: Path, out: Path, size: int, overrides: list[str]) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, mode, str(root), str(out), str(size), *overrides], capture_output=True, text=True,
                            check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, as for every command (e.g. data.histogram_bins=40)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "raw"
        t0 = time.perf_counter()
        make_dataset(root, args.images, args.size)
        print(f"generated {args.images} PNGs of {args.size}x{args.size} in {time.perf_counter() - t0:.0f}s")
        baseline = run("decode", root, Path(tmp) / "floor.npy", args.size, args.overrides)
        prepared = run("prepare", root, Path(tmp) / "prepared", args.size, args.overrides)
    array_mb = args.images * args.size * args.size / 2**20
    for name, r in (("decode-only floor", baseline), ("prepare", prepared)):
        print(f"{name:>18}: {r['images'] / r['seconds']:8.0f} images/s  memory growth {r['growth_mb']:6.0f} MB (RSS before {r['rss_before_mb']:.0f} MB)")
    print(f"decoded array: {array_mb:.0f} MB")
    print(f"throughput ratio prepare / floor: {prepared['seconds'] and (baseline['seconds'] / prepared['seconds']):.2f}")
    print(f"memory growth prepare / decoded array: {prepared['growth_mb'] / array_mb:.2f}  (floor: {baseline['growth_mb'] / array_mb:.2f})")


if __name__ == "__main__":
    main()
