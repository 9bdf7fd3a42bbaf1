"""The KFP components: one thin wrapper per step, plus the gate, the exit handler and the
sweep's ranking.

Each wrapper only maps KFP artifact paths and parameters onto the step function in
components/. They are lightweight components whose source KFP ships in the pipeline spec:
imports happen inside the function, from the project installed in the image (`make image`),
or from this venv under `kfp.local.SubprocessRunner(use_venv=False)`. `config` is the
resolved config as JSON (conf/ + Hydra overrides), validated again in every step.
"""

# No `from __future__ import annotations`: KFP reads the real annotation objects.
from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output
from omegaconf import OmegaConf

from components.core.config import CONF_DIR

# The default image; the graph sets each task's image from the composed config.
IMAGE = OmegaConf.load(CONF_DIR / "pipeline" / "default.yaml").image.cpu
# The deploy step reads TorchServe's keys from these (a Kubernetes secret on a cluster); deploy_op's
# body names them again, as a component's source runs on its own.
MANAGEMENT_TOKEN_ENV, INFERENCE_TOKEN_ENV = "TORCHSERVE_MANAGEMENT_TOKEN", "TORCHSERVE_INFERENCE_TOKEN"

component = dsl.component(base_image=IMAGE, install_kfp_package=False)


@component
def prepare_op(config: str, data_repo: str, data_rev: str, data_uri: str, prepared: Output[Dataset]):
    import json
    import tempfile

    from components.core.config import validate
    from components.data.source import fetch_data
    from components.prepare import prepare

    cfg = validate(json.loads(config), "pipeline parameter 'config'")
    with tempfile.TemporaryDirectory() as download:
        data_dir = fetch_data(download, cfg.data.root, repo=data_repo, rev=data_rev, uri=data_uri)
        prepare(cfg, data_dir, prepared.path)


@component
def train_op(config: str, prepared: Input[Dataset], model: Output[Model], metrics: Output[Metrics],
             training_log: Output[Artifact]):
    import json
    import subprocess
    import sys
    import tempfile

    from components.core.config import validate
    from components.train import train

    cfg = validate(json.loads(config), "pipeline parameter 'config'")
    gpus = cfg.pipeline.train.accelerator_count
    with tempfile.TemporaryDirectory() as checkpoints:
        if gpus > 1:  # one process per GPU on this node
            with tempfile.NamedTemporaryFile("w", suffix=".json") as params:
                params.write(config)
                params.flush()
                subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
                                "-m", "components.train", "--params", params.name, "--prepared", prepared.path,
                                "--out", model.path, "--live", training_log.path, "--checkpoints", checkpoints], check=True)
            results = json.loads(open(f"{model.path}/model.json").read())["metrics"]
        else:
            results = train(cfg, prepared.path, model.path, training_log.path, checkpoints)
    for name, value in results.items():
        metrics.log_metric(name, value)


