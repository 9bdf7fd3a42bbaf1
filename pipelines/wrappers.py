"""The KFP components: one thin wrapper per step, plus the run's data hash, the gate, the exit
handler and the sweep's ranking.

Each wrapper only maps KFP artifact paths and parameters onto the step function in
components/. They are lightweight components whose source KFP ships in the pipeline spec:
imports happen inside the function, from the project installed in the image (`make image`),
or from this venv under `kfp.local.SubprocessRunner(use_venv=False)`. `config` holds only the
config sections the step reads (its SECTIONS), so its cache key changes only with them;
`expected_commit` is the commit the images were built from (pipelines/in_pod.py checks it);
`data_hash` is the data-hash task's, which each step's lineage records.
"""

# No `from __future__ import annotations`: KFP reads the real annotation objects.
from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

# The graph sets each task's image (<repository>:<commit>) from the composed config.
component = dsl.component(base_image="python:3.11", install_kfp_package=False)


@component
def data_hash_op(config: str, expected_commit: str, data_repo: str, data_rev: str, data_uri: str) -> str:
    """What identifies the data prepare fetches, read at run time (never cached): prepare's cache key and every
    step's lineage change with the data, not only with the run parameters that name it."""
    import tempfile

    from components.data.source import data_hash_of
    from pipelines.in_pod import git_credentials, step_config

    cfg = step_config(config, expected_commit)
    with tempfile.TemporaryDirectory() as scratch, git_credentials(scratch):
        data_hash = data_hash_of(cfg.data.root, repo=data_repo, rev=data_rev, uri=data_uri)
    print(f"data hash: {data_hash}")
    return data_hash


@component
def prepare_op(config: str, expected_commit: str, data_repo: str, data_rev: str, data_uri: str, data_hash: str,
               prepared: Output[Dataset]):
    import tempfile

    from components.data.source import fetch_data
    from components.prepare import prepare
    from pipelines.in_pod import git_credentials, step_config

    cfg = step_config(config, expected_commit, data_hash=data_hash)
    with tempfile.TemporaryDirectory() as download, git_credentials(download):
        data_dir = fetch_data(download, cfg.data.root, repo=data_repo, rev=data_rev, uri=data_uri)
        prepare(cfg, data_dir, prepared.path)


@component
def train_op(config: str, expected_commit: str, data_hash: str, gpus: int, epochs: int, lr: float, batch_size: int, model_name: str,
             prepared: Input[Dataset], model: Output[Model], metrics: Output[Metrics], training_log: Output[Artifact]):
    """With GPUs the device is cuda, never a silent CPU fallback, and one process per GPU (the train step's torchrun)."""
    import tempfile

    from components.train import launch
    from pipelines.in_pod import train_step_config

    cfg = train_step_config(config, expected_commit, gpus, data_hash, epochs=epochs, lr=lr, batch_size=batch_size,
                            model_name=model_name)
    with tempfile.TemporaryDirectory() as checkpoints:
        results = launch(cfg, prepared.path, model.path, training_log.path, checkpoints)
    for name, value in results.items():
        metrics.log_metric(name, value)


@component
def evaluate_op(config: str, expected_commit: str, data_hash: str, prepared: Input[Dataset], model: Input[Model], reports: Output[Artifact],
                metrics: Output[Metrics], confusion_matrix: Output[ClassificationMetrics],
                evaluation_report: Output[HTML], model_card: Output[Markdown]) -> float:
    """Returns the test accuracy; the gate step decides on the reports (evaluate does not enforce the gate here)."""
    import json
    import shutil

    from components.evaluate import evaluate
    from pipelines.in_pod import step_config

    cfg = step_config(config, expected_commit, data_hash=data_hash)
    results = evaluate(cfg, prepared.path, model.path, reports.path, enforce_gate=False)
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
    return results["accuracy"]


