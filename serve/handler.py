"""TorchServe handler: the packaged ONNX model run with onnxruntime.

A request is PNG/JPEG bytes (raw body or one multipart field) or JSON
{"instances": [pixels, ...]} with pixels shaped [channels, height, width] in 0-255. The
preprocessing is the one written in signature.json; the answer is the top-k labels with
probabilities. A malformed request gets a 4xx and a message, alone: the rest of its batch
and the worker carry on.

Monitoring: custom metrics (predictions per class, confidence, input brightness and contrast, rejected
inputs) on TorchServe's Prometheus endpoint, and a sampled prediction log (JSON lines)
when the server sets SERVE_PREDICTION_LOG, both written by a worker thread once per
MONITOR_INTERVAL_S from what the requests queued (at most an interval's worth of images,
which the worker's own speed bounds).

Only numpy, onnxruntime and PIL, plus components/features.py shipped in the archive.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, UnidentifiedImageError

from components.features import image_features, intensity

PREDICTION_LOG_ENV = "SERVE_PREDICTION_LOG"
SAMPLE_RATE_ENV = "SERVE_PREDICTION_LOG_SAMPLE_RATE"
LOG_MAX_BYTES_ENV = "SERVE_PREDICTION_LOG_MAX_BYTES"
LOG_BACKUPS_ENV = "SERVE_PREDICTION_LOG_BACKUPS"
THREADS_ENV = "SERVE_ONNX_THREADS"
IMAGE_FORMATS = ["PNG", "JPEG"]
MONITOR_INTERVAL_S = 1.0
# Decompressing more pixels than this is refused before decoding (a tiny PNG can expand to GBs).
MAX_PIXELS = 16_000_000


def decode_image(data: bytes, signature: dict) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 (C, H, W), converted and resized as the signature says."""
    spec = signature["input"]
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ValueError(f"image has {img.width}x{img.height} pixels, more than {MAX_PIXELS}")
            img.load()
            if img.mode != spec["color_mode"]:
                img = img.convert(spec["color_mode"])
            size = (spec["resize"]["width"], spec["resize"]["height"])
            if img.size != size:
                img = img.resize(size, Image.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except UnidentifiedImageError:
        raise ValueError("not a PNG or JPEG image") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"truncated or corrupt image ({exc})") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def parse_instance(instance: object, signature: dict) -> np.ndarray:
    """One JSON instance -> float32 (C, H, W) pixel values in [0, 255]."""
    expected = tuple(signature["input"]["shape"][1:])
    try:
        array = np.asarray(instance, dtype=np.float32)
    except (ValueError, TypeError):
        raise ValueError(f"values must be numbers in [0, 255] shaped {list(expected)} (channels, height, width)") from None
    if array.shape != expected:
        raise ValueError(f"expected shape {list(expected)} (channels, height, width), got {list(array.shape)}")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise ValueError("values must be finite numbers in [0, 255]")
    return array


def normalize(pixels: np.ndarray, signature: dict) -> np.ndarray:
    """(N, C, H, W) pixels in [0, 255] -> the model input (same arithmetic as training)."""
    norm = signature["input"]["normalization"]
    mean = np.asarray(norm["mean"], dtype=np.float32).reshape(1, -1, 1, 1) * np.float32(255)
    std = np.asarray(norm["std"], dtype=np.float32).reshape(1, -1, 1, 1) * np.float32(255)
    return (pixels.astype(np.float32) - mean) / std


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def request_images(row: dict, signature: dict) -> tuple[list[np.ndarray], bool]:
    """The images of one request and whether it came as JSON instances; ValueError if malformed."""
    fields = [value for value in row.values() if value not in (None, b"", bytearray(), "")]
    if not fields:
        raise ValueError("empty request: send a PNG/JPEG image or JSON {\"instances\": [...]}")
    if len(fields) > 1:
        raise ValueError("send one image per request (or several as JSON instances)")
    body = fields[0]
    if isinstance(body, (bytes, bytearray)) and body.lstrip()[:1] in (b"{", b"["):
        try:  # JSON sent without its Content-Type arrives as bytes
            body = json.loads(body)
        except ValueError:
            raise ValueError("body is not valid JSON") from None
    if isinstance(body, dict):
        instances = body.get("instances")
        if not isinstance(instances, list) or not instances:
            raise ValueError("JSON body must be an object with a non-empty list \"instances\"")
        images = []
        for i, instance in enumerate(instances):
            try:
                images.append(parse_instance(instance, signature))
            except ValueError as exc:
                raise ValueError(f"instance {i}: {exc}") from None
        return images, True
    if isinstance(body, (bytes, bytearray)):
        return [decode_image(bytes(body), signature)], False
    raise ValueError("send a PNG/JPEG image or JSON {\"instances\": [...]}")


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


