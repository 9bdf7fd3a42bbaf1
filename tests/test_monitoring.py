"""The monitoring path in-process: the prediction log's writer sheds load instead of growing (its
rotation lock held by another worker, a full disk), metrics never wait on the log, a failing write
is logged once per interval, and the drift reader skips what a failed write left half-written.
tests/test_serve.py runs the same through a real TorchServe."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from components.core.config.compose import compose
from components.core.paths import ROOT
from components.drift.prediction_log import LogWriter, PredictionLog, rotated_logs
from components.drift.report import check_drift, load_window
from components.handler import telemetry
from components.handler.telemetry import Monitor


def line(i: int) -> str:
    return json.dumps({"i": i}) + "\n"


def logged(log_file: Path) -> list[dict]:
    return [json.loads(text) for path in [*reversed(rotated_logs(log_file)), log_file] if path.exists()
            for text in path.read_text().splitlines()]


def wait_until(condition, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@contextlib.contextmanager
def rotation_lock_held(log_file: Path):
    """What another worker rotating the log holds (components/drift/prediction_log.py rotate_log)."""
    with open(log_file.with_name(log_file.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def test_with_the_rotation_lock_held_the_writer_keeps_at_most_its_capacity_and_counts_what_it_drops(tmp_path):
    log = PredictionLog(tmp_path / "predictions.jsonl", sample_rate=1.0, max_bytes=0, backups=100)  # every write rotates
    writer = LogWriter(log, capacity=100, error_interval_s=60)
    writer.start()
    with rotation_lock_held(log.file):
        writer.offer([line(0)])
        wait_until(lambda: log.file.exists() and writer.waiting.empty())
        time.sleep(0.1)  # written; the writer now waits for the lock to rotate
        for batch in range(10):
            writer.offer([line(1 + 100 * batch + i) for i in range(100)])
        assert writer.waiting.qsize() == 100 and writer.take_dropped() == 900
    # Done when the write of the 100 waiting lines has rotated too (reading while a rotation renames could miss or repeat a file).
    wait_until(lambda: not log.file.exists() and len(rotated_logs(log.file)) == 2)
    assert logged(log.file) == [{"i": i} for i in range(101)] and writer.take_dropped() == 0


REFERENCE_RANGE = {"brightness": (0.0, 1.0), "contrast": (0.0, 1.0)}


class FakeMetricCache:
    """TorchServe's metric cache (context.metrics), summing what each metric's series was given."""

    def __init__(self):
        self.totals: Counter[tuple[str, ...]] = Counter()

    def add_metric_to_cache(self, name: str, unit: str, dimensions: list[str]):
        totals = self.totals

        class Metric:
            def add_or_update(self, value: float, dimension_values: list[str]) -> None:
                totals[(name, *dimension_values[1:])] += value

        return Metric()


def test_metrics_never_wait_on_the_prediction_log_and_count_its_dropped_lines_with_a_fake_metric_cache(tmp_path):
    log = PredictionLog(tmp_path / "predictions.jsonl", sample_rate=1.0, max_bytes=0, backups=100)
    writer, metrics = LogWriter(log, capacity=50, error_interval_s=60), FakeMetricCache()
    monitor = Monitor(metrics, "digits", "v1", ["a", "b"], REFERENCE_RANGE, writer, error_interval_s=60)
    writer.start()
    pixels, probs = np.full((2, 1, 8, 8), 128, np.float32), np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)
    with rotation_lock_held(log.file):
        for _ in range(3):
            for _ in range(100):
                monitor.record(pixels, probs)
            flush = threading.Thread(target=monitor.flush)
            flush.start()
            flush.join(timeout=5)
            assert not flush.is_alive(), "metrics waited on the prediction log's lock"
            assert monitor.seen == [] and writer.waiting.qsize() <= 50
        assert metrics.totals[("PredictionsTotal", "a")] == metrics.totals[("PredictionsTotal", "b")] == 300
        assert metrics.totals[("PredictionLogDroppedTotal",)] >= 600 - 2 * 50  # at most one write went out, one queue waits
    wait_until(lambda: writer.waiting.empty())
    time.sleep(0.1)
    monitor.flush()
    assert len(logged(log.file)) + metrics.totals[("PredictionLogDroppedTotal",)] == 600


def test_a_failing_write_is_logged_once_per_interval_in_one_line_and_its_lines_counted(tmp_path, caplog):
    writer = LogWriter(PredictionLog(tmp_path / "no such folder" / "predictions.jsonl", 1.0, 10**6, 2), capacity=100, error_interval_s=60)
    with caplog.at_level(logging.WARNING):
        for i in range(20):
            writer.offer([line(i), line(i)])
            writer.write_waiting(writer.waiting.get())
        assert writer.take_dropped() == 40
        [report] = caplog.records
        assert report.exc_info is None and "1 failed writes in the last 60 s" in report.getMessage()
        assert "No such file or directory" in report.getMessage()
        writer.errors.last_report -= 60  # the interval has passed
        writer.write_waiting(line(20))
    assert len(caplog.records) == 2 and "20 failed writes in the last 60 s" in caplog.records[1].getMessage()


class Stop(BaseException):
    pass


def ticks(count: int):
    """A stand-in for the monitoring thread's one-second sleep: returns `count` times, then stops the thread's loop."""
    left = iter(range(count))

    def sleep(seconds: float) -> None:
        if next(left, None) is None:
            raise Stop

    return sleep


def broken_flush() -> None:
    raise KeyError("brightness")  # a monitoring bug, on every flush


def test_a_failing_monitoring_thread_is_logged_once_per_interval_in_one_line(caplog, monkeypatch):
    """Before, each second's failed flush logged a traceback: a persistent bug wrote 3,600 of them an hour."""
    monitor = Monitor(FakeMetricCache(), "digits", "v1", ["a", "b"], REFERENCE_RANGE, None, error_interval_s=60)
    monitor.flush = broken_flush
    with caplog.at_level(logging.WARNING), contextlib.suppress(Stop):
        monkeypatch.setattr(telemetry.time, "sleep", ticks(5))
        monitor._run_forever()  # five ticks, one second apart in a worker
    [report] = caplog.records
    assert report.exc_info is None and report.getMessage() == (
        "monitoring: 1 failed flushes in the last 60 s, their metrics and log lines lost; last: KeyError: 'brightness'")
    monitor.errors.last_report -= 60  # the interval has passed
    with caplog.at_level(logging.WARNING), contextlib.suppress(Stop):
        monkeypatch.setattr(telemetry.time, "sleep", ticks(1))
        monitor._run_forever()
    assert len(caplog.records) == 2 and caplog.records[1].getMessage().startswith("monitoring: 5 failed flushes in the last 60 s")


