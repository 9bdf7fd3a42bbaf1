"""Fairness across sensitive groups (fairlearn): per-group metrics, between-group gaps,
one-class-versus-the-rest demographic parity and equalized odds, a bootstrap interval for
the accuracy gap, and a pass/fail verdict per configured threshold."""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
from fairlearn.metrics import (
    MetricFrame,
    count,
    demographic_parity_difference,
    equalized_odds_difference,
    selection_rate,
)
from omegaconf import DictConfig
from sklearn.metrics import accuracy_score, precision_score, recall_score

from components.core.errors import DataError

GAP_METRICS = ("accuracy", "recall_macro", "precision_macro")


def recall_macro(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in the group, so every term is defined."""
    return recall_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0)


def precision_macro(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean precision over the classes the model predicted in the group, so every term is defined."""
    return precision_score(y_true, y_pred, labels=np.unique(y_pred), average="macro", zero_division=0)


def audited_groupings(sensitive: pd.DataFrame) -> dict[str, pd.Series]:
    """Each sensitive attribute alone, plus their intersection when there are several."""
    groupings = {name: sensitive[name].astype(str) for name in sensitive.columns}
    if len(sensitive.columns) > 1:
        groupings[" & ".join(sensitive.columns)] = sensitive.astype(str).agg(" & ".join, axis=1)
    return groupings


def require_groups(sensitive: pd.DataFrame, known_groups: dict[str, list[str]], source: str) -> None:
    """Every group the data knows must have test images, or its fairness cannot be measured."""
    empty = [f"{attr}={group}" for attr, groups in known_groups.items() if attr in sensitive
             for group in groups if not (sensitive[attr] == group).any()]
    if empty:
        raise DataError(f"{source}: group(s) {empty} have no images in the test split, so their fairness cannot be "
                        "measured; add data for them or change data.split")


def group_metrics(y_true: np.ndarray, y_pred: np.ndarray, groups: pd.Series, classes: list[str]) -> MetricFrame:
    metrics = {"count": count, "accuracy": accuracy_score, "recall_macro": recall_macro, "precision_macro": precision_macro}
    metrics |= {f"selection_rate[{name}]": partial(selection_rate, pos_label=k) for k, name in enumerate(classes)}
    return MetricFrame(metrics=metrics, y_true=y_true, y_pred=y_pred, sensitive_features=groups)


def one_versus_rest(metric, y_true: np.ndarray, y_pred: np.ndarray, groups: pd.Series, classes: list[str]) -> dict:
    """A binary fairlearn metric for each class against the rest; the worst class decides."""
    per_class = {name: float(metric((y_true == k).astype(int), (y_pred == k).astype(int), sensitive_features=groups))
                 for k, name in enumerate(classes)}
    worst = max(per_class, key=per_class.get)
    return {"value": per_class[worst], "worst_class": worst, "per_class": per_class}


def accuracy_gap_interval(correct: np.ndarray, groups: pd.Series, samples: int, confidence: float, seed: int) -> dict:
    """Bootstrap interval of accuracy(best group) - accuracy(worst group), plus one per group.

    The two groups are fixed at their observed ranking, so the interval is of a signed
    difference: it includes 0 when the gap could be noise. (fairlearn's MetricFrame(n_boot=)
    bootstraps max - min over groups, which is never below 0 and so cannot tell.) Each group
    is resampled on its own, keeping its size; the mean of n resampled 0/1 outcomes is exactly
    Binomial(n, accuracy) / n, so that is drawn instead of n indices per draw.
    """
    stats = pd.Series(correct, dtype=float).groupby(groups.to_numpy()).agg(["mean", "size"])
    sizes, accuracies = stats["size"].to_numpy(), stats["mean"].to_numpy()
    draws = np.random.default_rng(seed).binomial(sizes, accuracies, size=(samples, len(stats))) / sizes
    best, worst = stats["mean"].idxmax(), stats["mean"].idxmin()
    gaps = draws[:, stats.index.get_loc(best)] - draws[:, stats.index.get_loc(worst)]
    tails = [(1 - confidence) / 2, (1 + confidence) / 2]
    low, high = np.quantile(gaps, tails)
    group_bounds = np.quantile(draws, tails, axis=0)
    return {
        "best_group": best, "worst_group": worst, "gap": float(stats.at[best, "mean"] - stats.at[worst, "mean"]),
        "low": float(low), "high": float(high), "significant": bool(low > 0),
        "confidence": confidence, "samples": samples,
        "group_accuracy": {g: {"low": float(lo), "high": float(hi)} for g, lo, hi in zip(stats.index, *group_bounds)},
    }


def grouping_report(y_true: np.ndarray, y_pred: np.ndarray, groups: pd.Series, classes: list[str], e: DictConfig, seed: int) -> dict:
    frame = group_metrics(y_true, y_pred, groups, classes)
    by_group = {}
    for group, row in frame.by_group.iterrows():
        rates = {name: float(row[f"selection_rate[{name}]"]) for name in classes}
        by_group[str(group)] = {"count": int(row["count"]), **{m: float(row[m]) for m in GAP_METRICS}, "selection_rate": rates}
    difference, ratio = frame.difference(method="between_groups"), frame.ratio(method="between_groups")
    return {
        "groups": by_group,
        "difference": {m: float(difference[m]) for m in GAP_METRICS},
        "ratio": {m: float(ratio[m]) for m in GAP_METRICS},
        "demographic_parity_difference": one_versus_rest(demographic_parity_difference, y_true, y_pred, groups, classes),
        "equalized_odds_difference": one_versus_rest(equalized_odds_difference, y_true, y_pred, groups, classes),
        "accuracy_gap": accuracy_gap_interval(y_true == y_pred, groups, e.bootstrap_samples, e.bootstrap_confidence, seed),
    }


def verdicts(grouping: str, report: dict, t: DictConfig) -> list[dict]:
    rules = [
        ("accuracy_difference", report["difference"]["accuracy"], "<=", t.max_accuracy_difference),
        ("accuracy_ratio", report["ratio"]["accuracy"], ">=", t.min_accuracy_ratio),
        ("recall_macro_difference", report["difference"]["recall_macro"], "<=", t.max_recall_macro_difference),
        ("demographic_parity_difference", report["demographic_parity_difference"]["value"], "<=", t.max_demographic_parity_difference),
        ("equalized_odds_difference", report["equalized_odds_difference"]["value"], "<=", t.max_equalized_odds_difference),
    ]
    checks = []
    for name, value, rule, threshold in rules:
        value = round(value, 9)  # so a value equal to its threshold up to float noise (0.79999999 vs 0.8) passes
        passed = value <= threshold if rule == "<=" else value >= threshold
        checks.append({"grouping": grouping, "check": name, "value": value, "rule": rule, "threshold": threshold, "passed": bool(passed)})
    return checks


def fairness_report(y_true: np.ndarray, y_pred: np.ndarray, sensitive: pd.DataFrame, classes: list[str], e: DictConfig, seed: int) -> dict:
    """Audit predictions (class indices) across every grouping of the sensitive attributes."""
    groupings = {name: grouping_report(y_true, y_pred, groups, classes, e, seed) for name, groups in audited_groupings(sensitive).items()}
    checks = [check for name, report in groupings.items() for check in verdicts(name, report, e.thresholds)]
    violations = [f"{c['grouping']}: {c['check']} {c['value']:.4f} (must be {c['rule']} {c['threshold']})" for c in checks if not c["passed"]]
    return {"groupings": groupings, "checks": checks, "violations": violations, "passed": not violations,
            "fail_on_violation": e.fail_on_violation}
