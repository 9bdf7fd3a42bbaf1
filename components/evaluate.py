"""evaluate: quality metrics, fairness across sensitive groups, interpretability, and the
reports a reviewer reads before a model may be promoted.

Outputs (in `reports_dir`): metrics.json (the headline DVC metrics, with each quality check's verdict),
quality.json (per-class detail, confusion matrix, a verdict per quality check, and when the error
analysis sampled the test split, how many of how many images), fairness.json (a verdict per check),
plots/confusion.json and plots/reliability.json (DVC plots), evaluation.html (self-contained)
and model_card.md. They are built in a scratch folder and moved into place only when all of
them are complete; other files in `reports_dir` are left alone.

The gate policy of conf/gate (quality and fairness verdicts from intervals) decides
whether the model may go on: when it closes, GateClosed is raised *after* the reports are
written (they are the evidence a reviewer needs), so `dvc repro` stops before package. The
pipeline's gate step decides the same way from these reports (`enforce_gate=False` here).
"""

from __future__ import annotations

from components.core.cli import run_step, step_command

if __name__ == "__main__":  # before the imports below (torch): a bad config is refused at once
    command = step_command("Evaluate the trained model: quality, fairness, interpretability, reports.",
                           prepared="artifacts/prepared", model="artifacts/model", reports="reports")

import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from components.core.config.sections import select
from components.core.events import emit
from components.data.dataset import Prepared, load_prepared
from components.core.errors import ConfigError, DataError, StepError
from components.evaluation.explanations import analyse_errors, attribution_grids
from components.evaluation.fairness import fairness_report, require_groups
from components.evaluation.gates import decide, summary as gate_summary, verdict_counts
from components.evaluation.quality import measured_checks, quality_metrics
from components.core.io import scratch_beside, write_json
from components.core.lineage import lineage
from components.core.numerics import activate
from components.core.progress import progress
from components.model.networks import load_trained, predict_logits, resolve_device
from components.evaluation.report import Evaluation, render_html, render_model_card

SECTIONS = ("seed", "data", "train.device", "numerics", "evaluate", "gate")  # the config this step reads: its DVC params and its config hash
CODE_FILES = ("components/evaluation/templates",)  # the reports' Jinja2 templates: code, though not Python
REPORT_FILES = ("metrics.json", "quality.json", "fairness.json", "plots/confusion.json", "plots/reliability.json", "evaluation.html", "model_card.md")


class GateClosed(StepError):
    """The gate policy (conf/gate) blocks this model; the reports are written."""


def audited_attributes(cfg: DictConfig, prepared: Prepared, prepared_dir: Path) -> list[str]:
    wanted = cfg.evaluate.sensitive_attributes
    attributes = list(cfg.data.sensitive_attributes if wanted is None else wanted)
    unknown = [a for a in attributes if a not in prepared.meta["sensitive_attributes"]]
    if unknown:
        raise ConfigError(f"evaluate.sensitive_attributes: {unknown} not in the data; {prepared_dir / 'prepared.json'} "
                          f"has {prepared.meta['sensitive_attributes']}")
    return attributes


def check_model_matches_data(spec: dict, meta: dict, model_dir: Path, prepared_dir: Path) -> None:
    mismatches = [f"{key}: model {spec[key]} vs data {meta[key]}" for key in ("classes", "channels", "image_size") if spec[key] != meta[key]]
    if mismatches:
        raise DataError(f"{model_dir} does not fit {prepared_dir} ({'; '.join(mismatches)}); retrain on this data")


def headline(quality: dict, fairness: dict, gate_open: bool) -> dict:
    """The numbers `dvc metrics show/diff` and `dvc exp show` lead with; the detail stays in the reports."""
    gaps = [report["difference"]["accuracy"] for report in fairness["groupings"].values()]
    return {
        **{key: quality[key] for key in ("accuracy", "balanced_accuracy", "f1_macro", "ece", "n_test")},
        "quality": {check["check"]: check["verdict"] for check in quality["checks"]},
        "fairness": {**fairness["verdicts"], "worst_accuracy_gap": max(gaps, default=0.0)},
        "gate": "open" if gate_open else "closed",
    }


def write_reports(ev: Evaluation, metrics: dict, classes: list[str], y_true: np.ndarray, y_pred: np.ndarray, out: Path) -> None:
    write_json(out / "metrics.json", metrics)
    write_json(out / "quality.json", {**ev.quality, "lineage": ev.lineage})
    write_json(out / "fairness.json", {**ev.fairness, "lineage": ev.lineage})
    write_json(out / "plots" / "confusion.json", [{"actual": classes[t], "predicted": classes[p]} for t, p in zip(y_true, y_pred)])
    write_json(out / "plots" / "reliability.json", ev.reliability)
    (out / "evaluation.html").write_text(render_html(ev), encoding="utf-8")
    (out / "model_card.md").write_text(render_model_card(ev), encoding="utf-8")


