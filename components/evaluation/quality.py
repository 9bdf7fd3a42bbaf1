"""Quality on the test split: the metrics (scikit-learn, and the expected calibration error), and
for each quality check of the gate (accuracy, balanced accuracy, ECE) a percentile bootstrap
interval over test images; conf/gate turns those into verdicts (components/evaluation/gates.py)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from omegaconf import DictConfig
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

from components.evaluation.gates import QUALITY_RULES

# Resampled image indices held at once: chunks of bootstrap draws stay near this many cells
# (8 bytes each, a few arrays of it), whatever the test-set size.
CHUNK_CELLS = 1 << 20


def calibration_bin(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Each image's equal-width confidence bin (a confidence of 1 falls in the last)."""
    return np.minimum((confidence * n_bins).astype(int), n_bins - 1)


def calibration(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> tuple[float, list[dict]]:
    """Expected calibration error of the top-label confidence over equal-width bins, and the
    non-empty bins (for the reliability curve). scikit-learn's calibration tools are binary only."""
    which = calibration_bin(confidence, n_bins)
    ece, bins = 0.0, []
    for b in np.unique(which):
        members = which == b
        conf, acc = float(confidence[members].mean()), float(correct[members].mean())
        ece += members.mean() * abs(acc - conf)
        bins.append({"bin": f"{b / n_bins:.2f}-{(b + 1) / n_bins:.2f}", "confidence": conf, "accuracy": acc, "count": int(members.sum())})
    return float(ece), bins


def quality_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str], n_bins: int) -> tuple[dict, list[dict]]:
    y_pred, labels = probs.argmax(axis=1), list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    macro = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    ece, bins = calibration(probs.max(axis=1), y_pred == y_true, n_bins)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "precision_macro": float(macro[0]), "recall_macro": float(macro[1]), "f1_macro": float(macro[2]),
        "ece": ece,
        "n_test": len(y_true),
        "per_class": {c: {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]), "support": int(support[k])}
                      for k, c in enumerate(classes)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }, bins


def resampled_indices(n: int, samples: int, seed: int, chunk_cells: int = CHUNK_CELLS) -> Iterator[np.ndarray]:
    """The bootstrap's draws of n test-image indices with replacement, a chunk of draws (rows) at a time."""
    rng, per_chunk = np.random.default_rng(seed), max(1, chunk_cells // n)
    for start in range(0, samples, per_chunk):
        yield rng.integers(0, n, size=(min(per_chunk, samples - start), n))


def per_draw_sums(key: np.ndarray, n_keys: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Per draw (row of `key`) and key value, the count of images (or the sum of their `weights`).
    np.bincount adds in index order, so the sums are the same bytes on every machine."""
    rows = np.arange(key.shape[0])[:, None] * n_keys
    return np.bincount((rows + key).ravel(), weights=None if weights is None else weights.ravel(),
                       minlength=key.shape[0] * n_keys).reshape(key.shape[0], n_keys)


def draw_statistics(y_true: np.ndarray, correct: np.ndarray, residual: np.ndarray, bins: np.ndarray, n_classes: int,
                    n_bins: int, draws: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy and ECE of each resampled test set (a row of `draws`). A resampled
    image keeps its confidence bin: ECE is the sum over bins of |sum of (correct - confidence)| over n."""
    n = draws.shape[1]
    support = per_draw_sums(y_true[draws], n_classes)
    hits = per_draw_sums(y_true[draws], n_classes, correct[draws])
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, hits / support, np.nan)  # a class absent from a draw has no recall
    return {"accuracy": hits.sum(1) / n, "balanced_accuracy": np.nanmean(recall, axis=1),
            "ece": np.abs(per_draw_sums(bins[draws], n_bins, residual[draws])).sum(1) / n}


def quality_intervals(y_true: np.ndarray, probs: np.ndarray, n_bins: int, samples: int, confidence: float, seed: int,
                      chunk_cells: int = CHUNK_CELLS) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of each quality check over test images, computed chunk by chunk."""
    top, correct = probs.max(axis=1), (probs.argmax(axis=1) == y_true).astype(float)
    bins = calibration_bin(top, n_bins)
    chunks = [draw_statistics(y_true, correct, correct - top, bins, probs.shape[1], n_bins, draws)
              for draws in resampled_indices(len(y_true), samples, seed, chunk_cells)]
    tails = [(1 - confidence) / 2, (1 + confidence) / 2]
    return {name: tuple(float(q) for q in np.quantile(np.concatenate([c[name] for c in chunks]), tails)) for name in QUALITY_RULES}


def measured_checks(quality: dict, y_true: np.ndarray, probs: np.ndarray, e: DictConfig, seed: int) -> list[dict]:
    """Each quality check's value (from `quality`), bootstrap interval and the test images it rests on; no verdict yet."""
    intervals = quality_intervals(y_true, probs, e.calibration_bins, e.bootstrap_samples, e.bootstrap_confidence, seed)
    return [{"check": name, "value": round(quality[name], 9), "low": intervals[name][0], "high": intervals[name][1],
             "confidence": e.bootstrap_confidence, "min_count": len(y_true), "min_count_of": "the test split"}
            for name in QUALITY_RULES]
