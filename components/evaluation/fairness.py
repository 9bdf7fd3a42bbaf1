"""Fairness across sensitive groups (fairlearn): per-group metrics, between-group gaps,
one-class-versus-the-rest demographic parity and equalized odds, and for every check its
bootstrap interval and the smallest count it rests on; conf/gate turns those into verdicts
(components/evaluation/gates.py)."""

from __future__ import annotations

import warnings
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
from components.evaluation.gates import FAIRNESS_RULES, judge, verdict_counts

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


def group_rates(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Per-group rates from confusion counts `confusion[..., group, true, predicted]` (any leading
    axes, e.g. bootstrap draws): accuracy and macro recall per group, and per group and class the
    selection rate, TPR and FPR (one class versus the rest); NaN where undefined."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class absent from a group's draw
        n = confusion.sum((-2, -1))[..., None]
        hits, support, predicted = np.diagonal(confusion, axis1=-2, axis2=-1), confusion.sum(-1), confusion.sum(-2)
        tpr = np.where(support > 0, hits / support, np.nan)
        return {"accuracy": hits.sum(-1) / n[..., 0], "recall_macro": np.nanmean(tpr, -1), "selection": predicted / n,
                "tpr": tpr, "fpr": np.where(n > support, (predicted - hits) / (n - support), np.nan)}


def worst_pairs(rates: dict[str, np.ndarray]) -> dict[str, tuple[str, tuple, tuple]]:
    """For each check, the rate and the (best, worst) cells that make its observed value: the
    groups furthest apart, and for the one-versus-the-rest checks the class (and rate) where they are."""
    def spread_pair(rate: str) -> tuple[float, tuple, tuple]:
        values = rates[rate]
        if values.ndim == 1:
            return float(np.nanmax(values) - np.nanmin(values)), (int(np.nanargmax(values)),), (int(np.nanargmin(values)),)
        spreads = np.nanmax(values, 0) - np.nanmin(values, 0)
        k = int(np.nanargmax(spreads))
        return float(spreads[k]), (int(np.nanargmax(values[:, k])), k), (int(np.nanargmin(values[:, k])), k)

    odds = max((spread_pair(rate) + (rate,) for rate in ("tpr", "fpr")), key=lambda found: found[0])
    return {"accuracy_difference": ("accuracy", *spread_pair("accuracy")[1:]),
            "accuracy_ratio": ("accuracy", *spread_pair("accuracy")[1:]),
            "recall_macro_difference": ("recall_macro", *spread_pair("recall_macro")[1:]),
            "demographic_parity_difference": ("selection", *spread_pair("selection")[1:]),
            "equalized_odds_difference": (odds[3], odds[1], odds[2])}


def pair_values(rates: dict[str, np.ndarray], pairs: dict) -> dict[str, np.ndarray]:
    """Each check on its fixed pair of cells: a signed difference (or ratio), so an interval of it
    covers 0 (or 1) when the gap could be noise; max - min over groups would never go below 0."""
    values = {}
    for name, (rate, best, worst) in pairs.items():
        high, low = rates[rate][(..., *best)], rates[rate][(..., *worst)]
        values[name] = low / high if name == "accuracy_ratio" else high - low
    return values


def group_confusion(y_true: np.ndarray, y_pred: np.ndarray, codes: np.ndarray, n_groups: int, n_classes: int) -> np.ndarray:
    cells = (codes * n_classes + y_true) * n_classes + y_pred
    return np.bincount(cells, minlength=n_groups * n_classes**2).reshape(n_groups, n_classes, n_classes)


def check_intervals(confusion: np.ndarray, samples: int, confidence: float, seed: int) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of every check on its observed pair of cells, each group
    resampled on its own at its size. Resampling a group's n images with replacement is exactly a
    multinomial draw of n over its confusion cells, so that is drawn (cost independent of n)."""
    rng = np.random.default_rng(seed)
    draws = np.stack([rng.multinomial(cells.sum(), cells.ravel() / cells.sum(), size=samples).reshape(samples, *cells.shape)
                      for cells in confusion], axis=1)
    tails = [(1 - confidence) / 2, (1 + confidence) / 2]
    values = pair_values(group_rates(draws), worst_pairs(group_rates(confusion)))
    return {name: tuple(float(q) for q in np.nanquantile(v, tails)) for name, v in values.items()}


def smallest_counts(confusion: np.ndarray, groups: list[str], classes: list[str]) -> dict[str, tuple[int, str]]:
    """The fewest test images each check rests on: a group, or for equalized odds a group's class."""
    sizes = confusion.sum((1, 2))
    g = int(sizes.argmin())
    by_group = (int(sizes[g]), f"group {groups[g]}")
    support = confusion.sum(2)
    g, k = np.unravel_index(support.argmin(), support.shape)
    counts = {name: by_group for name in FAIRNESS_RULES}
    counts["equalized_odds_difference"] = (int(support[g, k]), f"group {groups[g]}, true class {classes[k]}")
    return counts


def measured_checks(grouping: str, report: dict, y_true: np.ndarray, y_pred: np.ndarray, groups: pd.Series,
                    classes: list[str], e: DictConfig, seed: int) -> list[dict]:
    """Each check's value (from the fairlearn report), bootstrap interval and smallest count; no verdict yet."""
    codes, names = pd.factorize(groups, sort=True)
    confusion = group_confusion(y_true, y_pred, codes, len(names), len(classes))
    intervals = check_intervals(confusion, e.bootstrap_samples, e.bootstrap_confidence, seed)
    counts = smallest_counts(confusion, [str(n) for n in names], classes)
    values = {"accuracy_difference": report["difference"]["accuracy"], "accuracy_ratio": report["ratio"]["accuracy"],
              "recall_macro_difference": report["difference"]["recall_macro"],
              "demographic_parity_difference": report["demographic_parity_difference"]["value"],
              "equalized_odds_difference": report["equalized_odds_difference"]["value"]}
    return [{"grouping": grouping, "check": name, "value": round(values[name], 9), "low": intervals[name][0],
             "high": intervals[name][1], "confidence": e.bootstrap_confidence, "min_count": counts[name][0],
             "min_count_of": counts[name][1]} for name in FAIRNESS_RULES]


def fairness_report(y_true: np.ndarray, y_pred: np.ndarray, sensitive: pd.DataFrame, classes: list[str], e: DictConfig,
                    fairness_gate: DictConfig, seed: int) -> dict:
    """Audit predictions (class indices) across every grouping of the sensitive attributes;
    each check judged by the gate policy's fairness section."""
    groupings, checks = {}, []
    for name, groups in audited_groupings(sensitive).items():
        groupings[name] = grouping_report(y_true, y_pred, groups, classes, e, seed)
        measured = measured_checks(name, groupings[name], y_true, y_pred, groups, classes, e, seed)
        checks += [judge(c, "fairness", fairness_gate) for c in measured]
    return {"groupings": groupings, "checks": checks, "verdicts": verdict_counts(checks)}
