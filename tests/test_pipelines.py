"""Kubeflow Pipelines: the compiled spec carries the cluster settings, run-local runs the whole
pipeline through kfp.local with the numbers of `dvc repro`, the gate and the sweep work, the
prepare component fetches DVC data at a revision from a real S3 server (SeaweedFS), and submit
speaks the KFP API (checked against a fake server: a real one needs Kubernetes)."""

from __future__ import annotations

import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from kfp import local
from safetensors.torch import load_file

from components.core.config import PORT_KEYS, ROOT, compose
from components.core.lineage import data_hash
from pipelines.wrappers import prepare_op
from pipelines.graph import config_json
from pipelines.local import collect_results
from components.serving import server
from tests.helpers.datasets import make_image_dataset
from tests.helpers.project import copy_project, git_commit, run
from tests.helpers.servers import free_ports, seaweed_s3

pytestmark = pytest.mark.slow  # real servers and pipeline runs: minutes

OPEN_GATE = "pipeline.gate.require_fairness=false"


def run_local(out: Path, *overrides: str, sweep: bool = False, check: bool = True):
    """`python -m pipelines run-local` with a private TorchServe (state dir, free loopback ports); returns (result, run dir)."""
    serve = [f"serve.state_dir={out / 'serve'}", *(f"serve.{key}={port}" for key, port in zip(PORT_KEYS, free_ports(len(PORT_KEYS))))]
    command = ["python", "-m", "pipelines", "run-local", "--output-dir", str(out / "kfp"), *(["--sweep"] if sweep else []), *serve, *overrides]
    result = run(command, ROOT, check=check)
    (run_dir,) = (out / "kfp").iterdir()
    return result, run_dir


