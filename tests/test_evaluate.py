"""evaluate: reports end to end on the real sample, self-contained HTML, the fairness gate,
calibration, interpretability, and bad input that writes nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from components.core.config.compose import compose
from components.core.errors import ConfigError, DataError
from components.core.paths import ROOT
from components.evaluate import REPORT_FILES, GateClosed, evaluate
from components.evaluation.explanations import attribute, attribution_grid, error_analysis, stratified_sample
from components.evaluation.quality import calibration
from components.model.networks import load_trained, predict_logits
from components.prepare import prepare
from components.train import train
from tests.helpers.datasets import make_image_dataset, small_overrides

DIGITS = tuple("0123456789")
FAST = ("evaluate.attribution_samples=4", "evaluate.bootstrap_samples=200")


@pytest.fixture(scope="module")
def reports(digits_run, tmp_path_factory) -> Path:
    """The sample model (3 epochs) evaluated once with the default evaluate config (gate reported, not enforced)."""
    out = tmp_path_factory.mktemp("evaluate") / "reports"
    evaluate(digits_run["cfg"], digits_run["prepared"], digits_run["model"], out, enforce_gate=False)
    return out


@pytest.mark.integration
def test_reports_exist_and_carry_lineage(reports):
    assert sorted(str(p.relative_to(reports)) for p in reports.rglob("*") if p.is_file()) == sorted(REPORT_FILES)
    quality = json.loads((reports / "quality.json").read_text())
    fairness = json.loads((reports / "fairness.json").read_text())
    html = (reports / "evaluation.html").read_text()
    card = (reports / "model_card.md").read_text()
    for key in ("data_hash", "config_hash", "code_hash"):
        value = str(quality["lineage"][key])
        assert fairness["lineage"][key] == quality["lineage"][key]
        assert value in html and value in card
    assert "git_commit" not in html + card
    assert quality["lineage"]["data_hash"] == (ROOT / "data.dvc").read_text().split("md5: ")[1].split()[0]


@pytest.mark.integration
def test_quality_metrics_agree_with_the_confusion_matrix_and_plots(reports):
    metrics = json.loads((reports / "quality.json").read_text())
    headline = json.loads((reports / "metrics.json").read_text())
    assert {k: headline[k] for k in ("accuracy", "balanced_accuracy", "f1_macro", "ece")} == {
        k: metrics[k] for k in ("accuracy", "balanced_accuracy", "f1_macro", "ece")}
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.sum() == metrics["n_test"] == 271
    assert metrics["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    recall = np.diag(matrix) / matrix.sum(axis=1)
    assert metrics["balanced_accuracy"] == pytest.approx(recall.mean())
    assert [metrics["per_class"][c]["recall"] for c in DIGITS] == pytest.approx(recall)
    assert metrics["recall_macro"] == pytest.approx(recall.mean())
    pairs = json.loads((reports / "plots" / "confusion.json").read_text())
    assert len(pairs) == 271 and sum(p["actual"] == p["predicted"] for p in pairs) == np.trace(matrix)
    bins = json.loads((reports / "plots" / "reliability.json").read_text())
    assert sum(b["count"] for b in bins) == 271
    assert metrics["ece"] == pytest.approx(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / 271)


@pytest.mark.integration
def test_the_low_contrast_site_gap_is_measured_and_shown(reports, digits_run):
    fairness = json.loads((reports / "fairness.json").read_text())
    site = fairness["groupings"]["site"]
    # Recompute the per-site accuracy straight from the model, independently of the step.
    model, norm, _ = load_trained(digits_run["model"])
    index = pd.read_csv(digits_run["prepared"] / "index.csv", dtype=str)
    test = (index["split"] == "test").to_numpy()
    images = torch.from_numpy(np.load(digits_run["prepared"] / "images.npy")[test])
    predicted = predict_logits(model, norm, images, torch.device("cpu")).argmax(1).numpy()
    correct = predicted == index["label_index"][test].astype(int).to_numpy()
    for group in ("site_a", "site_b"):
        in_group = (index["site"][test] == group).to_numpy()
        assert site["groups"][group]["count"] == in_group.sum()
        assert site["groups"][group]["accuracy"] == pytest.approx(correct[in_group].mean())
    assert site["accuracy_gap"]["worst_group"] == "site_b"
    assert site["groups"]["site_b"]["accuracy"] < site["groups"]["site_a"]["accuracy"]
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["fairness"]["worst_accuracy_gap"] == pytest.approx(site["difference"]["accuracy"])
    html, card = (reports / "evaluation.html").read_text(), (reports / "model_card.md").read_text()
    sentence = f"site_b is {site['accuracy_gap']['gap']:.3f} less accurate than site_a"
    assert sentence in html and sentence in card
    for c in fairness["checks"]:  # every check with its interval, in the card and the HTML
        assert f"| site | {c['check']} | {c['value']:.4f} | {c['low']:.4f} to {c['high']:.4f} | {c['min_count']} |" in card
        assert f"{c['low']:.4f} to {c['high']:.4f}" in html


@pytest.mark.integration
def test_site_b_per_class_counts_are_too_small_to_judge_equalized_odds(reports):
    """About 8 site_b test images per class: equalized odds is inconclusive, never a fail on a point estimate."""
    fairness = json.loads((reports / "fairness.json").read_text())
    eod = next(c for c in fairness["checks"] if c["check"] == "equalized_odds_difference")
    assert eod["min_count"] < 30 and eod["min_count_of"].startswith("group site_b, true class")
    assert eod["verdict"] == "inconclusive" and eod["why"].startswith(f"rests on {eod['min_count']} test images")


@pytest.mark.integration
def test_html_is_self_contained(reports):
    html = (reports / "evaluation.html").read_text()
    sources = re.findall(r'src="([^"]*)"', html)
    assert len(sources) >= 6 and all(re.fullmatch(r"data:image/png;base64,[A-Za-z0-9+/]+=*", s) for s in sources)
    text = re.sub(r'src="[^"]*"', "", html)
    assert not re.search(r"(?i)https?:|//[a-z0-9]|<script|<link|@import|url\(", text)
    assert "Most confident mistakes" in html and "EBM term" in html


@pytest.mark.integration
def test_a_closed_gate_raises_after_writing_the_reports(digits_run, tmp_path):
    strict = (*FAST, "gate.on_inconclusive=block")  # equalized odds on site_b is inconclusive (too few images)
    out = tmp_path / "reports"
    with pytest.raises(GateClosed, match=r"(?s)gate closed\n.*blocks: site: equalized_odds_difference .*: inconclusive, rests on"):
        evaluate(compose(["train.epochs=3", *strict]), digits_run["prepared"], digits_run["model"], out)
    fairness = json.loads((out / "fairness.json").read_text())
    assert fairness["gate"]["open"] is False and fairness["verdicts"]["inconclusive"] >= 1
    assert (out / "evaluation.html").exists() and (out / "model_card.md").exists()
    assert "gate CLOSED" in (out / "model_card.md").read_text()
    # Not enforced (the pipeline's gate step decides), the same decision is reported, not raised.
    metrics = evaluate(compose(["train.epochs=3", *strict]), digits_run["prepared"], digits_run["model"], tmp_path / "r2",
                       enforce_gate=False)
    assert metrics["gate"] == "closed"


@pytest.mark.integration
def test_reports_leave_other_files_alone(digits_run, tmp_path):
    out = tmp_path / "reports"
    out.mkdir()
    (out / "package.json").write_text("{}")
    evaluate(compose(["train.epochs=3", *FAST, "evaluate.attribution_method=occlusion"]), digits_run["prepared"], digits_run["model"], out,
             enforce_gate=False)
    assert (out / "package.json").read_text() == "{}"
    assert "occlusion" in (out / "evaluation.html").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "scratch folder left behind"


def with_label_noise(data: Path, every: int) -> Path:
    """Every `every`-th image of make_image_dataset's metadata labelled as the next class: errors no model can avoid."""
    header, *rows = (data / "metadata.csv").read_text().splitlines()
    classes = sorted({row.split(",")[1] for row in rows})
    for i in range(every - 1, len(rows), every):
        file, label, group = rows[i].split(",")
        rows[i] = f"{file},{classes[(classes.index(label) + 1) % len(classes)]},{group}"
    (data / "metadata.csv").write_text("\n".join([header, *rows]) + "\n")
    return data