FULL_DISK = """
import json, resource, signal, sys
from pathlib import Path
from components.drift.prediction_log import LogWriter, PredictionLog

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails like one on a full disk
log_file = Path(sys.argv[1])
writer = LogWriter(PredictionLog(log_file, 1.0, 10**9, 2), capacity=1000, error_interval_s=60)

def write(first, count):
    writer.offer([json.dumps({"i": i}) + "\\n" for i in range(first, first + count)])
    writer.write_waiting(writer.waiting.get())

write(0, 10)
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (log_file.stat().st_size + 5, hard))  # 5 bytes left on the disk: half a line
write(10, 10)
write(20, 10)
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space freed
write(30, 10)
print(writer.take_dropped())
"""


def test_after_a_full_disk_the_log_goes_on_on_a_new_line_and_the_drift_reader_skips_the_half_written_one(tmp_path):
    log_file = tmp_path / "predictions.jsonl"
    dropped = subprocess.run([sys.executable, "-c", FULL_DISK, str(log_file)], cwd=ROOT, capture_output=True, text=True, check=True)
    assert dropped.stdout.strip() == "20"
    records, skipped = load_window(log_file, 1000)
    assert records == [{"i": i} for i in [*range(10), *range(30, 40)]] and skipped == 1


def test_the_drift_reader_skips_and_counts_malformed_lines_in_its_window(tiny_package, tmp_path):
    reference_file = tiny_package["out"] / "reference_stats.json"
    reference = json.loads(reference_file.read_text())
    record = {"prediction": next(iter(reference["class_distribution"])),
              "features": {name: h["edges"][len(h["edges"]) // 2] for name, h in reference["features"].items()}}
    log_file = tmp_path / "predictions.jsonl"
    log_file.write_text(json.dumps(record) + "\n" + '{"time": "2026-12-03T14:2' + "\n" + (json.dumps(record) + "\n") * 30
                        + '["not a record"]\n' + json.dumps(record)[:40])
    assert load_window(log_file, 10) == ([record] * 8, 2)
    cfg = compose(["serve.drift.window=100", "serve.drift.min_samples=20"])
    report = check_drift(cfg, log_file, reference_file, tmp_path / "drift")
    assert report["samples"] == 31 and report["skipped_lines"] == 3
    assert json.loads((tmp_path / "drift" / "drift.json").read_text())["skipped_lines"] == 3
