"""What the server saw, as custom metrics and a sampled prediction log (JSON lines, rotated).

The request path only queues what it saw (Monitor.record, Monitor.reject); a background thread
turns it into metrics, log lines and one summary line of rejected requests once per
MONITOR_INTERVAL_S. TorchServe turns every emitted metric value into a log line parsed by its
frontend, and per-request numpy calls cost more than the model itself; once per interval, the
work is bounded by the worker's own speed, and the server log by time, not by the request count.
That thread only hands log lines to the prediction log's LogWriter, never waits on the log: the
lines it cannot take are counted in PredictionLogDroppedTotal.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from datetime import datetime, timezone

import numpy as np

from components.drift.features import image_features, intensity
from components.drift.prediction_log import ErrorReport, LogWriter

MONITOR_INTERVAL_S = 1.0
METRIC_DIMENSIONS = {"PredictionsTotal": ["Class"], "ConfidenceTotal": [], "InputFeatureTotal": ["Feature"],
                     "InputOutOfReferenceTotal": ["Feature"], "RejectedInputsTotal": ["Status"], "PredictionLogDroppedTotal": []}


class Monitor:
    """Metrics (TorchServe's metric cache) and the prediction log (its writer; None: off) of one model version."""

    def __init__(self, metrics, model_name: str, version: str, classes: list[str],
                 reference_range: dict[str, tuple[float, float]], writer: LogWriter | None, error_interval_s: float):
        self.metrics = {name: metrics.add_metric_to_cache(name, "count", ["ModelName", *dims]) for name, dims in METRIC_DIMENSIONS.items()}
        self.model_name, self.version, self.classes = model_name, version, classes
        self.reference_range, self.writer = reference_range, writer
        self.seen: list[tuple[float, np.ndarray, np.ndarray]] = []  # (time, pixels, probabilities) per batch
        self.rejected: Counter[int] = Counter()
        self.last_rejection = ""
        self.lock = threading.Lock()
        self.rng = np.random.default_rng()
        self.errors = ErrorReport("monitoring", "failed flushes", "their metrics and log lines lost", error_interval_s)

    def start(self) -> None:
        if self.writer:
            self.writer.start()
        threading.Thread(target=self._run_forever, name="monitoring", daemon=True).start()

    def record(self, pixels: np.ndarray, probs: np.ndarray) -> None:
        with self.lock:
            self.seen.append((time.time(), pixels, probs))

    def reject(self, status: int, message: str) -> None:
        with self.lock:
            self.rejected[status] += 1
            self.last_rejection = f"{status} {message}"

    def _run_forever(self) -> None:
        while True:
            time.sleep(MONITOR_INTERVAL_S)
            self._flush_or_report()

    def _flush_or_report(self) -> None:
        """flush(); a monitoring bug must not stop monitoring, nor serving, nor flood the log: one line per interval."""
        try:
            self.flush()
        except Exception as exc:
            self.errors.failed(f"{exc.__class__.__name__}: {exc}")

    def flush(self) -> None:
        """Emit and log what was queued since the last call."""
        with self.lock:
            seen, self.seen = self.seen, []
            rejected, self.rejected, last = self.rejected, Counter(), self.last_rejection
        if rejected:
            statuses = ", ".join(f"{count} x {status}" for status, count in sorted(rejected.items()))
            logging.warning("rejected %d malformed requests (%s) in the last %.0f s; last: %s",
                            sum(rejected.values()), statuses, MONITOR_INTERVAL_S, last[:200])
            for status, count in rejected.items():
                self._emit("RejectedInputsTotal", count, str(status))
        if seen:
            self._observe(np.concatenate([batch[1] for batch in seen]), np.concatenate([batch[2] for batch in seen]),
                          np.repeat([batch[0] for batch in seen], [len(batch[1]) for batch in seen]))
        dropped = self.writer.take_dropped() if self.writer else 0
        if dropped:
            self._emit("PredictionLogDroppedTotal", dropped)

    def _observe(self, pixels: np.ndarray, probs: np.ndarray, times: np.ndarray) -> None:
        best = probs.argmax(axis=1)
        confidence = probs[np.arange(len(best)), best]
        for label, count in zip(*np.unique(best, return_counts=True)):
            self._emit("PredictionsTotal", int(count), self.classes[label])
        self._emit("ConfidenceTotal", float(confidence.sum()))
        for name, values in intensity(pixels).items():
            low, high = self.reference_range[name]
            self._emit("InputFeatureTotal", float(values.sum()), name)
            self._emit("InputOutOfReferenceTotal", int(((values < low) | (values > high)).sum()), name)
        if self.writer and (sampled := np.flatnonzero(self.rng.random(len(best)) < self.writer.log.sample_rate)).size:
            features = image_features(pixels[sampled])
            self.writer.offer([self._log_line(times[j], best[j], confidence[j], {name: v[i] for name, v in features.items()})
                            for i, j in enumerate(sampled)])

    def _log_line(self, when: float, best: int, confidence: float, features: dict[str, float]) -> str:
        return json.dumps({"time": datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds"),
                           "model_version": self.version, "prediction": self.classes[best], "confidence": round(float(confidence), 6),
                           "features": {name: round(float(value), 6) for name, value in features.items()}}) + "\n"

    def _emit(self, name: str, value: float, *dimensions: str) -> None:
        self.metrics[name].add_or_update(value, [self.model_name, *dimensions])