@component
def gate_op(expected_commit: str, reports: Input[Artifact], min_accuracy: float, min_balanced_accuracy: float, max_ece: float,
            min_test_size: int, max_accuracy_difference: float, min_accuracy_ratio: float, max_recall_macro_difference: float,
            max_demographic_parity_difference: float, max_equalized_odds_difference: float, min_group_size: int,
            on_fail: str, on_inconclusive: str) -> str:
    """The gate policy of conf/gate on evaluate's reports, with this run's thresholds: exits non-zero when it closes.
    Its parameters after `reports` are the gate schema's, one per key (gate_parameters; a test keeps them equal):
    KFP runs this function from its source, and the backends of Kubeflow 1.10 fill in only whole parameters."""
    thresholds = {name: value for name, value in locals().items() if name not in ("expected_commit", "reports")}
    import json
    import sys

    from components.evaluation.gates import decide, summary
    from pipelines.in_pod import gate_config

    gate = gate_config(expected_commit, thresholds)
    quality, fairness = (json.loads(open(f"{reports.path}/{name}.json").read())["checks"] for name in ("quality", "fairness"))
    decision = decide(quality, fairness, gate)
    print(summary(decision))
    if not decision["open"]:
        sys.exit(f"gate closed: {'; '.join(decision['blocking'])}. The model is neither packaged nor deployed; "
                 "evaluate's reports show the evidence.")
    return "open" + (f" with {len(decision['warnings'])} warning(s)" if decision["warnings"] else "")


@component
def package_op(config: str, expected_commit: str, data_hash: str, prepared: Input[Dataset], model: Input[Model],
               package: Output[Model]) -> NamedTuple("Package", [("version", str), ("mar_file", str)]):
    """The md5 of what deploy and scoring load goes in the artifact's metadata, which KFP keeps outside its folder."""
    from collections import namedtuple

    from components.core.io import file_digest
    from components.package import package as package_step
    from pipelines.in_pod import step_config

    manifest = package_step(step_config(config, expected_commit, data_hash=data_hash), prepared.path, model.path, package.path)
    package.metadata["md5"] = {name: file_digest(f"{package.path}/{name}", "md5") for name in (manifest["mar"]["file"], "model.onnx")}
    return namedtuple("Package", ["version", "mar_file"])(manifest["version"], manifest["mar"]["file"])


@component
def deploy_op(config: str, expected_commit: str, package: Input[Model], version: str, mar_file: str, management_url: str,
              inference_url: str, model_store: str, key_file: str) -> str:
    """Empty management_url: the local TorchServe of the config's `serve` section. Otherwise the keys
    come from the key file the server rewrites at every start, on the volume deploy shares with it."""
    from components.core.recorded import Recorded
    from components.deploy import deploy
    from pipelines.in_pod import server_keys, step_config

    cfg = step_config(config, expected_commit)
    keys = server_keys(key_file, management_url, cfg.serve.token_expiration_min) if management_url else {}
    recorded = Recorded(package.metadata["md5"][mar_file], "the KFP package artifact's metadata")
    result = deploy(cfg, f"{package.path}/{mar_file}", version, management_url or None, keys.get("management"),
                    inference_url=inference_url or None, inference_token=keys.get("inference"), model_store=model_store or None,
                    recorded=recorded)
    return result["endpoint"]


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
def score_op(config: str, expected_commit: str, input_uri: str, package_uri: str, scored: Output[Dataset],
             drift_report: Output[HTML], metrics: Output[Metrics]):
    """Batch scoring: `input_uri` (s3:// prefix or folder) with the package at `package_uri` (s3:// or folder)."""
    import os
    import shutil

    from components.score import score
    from pipelines.in_pod import step_config

    result = score(step_config(config, expected_commit), input_uri, package_uri, None, scored.path)
    drift_html = f"{scored.path}/drift.html"
    if os.path.exists(drift_html):
        shutil.copy(drift_html, drift_report.path)
    else:
        open(drift_report.path, "w").write(f"<p>drift not checked: {result['drift']['reason']}</p>\n")
    for key in ("files", "scored", "rejected"):
        metrics.log_metric(key, result[key])
    metrics.log_metric("drift", float(bool(result["drift"].get("drift"))))
