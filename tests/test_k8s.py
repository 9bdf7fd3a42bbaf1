"""TorchServe on Kubernetes (serve/k8s/): the manifests validate offline against the Kubernetes
schema (kubernetes-validate), config.properties is the one conf/serve generates, and the
deploy step works against a real TorchServe started exactly as the Deployment starts it: the
same config (on loopback), the same command, the key file in the working dir on the shared
volume, probes that need no token, keys that never go stale (restart, expiry). A real TorchServe
started as KServe's ServingRuntime of serve/k8s/kserve starts it (tests/test_kserve.py checks
the manifests) loads the model from the storageUri's layout and answers the Open Inference Protocol."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import kubernetes_validate
import psutil
import pytest
import requests
import yaml
from kfp import compiler

from components.core.config.compose import compose
from components.core.config.schema import PORT_KEYS
from components.core.errors import ConfigError
from components.core.paths import ROOT
from components.deploy import deploy
from components.package import package
from components.torchserve.server import read_keys
from pipelines.graph import training_pipeline
from pipelines.in_pod import server_keys
from serve.k8s.__main__ import (CONFIG_FILE, HANDLER_ENV_FILE, HOME, MODELS, PVC_FILE, cluster_config_properties, cluster_handler_env,
                                generated, kserve_config_properties, kserve_manifests, volume_claim)
from tests.helpers.project import run
from tests.helpers.servers import free_ports

K8S = ROOT / "serve" / "k8s"
KUBERNETES_VERSION = "1.30.0"


def manifests() -> list[dict]:
    """What `kubectl apply -k serve/k8s` applies: the listed resources, the generated ConfigMap, the namespace set."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((K8S / name).read_text())]
    for generator in kustomization["configMapGenerator"]:  # `files:` become keys; `envs:` files hold KEY=value lines
        data = {Path(f).name: (K8S / f).read_text() for f in generator.get("files", [])}
        data |= {k: v for f in generator.get("envs", []) for k, v in (line.split("=", 1) for line in (K8S / f).read_text().splitlines())}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data})
    for doc in docs:
        doc["metadata"]["namespace"] = kustomization["namespace"]
    return docs


def test_manifests_validate_against_the_kubernetes_schema():
    docs = manifests()
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "ConfigMap", "Deployment", "NetworkPolicy", "PersistentVolumeClaim", "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises on any unknown or mistyped field
    bad = next(d for d in manifests() if d["kind"] == "Deployment")
    bad["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["gpu"] = {"count": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_manifests_wire_config_volume_probes_and_policy_together():
    docs = {d["metadata"]["name"] if d["kind"] == "ConfigMap" else d["kind"]: d for d in manifests()}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {p["httpGet"]["path"] for p in (container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe"))} == {"/metrics"}
    config = docs["torchserve-config"]["data"]["config.properties"]
    assert container["envFrom"] == [{"configMapRef": {"name": "torchserve-handler"}}]
    assert docs["torchserve-handler"]["data"]["SERVE_MAX_IMAGE_PIXELS"] == str(compose([]).serve.max_image_pixels)
    assert docs["torchserve-handler"]["data"]["SERVE_MAX_INSTANCES"] == str(compose([]).serve.max_instances)
    assert "disable_token_authorization=false" in config and "enable_model_api=true" in config
    assert "model_store=/mnt/torchserve/model-store" in config and container["workingDir"] == "/mnt/torchserve/state"
    cfg = compose([])
    d = cfg.pipeline.deploy
    assert f"{d.volume_path}/{d.model_store}" == "/mnt/torchserve/model-store" and f"{d.volume_path}/{d.key_file}".startswith(container["workingDir"])
    management = docs["NetworkPolicy"]["spec"]["ingress"][1]
    assert management["ports"] == [{"port": "management"}]
    assert management["from"][0]["podSelector"]["matchLabels"] == {"kfp-dvc-template/role": "deploy"}  # set by pipelines/graph.py
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"inference": cfg.serve.inference_port, "management": cfg.serve.management_port, "metrics": cfg.serve.metrics_port}


def test_the_shared_volume_is_generated_from_conf_pipeline_with_its_storage_class_and_access_mode():
    assert generated(compose([]))[PVC_FILE] == PVC_FILE.read_text()
    default = volume_claim(compose([]))
    assert default["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "5Gi"}}}  # the cluster's default class
    claim = volume_claim(compose(["pipeline.deploy.storage_class=efs-sc", "pipeline.deploy.access_mode=ReadWriteOnce",
                                  "pipeline.deploy.storage_size=20Gi", "pipeline.deploy.model_store_pvc=models"]))
    assert claim["metadata"]["name"] == "models"
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "20Gi"}}, "storageClassName": "efs-sc"}
    kubernetes_validate.validate(claim, KUBERNETES_VERSION, strict=True)


