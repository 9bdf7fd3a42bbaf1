"""Rendering of an evaluation: matplotlib figures as PNG, a self-contained evaluation.html
(figures embedded as base64, no external links, so it opens offline) and model_card.md, both
from the Jinja2 templates in templates/: restyle them there, without touching this code."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
from matplotlib.figure import Figure

SMALL_GROUP = 30  # test images below which a group's numbers are called out as unreliable


def new_figure(width: float, height: float, **subplots):
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.subplots(**subplots)


def figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})  # no version/URL stamp: byte-stable output
    return buffer.getvalue()


@dataclass
class Evaluation:
    """Everything the reports show, gathered by the evaluate step."""

    model: dict              # model.json of the evaluated model
    data: dict               # prepared.json of the evaluated data
    config: dict             # resolved config of this run
    quality: dict
    reliability: list[dict]  # calibration bins
    fairness: dict
    error_analysis: dict
    attributions: dict[str, bytes]
    lineage: dict


def confusion_figure(matrix: list[list[int]], classes: list[str]) -> bytes:
    fig, ax = new_figure(0.45 * len(classes) + 2.5, 0.45 * len(classes) + 2)
    counts = np.asarray(matrix)
    ax.imshow(counts, cmap="Blues")
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, n, ha="center", va="center", fontsize=8, color="white" if n > counts.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title("Confusion matrix (test split)")
    return figure_png(fig)


def reliability_figure(bins: list[dict], ece: float) -> bytes:
    fig, ax = new_figure(4.5, 4)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", label="model")
    ax.set_xlabel("mean confidence in bin")
    ax.set_ylabel("accuracy in bin")
    ax.set_title(f"Reliability diagram (ECE {ece:.3f})")
    ax.legend()
    return figure_png(fig)


def fairness_figure(grouping: str, report: dict) -> bytes:
    """Accuracy (with its bootstrap interval), macro recall and macro precision per group."""
    groups = list(report["groups"])
    fig, ax = new_figure(1.2 * len(groups) + 3, 3.2)
    x = np.arange(len(groups))
    for k, metric in enumerate(("accuracy", "recall_macro", "precision_macro")):
        values = np.array([report["groups"][g][metric] for g in groups])
        errors = None
        if metric == "accuracy":
            bounds = report["accuracy_gap"]["group_accuracy"]
            errors = [values - [bounds[g]["low"] for g in groups], [bounds[g]["high"] for g in groups] - values]
        ax.bar(x + (k - 1) * 0.27, values, 0.27, yerr=errors, capsize=3, label=metric)
    ax.set_xticks(x, groups)
    ax.set_ylim(max(0.0, min(g["accuracy"] for g in report["groups"].values()) - 0.2), 1.0)
    ax.set_title(f"Per-group metrics: {grouping}")
    ax.legend(fontsize=8, loc="lower right")
    return figure_png(fig)


def gap_sentence(gap: dict) -> str:
    noise = "larger than sampling noise" if gap["significant"] else "could be sampling noise"
    return (f"{gap['worst_group']} is {gap['gap']:.3f} less accurate than {gap['best_group']} "
            f"({gap['confidence']:.0%} bootstrap interval {gap['low']:.3f} to {gap['high']:.3f}, "
            f"{gap['samples']} draws: {noise}).")


def fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------- templates

SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro", "ece", "n_test")
TEMPLATES = Path(__file__).parent / "templates"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=jinja2.select_autoescape(["html.j2"]),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(fmt=fmt, b64=lambda png: base64.b64encode(png).decode(),
                       metric_row=lambda key, values: [key, values[key]], prefix=lambda text, head: head + text,
                       gap_row=lambda metric, report: [metric, report["difference"][metric], report["ratio"][metric]])
    env.globals.update(gap_sentence=gap_sentence, gate_line=_gate_line, CHECK_HEADERS=CHECK_HEADERS, QUALITY_HEADERS=QUALITY_HEADERS)
    return env


def _gate_line(ev: Evaluation) -> str:
    gate = ev.fairness["gate"]  # the decision on every check, quality and fairness
    counts = {name: ", ".join(f"{n} {v}" for v, n in report["verdicts"].items())
              for name, report in (("quality", ev.quality), ("fairness", ev.fairness))}
    return (f"gate {'open' if gate['open'] else 'CLOSED'} (quality checks: {counts['quality']}; "
            f"fairness checks: {counts['fairness']}; policy: conf/gate)")


def check_row(check: dict) -> list:
    """A judged check's value, interval, the count it rests on, threshold and verdict (upper case unless it passed)."""
    return [check["check"], check["value"], f"{check['low']:.4f} to {check['high']:.4f}", check["min_count"],
            f"{check['rule']} {check['threshold']}", check["verdict"] if check["verdict"] == "pass" else check["verdict"].upper()]