@component
def evaluate_op(config: str, prepared: Input[Dataset], model: Input[Model], reports: Output[Artifact],
                metrics: Output[Metrics], confusion_matrix: Output[ClassificationMetrics],
                evaluation_report: Output[HTML], model_card: Output[Markdown],
                ) -> NamedTuple("Verdicts", [("accuracy", float), ("fairness_passed", bool), ("fairness_violations", str)]):
    import json
    import shutil
    from collections import namedtuple

    from components.core.config import validate
    from components.evaluate import evaluate

    cfg = validate(json.loads(config), "pipeline parameter 'config'")
    results = evaluate(cfg, prepared.path, model.path, reports.path)
    fairness = json.loads(open(f"{reports.path}/fairness.json").read())
    quality = json.loads(open(f"{reports.path}/quality.json").read())
    shutil.copy(f"{reports.path}/evaluation.html", evaluation_report.path)
    shutil.copy(f"{reports.path}/model_card.md", model_card.path)
    confusion_matrix.log_confusion_matrix(list(cfg.data.classes), quality["confusion_matrix"])

    def log_numbers(prefix: str, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict) and key not in ("lineage", "per_class"):
                log_numbers(f"{prefix}{key}.", value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics.log_metric(prefix + key, value)

    log_numbers("", results)
    verdicts = namedtuple("Verdicts", ["accuracy", "fairness_passed", "fairness_violations"])
    return verdicts(results["accuracy"], fairness["passed"], "; ".join(fairness["violations"]))


@component
def package_op(config: str, prepared: Input[Dataset], model: Input[Model], package: Output[Model],
               ) -> NamedTuple("Package", [("version", str), ("mar_file", str)]):
    import json
    from collections import namedtuple

    from components.core.config import validate
    from components.package import package as package_step

    manifest = package_step(validate(json.loads(config), "pipeline parameter 'config'"), prepared.path, model.path, package.path)
    return namedtuple("Package", ["version", "mar_file"])(manifest["version"], manifest["mar"]["file"])


@component
def deploy_op(config: str, package: Input[Model], version: str, mar_file: str, management_url: str, inference_url: str,
              model_store: str) -> str:
    """Empty management_url: the local TorchServe of the config's `serve` section."""
    import json
    import os

    from components.core.config import validate
    from components.deploy import deploy

    cfg = validate(json.loads(config), "pipeline parameter 'config'")
    result = deploy(cfg, f"{package.path}/{mar_file}", version, management_url or None,
                    os.environ.get("TORCHSERVE_MANAGEMENT_TOKEN"), inference_url=inference_url or None,
                    inference_token=os.environ.get("TORCHSERVE_INFERENCE_TOKEN"), model_store=model_store or None)
    return result["endpoint"]


@component
def gate_closed_op(reason: str, accuracy: float, fairness_violations: str):
    import sys

    sys.exit(f"gate closed: {reason} (test accuracy {accuracy:.4f}; fairness violations: {fairness_violations or 'none'}). "
             "The model is neither packaged nor deployed; the evaluate reports show the evidence.")


@component
def record_outcome_op(status: dsl.PipelineTaskFinalStatus, outcome: Output[Artifact]):
    import json

    record = {"state": status.state, "run": status.pipeline_job_resource_name, "error": status.error_message}
    open(outcome.path, "w").write(json.dumps(record, indent=2) + "\n")
    print(f"pipeline outcome: {record}")


@component
def select_best_op(trials: list, reports: Input[List[Artifact]], metric: str, goal: str, summary: Output[Markdown],
                   best: Output[Metrics]) -> str:
    """Rank the sweep's trials (in ParallelFor order) by `metric` of their reports/metrics.json."""
    import json
    from functools import reduce

    scores = [reduce(dict.get, metric.split("."), json.loads(open(f"{r.path}/metrics.json").read())) for r in reports]
    names = [trial["name"] for trial in trials]
    chosen = (max if goal == "maximize" else min)(range(len(scores)), key=scores.__getitem__)
    rows = [f"| {'**best**' if i == chosen else ''} | `{name}` | {score:.6g} |" for i, (name, score) in enumerate(zip(names, scores))]
    open(summary.path, "w").write(f"# Sweep: {metric} ({goal})\n\n| | trial | {metric} |\n|---|---|---|\n" + "\n".join(rows) + "\n")
    best.log_metric(metric, scores[chosen])
    best.metadata["trial"] = names[chosen]
    print(f"sweep: best trial {names[chosen]!r}: {metric} = {scores[chosen]:.6g}")
    return names[chosen]


@component
def score_op(config: str, input_uri: str, package_uri: str, scored: Output[Dataset], drift_report: Output[HTML],
             metrics: Output[Metrics]):
    """Batch scoring: `input_uri` (s3:// prefix or folder) with the package at `package_uri` (s3:// or folder)."""
    import json
    import os
    import shutil

    from components.core.config import validate
    from components.score import score

    result = score(validate(json.loads(config), "pipeline parameter 'config'"), input_uri, package_uri, None, scored.path)
    drift_html = f"{scored.path}/drift.html"
    if os.path.exists(drift_html):
        shutil.copy(drift_html, drift_report.path)
    else:
        open(drift_report.path, "w").write(f"<p>drift not checked: {result['drift']['reason']}</p>\n")
    for key in ("files", "scored", "rejected"):
        metrics.log_metric(key, result[key])
    metrics.log_metric("drift", float(bool(result["drift"].get("drift"))))