@pytest.fixture(scope="module")
def small_test_set(tmp_path_factory) -> dict:
    """A generated dataset of 180 images, one in nine mislabelled, with 54 test images (3 classes x 2 sites x 9),
    prepared; a model trained on it for 2 epochs, and one that barely learns (1 epoch at a learning rate of 1e-6)."""
    root = tmp_path_factory.mktemp("small_test_set")
    data = with_label_noise(make_image_dataset(root / "raw", per_class=60), every=9)
    cfg = compose(cfg_overrides(data))
    prepare(cfg, data, root / "prepared")
    train(cfg, root / "prepared", root / "model", root / "live", root / "ckpt")
    untrained = compose([*cfg_overrides(data), "train.epochs=1", "train.lr=0.000001"])
    train(untrained, root / "prepared", root / "untrained", root / "live_untrained", root / "ckpt_untrained")
    return {"cfg": cfg, "prepared": root / "prepared", "model": root / "model", "untrained": root / "untrained"}


def cfg_overrides(data: Path) -> list[str]:
    return small_overrides(data, "data.split.test=0.3", *FAST)


def quality_checks(reports: Path) -> dict[str, dict]:
    return {c["check"]: c for c in json.loads((reports / "quality.json").read_text())["checks"]}


@pytest.mark.integration
def test_a_quality_miss_inside_the_noise_is_inconclusive_and_warns(small_test_set, tmp_path):
    """Accuracy 0.87 on 54 test images against the default 0.9: the old point-estimate gate closed; the interval straddles it."""
    s, reports = small_test_set, tmp_path / "reports"
    metrics = evaluate(s["cfg"], s["prepared"], s["model"], reports)  # enforced: a closed gate would raise
    accuracy = quality_checks(reports)["accuracy"]
    assert accuracy["min_count"] == 54 and accuracy["value"] < 0.9 < accuracy["high"]
    assert (accuracy["verdict"], accuracy["why"]) == ("inconclusive", "the interval straddles the tolerance")
    assert metrics["quality"]["accuracy"] == "inconclusive" and metrics["gate"] == "open"
    warnings = json.loads((reports / "fairness.json").read_text())["gate"]["warnings"]
    assert (f"quality: accuracy {accuracy['value']:.4f} (interval {accuracy['low']:.4f} to {accuracy['high']:.4f}; must be >= 0.9, "
            "gate.quality.min_accuracy): inconclusive, the interval straddles the tolerance") in warnings
    card = (reports / "model_card.md").read_text()
    assert f"| accuracy | {accuracy['value']:.4f} | {accuracy['low']:.4f} to {accuracy['high']:.4f} | 54 | >= 0.9 | INCONCLUSIVE |" in card
    assert f"{accuracy['low']:.4f} to {accuracy['high']:.4f}" in (reports / "evaluation.html").read_text()