def publish(scratch: Path, reports_dir: Path) -> None:
    # reports/ may hold other steps' files, so ours are moved in one by one, not the folder swapped.
    for name in REPORT_FILES:
        (reports_dir / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(scratch / name, reports_dir / name)


def evaluate(cfg: DictConfig, prepared_dir: str | Path, model_dir: str | Path, reports_dir: str | Path,
             enforce_gate: bool = True) -> dict:
    """Evaluate the trained model on the test split and write the reports; returns metrics.json's content.
    With `enforce_gate`, a closed gate raises GateClosed after the reports are written."""
    events = cfg.events  # a side channel (components/core/events.py): it determines no output, so it is not in SECTIONS
    cfg = select(cfg, SECTIONS)
    prepared_dir, model_dir, reports_dir = Path(prepared_dir), Path(model_dir), Path(reports_dir)
    e = cfg.evaluate
    prepared = load_prepared(prepared_dir)
    model, norm, spec = load_trained(model_dir)
    check_model_matches_data(spec, prepared.meta, model_dir, prepared_dir)
    attributes = audited_attributes(cfg, prepared, prepared_dir)
    images, index = prepared.split("test")
    if len(images) == 0:
        raise DataError(f"{prepared_dir}: the test split is empty; add data or change data.split")
    require_groups(index[attributes], {a: list(prepared.meta["groups"][a]) for a in attributes}, str(prepared_dir))

    numerics = activate(cfg.numerics.profile, cfg.numerics.threads)
    device = resolve_device(cfg.train.device)
    model, norm = model.to(device), norm.to(device)
    phases = progress((), "evaluate", total=4, unit="phase", every_s=0)
    probs = torch.softmax(predict_logits(model, norm, torch.from_numpy(images), device), dim=1).numpy()
    phases.step(done=f"predictions on {len(images)} test images")
    classes, y_true, y_pred = spec["classes"], index["label_index"].to_numpy(), probs.argmax(axis=1)

    quality, reliability = quality_metrics(y_true, probs, classes, e.calibration_bins)
    checks = measured_checks(quality, y_true, probs, e, cfg.seed)
    fairness = fairness_report(y_true, y_pred, index[attributes], classes, e, cfg.gate.fairness, cfg.seed)
    decision = decide(checks, fairness["checks"], cfg.gate)
    quality |= {"checks": decision["quality"], "verdicts": verdict_counts(decision["quality"])}
    fairness["gate"] = {k: decision[k] for k in ("open", "blocking", "warnings")}
    phases.step(done=f"quality and fairness ({e.bootstrap_samples} bootstrap samples)")
    errors = analyse_errors(images, index, attributes, probs, e, cfg.seed, cfg.numerics.profile)
    if errors["n_images"] < errors["n_test"]:  # said only when sampled: a test set within the budget is analysed whole
        quality["sampled"] = {"error_analysis": {"images": errors["n_images"], "of": errors["n_test"],
                                                 "budget": "evaluate.error_analysis_max_images", "stratified_by": "true class, error"}}
    phases.step(done=f"error analysis ({errors['n_images']} of {errors['n_test']} test images)")
    grids = attribution_grids(model, norm, images, index, probs, attributes, classes, e, device, cfg.seed)
    phases.step(done="attributions")
    phases.close()
    ev = Evaluation(model=spec, data=prepared.meta, config=OmegaConf.to_container(cfg, resolve=True), quality=quality,
                    reliability=reliability, fairness=fairness, error_analysis=errors, attributions=grids,
                    lineage=lineage(cfg, __spec__.name, device.type, CODE_FILES, numerics))
    metrics = headline(quality, fairness, decision["open"])

    with scratch_beside(reports_dir) as scratch:
        write_reports(ev, metrics, classes, y_true, y_pred, scratch)
        publish(scratch, reports_dir)
    emit(events, "experiment_finished", summary(metrics, reports_dir), details={"metrics": metrics, "lineage": ev.lineage,
         "dvc_experiment": os.environ.get("DVC_EXP_NAME")})
    if not decision["open"]:
        emit(events, "gate_closed", gate_summary(decision), details={"metrics": metrics})
        if enforce_gate:
            raise GateClosed(f"{gate_summary(decision)}\nThe reports in {reports_dir} show the evidence; the policy is conf/gate.")
    return metrics


def summary(metrics: dict, reports_dir) -> str:
    fairness, verdict = metrics["fairness"], metrics["quality"]
    return (f"evaluate: accuracy {metrics['accuracy']:.4f} ({verdict['accuracy']}), balanced accuracy "
            f"{metrics['balanced_accuracy']:.4f} ({verdict['balanced_accuracy']}), ECE {metrics['ece']:.4f} ({verdict['ece']}), "
            f"fairness checks {fairness['pass']} pass / {fairness['fail']} fail / "
            f"{fairness['inconclusive']} inconclusive, gate {metrics['gate']} -> {reports_dir}")


if __name__ == "__main__":
    run_step(command, evaluate, lambda metrics, args: summary(metrics, args.reports))
