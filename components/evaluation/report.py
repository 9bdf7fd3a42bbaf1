"""Rendering of an evaluation: matplotlib figures as PNG, a self-contained evaluation.html
(figures embedded as base64, no external links, so it opens offline) and model_card.md."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass

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


# ---------------------------------------------------------------- HTML


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _gate_line(fairness: dict) -> str:
    gate = fairness["gate"]
    verdicts = ", ".join(f"{n} {v}" for v, n in fairness["verdicts"].items())
    return f"gate {'open' if gate['open'] else 'CLOSED'} (checks: {verdicts}; policy: conf/gate)"


def check_rows(fairness: dict) -> list[list]:
    """One row per check: its value, interval, the count it rests on, tolerance and verdict."""
    return [[c["grouping"], c["check"], c["value"], f"{c['low']:.4f} to {c['high']:.4f}", c["min_count"],
             f"{c['rule']} {c['threshold']}", c["verdict"] if c["verdict"] == "pass" else c["verdict"].upper()]
            for c in fairness["checks"]]


CHECK_HEADERS = ["grouping", "check", "value", "interval", "fewest images", "tolerance", "verdict"]


def _quality_html(ev: Evaluation) -> str:
    q, classes = ev.quality, ev.model["classes"]
    summary = [[k, q[k]] for k in ("accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro", "ece", "n_test")]
    per_class = [[c, *(q["per_class"][c][k] for k in ("precision", "recall", "f1", "support"))] for c in classes]
    return ("<h2>Quality (test split)</h2>" + _table(["metric", "value"], summary)
            + _table(["class", "precision", "recall", "f1", "support"], per_class)
            + _img(confusion_figure(q["confusion_matrix"], classes), "confusion matrix")
            + _img(reliability_figure(ev.reliability, q["ece"]), "reliability diagram"))


def _fairness_html(ev: Evaluation) -> str:
    f = ev.fairness
    parts = [f"<h2>Fairness: {html.escape(_gate_line(f))}</h2>",
             f"<p>Intervals: {f['checks'][0]['confidence']:.0%} bootstrap. A check fails only when its whole interval lies beyond "
             "its tolerance, and is inconclusive when the data cannot tell.</p>" if f["checks"] else "",
             _table(CHECK_HEADERS, check_rows(f)),
             "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in f["gate"]["blocking"] + f["gate"]["warnings"]) + "</ul>"]
    for name, report in f["groupings"].items():
        classes = list(next(iter(report["groups"].values()))["selection_rate"])
        rows = [[g, r["count"], r["accuracy"], r["recall_macro"], r["precision_macro"], *(r["selection_rate"][c] for c in classes)]
                for g, r in report["groups"].items()]
        dpd, eod = report["demographic_parity_difference"], report["equalized_odds_difference"]
        gaps = [[m, report["difference"][m], report["ratio"][m]] for m in report["difference"]]
        parts += [f"<h3>{html.escape(name)}</h3>",
                  _table(["group", "count", "accuracy", "recall_macro", "precision_macro", *(f"selection rate {c}" for c in classes)], rows),
                  _table(["metric", "difference (max - min)", "ratio (min / max)"], gaps),
                  f"<p>Demographic parity difference {dpd['value']:.4f} (worst class {html.escape(dpd['worst_class'])}); "
                  f"equalized odds difference {eod['value']:.4f} (worst class {html.escape(eod['worst_class'])}), "
                  "each one class versus the rest.</p>",
                  f"<p>{html.escape(gap_sentence(report['accuracy_gap']))}</p>",
                  _img(fairness_figure(name, report), f"per-group metrics for {name}")]
    return "".join(parts)


def _interpretability_html(ev: Evaluation) -> str:
    ea = ev.error_analysis
    parts = ["<h2>Interpretability</h2>", "<h3>Error analysis (glass-box EBM predicting where the model errs)</h3>",
             f"<p>{ea['n_errors']} errors in {ea['n_images']} test images.</p>",
             "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in ea["findings"]) + "</ul>"]
    if ea["ranking"]:
        parts += [_img(ea["importance_plot"], "EBM term importance"),
                  *(_img(png, "EBM term plot") for png in ea["term_plots"])]
    method = ev.config["evaluate"]["attribution_method"]
    parts.append(f"<h3>Attributions ({html.escape(method)}, target = predicted class)</h3>")
    parts += [f"<h4>{html.escape(title)}</h4>" + _img(png, title) for title, png in ev.attributions.items()]
    return "".join(parts)


STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:0.8em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f0f0}img{display:block;margin:0.8em 0;max-width:100%}"""