@pytest.mark.integration
def test_a_clear_quality_miss_fails_and_blocks(small_test_set, tmp_path):
    s, reports = small_test_set, tmp_path / "reports"
    with pytest.raises(GateClosed, match=r"(?s)gate closed\n.*blocks: quality: accuracy 0\.\d{4} \(interval .*; must be >= 0\.9, "
                                         r"gate\.quality\.min_accuracy\): fail, the whole interval is beyond the tolerance"):
        evaluate(s["cfg"], s["prepared"], s["untrained"], reports)
    accuracy = quality_checks(reports)["accuracy"]
    assert accuracy["verdict"] == "fail" and accuracy["high"] < 0.9
    metrics = json.loads((reports / "metrics.json").read_text())
    assert (metrics["quality"]["accuracy"], metrics["gate"]) == ("fail", "closed")
    card = (reports / "model_card.md").read_text()
    assert f"| accuracy | {accuracy['value']:.4f} | {accuracy['low']:.4f} to {accuracy['high']:.4f} | 54 | >= 0.9 | FAIL |" in card


def _prepared(tmp_path: Path, classes=DIGITS, channels: int = 1, rare_group: bool = False):
    data = make_image_dataset(tmp_path / "raw", classes=classes, per_class=8, channels=channels, size=(32, 32))
    if rare_group:  # one image only: its stratum is too small to reach the test split
        meta = (data / "metadata.csv").read_text().splitlines()
        meta[1] = meta[1].rsplit(",", 1)[0] + ",g_rare"
        (data / "metadata.csv").write_text("\n".join(meta) + "\n")
    cfg = compose([f"data.root={data}", f"data.classes=[{','.join(classes)}]", f"data.channels={channels}", *FAST])
    prepare(cfg, data, tmp_path / "prepared")
    return cfg, tmp_path / "prepared"


