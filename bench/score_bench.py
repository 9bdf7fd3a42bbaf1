"""Batch scoring (components/score.py: all cores, process pool) vs in-process onnxruntime on the
same files: images/s, side by side, over repeats (min / median / max and the ratio of medians).

    .venv/bin/python -m bench.score_bench [--package artifacts/package] [--input data/images] [--repeats 5]

The baseline is the loop a user would write: read each file, decode and normalize it as the
handler does, run one onnxruntime session (its default threads: every core) per chunk. Batch
scoring does more per image (top-k, drift features, JSON lines) and pays for a process pool.
Target: >= 0.8 of the baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from components.core.config.compose import compose
from components.handler.inference import normalize
from components.handler.request import PixelBudget, decode_image
from components.score import predict_files
from components.scoring.inputs import list_files, read_chunks


def baseline(fs, files: list[str], package: Path, chunk: int, max_pixels: int) -> int:
    signature = json.loads((package / "signature.json").read_text())
    session = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    scored = 0
    for _, blobs in read_chunks(fs, files, chunk):
        pixels = np.stack([decode_image(blob, signature, PixelBudget(max_pixels)) for blob in blobs])
        scored += len(session.run(None, {signature["input"]["name"]: normalize(pixels, signature)})[0])
    return scored


def batch(fs, root: str, files: list[str], package: Path, score_cfg, max_pixels: int) -> int:
    with tempfile.TemporaryDirectory() as out:
        return predict_files(fs, root, files, package, score_cfg, max_pixels, Path(out))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", default="artifacts/package")
    parser.add_argument("--input", default="data/images")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, as for every command (e.g. model=resnet18)")
    args = parser.parse_args()
    cfg = compose(args.overrides)
    fs, root, files = list_files(args.input, list(cfg.score.extensions))
    package = Path(args.package)
    rates: dict[str, list[float]] = {"in-process onnxruntime": [], "batch scoring": []}
    for _ in range(args.repeats):  # alternate, so both see the same machine load
        for name, run in (("in-process onnxruntime",
                           lambda: baseline(fs, files, package, cfg.score.chunk_size, cfg.serve.max_image_pixels)),
                          ("batch scoring", lambda: batch(fs, root, files, package, cfg.score, cfg.serve.max_image_pixels))):
            start = time.perf_counter()
            count = run()
            rates[name].append(count / (time.perf_counter() - start))
    print(f"{len(files)} images, {args.repeats} repeats, workers={cfg.score.workers or 'all cores'}, chunk={cfg.score.chunk_size}")
    for name, values in rates.items():
        print(f"  {name:<24} images/s  min {min(values):8.0f}  median {statistics.median(values):8.0f}  max {max(values):8.0f}")
    ratio = statistics.median(rates["batch scoring"]) / statistics.median(rates["in-process onnxruntime"])
    print(f"  ratio batch / in-process (medians): {ratio:.2f}  (target >= 0.8)")


if __name__ == "__main__":
    main()