def render_html(ev: Evaluation) -> str:
    lineage = [[k, v] for k, v in ev.lineage.items()] + [[f"model {k}", v] for k, v in ev.model["lineage"].items()]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Evaluation: {html.escape(ev.model['model']['name'])}</title>"
            f"<style>{STYLE}</style></head><body><h1>Evaluation report: {html.escape(ev.model['model']['name'])}</h1>"
            + _table(["lineage", "value"], lineage) + _quality_html(ev) + _fairness_html(ev) + _interpretability_html(ev)
            + "</body></html>\n")


# ---------------------------------------------------------------- model card


def _md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows])


def limitations(ev: Evaluation) -> list[str]:
    """The configured limitations plus those measured in this evaluation."""
    found = list(ev.config["evaluate"]["limitations"])
    found += [f"Fairness check {c['verdict']}: {c['grouping']} {c['check']} {c['value']:.4f} (interval {c['low']:.4f} to "
              f"{c['high']:.4f}; {c['why']})." for c in ev.fairness["checks"] if c["verdict"] != "pass"]
    for name, report in ev.fairness["groupings"].items():
        small = [g for g, r in report["groups"].items() if r["count"] < SMALL_GROUP]
        if small:
            found.append(f"{name}: group(s) {small} have fewer than {SMALL_GROUP} test images; their numbers are uncertain.")
    found.append(f"Expected calibration error {ev.quality['ece']:.3f}: confidences are probabilities only as far as the reliability diagram shows.")
    return found


def render_model_card(ev: Evaluation) -> str:
    m, d, q, cfg = ev.model, ev.data, ev.quality, ev.config
    groups = [[name, g, r["count"], r["accuracy"], f"{report['accuracy_gap']['group_accuracy'][g]['low']:.3f} to "
               f"{report['accuracy_gap']['group_accuracy'][g]['high']:.3f}"]
              for name, report in ev.fairness["groupings"].items() for g, r in report["groups"].items()]
    train = [[k, str(v)] for k, v in cfg["train"].items()] + [["seed", cfg["seed"]]]
    lineage = [[k, v] for k, v in ev.lineage.items()] + [[f"model {k}", v] for k, v in m["lineage"].items()]
    ranking = ", ".join(f"{r['term']} ({r['importance']:.3f})" for r in ev.error_analysis["ranking"][:5]) or "none"
    sections = [
        f"# Model card: {m['model']['name']}",
        "## Model details\n" + _md_table(["field", "value"], [
            ["architecture", f"{m['model']['name']} (width {m['model']['width']}, dropout {m['model']['dropout']})"],
            ["input", f"{m['channels']} channel(s), {m['image_size'][0]}x{m['image_size'][1]} pixels"],
            ["classes", ", ".join(m["classes"])],
            ["validation accuracy at training", m["metrics"]["val_accuracy"]],
            ["epochs run (best)", f"{m['metrics']['epochs_run']} ({m['metrics']['best_epoch']})"]]),
        "## Intended use\n" + cfg["evaluate"]["intended_use"],
        "## Data\n" + _md_table(["field", "value"], [
            ["data hash (data.dvc)", ev.lineage["data_hash"]],
            ["images per split", ", ".join(f"{k} {v}" for k, v in d["counts"].items())],
            *[[f"groups of {a}", ", ".join(f"{g} {n}" for g, n in gs.items())] for a, gs in d["groups"].items()]]),
        "## Training configuration\n" + _md_table(["train", "value"], train),
        f"## Metrics (test split, {q['n_test']} images)\n" + _md_table(["metric", "value"], [
            [k, q[k]] for k in ("accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro", "ece")]),
        f"## Fairness: {_gate_line(ev.fairness)}\n" + _md_table(CHECK_HEADERS, check_rows(ev.fairness))
        + "\n\n" + _md_table(["grouping", "group", "test images", "accuracy", f"{cfg['evaluate']['bootstrap_confidence']:.0%} interval"], groups)
        + "\n\n" + "\n".join(f"- {name}: {gap_sentence(r['accuracy_gap'])}" for name, r in ev.fairness["groupings"].items()),
        "## Interpretability findings\n" + f"Error analysis ranks what drives errors: {ranking}.\n\n"
        + "\n".join(f"- {s}" for s in ev.error_analysis["findings"])
        + "\n\nThese are associations on the test split, not causes; see evaluation.html for the term plots and attributions.",
        "## Limitations\n" + "\n".join(f"- {s}" for s in limitations(ev)),
        "## Lineage\n" + _md_table(["field", "value"], lineage),
    ]
    return "\n\n".join(sections) + "\n"
