"""Drift: the logged predictions against the reference statistics saved by prepare.

Per input feature: population stability index (PSI) over the reference histogram's bins
and the Kolmogorov-Smirnov statistic against the reference distribution; plus the PSI of
the predicted-class distribution against the training label distribution. Writes
drift.json and a self-contained drift.html.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import deque
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from scipy import stats

from components.core.errors import StepError
from components.core.io import write_bytes_atomic, write_json
from components.drift.features import FEATURES
from components.drift.prediction_log import rotated_logs

EPSILON = 1e-4  # stands in for an empty bin, so PSI stays finite


class DriftError(StepError):
    pass


def load_window(log_file: Path, window: int) -> tuple[list[dict], int]:
    """The records among the last `window` lines of the prediction log, reading its rotated files as needed, and how
    many of those lines were skipped: not a JSON object (half-written by a worker that hit a full disk or was killed)."""
    files = [path for path in [log_file, *rotated_logs(log_file)] if path.exists()]  # none current just after a rotation
    if not files:
        raise DriftError(f"{log_file}: no prediction log (is serve.prediction_log.sample_rate above 0 and the model serving?)")
    records: list[dict] = []
    read = 0
    for path in files:
        with open(path, errors="replace") as f:
            lines = [line for line in deque(f, maxlen=window - read) if line.strip()]
        read += len(lines)
        records = [record for record in map(_record, lines) if record is not None] + records
        if read >= window:
            break
    return records, read - len(records)


def _record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    e, a = np.maximum(expected, EPSILON), np.maximum(actual, EPSILON)
    return float(((a - e) * np.log(a / e)).sum())


def bin_fractions(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Fractions per reference bin; values beyond the outer edges count in the outer bins."""
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
    return counts / max(len(values), 1)


def feature_drift(histogram: dict, values: np.ndarray, drift: DictConfig) -> dict:
    edges, counts = np.asarray(histogram["edges"]), np.asarray(histogram["counts"], dtype=float)
    cumulative = np.concatenate([[0.0], np.cumsum(counts) / counts.sum()])
    ks = stats.kstest(values, lambda x: np.interp(x, edges, cumulative))  # piecewise-linear reference CDF
    value = psi(counts / counts.sum(), bin_fractions(values, edges))
    return {"psi": round(value, 6), "ks_statistic": round(float(ks.statistic), 6), "ks_pvalue": float(ks.pvalue),
            "live_mean": round(float(values.mean()), 6),
            "drifted": bool(value > drift.psi_threshold or ks.statistic > drift.ks_threshold)}


def drift_report(records: list[dict], reference: dict, drift: DictConfig) -> dict:
    if len(records) < drift.min_samples:
        raise DriftError(f"only {len(records)} logged predictions; serve.drift.min_samples is {drift.min_samples}")
    features = {name: feature_drift(reference["features"][name], np.array([r["features"][name] for r in records]), drift)
                for name in FEATURES}
    classes = list(reference["class_distribution"])
    predicted = [r["prediction"] for r in records]
    live = np.array([predicted.count(c) for c in classes]) / len(predicted)
    class_psi = psi(np.array([reference["class_distribution"][c] for c in classes]), live)
    return {
        "samples": len(records),
        "first": records[0].get("time"),
        "last": records[-1].get("time"),
        "model_versions": sorted({r.get("model_version", "?") for r in records}),
        "features": features,
        "predicted_classes": {"psi": round(class_psi, 6), "live": dict(zip(classes, live.round(6).tolist())),
                              "reference": reference["class_distribution"], "drifted": bool(class_psi > drift.class_psi_threshold)},
        "thresholds": {k: drift[k] for k in ("psi_threshold", "ks_threshold", "class_psi_threshold")},
        "drift": any(f["drifted"] for f in features.values()) or bool(class_psi > drift.class_psi_threshold),
    }


def check_drift(cfg: DictConfig, log_file: Path, reference_file: Path, out_dir: Path) -> dict:
    """Compare the last serve.drift.window logged predictions with the reference; write the reports."""
    if not reference_file.exists():
        raise DriftError(f"{reference_file}: no reference statistics; run the package step first")
    reference = json.loads(reference_file.read_text())
    records, skipped = load_window(log_file, cfg.serve.drift.window)
    report = {**drift_report(records, reference, cfg.serve.drift), "skipped_lines": skipped}
    write_json(out_dir / "drift.json", report)
    write_bytes_atomic(out_dir / "drift.html", render_html(report, reference, records).encode())
    return report


def _figure(reference: dict, records: list[dict]) -> str:
    """Reference vs live histograms per feature, as a base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(FEATURES), figsize=(4 * len(FEATURES), 3))
    for ax, name in zip(axes, FEATURES):
        edges = np.asarray(reference["features"][name]["edges"])
        counts = np.asarray(reference["features"][name]["counts"], dtype=float)
        live = bin_fractions(np.array([r["features"][name] for r in records]), edges)
        ax.stairs(counts / counts.sum(), edges, label="reference", fill=True, alpha=0.4)
        ax.stairs(live, edges, label="live", linewidth=2)
        ax.set_title(name)
    axes[0].legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def render_html(report: dict, reference: dict, records: list[dict]) -> str:
    rows = "".join(
        f"<tr class={'bad' if f['drifted'] else 'ok'}><td>{html.escape(name)}</td><td>{f['psi']:.4f}</td>"
        f"<td>{f['ks_statistic']:.4f}</td><td>{f['ks_pvalue']:.3g}</td><td>{f['live_mean']:.4f}</td>"
        f"<td>{'DRIFT' if f['drifted'] else 'ok'}</td></tr>"
        for name, f in report["features"].items()
    )
    classes = report["predicted_classes"]
    verdict = "Drift detected" if report["drift"] else "No drift"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Drift report</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:4px 10px;border-bottom:1px solid #ccc}}
.bad{{background:#fdd}} .ok{{background:#efe}}</style></head><body>
<h1>{verdict}</h1>
<p>{report['samples']} logged predictions from {html.escape(str(report['first']))} to {html.escape(str(report['last']))},
model version(s) {html.escape(', '.join(report['model_versions']))}. Thresholds: {html.escape(json.dumps(report['thresholds']))}.
{report.get('skipped_lines', 0)} malformed lines of the log skipped.</p>
<table><tr><th>input feature</th><th>PSI</th><th>KS statistic</th><th>KS p-value</th><th>live mean</th><th></th></tr>{rows}</table>
<p class={'bad' if classes['drifted'] else 'ok'}>Predicted-class distribution: PSI {classes['psi']:.4f}
({'DRIFT' if classes['drifted'] else 'ok'}).</p>
<img alt="reference vs live feature histograms" src="data:image/png;base64,{_figure(reference, records)}">
</body></html>
"""