class OnnxImageClassifier:
    def initialize(self, context) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        self.signature = json.loads((model_dir / "signature.json").read_text())
        self.classes = self.signature["output"]["classes"]
        self.top_k = min(self.signature["output"]["top_k"], len(self.classes))
        self.model_name, self.version = context.model_name, context.manifest["model"]["modelVersion"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get(THREADS_ENV, "0"))
        options.inter_op_num_threads = 1
        # Spinning pool threads would steal the cores TorchServe's frontend needs between requests.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
        reference = json.loads((model_dir / "reference_stats.json").read_text())["features"]
        self.reference_range = {name: (h["edges"][0], h["edges"][-1]) for name, h in reference.items()}
        log_file = os.environ.get(PREDICTION_LOG_ENV)
        self.log_file = Path(log_file) if log_file else None
        self.sample_rate = float(os.environ.get(SAMPLE_RATE_ENV, "0")) if log_file else 0.0
        self.log_max_bytes = int(os.environ.get(LOG_MAX_BYTES_ENV, "100000000"))
        self.log_backups = int(os.environ.get(LOG_BACKUPS_ENV, "5"))
        self._start_monitoring(context.metrics)

    def _start_monitoring(self, metrics) -> None:
        """The request path only queues what it saw; a background thread turns it into metrics and
        log lines once per MONITOR_INTERVAL_S. TorchServe turns every emitted metric value into a log
        line parsed by its frontend, and per-request numpy calls cost more than the model itself."""
        dimensions = {"PredictionsTotal": ["Class"], "ConfidenceTotal": [], "InputFeatureTotal": ["Feature"],
                      "InputOutOfReferenceTotal": ["Feature"], "RejectedInputsTotal": ["Status"]}
        self.metrics = {name: metrics.add_metric_to_cache(name, "count", ["ModelName", *dims]) for name, dims in dimensions.items()}
        self.seen: list[tuple[float, np.ndarray, np.ndarray]] = []  # (time, pixels, probabilities) per batch
        self.rejected: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.rng = np.random.default_rng()
        threading.Thread(target=self._monitor_forever, name="monitoring", daemon=True).start()

    def _monitor_forever(self) -> None:
        while True:
            time.sleep(MONITOR_INTERVAL_S)
            try:
                self._monitor()
            except Exception:  # a monitoring bug must not stop monitoring, nor serving
                logging.exception("monitoring failed")

    def _monitor(self) -> None:
        with self.lock:
            seen, self.seen = self.seen, []
            rejected, self.rejected = self.rejected, Counter()
        for status, count in rejected.items():
            self._emit("RejectedInputsTotal", count, status)
        if not seen:
            return
        pixels = np.concatenate([batch[1] for batch in seen])
        probs = np.concatenate([batch[2] for batch in seen])
        times = np.repeat([batch[0] for batch in seen], [len(batch[1]) for batch in seen])
        best = probs.argmax(axis=1)
        confidence = probs[np.arange(len(best)), best]
        for label, count in zip(*np.unique(best, return_counts=True)):
            self._emit("PredictionsTotal", int(count), self.classes[label])
        self._emit("ConfidenceTotal", float(confidence.sum()))
        for name, values in intensity(pixels).items():
            low, high = self.reference_range[name]
            self._emit("InputFeatureTotal", float(values.sum()), name)
            self._emit("InputOutOfReferenceTotal", int(((values < low) | (values > high)).sum()), name)
        sampled = np.flatnonzero(self.rng.random(len(best)) < self.sample_rate)
        if sampled.size:
            self._log(times[sampled], image_features(pixels[sampled]), best[sampled], confidence[sampled])

    def _emit(self, name: str, value: float, *dimensions: str) -> None:
        self.metrics[name].add_or_update(value, [self.model_name, *dimensions])

    def handle(self, data: list[dict], context) -> list:
        images, owners, answers, as_json = [], [], [None] * len(data), [False] * len(data)
        for i, row in enumerate(data):
            try:
                parsed, as_json[i] = request_images(row, self.signature)
            except ValueError as exc:
                answers[i] = self._reject(context, i, 400, str(exc))
                continue
            images += parsed
            owners += [i] * len(parsed)
        if images:
            pixels = np.stack(images)
            probs = softmax(self.session.run(None, {self.signature["input"]["name"]: normalize(pixels, self.signature)})[0])
            ranked = self._record(pixels, probs)
            for i in sorted(set(owners)):
                mine = [ranked[j] for j, owner in enumerate(owners) if owner == i]
                answers[i] = {"predictions": mine} if as_json[i] else mine[0]
        for i in range(len(data)):
            context.set_response_content_type(i, "application/json")
        return [json.dumps(answer) for answer in answers]

    def _reject(self, context, idx: int, status: int, message: str) -> dict:
        context.set_response_status(status, message, idx)
        with self.lock:
            self.rejected[str(status)] += 1
        return {"code": status, "error": message}

    def _record(self, pixels: np.ndarray, probs: np.ndarray) -> list[list[dict]]:
        """Top-k per image; the batch is queued for monitoring."""
        with self.lock:
            self.seen.append((time.time(), pixels, probs))
        return [[{"label": self.classes[c], "probability": round(row[c], 6)} for c in sorted(range(len(row)), key=row.__getitem__, reverse=True)[: self.top_k]]
                for row in probs.tolist()]

    def _log(self, times: np.ndarray, features: dict[str, np.ndarray], best: np.ndarray, confidence: np.ndarray) -> None:
        lines = "".join(
            json.dumps({"time": datetime.fromtimestamp(times[j], timezone.utc).isoformat(timespec="milliseconds"), "model_version": self.version,
                        "prediction": self.classes[best[j]], "confidence": round(float(confidence[j]), 6),
                        "features": {name: round(float(values[j]), 6) for name, values in features.items()}}) + "\n"
            for j in range(len(best)))
        # One O_APPEND write per interval: lines from several workers never interleave.
        fd = os.open(self.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, lines.encode())
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > self.log_max_bytes:
            rotate_log(self.log_file, self.log_max_bytes, self.log_backups)