@pytest.mark.integration
def test_kubectl_kustomize_builds_both_kustomizations():
    """`kubectl kustomize` (offline) builds what `kubectl apply -k` would apply; every object validates."""
    for folder in (K8S, K8S / "kserve"):
        built = run(["kubectl", "kustomize", str(folder)], ROOT).stdout
        kinds = [doc["kind"] for doc in yaml.safe_load_all(built)]
        assert kinds, folder
    docs = list(yaml.safe_load_all(run(["kubectl", "kustomize", str(K8S)], ROOT).stdout))
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert {d["kind"] for d in docs} == {"ConfigMap", "Deployment", "NetworkPolicy", "PersistentVolumeClaim", "Service"}


@pytest.mark.integration
def test_a_read_write_once_volume_pins_torchserve_to_the_node_of_the_deploy_step(tmp_path):
    """Both pods mount the volume: with ReadWriteOnce, the Deployment `kubectl apply -k` applies runs on the node(s) the
    compiled deploy step is pinned to, both from pipeline.deploy.node_selector."""
    cfg = compose(["pipeline.deploy.access_mode=ReadWriteOnce", "+pipeline.deploy.node_selector={kubernetes.io/hostname: node-a}",
                   "pipeline.deploy.management_url=http://torchserve:8081", "pipeline.deploy.inference_url=http://torchserve:8080",
                   "pipeline.deploy.model_store_pvc=torchserve-store"])
    folder = shutil.copytree(K8S, tmp_path / "k8s", ignore=shutil.ignore_patterns("*.py", "__pycache__", "kserve"))
    for path, text in generated(cfg).items():
        if path.parent == K8S:
            (folder / path.name).write_text(text)
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all(run(["kubectl", "kustomize", str(folder)], ROOT).stdout)}
    for doc in docs.values():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert docs["Deployment"]["spec"]["template"]["spec"]["nodeSelector"] == {"kubernetes.io/hostname": "node-a"}
    spec = tmp_path / "pipeline.yaml"
    compiler.Compiler().compile(training_pipeline(cfg, "c0ffee", {"data_repo": "", "data_rev": "", "data_uri": "s3://bucket/raw"}), str(spec))
    deploy = list(yaml.safe_load_all(spec.read_text()))[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-deploy-op"]
    assert deploy["nodeSelector"] == {"labels": {"kubernetes.io/hostname": "node-a"}}
    assert deploy["pvcMount"][0]["constant"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
    with pytest.raises(ConfigError, match="pipeline.deploy.access_mode=ReadWriteOnce: TorchServe and the deploy step must share one node"):
        generated(compose(["pipeline.deploy.access_mode=ReadWriteOnce"]))


@pytest.mark.integration
def test_config_properties_is_generated_from_conf_serve():
    assert CONFIG_FILE.read_text() == cluster_config_properties(compose([]))
    assert HANDLER_ENV_FILE.read_text() == cluster_handler_env(compose([]))
    assert run([sys.executable, "-m", "serve.k8s", "--check"], ROOT).stdout.strip() == (
        "config.properties, handler.env, kserve/config.properties, kserve/inferenceservice.yaml, pvc.yaml, placement.yaml match conf/serve")
    stale = run([sys.executable, "-m", "serve.k8s", "--check", "serve.workers=3"], ROOT, check=False)
    assert stale.returncode == 2 and "config.properties: stale; regenerate it with `python -m serve.k8s`" in stale.stderr


# --- a real TorchServe started as the Deployment starts it ------------------------------------

@contextlib.contextmanager
def torchserve_like_the_deployment(cfg, volume: Path) -> Iterator[None]:
    """The Deployment's command, config (bound to loopback) and folders."""
    config = volume.parent / "config.properties"
    config.write_text(cluster_config_properties(cfg, bind="127.0.0.1", volume=volume))
    for folder in ("model-store", "state"):
        (volume / folder).mkdir(parents=True, exist_ok=True)
    (container,) = next(d for d in manifests() if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"]
    command = container["command"][-1].replace("/etc/torchserve/config.properties", str(config)).replace(
        "/mnt/torchserve/model-store", str(volume / "model-store"))
    env = dict(line.split("=", 1) for line in cluster_handler_env(cfg, volume=volume).splitlines())  # the ConfigMap's env
    with torchserve(["sh", "-c", command], volume / "state", env, volume / "tmp", f"http://127.0.0.1:{cfg.serve.metrics_port}/metrics"):
        yield


@contextlib.contextmanager
def torchserve(command: list[str], cwd: Path, env: dict[str, str], tmp: Path, probe: str) -> Iterator[None]:
    """TorchServe started by `command` in `cwd` with the handler's `env` (its temp files and logs under `tmp`), in a
    process group stopped afterwards; yields once `probe` answers as the startup probe wants it."""
    (tmp / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp), "LOG_LOCATION": str(tmp / "logs"), "METRICS_LOCATION": str(tmp / "logs"), **env,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    with open(tmp / "console.log", "wb") as console:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=console, stderr=console, start_new_session=True)
    try:
        wait_for_probe(probe, process, tmp / "console.log")
        yield
    finally:
        java = psutil.Process(process.pid).children(recursive=True) if process.poll() is None else []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        psutil.wait_procs(java, timeout=60)
        process.wait(timeout=60)


def wait_for_probe(url: str, process: subprocess.Popen, console: Path) -> None:
    """What the startup probe does: GET without any token until it answers 200."""
    for _ in range(600):
        assert process.poll() is None, f"TorchServe exited during start:\n{console.read_text()[-3000:]}"
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(url)


@pytest.fixture(scope="module")
def packaged(digits_run, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("k8s") / "package"
    manifest = package(digits_run["cfg"], digits_run["prepared"], digits_run["model"], out)
    return {"mar": out / manifest["mar"]["file"], "version": manifest["version"]}


@pytest.mark.integration
def test_the_deploy_step_against_a_torchserve_configured_like_the_manifests(packaged, tmp_path):
    cfg = compose([f"serve.{key}={port}" for key, port in zip(PORT_KEYS, free_ports(len(PORT_KEYS)))])
    s, volume = cfg.serve, tmp_path / "volume"
    management, inference = f"http://127.0.0.1:{s.management_port}", f"http://127.0.0.1:{s.inference_port}"
    key_file = volume / "state" / "key_file.json"
    seen = []
    for restart in range(2):  # TorchServe writes new keys at every start: the deploy step reads them, never a stale copy
        with torchserve_like_the_deployment(cfg, volume):
            assert requests.get(f"{inference}/ping", timeout=5).status_code == 400  # why the probes use /metrics
            keys = server_keys(str(key_file), management, s.token_expiration_min)
            seen.append(keys["management"])
            record = deploy(cfg, packaged["mar"], packaged["version"], management, keys["management"], inference_url=inference,
                            inference_token=keys["inference"], model_store=volume / "model-store")
            assert record["endpoint"] == f"{inference}/predictions/digits"
            if restart:
                data = json.loads(key_file.read_text())  # as if the key were about to expire
                data["management"]["expiration time"] = "2000-01-01T00:00:00.000000000Z"
                key_file.write_text(json.dumps(data))
                renewed = server_keys(str(key_file), management, s.token_expiration_min)
                assert renewed["management"] != keys["management"]
                listed = requests.get(f"{management}/models", headers={"Authorization": f"Bearer {renewed['management']}"}, timeout=10)
                assert listed.status_code == 200 and listed.json()["models"][0]["modelName"] == "digits"
    assert seen[0] != seen[1]


@pytest.mark.integration
def test_a_torchserve_run_like_the_kserve_runtime_serves_the_storage_uri_layout_over_v2(packaged, tmp_path):
    cfg = compose([f"serve.{key}={port}" for key, port in zip(PORT_KEYS, free_ports(len(PORT_KEYS)))])
    s, name = cfg.serve, cfg.package.model_name
    models, home = tmp_path / "models", tmp_path / "home"  # what the storage initializer fills (/mnt/models); the working dir
    for folder in (models / "config", models / "model-store", home):
        folder.mkdir(parents=True)
    (models / "config" / "config.properties").write_text(kserve_config_properties(cfg, bind="127.0.0.1", models=models))
    shutil.copy(packaged["mar"], models / "model-store" / f"{name}.mar")  # as `python -m serve.k8s` documents the upload
    (container,) = next(d for d in kserve_manifests(cfg) if d["kind"] == "ServingRuntime")["spec"]["containers"]
    command = [*container["command"], *(arg.replace(str(MODELS), str(models)) for arg in container["args"])]
    env = {e["name"]: e["value"].replace(str(HOME), str(home)) for e in container["env"]}
    probe = container["readinessProbe"]["httpGet"]
    with torchserve(command, home, env, tmp_path / "tmp", f"http://127.0.0.1:{probe['port']}{probe['path']}"):
        inference = f"http://127.0.0.1:{s.inference_port}"
        assert requests.get(f"{inference}/ping", timeout=5).status_code == 400  # why the probes use /metrics
        body = {"id": "kserve-1", "inputs": [{"name": "image", "shape": [2, 1, 32, 32], "datatype": "UINT8", "data": [0] * 2048}]}
        token = {"Authorization": f"Bearer {read_keys(home / 'key_file.json')['inference']}"}
        response = requests.post(f"{inference}/v2/models/{name}/infer", json=body, headers=token, timeout=30)
        assert response.status_code == 200, response.text  # loaded at start (load_models): nothing registered it
        answer = response.json()
        assert (answer["id"], answer["model_name"], answer["model_version"]) == ("kserve-1", name, packaged["version"])
        assert answer["outputs"][0]["shape"] == [2, 10]
        assert requests.post(f"{inference}/v2/models/{name}/infer", json=body, timeout=30).status_code == 400  # token auth is on