def _assert_writes_nothing(error, match, cfg, prepared, model, tmp_path):
    out = tmp_path / "reports"
    out.mkdir()
    (out / "metrics.json").write_text("old")
    with pytest.raises(error, match=match):
        evaluate(cfg, prepared, model, out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert [p.name for p in out.iterdir()] == ["metrics.json"] and (out / "metrics.json").read_text() == "old"


@pytest.mark.integration
def test_unknown_sensitive_attribute_writes_nothing(digits_run, tmp_path):
    cfg = compose(["train.epochs=3", "evaluate.sensitive_attributes=[site,age]"])
    _assert_writes_nothing(ConfigError, r"evaluate.sensitive_attributes: \['age'\] not in the data", cfg,
                           digits_run["prepared"], digits_run["model"], tmp_path)


@pytest.mark.integration
def test_empty_group_writes_nothing(digits_run, tmp_path):
    cfg, prepared = _prepared(tmp_path, rare_group=True)
    _assert_writes_nothing(DataError, r"\['site=g_rare'\] have no images in the test split", cfg, prepared, digits_run["model"], tmp_path)


@pytest.mark.integration
@pytest.mark.parametrize("classes,channels,mismatch", [(("a", "b", "c"), 1, "classes: model"), (DIGITS, 3, "channels: model 1 vs data 3")])
def test_model_data_mismatch_writes_nothing(digits_run, tmp_path, classes, channels, mismatch):
    cfg, prepared = _prepared(tmp_path, classes=classes, channels=channels)
    _assert_writes_nothing(DataError, mismatch, cfg, prepared, digits_run["model"], tmp_path)


@pytest.mark.integration
def test_cli_reports_bad_input_in_one_line(digits_run, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "components.evaluate", "--prepared", str(digits_run["prepared"]), "--model", str(digits_run["model"]),
         "--reports", str(tmp_path / "reports"), "evaluate.sensitive_attributes=[age]"],
        cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: evaluate.sensitive_attributes: ['age'] not in the data; {digits_run['prepared'] / 'prepared.json'} has ['site']"]
    assert not (tmp_path / "reports").exists()


def test_expected_calibration_error_by_hand():
    confidence = np.array([0.95, 0.95, 0.55, 0.55, 0.05])
    correct = np.array([True, False, True, True, False])
    ece, bins = calibration(confidence, correct, n_bins=10)
    # bins 0.0-0.1: |0 - 0.05|, 0.5-0.6: |1 - 0.55|, 0.9-1.0: |0.5 - 0.95|, weighted by 1/5, 2/5, 2/5
    assert ece == pytest.approx(0.2 * 0.05 + 0.4 * 0.45 + 0.4 * 0.45)
    assert [(b["bin"], b["count"]) for b in bins] == [("0.00-0.10", 1), ("0.50-0.60", 2), ("0.90-1.00", 2)]


def test_error_analysis_finds_the_feature_that_drives_errors():
    rng = np.random.default_rng(0)
    n = 400
    features = pd.DataFrame({"brightness": rng.random(n), "contrast": rng.random(n), "site": rng.choice(["a", "b"], n)})
    errors = features["contrast"].to_numpy() < 0.2 * rng.random(n) + 0.1  # errors happen at low contrast only
    result = error_analysis(features, errors, compose(["evaluate.error_analysis_term_plots=2"]).evaluate, seed=0)
    assert result["ranking"][0]["term"] == "contrast"
    assert result["findings"][0].startswith("contrast: with the other features accounted for, lower values make errors more likely")
    assert len(result["term_plots"]) == 2 and all(p.startswith(b"\x89PNG") for p in result["term_plots"])
    too_few = error_analysis(features, np.arange(n) == 0, compose([]).evaluate, seed=0)
    assert too_few["ranking"] == [] and "too few" in too_few["findings"][0]


def test_a_stratified_sample_takes_exactly_the_budget_in_proportion_and_the_same_rows_each_time():
    strata = np.repeat([0, 1, 2, 3], [700, 200, 90, 10])
    rows = stratified_sample(strata, 100, seed=7)
    assert len(rows) == len(np.unique(rows)) == 100 and list(rows) == sorted(rows)
    assert [int((strata[rows] == k).sum()) for k in range(4)] == [70, 20, 9, 1]  # each stratum in proportion
    assert np.array_equal(rows, stratified_sample(strata, 100, seed=7))
    assert not np.array_equal(rows, stratified_sample(strata, 100, seed=8))
    assert np.array_equal(stratified_sample(strata, 1000, seed=7), np.arange(1000))  # within the budget: every row


def sampling_said(reports: Path) -> tuple[dict | None, str, str]:
    """What quality.json, evaluation.html and model_card.md say about sampling the error analysis."""
    sampled = json.loads((reports / "quality.json").read_text()).get("sampled")
    html, card = (reports / "evaluation.html").read_text(), (reports / "model_card.md").read_text()
    return sampled, re.sub(r"\s+", " ", html), card


@pytest.mark.integration
def test_error_analysis_within_its_budget_analyses_the_whole_test_set_and_says_nothing_of_sampling(reports):
    sampled, html, card = sampling_said(reports)  # the default budget (1000) is above the sample's 271 test images
    assert sampled is None and "sampled" not in html + card
    assert re.search(r"<p>\d+ errors in 271 test images\. Categorical", html)


@pytest.mark.integration
def test_error_analysis_above_its_budget_analyses_a_seeded_sample_of_exactly_the_budget(digits_run, tmp_path):
    cfg = compose(["train.epochs=3", *FAST, "evaluate.error_analysis_max_images=100"])
    for run in ("first", "second"):
        evaluate(cfg, digits_run["prepared"], digits_run["model"], tmp_path / run, enforce_gate=False)
    sampled, html, card = sampling_said(tmp_path / "first")
    assert sampled == {"error_analysis": {"images": 100, "of": 271, "budget": "evaluate.error_analysis_max_images",
                                          "stratified_by": "true class, error"}}
    assert re.search(r"<p>\d+ errors in 100 test images \(sampled 100 of 271 test images", html)
    assert "Error analysis (sampled 100 of 271 test images) ranks what drives errors: " in card
    for name in REPORT_FILES:  # the same sample, so the same reports
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes(), name


@pytest.mark.integration
def test_integrated_gradients_are_complete_and_occlusion_runs(digits_run):
    """Integrated gradients add up to f(image) - f(black image) for the explained class."""
    model, norm, _ = load_trained(digits_run["model"])
    images = np.load(digits_run["prepared"] / "images.npy")[:3]
    targets = np.array([0, 1, 2])
    e = compose(["evaluate.attribution_steps=64"]).evaluate
    attributions = attribute(model, norm, images, targets, e, torch.device("cpu"))
    assert attributions.shape == (3, 32, 32)
    with torch.no_grad():
        logits = model(norm(torch.from_numpy(images))) - model(norm(torch.zeros(3, 1, 32, 32)))
    assert attributions.sum(axis=(1, 2)) == pytest.approx(logits[range(3), targets].numpy(), rel=0.05, abs=0.05)
    occlusion = attribute(model, norm, images, targets, compose(["evaluate.attribution_method=occlusion"]).evaluate, torch.device("cpu"))
    assert occlusion.shape == (3, 32, 32) and np.abs(occlusion).sum() > 0
    png = attribution_grid(images, occlusion, ["a", "b", "c"], np.array([True, False, False]))
    assert png.startswith(b"\x89PNG")