def tiny_overrides(raw: Path) -> list[str]:
    return [f"pipeline.data.uri={raw}", "data.classes=[a,b,c]", "data.image_size=[16,16]", "train.epochs=2", "train.batch_size=8",
            "evaluate.bootstrap_samples=50", "evaluate.attribution_samples=2", "evaluate.attribution_steps=4"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_image_dataset(tmp_path_factory.mktemp("tiny") / "raw", per_class=20)


# --- compile -------------------------------------------------------------------------------

def test_compiled_spec_carries_gpu_resources_scheduling_retries_caching_and_secrets(tmp_path):
    out = tmp_path / "pipeline.yaml"
    run(["python", "-m", "pipelines", "compile", "--out", str(out), "experiment=quick", "train.lr=0.0123",
         "pipeline.train.accelerator_count=2", "pipeline.image.gpu=registry.example/gpu:7"], ROOT)
    spec, platform = yaml.safe_load_all(out.read_text())
    executors = spec["deploymentSpec"]["executors"]
    train = executors["exec-train-op"]["container"]
    assert train["image"] == "registry.example/gpu:7"
    env = {e["name"]: e["value"] for e in train["env"]}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert env["LINEAGE_GIT_COMMIT"] == head and env["LINEAGE_DATA_HASH"].endswith(".dir")
    assert train["resources"]["accelerator"] == {"count": "2", "resourceCount": "2", "resourceType": "nvidia.com/gpu", "type": "nvidia.com/gpu"}
    assert {k: train["resources"][k] for k in ("resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit")} == \
        {"resourceCpuRequest": "4", "resourceCpuLimit": "8", "resourceMemoryRequest": "16G", "resourceMemoryLimit": "32G"}
    assert executors["exec-evaluate-op"]["container"]["image"] == "ghcr.io/example/kfp-dvc-template:0.1.0"
    assert executors["exec-evaluate-op"]["container"]["resources"]["resourceMemoryLimit"] == "4G"

    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert k8s["exec-train-op"]["nodeSelector"] == {"labels": {"nvidia.com/gpu.present": "true"}}
    assert k8s["exec-train-op"]["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    (s3,) = k8s["exec-prepare-op"]["secretAsEnv"]
    assert s3["secretName"] == "kfp-dvc-template-s3"
    assert {m["secretKey"]: m["envVar"] for m in s3["keyToEnv"]} == {
        "access_key_id": "AWS_ACCESS_KEY_ID", "secret_access_key": "AWS_SECRET_ACCESS_KEY", "endpoint_url": "AWS_ENDPOINT_URL"}
    (keys,) = k8s["exec-deploy-op"]["secretAsEnv"]
    assert keys["secretName"] == "torchserve-keys" and {m["envVar"] for m in keys["keyToEnv"]} == {
        "TORCHSERVE_MANAGEMENT_TOKEN", "TORCHSERVE_INFERENCE_TOKEN"}

    body = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert body["train-op"]["retryPolicy"] == {"backoffDuration": "60s", "backoffFactor": 2.0, "backoffMaxDuration": "3600s", "maxRetryCount": 2}
    assert body["train-op"]["cachingOptions"] == {"enableCache": True}
    gate_open = spec["components"]["comp-condition-5"]["dag"]["tasks"]
    assert gate_open["deploy-op"]["cachingOptions"] == {} and "retryPolicy" not in gate_open["deploy-op"]
    branches = spec["components"]["comp-condition-branches-2"]["dag"]["tasks"]
    assert {t["taskInfo"]["name"]: t["triggerPolicy"]["condition"] for t in branches.values()} == {
        "fairness-gate-closed": "inputs.parameter_values['pipelinechannel--evaluate-op-fairness_passed'] == false",
        "quality-gate-closed": "!(inputs.parameter_values['pipelinechannel--evaluate-op-fairness_passed'] == false) && "
                               "inputs.parameter_values['pipelinechannel--evaluate-op-accuracy'] < 0.9",
        "gate-open": "!(inputs.parameter_values['pipelinechannel--evaluate-op-fairness_passed'] == false) && "
                     "!(inputs.parameter_values['pipelinechannel--evaluate-op-accuracy'] < 0.9)"}
    assert spec["root"]["dag"]["tasks"]["record-outcome-op"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"

    config = json.loads(spec["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"])
    assert config["train"]["lr"] == 0.0123 and config["train"]["epochs"] == 2  # Hydra overrides, as with `dvc exp run -S`


def test_compiled_sweep_fans_out_one_trial_per_override_set(tmp_path):
    out = tmp_path / "sweep.yaml"
    run(["python", "-m", "pipelines", "compile", "--sweep", "--out", str(out), "--trial", "train.lr=0.001",
         "--trial", "train.lr=0.01 model.width=16", "experiment=quick"], ROOT)
    spec, _ = yaml.safe_load_all(out.read_text())
    trials = spec["root"]["inputDefinitions"]["parameters"]["trials"]["defaultValue"]
    assert [t["name"] for t in trials] == ["train.lr=0.001", "train.lr=0.01 model.width=16"]
    configs = [json.loads(t["config"]) for t in trials]
    assert [(c["train"]["lr"], c["model"]["width"], c["train"]["epochs"]) for c in configs] == [(0.001, 32, 2), (0.01, 16, 2)]
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["for-loop-1"]["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--trials"
    assert tasks["select-best-op"]["inputs"]["artifacts"]["reports"]["taskOutputArtifact"] == {
        "outputArtifactKey": "pipelinechannel--evaluate-op-reports", "producerTask": "for-loop-1"}  # dsl.Collected


# --- run-local -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dvc_quick(tmp_path_factory) -> Path:
    repo = copy_project(tmp_path_factory.mktemp("dvc") / "repo")
    run(["python", "-m", "components.core.config", "experiment=quick"], repo)
    run(["dvc", "repro"], repo)
    return repo


@pytest.fixture(scope="module")
def local_quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("run_local")
    result, run_dir = run_local(out, "experiment=quick", OPEN_GATE)
    return {"out": out, "stdout": result.stdout, "run_dir": run_dir, "tasks": collect_results(run_dir)}


def test_run_local_gives_the_numbers_of_dvc_repro(dvc_quick, local_quick):
    tasks = local_quick["tasks"]
    ours = json.loads((Path(tasks["evaluate-op"].artifacts["reports"]) / "metrics.json").read_text())
    theirs = json.loads((dvc_quick / "reports" / "metrics.json").read_text())
    assert ours.pop("lineage")["config_hash"] != theirs.pop("lineage")["config_hash"]  # serve ports/state dir differ
    assert ours == theirs
    assert ours["accuracy"] > 0.5 and ours["n_test"] > 200
    dvclive = json.loads((dvc_quick / "dvclive" / "metrics.json").read_text())
    assert tasks["train-op"].metrics["metrics"] == {k: dvclive[k] for k in ("val_loss", "val_accuracy", "best_epoch", "epochs_run")}
    our_weights = load_file(Path(tasks["train-op"].artifacts["model"]) / "model.safetensors")
    their_weights = load_file(dvc_quick / "artifacts" / "model" / "model.safetensors")
    assert our_weights.keys() == their_weights.keys()
    assert all(our_weights[k].equal(their_weights[k]) for k in our_weights)


def test_run_local_passes_typed_artifacts_and_deploys_to_a_torchserve_it_stops(local_quick):
    tasks, stdout = local_quick["tasks"], local_quick["stdout"]
    assert list(tasks) == ["prepare-op", "train-op", "evaluate-op", "package-op", "deploy-op", "record-outcome-op"]
    evaluate = tasks["evaluate-op"]
    assert Path(evaluate.artifacts["evaluation_report"]).read_text().lstrip().lower().startswith("<!doctype html")
    assert "## Fairness" in Path(evaluate.artifacts["model_card"]).read_text()
    matrix = evaluate.metrics["confusion_matrix"]["confusionMatrix"]
    assert [c["displayName"] for c in matrix["annotationSpecs"]] == [str(d) for d in range(10)]
    assert sum(map(sum, (row["row"] for row in matrix["rows"]))) == evaluate.metrics["metrics"]["n_test"]
    assert evaluate.parameters["accuracy"] == evaluate.metrics["metrics"]["accuracy"]

    package, deploy = tasks["package-op"], tasks["deploy-op"]
    assert (Path(package.artifacts["package"]) / package.parameters["mar_file"]).is_file()
    cfg = compose([f"serve.state_dir={local_quick['out'] / 'serve'}"])
    assert deploy.parameters["Output"].endswith("/predictions/digits") and deploy.parameters["Output"].startswith("http://127.0.0.1:")
    assert server.running_pid(cfg) is None  # stopped afterwards
    outcome = json.loads(Path(tasks["record-outcome-op"].artifacts["outcome"]).read_text())
    assert outcome["state"] == "SUCCEEDED"
    for path in (evaluate.artifacts["evaluation_report"], package.artifacts["package"]):
        assert path in stdout


@pytest.mark.parametrize("closed_by,overrides,message", [
    ("fairness", ["evaluate.thresholds.max_accuracy_difference=-1"], "gate closed: a fairness check failed"),
    ("quality", [OPEN_GATE, "train.lr=0.000001", "train.epochs=1"], "gate closed: test accuracy below pipeline.gate.min_accuracy=0.9"),
])
def test_a_closed_gate_ends_the_run_failed_without_package_or_deploy(tmp_path, tiny_data, closed_by, overrides, message):
    result, run_dir = run_local(tmp_path, *tiny_overrides(tiny_data), *overrides, check=False)
    assert result.returncode == 2
    assert message in result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith("error: Pipeline 'kfp-dvc-template' finished with status FAILURE. "
                                                              "Inner task failed: 'gate-closed-op")
    assert "The fairness/quality gate closed: package and deploy did not run" in result.stderr
    tasks = collect_results(run_dir)
    assert list(tasks) == ["prepare-op", "train-op", "evaluate-op", "record-outcome-op"]
    verdicts = tasks["evaluate-op"].parameters
    assert verdicts["fairness_passed"] is False if closed_by == "fairness" else verdicts["accuracy"] < 0.9
    outcome = json.loads(Path(tasks["record-outcome-op"].artifacts["outcome"]).read_text())
    assert outcome["state"] == "FAILED"


def test_sweep_runs_locally_and_reports_the_best_trial(tmp_path, tiny_data):
    result, run_dir = run_local(tmp_path, *tiny_overrides(tiny_data), 'pipeline.sweep.trials=[["train.lr=0.000001"],["train.lr=0.01"]]',
                                "pipeline.sweep.metric=balanced_accuracy", sweep=True)
    tasks = collect_results(run_dir)
    scores = {i: json.loads((Path(tasks[f"for-loop-1-iteration-{i}/evaluate-op"].artifacts["reports"]) / "metrics.json").read_text())
              ["balanced_accuracy"] for i in (0, 1)}
    assert scores[1] > scores[0]
    best = tasks["select-best-op"]
    assert best.parameters["Output"] == "train.lr=0.01"
    assert best.metrics["best"] == {"balanced_accuracy": scores[1], "trial": "train.lr=0.01"}
    summary = Path(best.artifacts["summary"]).read_text()
    assert "| **best** | `train.lr=0.01` |" in summary and "`train.lr=0.000001`" in summary
    assert "sweep: best trial 'train.lr=0.01'" in result.stdout


# --- data: DVC at a git revision, or an S3 prefix, from a real S3 server ---------------------

def prepared_counts(task) -> dict:
    return json.loads((Path(task.outputs["prepared"].path) / "prepared.json").read_text())["counts"]


@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")  # image name without "python"
def test_prepare_component_fetches_dvc_data_at_a_revision_and_an_s3_prefix(tmp_path, monkeypatch):
    repo = copy_project(tmp_path / "repo")
    with seaweed_s3(tmp_path / "s3") as s3:
        for key, value in (("AWS_ACCESS_KEY_ID", s3.access_key), ("AWS_SECRET_ACCESS_KEY", s3.secret_key), ("AWS_ENDPOINT_URL", s3.endpoint)):
            monkeypatch.setenv(key, value)  # on a cluster: the Kubernetes secret mapped to env
        run(["dvc", "commit", "--force", "data.dvc"], repo)
        run(["dvc", "push", "data.dvc"], repo)
        first = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
        metadata = repo / "data" / "metadata.csv"
        metadata.write_text("".join(metadata.read_text().splitlines(keepends=True)[:1701]))  # header + 1700 images
        run(["dvc", "add", "data"], repo)
        git_commit(repo, "fewer images")
        run(["dvc", "push", "data.dvc"], repo)
        origin = tmp_path / "origin.git"  # what a cluster sees: a git server without any DVC cache
        run(["git", "clone", "-q", "--bare", str(repo), str(origin)], tmp_path)

        import s3fs
        s3fs.S3FileSystem().put(str(ROOT / "data"), f"{s3.bucket}/raw/digits", recursive=True)

        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
        config = config_json(compose([]))
        at_first = prepare_op(config=config, data_repo=f"file://{origin}", data_rev=first, data_uri="")
        at_head = prepare_op(config=config, data_repo=f"file://{origin}", data_rev="", data_uri="")
        from_s3 = prepare_op(config=config, data_repo="", data_rev="", data_uri=f"s3://{s3.bucket}/raw/digits")
    assert sum(prepared_counts(at_first).values()) == 1797
    assert sum(prepared_counts(at_head).values()) == 1700
    assert prepared_counts(from_s3) == prepared_counts(at_first)


# --- submit --------------------------------------------------------------------------------

class FakeKfpApi(BaseHTTPRequestHandler):
    """Records what the real kfp.Client sends; answers like the KFP v2beta1 API would."""

    requests: list[dict] = []

    def _answer(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self, body: dict | None) -> None:
        self.requests.append({"method": self.command, "path": self.path, "auth": self.headers.get("Authorization"), "body": body})

    def do_GET(self):
        self._record(None)
        self._answer({"multi_user": False} if self.path.startswith("/apis/v2beta1/healthz") else {})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._record(body)
        if self.path == "/apis/v2beta1/experiments":
            self._answer({"experiment_id": "exp-1", **body})
        else:
            self._answer({"run_id": "run-1", **body})

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_kfp_api_server():
    FakeKfpApi.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeKfpApi)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", FakeKfpApi.requests
    httpd.shutdown()
    httpd.server_close()


def test_submit_contract_with_fake_kfp_api_server(fake_kfp_api_server, tmp_path):
    host, requests = fake_kfp_api_server
    token_file = tmp_path / "token"
    token_file.write_text("token-from-file\n")
    result = run(["python", "-m", "pipelines", "submit", "--host", host, "--namespace", "team-a", "--experiment", "digits-lr",
                  "--token-file", str(token_file), "--no-cache", "experiment=quick", "train.lr=0.0123",
                  "pipeline.data.repo=https://git.example.com/team/project.git",
                  "pipeline.deploy.management_url=http://torchserve.serving:8081"], ROOT)
    assert [(r["method"], r["path"].split("?")[0]) for r in requests] == [
        ("GET", "/apis/v2beta1/experiments"), ("POST", "/apis/v2beta1/experiments"), ("POST", "/apis/v2beta1/runs")]
    assert {r["auth"] for r in requests} == {"Bearer token-from-file"}
    assert "namespace=team-a" in requests[0]["path"] and "digits-lr" in requests[0]["path"]
    assert requests[1]["body"] == {"display_name": "digits-lr", "namespace": "team-a"}

    created = requests[2]["body"]
    commit = run(["git", "rev-parse", "HEAD"], ROOT).stdout.strip()
    assert created["experiment_id"] == "exp-1"
    assert created["display_name"].startswith(f"kfp-dvc-template commit {commit[:8]}")
    assert f" data {data_hash()[:8]} " in created["display_name"]
    spec = created["pipeline_spec"]["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "kfp-dvc-template"
    assert "exec-train-op" in created["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    steps = [task for component in [*spec["components"].values(), spec["root"]]
             for task in component.get("dag", {}).get("tasks", {}).values() if "componentRef" in task and "cachingOptions" in task]
    assert len(steps) == 8 and all(task["cachingOptions"] == {} for task in steps)  # --no-cache reaches every step
    parameters = created["runtime_config"]["parameters"]
    assert parameters == {"data_repo": "https://git.example.com/team/project.git", "data_rev": commit, "data_uri": ""}
    config = json.loads(spec["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"])
    assert config["train"]["lr"] == 0.0123
    assert "submit: run run-1" in result.stdout


def test_submit_to_an_unreachable_host_fails_with_one_clear_error():
    (port,) = free_ports(1)  # nothing listens there any more
    result = run(["python", "-m", "pipelines", "submit", "--host", f"http://127.0.0.1:{port}", "experiment=quick",
                  "pipeline.data.repo=https://git.example.com/team/project.git",
                  "pipeline.deploy.management_url=http://torchserve.serving:8081"], ROOT, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: cannot reach the Kubeflow Pipelines API at http://127.0.0.1:{port}: "
                                     "Failed to establish a new connection: [Errno 111] Connection refused")
