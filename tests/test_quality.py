"""Quality verdicts from intervals: the statistics the bootstrap resamples are the reported metrics,
the intervals are seeded and do not depend on how the draws are chunked, and the gate judges a
quality check by its whole interval and the test-set size, like a fairness check."""

from __future__ import annotations

import numpy as np
import pytest

from components.core.config.compose import compose
from components.evaluation.gates import decide, judge
from components.evaluation.quality import (
    CHUNK_CELLS,
    calibration_bin,
    draw_statistics,
    measured_checks,
    quality_intervals,
    quality_metrics,
    resampled_indices,
)

CLASSES = ["a", "b", "c"]


def predictions(n: int, errors: int, right_confidence: float, wrong_confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """n test images of 3 classes, the first `errors` of them wrong, with the given top-label confidences."""
    y_true = np.arange(n) % 3
    correct = np.arange(n) >= errors
    predicted = np.where(correct, y_true, (y_true + 1) % 3)
    top = np.where(correct, right_confidence, wrong_confidence)
    probs = np.repeat(((1 - top) / 2)[:, None], 3, axis=1)
    probs[np.arange(n), predicted] = top
    return y_true, probs


def checks_of(y_true: np.ndarray, probs: np.ndarray, *overrides: str) -> list[dict]:
    cfg = compose(list(overrides))
    quality, _ = quality_metrics(y_true, probs, CLASSES, cfg.evaluate.calibration_bins)
    return decide(measured_checks(quality, y_true, probs, cfg.evaluate, seed=0), [], cfg.gate)["quality"]


def test_the_resampled_statistics_of_the_observed_test_set_are_the_reported_metrics():
    rng = np.random.default_rng(0)
    y_true, probs = rng.integers(0, 3, 200), rng.dirichlet([1, 1, 1], 200)
    quality, _ = quality_metrics(y_true, probs, CLASSES, 10)
    top, correct = probs.max(1), (probs.argmax(1) == y_true).astype(float)
    observed = draw_statistics(y_true, correct, correct - top, calibration_bin(top, 10), 3, 10, np.arange(200)[None, :])
    assert {name: float(values[0]) for name, values in observed.items()} == pytest.approx(
        {name: quality[name] for name in ("accuracy", "balanced_accuracy", "ece")})


def test_intervals_are_seeded_cover_the_estimate_and_do_not_depend_on_the_chunks():
    y_true, probs = predictions(271, 30, 0.9, 0.6)
    whole = quality_intervals(y_true, probs, 10, samples=1000, confidence=0.95, seed=3)
    assert whole == quality_intervals(y_true, probs, 10, samples=1000, confidence=0.95, seed=3)
    assert whole == quality_intervals(y_true, probs, 10, samples=1000, confidence=0.95, seed=3, chunk_cells=271 * 7)
    assert whole != quality_intervals(y_true, probs, 10, samples=1000, confidence=0.95, seed=4)
    low, high = whole["accuracy"]
    assert low < 241 / 271 < high and high - low < 0.1


def test_intervals_narrow_with_more_test_images():
    small = quality_intervals(*predictions(100, 10, 0.9, 0.6), 10, samples=1000, confidence=0.95, seed=0)
    large = quality_intervals(*predictions(10_000, 1000, 0.9, 0.6), 10, samples=1000, confidence=0.95, seed=0)
    for name in ("accuracy", "balanced_accuracy", "ece"):
        assert large[name][1] - large[name][0] < (small[name][1] - small[name][0]) / 5, name


def test_the_resampled_indices_held_at_once_stay_bounded_at_any_test_set_size():
    for n in (67, 10_000, 3_000_000):
        chunks = [draws.shape for draws in resampled_indices(n, samples=1000, seed=0)]
        assert sum(rows for rows, _ in chunks) == 1000 and all(cols == n for _, cols in chunks)
        assert max(rows * n for rows, _ in chunks) <= max(CHUNK_CELLS, n)


@pytest.mark.parametrize("interval,n,verdict,why", [
    ((0.92, 0.97), 271, "pass", "the whole interval is within the tolerance"),
    ((0.70, 0.85), 271, "fail", "the whole interval is beyond the tolerance"),
    ((0.86, 0.95), 271, "inconclusive", "the interval straddles the tolerance"),
    ((0.20, 0.40), 30, "inconclusive", "rests on 30 test images (the test split), fewer than gate.quality.min_test_size=50"),
])
def test_a_quality_verdict_comes_from_the_interval_and_the_test_set_size(interval, n, verdict, why):
    check = {"check": "accuracy", "value": sum(interval) / 2, "low": interval[0], "high": interval[1], "min_count": n,
             "min_count_of": "the test split"}
    judged = judge(check, "quality", compose([]).gate.quality)
    assert (judged["verdict"], judged["why"]) == (verdict, why)
    assert (judged["threshold"], judged["rule"], judged["key"]) == (0.9, ">=", "gate.quality.min_accuracy")


def test_the_issues_small_test_set_missing_ece_inside_the_noise_warns():
    """67 test images, accuracy 0.910 and ECE 0.0540 against max_ece 0.05: the old point-estimate gate closed."""
    y_true, probs = predictions(67, 6, 0.98, 0.4)
    checks = {c["check"]: c for c in checks_of(y_true, probs)}
    assert checks["ece"]["value"] == pytest.approx(0.0540, abs=5e-5) and checks["ece"]["low"] < 0.05 < checks["ece"]["high"]
    assert {name: c["verdict"] for name, c in checks.items()} == {"accuracy": "inconclusive", "balanced_accuracy": "inconclusive",
                                                                  "ece": "inconclusive"}
    decision = decide([c for c in checks.values()], [], compose([]).gate)
    assert decision["open"] and decision["blocking"] == []
    assert decision["warnings"][-1].startswith("quality: ece 0.0540 (interval ")
    assert decision["warnings"][-1].endswith("must be <= 0.05, gate.quality.max_ece): inconclusive, the interval straddles the tolerance")


def test_a_clear_quality_miss_fails_and_follows_the_fail_policy():
    y_true, probs = predictions(150, 60, 0.9, 0.9)  # accuracy 0.6, every confidence 0.9
    checks = checks_of(y_true, probs)
    assert [c["verdict"] for c in checks] == ["fail", "fail", "fail"] and checks[0]["high"] < 0.9
    blocked = decide(checks, [], compose([]).gate)
    assert not blocked["open"] and blocked["blocking"][0].startswith("quality: accuracy 0.6000 (interval ")
    assert blocked["blocking"][0].endswith("gate.quality.min_accuracy): fail, the whole interval is beyond the tolerance")
    warned = decide(checks, [], compose(["gate.on_fail=warn"]).gate)
    assert warned["open"] and len(warned["warnings"]) == 3
    too_few = checks_of(*predictions(40, 16, 0.9, 0.9))
    assert {c["verdict"] for c in too_few} == {"inconclusive"} and too_few[0]["why"].startswith("rests on 40 test images")
