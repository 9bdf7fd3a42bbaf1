"""TorchServe on KServe (serve/k8s/kserve/): what `kubectl apply -k` applies validates against
KServe's own CRD schemas (vendored from a KServe release, checked strictly as `kubectl apply`
does: unknown fields are errors), a broken manifest is rejected, and the manifests and the
config.properties of the storageUri agree with conf/serve, which generates them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from components.core.config.compose import compose
from components.core.paths import ROOT
from serve.k8s.__main__ import KSERVE_CONFIG_FILE, KSERVE_MANIFEST_FILE, MODELS, generated, kserve_manifests, service_name

KSERVE = ROOT / "serve" / "k8s" / "kserve"
SCHEMAS = json.loads((Path(__file__).parent / "schemas" / "kserve-v0.20.0.json").read_text())


def strict(schema):
    """The schema with unknown fields refused wherever it lists the known ones (kubectl's strict field validation)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


VALIDATORS = {kind: jsonschema.Draft7Validator(strict(s["openAPIV3Schema"])) for kind, s in SCHEMAS.items() if kind != "$comment"}


def validate(doc: dict) -> None:
    """Raises jsonschema.ValidationError unless `doc` is a valid object of a KServe kind at the vendored API version."""
    assert doc["apiVersion"] == SCHEMAS[doc["kind"]]["apiVersion"], doc["apiVersion"]
    VALIDATORS[doc["kind"]].validate(doc)


def manifests() -> list[dict]:
    """What `kubectl apply -k serve/k8s/kserve` applies: the resources, the image set, the JSON patches (`add` ops) applied."""
    kustomization = yaml.safe_load((KSERVE / "kustomization.yaml").read_text())
    docs = [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((KSERVE / name).read_text())]
    (image,) = kustomization["images"]
    for doc in docs:
        for container in doc["spec"].get("containers", []):
            assert container["image"] == image["name"]
            container["image"] = f"{image['newName']}:{image['newTag']}"
    for patch in kustomization["patches"]:
        for op in yaml.safe_load(patch["patch"]):
            assert op["op"] == "add"
            *parents, key = op["path"].strip("/").split("/")
            for doc in (d for d in docs if d["kind"] == patch["target"]["kind"]):
                node = doc
                for part in parents:
                    node = node[part]
                node[key] = op["value"]
    return docs


def test_manifests_validate_against_kserve_schemas():
    docs = manifests()
    assert [d["kind"] for d in docs] == ["ServingRuntime", "InferenceService"]
    for doc in docs:
        validate(doc)


@pytest.mark.parametrize("kind, path, value", [
    ("InferenceService", ["spec", "predictor", "model", "protocolVersion"], 2),                # a string in the schema
    ("InferenceService", ["spec", "predictor", "model", "storageURI"], "s3://bucket/model"),   # misspelled: unknown field
    ("InferenceService", ["spec", "predictor", "minReplicas"], "one"),
    ("ServingRuntime", ["spec", "containers", 0, "ports", 0, "containerPort"], "8080"),
    ("ServingRuntime", ["spec", "supportedModelFormats"], {"name": "pytorch"}),                 # a list in the schema
])
def test_a_broken_manifest_is_rejected(kind, path, value):
    doc = copy.deepcopy(next(d for d in manifests() if d["kind"] == kind))
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        validate(doc)


def test_manifests_and_storage_config_agree_with_conf_serve():
    cfg = compose([])
    s, name = cfg.serve, cfg.package.model_name
    runtime, service = manifests()
    (container,) = runtime["spec"]["containers"]
    model = service["spec"]["predictor"]["model"]
    assert service["metadata"]["name"] == service_name(name) == "digits" and model["runtime"] == runtime["metadata"]["name"]
    # RawDeployment works on every KServe; KServe <= 0.15 does not know "Standard" and falls back to Serverless (Knative)
    assert service["metadata"]["annotations"] == {"serving.kserve.io/deploymentMode": "RawDeployment"}
    assert model["protocolVersion"] == "v2" and "v2" in runtime["spec"]["protocolVersions"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["storageUri"].startswith("s3://")
    assert container["ports"] == [{"containerPort": s.inference_port, "protocol": "TCP"}]
    probes = [container[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")]
    assert probes == [{"path": "/metrics", "port": s.metrics_port}] * 3  # no token needed, as for the Deployment
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == str(s.metrics_port)
    pod = service["spec"]["predictor"]["securityContext"]
    assert pod["runAsNonRoot"] is True and container["securityContext"]["allowPrivilegeEscalation"] is False
    assert model["resources"]["limits"] and model["resources"]["requests"]
    # KServe's layout of the storageUri: config/config.properties and model-store/<name>.mar, under /mnt/models
    assert container["args"][-2:] == [f"--model-store={MODELS}/model-store", f"--ts-config={MODELS}/config/config.properties"]
    config = dict(line.split("=", 1) for line in KSERVE_CONFIG_FILE.read_text().splitlines() if not line.startswith("#"))
    assert config["inference_address"] == f"http://0.0.0.0:{s.inference_port}" and config["metrics_address"] == f"http://0.0.0.0:{s.metrics_port}"
    assert config["management_address"] == f"http://127.0.0.1:{s.management_port}"
    assert config["model_store"] == f"{MODELS}/model-store" and config["load_models"] == f"{name}={name}.mar"
    assert config["disable_token_authorization"] == "false"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["SERVE_MAX_IMAGE_PIXELS"] == str(s.max_image_pixels) and env["SERVE_PREDICTION_LOG"].startswith(container["workingDir"])
    assert env["SERVE_MAX_INSTANCES"] == str(s.max_instances)


def test_the_kserve_files_are_generated_from_conf_serve():
    files = generated(compose([]))
    assert files[KSERVE_MANIFEST_FILE] == KSERVE_MANIFEST_FILE.read_text()
    assert files[KSERVE_CONFIG_FILE] == KSERVE_CONFIG_FILE.read_text()
    other = generated(compose(["serve.inference_port=9080", "package.model_name=mnist"]))
    runtime, service = yaml.safe_load_all(other[KSERVE_MANIFEST_FILE])
    assert service["metadata"]["name"] == "mnist" and runtime["spec"]["containers"][0]["ports"][0]["containerPort"] == 9080
    assert "load_models=mnist=mnist.mar" in other[KSERVE_CONFIG_FILE]
    for model_name, service in (("My_Model", "my-model"), ("3d", "model-3d")):  # an object name is a DNS label
        assert kserve_manifests(compose([f"package.model_name={model_name}"]))[1]["metadata"]["name"] == service
