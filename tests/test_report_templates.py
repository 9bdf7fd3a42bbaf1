"""The evaluation report and model card come from Jinja2 templates a team can restyle without
touching Python; the error analysis models categorical features (true label, sensitive
attributes) as categories."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pandas as pd
import pytest

from components.core.config.compose import compose
from components.evaluate import evaluate
from components.evaluation import report
from components.evaluation.explanations import error_analysis
from components.prepare import prepare
from components.train import train
from tests.helpers.datasets import small_config


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    from tests.helpers.datasets import make_image_dataset

    root = tmp_path_factory.mktemp("templates")
    data = make_image_dataset(root / "raw")
    cfg = small_config(data, f"events.log_file={root / 'events.jsonl'}", "evaluate.bootstrap_samples=50",
                       "evaluate.attribution_samples=2")
    prepare(cfg, data, root / "prepared")
    train(cfg, root / "prepared", root / "model", root / "live", root / "ckpt")
    evaluate(cfg, root / "prepared", root / "model", root / "reports", enforce_gate=False)  # tiny data: the gate may close
    return cfg, root


def test_a_restyled_template_changes_the_reports_without_python(evaluated, tmp_path, monkeypatch):
    cfg, root = evaluated
    styled = tmp_path / "templates"
    shutil.copytree(report.TEMPLATES, styled)
    html = styled / "evaluation.html.j2"
    html.write_text(html.read_text().replace("<h1>", "<h1 class='acme'>ACME model review: "))
    card = styled / "model_card.md.j2"
    card.write_text(card.read_text().replace("## Intended use", "## What it is for (ACME policy 7)"))
    monkeypatch.setattr(report, "TEMPLATES", styled)
    evaluate(cfg, root / "prepared", root / "model", tmp_path / "reports", enforce_gate=False)
    assert "<h1 class='acme'>ACME model review: Evaluation report: cnn</h1>" in (tmp_path / "reports/evaluation.html").read_text()
    restyled = (tmp_path / "reports/model_card.md").read_text()
    assert "## What it is for (ACME policy 7)" in restyled and "## Intended use" not in restyled
    original = (root / "reports/model_card.md").read_text()
    assert restyled.replace("## What it is for (ACME policy 7)", "## Intended use") == original


def test_the_shipped_templates_render_every_section(evaluated):
    _, root = evaluated
    html, card = (root / "reports/evaluation.html").read_text(), (root / "reports/model_card.md").read_text()
    for heading in ("<h2>Checks: gate ", "Quality (test split)", "<h2>Fairness</h2>", "Interpretability", "Attributions"):
        assert heading in html
    for heading in ("# Model card: cnn", "## Model details", "## Data", "## Metrics (test split", "## Checks: gate ", "## Fairness\n",
                    "## Interpretability findings", "## Limitations", "## Lineage"):
        assert heading in card
    assert "| accuracy |" in card and "<script" not in html
    for check in ("accuracy", "balanced_accuracy", "ece"):  # each quality check's row: value, interval, test images, threshold, verdict
        assert re.search(rf"\| {check} \| [\d.]+ \| [\d.]+ to [\d.]+ \| \d+ \| [<>]= [\d.]+ \| (pass|FAIL|INCONCLUSIVE) \|", card), check


def test_true_label_is_a_category_in_the_error_analysis():
    rng = np.random.default_rng(0)
    labels = np.array([str(i % 10) for i in range(400)])
    features = pd.DataFrame({"brightness": rng.random(400), "site": np.where(np.arange(400) % 2, "a", "b"), "true_label": labels})
    errors = (labels == "7") & (rng.random(400) < 0.8) | (rng.random(400) < 0.05)
    analysis = error_analysis(features, errors, compose(["evaluate.error_analysis_interactions=0"]).evaluate, seed=0)
    assert analysis["ranking"][0]["term"] == "true_label"
    assert "true_label = 7 makes errors most likely" in " ".join(analysis["findings"])
