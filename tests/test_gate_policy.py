"""The gate policy is declared once, in its schema: the rules evaluate and the registry judge with,
the KFP run parameters, the gate step's rebuild of the policy and the docs table all derive from it,
so a new threshold is one line in conf/gate and one schema field."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, is_dataclass
from enum import StrEnum
from typing import get_type_hints

from omegaconf import OmegaConf

from components.core.config.compose import compose
from components.core.config.schema import GateConfig, at_least, gate_parameters, threshold, threshold_rules
from components.core.paths import ROOT
from components.evaluation.gates import FAIRNESS_RULES, QUALITY_RULES
from pipelines.graph import run_parameters
from pipelines.in_pod import IMAGE_COMMIT_ENV, gate_config
from pipelines.wrappers import gate_op

DATA = {"data_repo": "", "data_rev": "", "data_uri": "s3://bucket/data"}


def test_a_threshold_field_is_a_rule_named_by_its_measure():
    @dataclass
    class Section:
        min_recall: float = threshold(0, 1)
        max_latency_ms: float = threshold(0, 1000)
        min_group_size: int = at_least(1)  # a setting, not a threshold

    assert threshold_rules(Section) == {"recall": ("min_recall", ">="), "latency_ms": ("max_latency_ms", "<=")}


def test_the_rules_evaluate_judges_with_are_the_schemas_thresholds():
    assert QUALITY_RULES == {"accuracy": ("min_accuracy", ">="), "balanced_accuracy": ("min_balanced_accuracy", ">="),
                             "ece": ("max_ece", "<=")}
    assert list(FAIRNESS_RULES) == ["accuracy_difference", "accuracy_ratio", "recall_macro_difference",
                                    "demographic_parity_difference", "equalized_odds_difference"]
    assert FAIRNESS_RULES["accuracy_ratio"] == ("min_accuracy_ratio", ">=")


def test_every_gate_key_is_a_typed_run_parameter_with_its_conf_default():
    cfg = compose([])
    parameters = run_parameters(cfg, DATA).parameters
    assert {key for key, _ in gate_parameters().values()} == {f"gate.{key}" for key in _flat_keys(OmegaConf.to_container(cfg.gate))}
    for name, (key, kind) in gate_parameters().items():
        assert parameters[name].annotation is kind and parameters[name].default == OmegaConf.select(cfg, key), name
        assert type(parameters[name].default) is kind  # a plain str for a choice: KFP types its parameters by it


def _flat_keys(tree: dict, prefix: str = "") -> list[str]:
    return [k for key, value in tree.items() for k in (_flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key])]


def _sections(schema: type) -> list[type]:
    return [f.default_factory for f in fields(schema) if is_dataclass(f.default_factory)]


def test_the_gate_step_takes_every_gate_parameter_and_rebuilds_the_policy_from_them(monkeypatch):
    """gate_op's signature is written out (KFP runs the component from its source): this keeps it the schema's."""
    assert set(gate_op.component_spec.inputs) - {"expected_commit", "reports"} == set(gate_parameters())
    monkeypatch.setenv(IMAGE_COMMIT_ENV, "abc")
    run = compose(["gate.fairness.min_group_size=7", "gate.on_fail=warn"])
    assert gate_config("abc", {name: OmegaConf.select(run, key) for name, (key, _) in gate_parameters().items()}) == run.gate


def gate_table() -> str:
    """docs/evaluation.md's table of the gate policy, from the schema and conf/gate."""
    gate = compose([])
    rules = {key: f"`{measure}` {rule} it"
             for section in _sections(GateConfig) for measure, (key, rule) in threshold_rules(section).items()}
    rows = ["| key | run parameter | default | rule |", "|---|---|---|---|"]
    for name, (key, _) in gate_parameters().items():
        default = OmegaConf.select(gate, key)
        rows.append(f"| `{key}` | `{name}` | {f'`{default}`' if isinstance(default, StrEnum) else default} | "
                    f"{rules.get(name) or _valid_values(key)} |")
    return "\n".join(rows) + "\n"


def _valid_values(key: str) -> str:
    """What a gate key that is not a threshold accepts: its choices, or its range."""
    *sections, name = key.split(".")[1:]
    schema = GateConfig
    for part in sections:
        schema = get_type_hints(schema)[part]
    kind = get_type_hints(schema)[name]
    if issubclass(kind, StrEnum):
        return " or ".join(f"`{choice.value}`" for choice in kind)
    return f"at least {next(f for f in fields(schema) if f.name == name).metadata['range'][0]}"


def test_the_docs_table_of_the_gate_policy_is_the_schemas():
    page = (ROOT / "docs" / "evaluation.md").read_text()
    table = re.search(r"<!-- generated from the gate schema by tests/test_gate_policy.py::gate_table -->\n(.*?\n)\n", page, re.S)
    assert table and table.group(1) == gate_table(), f"docs/evaluation.md's gate table should read:\n{gate_table()}"
