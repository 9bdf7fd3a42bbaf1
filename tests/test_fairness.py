"""fairness: per-group numbers checked against an independent numpy/pandas computation on a
hand-made case, the bootstrap intervals' behaviour, and the verdicts of the gate policy
(pass / fail / inconclusive from intervals; block or warn)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from components.core.config.compose import compose
from components.core.errors import DataError
from components.evaluation.fairness import (
    accuracy_gap_interval,
    check_intervals,
    fairness_report,
    group_confusion,
    group_rates,
    pair_values,
    require_groups,
    worst_pairs,
)
from components.evaluation.gates import decide, judge

CLASSES = ["x", "y", "z"]
# 12 hand-made predictions: site a errs once, site b three times; sex m never errs.
Y_TRUE = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
Y_PRED = np.array([0, 1, 2, 0, 1, 1, 0, 2, 2, 1, 1, 2])
SENSITIVE = pd.DataFrame({"site": ["a"] * 6 + ["b"] * 6, "sex": ["m", "f"] * 6})


def evaluate_cfg(*overrides: str):
    return compose(list(overrides)).evaluate


def report_of(sensitive: pd.DataFrame, *overrides: str, y_true=Y_TRUE, y_pred=Y_PRED) -> dict:
    cfg = compose(list(overrides))
    return fairness_report(y_true, y_pred, sensitive, CLASSES, cfg.evaluate, cfg.gate.fairness, seed=0)


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
    report = report_of(SENSITIVE)
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
    site = report_of(SENSITIVE[["site"]])["groupings"]["site"]
    assert site["groups"]["a"]["accuracy"] == pytest.approx(5 / 6)
    assert site["groups"]["b"]["accuracy"] == pytest.approx(4 / 6)
    assert site["difference"]["accuracy"] == pytest.approx(1 / 6)
    assert site["ratio"]["accuracy"] == pytest.approx(0.8)
    # class z: a predicts it once in 6, b three times in 6
    assert site["demographic_parity_difference"]["per_class"]["z"] == pytest.approx(2 / 6)
    assert site["accuracy_gap"]["best_group"] == "a" and site["accuracy_gap"]["worst_group"] == "b"


def test_check_statistics_from_confusion_counts_equal_the_fairlearn_values():
    """The vectorised statistics the bootstrap resamples, on the observed data, are the reported values."""
    for name, groups in (("site", SENSITIVE["site"]), ("sex", SENSITIVE["sex"])):
        report = report_of(SENSITIVE[[name]])
        codes, _ = pd.factorize(groups, sort=True)
        rates = group_rates(group_confusion(Y_TRUE, Y_PRED, codes, 2, len(CLASSES)))
        ours = pair_values(rates, worst_pairs(rates))
        assert {c["check"]: c["value"] for c in report["checks"]} == pytest.approx({k: float(v) for k, v in ours.items()})


def check(value: float, low: float, high: float, name: str = "accuracy_difference", min_count: int = 100) -> dict:
    return {"grouping": "site", "check": name, "value": value, "low": low, "high": high, "min_count": min_count,
            "min_count_of": "group b"}


# Quality checks whose whole intervals lie within the default thresholds.
PASSING_QUALITY = [{"check": name, "value": value, "low": value - 0.005, "high": value + 0.005, "min_count": 271,
                    "min_count_of": "the test split"} for name, value in (("accuracy", 0.99), ("balanced_accuracy", 0.99), ("ece", 0.01))]


@pytest.mark.parametrize("interval,min_count,verdict", [
    ((0.01, 0.04), 100, "pass"),           # the whole interval within the tolerance (0.05)
    ((0.06, 0.20), 100, "fail"),           # the whole interval beyond it
    ((0.02, 0.09), 100, "inconclusive"),   # straddles it: the data cannot tell
    ((0.30, 0.60), 8, "inconclusive"),     # beyond it, but resting on 8 images (< min_group_size 30)
    ((0.05, 0.05), 100, "pass"),           # on the tolerance is within it
])
def test_a_verdict_comes_from_the_interval_and_the_group_size(interval, min_count, verdict):
    judged = judge(check(sum(interval) / 2, *interval, min_count=min_count), "fairness", compose([]).gate.fairness)
    assert judged["verdict"] == verdict
    assert (judged["threshold"], judged["rule"], judged["key"]) == (0.05, "<=", "gate.fairness.max_accuracy_difference")
    ratio = judge(check(0.9, 0.85, 0.93, name="accuracy_ratio"), "fairness", compose([]).gate.fairness)
    assert ratio["verdict"] == "fail" and ratio["rule"] == ">="  # a ratio must stay at or above 0.95


@pytest.mark.parametrize("on_fail,on_inconclusive,open_,blocking,warnings", [
    ("block", "warn", False, 1, 1), ("block", "block", False, 2, 0), ("warn", "warn", True, 0, 2), ("warn", "block", False, 1, 1),
])
def test_the_policy_blocks_or_warns_on_fail_and_inconclusive(on_fail, on_inconclusive, open_, blocking, warnings):
    gate = compose([f"gate.on_fail={on_fail}", f"gate.on_inconclusive={on_inconclusive}"]).gate
    decision = decide(PASSING_QUALITY, [check(0.1, 0.06, 0.2), check(0.05, 0.02, 0.09), check(0.01, 0.0, 0.03)], gate)
    assert (decision["open"], len(decision["blocking"]), len(decision["warnings"])) == (open_, blocking, warnings)
    assert [c["verdict"] for c in decision["fairness"]] == ["fail", "inconclusive", "pass"]
    assert [c["verdict"] for c in decision["quality"]] == ["pass"] * 3


def test_a_real_gap_on_large_groups_fails_and_the_same_gap_on_small_groups_is_inconclusive():
    rng = np.random.default_rng(0)

    def predictions(n_per_group: int) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
        y_true = np.tile(np.arange(3), 2 * n_per_group // 3 + 1)[: 2 * n_per_group]
        wrong = np.r_[rng.random(n_per_group) < 0.02, rng.random(n_per_group) < 0.30]  # group b errs 15x as often
        y_pred = np.where(wrong, (y_true + 1) % 3, y_true)
        return y_true, y_pred, pd.DataFrame({"site": ["a"] * n_per_group + ["b"] * n_per_group})

    y_true, y_pred, sensitive = predictions(600)
    large = {c["check"]: c for c in report_of(sensitive, y_true=y_true, y_pred=y_pred)["checks"]}
    assert large["accuracy_difference"]["verdict"] == "fail" and large["accuracy_difference"]["low"] > 0.05
    y_true, y_pred, sensitive = predictions(20)
    small = {c["check"]: c for c in report_of(sensitive, y_true=y_true, y_pred=y_pred)["checks"]}
    assert small["accuracy_difference"]["verdict"] == "inconclusive"
    assert small["accuracy_difference"]["why"].startswith("rests on 20 test images (group a)")  # the first of the smallest


def test_intervals_are_seeded_and_cover_the_observed_value():
    codes, _ = pd.factorize(SENSITIVE["site"], sort=True)
    confusion = group_confusion(Y_TRUE, Y_PRED, codes, 2, len(CLASSES))
    first = check_intervals(confusion, samples=500, confidence=0.9, seed=3)
    assert first == check_intervals(confusion, samples=500, confidence=0.9, seed=3)
    assert first["accuracy_difference"][0] <= 1 / 6 <= first["accuracy_difference"][1]


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


def test_the_registry_judges_committed_reports_with_the_same_policy(tmp_path):
    """gate_failures re-judges the reports committed at a version's commit with conf/gate (a real git repo)."""
    from components.promote import gate_failures
    from tests.helpers.project import git_commit, run

    run(["git", "init", "-q", "-b", "main"], tmp_path)
    (tmp_path / "reports").mkdir()
    commits = []
    for quality, fairness in (({"accuracy": 0.99, "balanced_accuracy": 0.99, "ece": 0.01},  # before any intervals
                               {"checks": [{"grouping": "site", "check": "accuracy_difference", "value": 0.2, "passed": False}]}),
                              ({"checks": PASSING_QUALITY}, {"checks": [{"grouping": "site", "check": "accuracy_difference",
                                                                         "value": 0.2, "passed": False}]}),
                              ({"checks": PASSING_QUALITY}, {"checks": [check(0.2, 0.1, 0.3)]})):
        (tmp_path / "reports" / "quality.json").write_text(json.dumps(quality))
        (tmp_path / "reports" / "fairness.json").write_text(json.dumps(fairness))
        git_commit(tmp_path, "reports")
        commits.append(run(["git", "rev-parse", "HEAD"], tmp_path).stdout.strip())
    cfg = compose([])
    for commit, report in zip(commits, ("quality", "fairness")):
        assert gate_failures(cfg, commit, tmp_path) == [
            f"reports/{report}.json at {commit[:10]} has no check intervals (written before conf/gate's verdicts from intervals): "
            "run the evaluate step and commit its reports"]
    head = commits[-1]
    assert gate_failures(cfg, head, tmp_path) == [decide(PASSING_QUALITY, [check(0.2, 0.1, 0.3)], cfg.gate)["blocking"][0]]
    assert gate_failures(compose(["gate.on_fail=warn"]), head, tmp_path) == []
