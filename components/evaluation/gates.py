"""The one gate policy (conf/gate): a verdict per quality check and per fairness check, each from its
bootstrap interval. Evaluate, the pipeline's gate step and the registry all decide with `decide`,
from the checks evaluate wrote, so a threshold changes in one place.

A check is
- fail: its whole interval lies beyond the threshold (or tolerance);
- inconclusive: it rests on fewer test images than its section's minimum (`quality.min_test_size`
  for the test split; `fairness.min_group_size` for a group, or a group's class), or its interval
  straddles the threshold: the data cannot tell;
- pass: its whole interval lies within the threshold.
"""

from __future__ import annotations

from omegaconf import DictConfig

from components.core.config.schema import FairnessGate, QualityGate, threshold_rules

# check name -> (its gate key, rule), from the schema's thresholds: "<=" a value must stay at or below it.
FAIRNESS_RULES = threshold_rules(FairnessGate)
QUALITY_RULES = threshold_rules(QualityGate)
# gate section -> its rules and the key of the fewest test images a check of it may rest on.
SECTIONS = {"quality": (QUALITY_RULES, "min_test_size"), "fairness": (FAIRNESS_RULES, "min_group_size")}


def _within(value: float, rule: str, tolerance: float) -> bool:
    value = round(value, 9)  # a value equal to its tolerance up to float noise (0.79999999 vs 0.8) is within it
    return value <= tolerance if rule == "<=" else value >= tolerance


def judge(check: dict, section: str, thresholds: DictConfig) -> dict:
    """`check` (check, value, low, high, min_count, min_count_of; a fairness check also its grouping) of gate
    section `section` ("quality" or "fairness", whose config is `thresholds`) with its threshold, rule and verdict."""
    rules, minimum = SECTIONS[section]
    key, rule = rules[check["check"]]
    tolerance = thresholds[key]
    low_side, high_side = _within(check["low"], rule, tolerance), _within(check["high"], rule, tolerance)
    if check["min_count"] < thresholds[minimum]:
        verdict, why = "inconclusive", (f"rests on {check['min_count']} test images ({check['min_count_of']}), "
                                        f"fewer than gate.{section}.{minimum}={thresholds[minimum]}")
    elif low_side and high_side:
        verdict, why = "pass", "the whole interval is within the tolerance"
    elif not low_side and not high_side:
        verdict, why = "fail", "the whole interval is beyond the tolerance"
    else:
        verdict, why = "inconclusive", "the interval straddles the tolerance"
    return {**check, "section": section, "rule": rule, "threshold": tolerance, "key": f"gate.{section}.{key}",
            "verdict": verdict, "why": why}


def describe(check: dict) -> str:
    """One line on a judged check, led by what it is about: its grouping (fairness) or its section (quality)."""
    return (f"{check.get('grouping', check['section'])}: {check['check']} {check['value']:.4f} (interval {check['low']:.4f} to "
            f"{check['high']:.4f}; must be {check['rule']} {check['threshold']}, {check['key']}): {check['verdict']}, {check['why']}")


def decide(quality: list[dict], fairness: list[dict], gate: DictConfig) -> dict:
    """The gate's decision on measured quality and fairness checks: open or not, why, and each check judged."""
    judged = {"quality": [judge(check, "quality", gate.quality) for check in quality],
              "fairness": [judge(check, "fairness", gate.fairness) for check in fairness]}
    blocking, warnings = [], []
    for check in judged["quality"] + judged["fairness"]:
        if check["verdict"] != "pass":
            policy = gate.on_fail if check["verdict"] == "fail" else gate.on_inconclusive
            (blocking if policy == "block" else warnings).append(describe(check))
    return {"open": not blocking, "blocking": blocking, "warnings": warnings, **judged}


def verdict_counts(checks: list[dict]) -> dict[str, int]:
    return {v: sum(c["verdict"] == v for c in checks) for v in ("pass", "fail", "inconclusive")}


def summary(decision: dict) -> str:
    lines = [f"gate {'open' if decision['open'] else 'closed'}"]
    lines += [f"  blocks: {line}" for line in decision["blocking"]]
    lines += [f"  warns:  {line}" for line in decision["warnings"]]
    return "\n".join(lines)