QUALITY_HEADERS = ["check", "value", "interval", "test images", "threshold", "verdict"]
CHECK_HEADERS = ["grouping", "check", "value", "interval", "fewest images", "tolerance", "verdict"]


def _quality_checks(ev: Evaluation) -> list[list]:
    return [check_row(c) for c in ev.quality["checks"]]


def _checks(ev: Evaluation) -> list[list]:
    return [[c["grouping"], *check_row(c)] for c in ev.fairness["checks"]]


def _lineage(ev: Evaluation) -> list[list]:
    return [[k, v] for k, v in ev.lineage.items()] + [[f"model {k}", v] for k, v in ev.model["lineage"].items()]


def _group_rows(report: dict) -> list[list]:
    classes = list(next(iter(report["groups"].values()))["selection_rate"])
    return [[g, r["count"], r["accuracy"], r["recall_macro"], r["precision_macro"], *(r["selection_rate"][c] for c in classes)]
            for g, r in report["groups"].items()]


def render_html(ev: Evaluation) -> str:
    """reports/evaluation.html from templates/evaluation.html.j2."""
    q, classes = ev.quality, ev.model["classes"]
    figures = {"confusion": confusion_figure(q["confusion_matrix"], classes), "reliability": reliability_figure(ev.reliability, q["ece"]),
               "fairness": {name: fairness_figure(name, report) for name, report in ev.fairness["groupings"].items()}}
    per_class = [[c, *(q["per_class"][c][k] for k in ("precision", "recall", "f1", "support"))] for c in classes]
    return _environment().get_template("evaluation.html.j2").render(
        ev=ev, figures=figures, lineage=_lineage(ev), summary_keys=SUMMARY_KEYS, per_class=per_class, checks=_checks(ev),
        quality_checks=_quality_checks(ev),
        group_rows={name: _group_rows(report) for name, report in ev.fairness["groupings"].items()})


def limitations(ev: Evaluation) -> list[str]:
    """The configured limitations plus those measured in this evaluation."""
    found = list(ev.config["data"]["limitations"])
    found += [f"Quality check {c['verdict']}: {c['check']} {c['value']:.4f} (interval {c['low']:.4f} to "
              f"{c['high']:.4f}; {c['why']})." for c in ev.quality["checks"] if c["verdict"] != "pass"]
    found += [f"Fairness check {c['verdict']}: {c['grouping']} {c['check']} {c['value']:.4f} (interval {c['low']:.4f} to "
              f"{c['high']:.4f}; {c['why']})." for c in ev.fairness["checks"] if c["verdict"] != "pass"]
    for name, report in ev.fairness["groupings"].items():
        small = [g for g, r in report["groups"].items() if r["count"] < SMALL_GROUP]
        if small:
            found.append(f"{name}: group(s) {small} have fewer than {SMALL_GROUP} test images; their numbers are uncertain.")
    found.append(f"Expected calibration error {ev.quality['ece']:.3f}: "
                 "confidences are probabilities only as far as the reliability diagram shows.")
    return found


def render_model_card(ev: Evaluation) -> str:
    """reports/model_card.md from templates/model_card.md.j2."""
    d, cfg = ev.data, ev.config
    intervals = [[name, g, r["count"], r["accuracy"], f"{report['accuracy_gap']['group_accuracy'][g]['low']:.3f} to "
                  f"{report['accuracy_gap']['group_accuracy'][g]['high']:.3f}"]
                 for name, report in ev.fairness["groupings"].items() for g, r in report["groups"].items()]
    data_rows = [["data hash (data.dvc)", ev.lineage["data_hash"]],
                 ["images per split", ", ".join(f"{k} {v}" for k, v in d["counts"].items())],
                 *[[f"groups of {a}", ", ".join(f"{g} {n}" for g, n in gs.items())] for a, gs in d["groups"].items()]]
    ranking = ", ".join(f"{r['term']} ({r['importance']:.3f})" for r in ev.error_analysis["ranking"][:5]) or "none"
    return _environment().get_template("model_card.md.j2").render(
        ev=ev, data_rows=data_rows, train_rows=[[k, str(v)] for k, v in cfg["train"].items()] + [["seed", cfg["seed"]]],
        metric_keys=SUMMARY_KEYS[:-1], checks=_checks(ev), quality_checks=_quality_checks(ev), group_intervals=intervals, ranking=ranking,
        limitations=limitations(ev),
        lineage=_lineage(ev))
