"""The one gate policy (conf/gate): quality thresholds on the test metrics, and a verdict per
fairness check from its interval. Evaluate, the pipeline's gate step and the registry all
decide with `decide`, from the numbers evaluate wrote, so a threshold changes in one place.

A quality metric below (above) its threshold fails. A fairness check is
- fail: its whole interval lies beyond the tolerance;
- inconclusive: it rests on a group (or a group's class) smaller than `min_group_size`, or
  its interval straddles the tolerance: the data cannot tell;
- pass: its whole interval lies within the tolerance.
"""

from __future__ import annotations

from omegaconf import DictConfig

from components.core.config.schema import FairnessGate, QualityGate, threshold_rules

# check or metric name -> (its gate key, rule), from the schema's thresholds: "<=" a value must stay at or below it.
FAIRNESS_RULES = threshold_rules(FairnessGate)
QUALITY_RULES = threshold_rules(QualityGate)


def _within(value: float, rule: str, tolerance: float) -> bool:
    value = round(value, 9)  # a value equal to its tolerance up to float noise (0.79999999 vs 0.8) is within it
    return value <= tolerance if rule == "<=" else value >= tolerance


def judge(check: dict, fairness: DictConfig) -> dict:
    """`check` (grouping, check, value, low, high, min_count, min_count_of) with its tolerance, rule and verdict."""
    key, rule = FAIRNESS_RULES[check["check"]]
    tolerance = fairness[key]
    low_side, high_side = _within(check["low"], rule, tolerance), _within(check["high"], rule, tolerance)
    if check["min_count"] < fairness.min_group_size:
        verdict, why = "inconclusive", (f"rests on {check['min_count']} test images ({check['min_count_of']}), "
                                        f"fewer than gate.fairness.min_group_size={fairness.min_group_size}")
    elif low_side and high_side:
        verdict, why = "pass", "the whole interval is within the tolerance"
    elif not low_side and not high_side:
        verdict, why = "fail", "the whole interval is beyond the tolerance"
    else:
        verdict, why = "inconclusive", "the interval straddles the tolerance"
    return {**check, "rule": rule, "threshold": tolerance, "key": f"gate.fairness.{key}", "verdict": verdict, "why": why}


def describe(check: dict) -> str:
    return (f"{check['grouping']}: {check['check']} {check['value']:.4f} (interval {check['low']:.4f} to {check['high']:.4f}; "
            f"must be {check['rule']} {check['threshold']}, {check['key']}): {check['verdict']}, {check['why']}")


def quality_failures(metrics: dict, quality: DictConfig) -> list[str]:
    return [f"{metric} {metrics[metric]:.4f} not {rule} {quality[key]} (gate.quality.{key})"
            for metric, (key, rule) in QUALITY_RULES.items() if not _within(metrics[metric], rule, quality[key])]


def decide(metrics: dict, checks: list[dict], gate: DictConfig) -> dict:
    """The gate's decision on measured metrics and fairness checks: open or not, and why."""
    judged = [judge(check, gate.fairness) for check in checks]
    quality = [f"quality: {f}" for f in quality_failures(metrics, gate.quality)]
    blocking, warnings = (quality, []) if gate.on_fail == "block" else ([], quality)
    for check in judged:
        if check["verdict"] != "pass":
            policy = gate.on_fail if check["verdict"] == "fail" else gate.on_inconclusive
            (blocking if policy == "block" else warnings).append(describe(check))
    return {"open": not blocking, "blocking": blocking, "warnings": warnings, "checks": judged}


def summary(decision: dict) -> str:
    lines = [f"gate {'open' if decision['open'] else 'closed'}"]
    lines += [f"  blocks: {line}" for line in decision["blocking"]]
    lines += [f"  warns:  {line}" for line in decision["warnings"]]
    return "\n".join(lines)
