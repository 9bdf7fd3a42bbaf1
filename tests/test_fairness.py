"""fairness: per-group numbers checked against an independent numpy/pandas computation on a
hand-made case, the bootstrap interval's behaviour, and the verdicts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from components.core.config import compose
from components.core.errors import DataError
from components.evaluation.fairness import accuracy_gap_interval, fairness_report, require_groups

CLASSES = ["x", "y", "z"]
# 12 hand-made predictions: site a errs once, site b three times; sex m never errs.
Y_TRUE = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
Y_PRED = np.array([0, 1, 2, 0, 1, 1, 0, 2, 2, 1, 1, 2])
SENSITIVE = pd.DataFrame({"site": ["a"] * 6 + ["b"] * 6, "sex": ["m", "f"] * 6})


def evaluate_cfg(*overrides: str):
    return compose(list(overrides)).evaluate


def by_hand(groups: np.ndarray) -> dict:
    """The same numbers from their definitions, with plain numpy."""
    out = {}
    for g in np.unique(groups):
        t, p = Y_TRUE[groups == g], Y_PRED[groups == g]
        recall = [np.mean(p[t == k] == k) for k in np.unique(t)]
        precision = [np.mean(t[p == k] == k) for k in np.unique(p)]
        out[g] = {"count": len(t), "accuracy": np.mean(t == p), "recall_macro": np.mean(recall),
                  "precision_macro": np.mean(precision), "selection_rate": {c: np.mean(p == k) for k, c in enumerate(CLASSES)}}
    return out


def one_vs_rest_by_hand(groups: np.ndarray) -> tuple[dict, dict]:
    dpd, eod = {}, {}
    for k, c in enumerate(CLASSES):
        rates = {g: np.mean(Y_PRED[groups == g] == k) for g in np.unique(groups)}
        tpr = {g: np.mean(Y_PRED[(groups == g) & (Y_TRUE == k)] == k) for g in np.unique(groups)}
        fpr = {g: np.mean(Y_PRED[(groups == g) & (Y_TRUE != k)] == k) for g in np.unique(groups)}
        dpd[c] = max(rates.values()) - min(rates.values())
        eod[c] = max(max(tpr.values()) - min(tpr.values()), max(fpr.values()) - min(fpr.values()))
    return dpd, eod


def test_group_numbers_match_an_independent_computation():
    report = fairness_report(Y_TRUE, Y_PRED, SENSITIVE, CLASSES, evaluate_cfg(), seed=0)
    assert set(report["groupings"]) == {"site", "sex", "site & sex"}
    for name, groups in (("site", SENSITIVE["site"]), ("sex", SENSITIVE["sex"]),
                         ("site & sex", SENSITIVE["site"] + " & " + SENSITIVE["sex"])):
        got, expected = report["groupings"][name], by_hand(groups.to_numpy())
        assert set(got["groups"]) == set(expected)
        for g, numbers in expected.items():
            assert got["groups"][g].pop("selection_rate") == pytest.approx(numbers.pop("selection_rate"))
            assert got["groups"][g] == pytest.approx(numbers)
        for metric in ("accuracy", "recall_macro", "precision_macro"):
            values = [numbers[metric] for numbers in expected.values()]
            assert got["difference"][metric] == pytest.approx(max(values) - min(values))
            assert got["ratio"][metric] == pytest.approx(min(values) / max(values))
        dpd, eod = one_vs_rest_by_hand(groups.to_numpy())
        assert got["demographic_parity_difference"]["per_class"] == pytest.approx(dpd)
        assert got["demographic_parity_difference"]["value"] == pytest.approx(max(dpd.values()))
        assert dpd[got["demographic_parity_difference"]["worst_class"]] == max(dpd.values())
        assert got["equalized_odds_difference"]["per_class"] == pytest.approx(eod)
        assert got["equalized_odds_difference"]["value"] == pytest.approx(max(eod.values()))


def test_hand_made_case_literal_values():
    site = fairness_report(Y_TRUE, Y_PRED, SENSITIVE[["site"]], CLASSES, evaluate_cfg(), seed=0)["groupings"]["site"]
    assert site["groups"]["a"]["accuracy"] == pytest.approx(5 / 6)
    assert site["groups"]["b"]["accuracy"] == pytest.approx(4 / 6)
    assert site["difference"]["accuracy"] == pytest.approx(1 / 6)
    assert site["ratio"]["accuracy"] == pytest.approx(0.8)
    # class z: a predicts it once in 6, b three times in 6
    assert site["demographic_parity_difference"]["per_class"]["z"] == pytest.approx(2 / 6)
    assert site["accuracy_gap"]["best_group"] == "a" and site["accuracy_gap"]["worst_group"] == "b"


def test_verdicts_compare_each_check_with_its_threshold():
    strict = evaluate_cfg("evaluate.thresholds.max_accuracy_difference=0.1", "evaluate.thresholds.min_accuracy_ratio=0.8",
                          "evaluate.thresholds.max_recall_macro_difference=1", "evaluate.thresholds.max_demographic_parity_difference=1",
                          "evaluate.thresholds.max_equalized_odds_difference=1", "evaluate.sensitive_attributes=[site]")
    report = fairness_report(Y_TRUE, Y_PRED, SENSITIVE[["site"]], CLASSES, strict, seed=0)
    verdicts = {c["check"]: c["passed"] for c in report["checks"]}
    assert verdicts == {"accuracy_difference": False, "accuracy_ratio": True,  # 0.8 >= 0.8: a value on the threshold passes
                        "recall_macro_difference": True, "demographic_parity_difference": True, "equalized_odds_difference": True}
    assert report["passed"] is False
    assert report["violations"] == ["site: accuracy_difference 0.1667 (must be <= 0.1)"]
    lenient = evaluate_cfg("evaluate.thresholds.max_accuracy_difference=0.2", "evaluate.thresholds.max_equalized_odds_difference=1",
                           "evaluate.thresholds.max_demographic_parity_difference=1", "evaluate.thresholds.max_recall_macro_difference=1",
                           "evaluate.thresholds.min_accuracy_ratio=0")
    assert fairness_report(Y_TRUE, Y_PRED, SENSITIVE[["site"]], CLASSES, lenient, seed=0)["passed"] is True


def _outcomes(n_a: int, acc_a: float, n_b: int, acc_b: float) -> tuple[np.ndarray, pd.Series]:
    correct = np.r_[np.arange(n_a) < round(acc_a * n_a), np.arange(n_b) < round(acc_b * n_b)]
    return correct, pd.Series(["a"] * n_a + ["b"] * n_b)


def test_bootstrap_interval_tells_a_real_gap_from_noise():
    real = accuracy_gap_interval(*_outcomes(400, 0.95, 400, 0.80), samples=2000, confidence=0.95, seed=0)
    assert real["best_group"] == "a" and real["gap"] == pytest.approx(0.15)
    assert 0 < real["low"] < 0.15 < real["high"] and real["significant"]
    noise = accuracy_gap_interval(*_outcomes(20, 0.90, 20, 0.85), samples=2000, confidence=0.95, seed=0)
    assert noise["low"] < 0 < noise["high"] and not noise["significant"]


def test_bootstrap_interval_narrows_with_data_widens_with_confidence_and_is_seeded():
    def width(result):
        return result["high"] - result["low"]

    small = accuracy_gap_interval(*_outcomes(50, 0.9, 50, 0.8), samples=2000, confidence=0.95, seed=1)
    large = accuracy_gap_interval(*_outcomes(5000, 0.9, 5000, 0.8), samples=2000, confidence=0.95, seed=1)
    looser = accuracy_gap_interval(*_outcomes(50, 0.9, 50, 0.8), samples=2000, confidence=0.5, seed=1)
    assert width(large) < width(small) / 5
    assert width(looser) < width(small)
    assert accuracy_gap_interval(*_outcomes(50, 0.9, 50, 0.8), samples=2000, confidence=0.95, seed=1) == small
    bounds = small["group_accuracy"]
    assert bounds["a"]["low"] < 0.9 < bounds["a"]["high"] and bounds["b"]["low"] < 0.8 < bounds["b"]["high"]


def test_bootstrap_matches_resampling_the_test_images():
    """The binomial draw is the same distribution as resampling images with replacement per group."""
    correct, groups = _outcomes(60, 0.9, 30, 0.7)
    ours = accuracy_gap_interval(correct, groups, samples=20000, confidence=0.9, seed=0)
    rng = np.random.default_rng(1)
    a, b = correct[groups == "a"], correct[groups == "b"]
    gaps = rng.choice(a, (20000, len(a))).mean(1) - rng.choice(b, (20000, len(b))).mean(1)
    assert [ours["low"], ours["high"]] == pytest.approx(np.quantile(gaps, [0.05, 0.95]), abs=0.015)


def test_a_known_group_without_test_images_is_an_error():
    with pytest.raises(DataError, match=r"\['site=c'\] have no images in the test split"):
        require_groups(SENSITIVE, {"site": ["a", "b", "c"]}, "prepared")
    require_groups(SENSITIVE, {"site": ["a", "b"], "sex": ["m", "f"]}, "prepared")
