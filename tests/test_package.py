"""package: ONNX export and parity, signature, lineage in the metadata, the .mar contents."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml

from components.core.config.compose import compose
from components.core.config.sections import config_hash, select
from components.core.errors import ConfigError
from components.core.io import file_digest
from components.core.lineage import code_hash, source_files
from components.core.paths import ROOT
from components.data.dataset import decode, load_prepared
from components.drift.features import image_features, intensity
from components.handler.request import PixelBudget, decode_image
from components.model.networks import load_trained
from components.package import CODE_FILES, HANDLER, SECTIONS, package
from components.packaging.onnx import ParityError, check_parity, onnx_logits


def test_the_mar_carries_exactly_the_handlers_import_closure():
    """Beyond what importing the `components` package itself runs (an empty file in the archive)."""
    handler_module = HANDLER.removesuffix(".py").replace("/", ".")
    assert set(source_files(handler_module)) - set(source_files("components")) == set(CODE_FILES)


@pytest.mark.integration
def test_onnx_model_passes_the_checker_and_matches_torch(packaged):
    out, manifest = packaged["out"], packaged["manifest"]
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    parity = manifest["parity"]
    assert parity["images"] == len(load_prepared(packaged["prepared"]).split("test")[0]) > 200
    assert parity == {"images": parity["images"], "argmax_agreement": 1.0, "atol": 1e-4}  # what passed; the measured
    # difference is onnxruntime's on this CPU (its kernels follow the ISA), so no committed byte holds it


@pytest.mark.integration
def test_batch_axis_is_dynamic(packaged):
    model = onnx.load(str(packaged["out"] / "model.onnx"))
    assert model.graph.input[0].name == "image"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic, not a fixed size
    session = ort.InferenceSession(str(packaged["out"] / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 7, 64):
        assert session.run(None, {"image": np.zeros((batch, 1, 32, 32), np.float32)})[0].shape == (batch, 10)


@pytest.mark.integration
def test_signature_describes_input_preprocessing_and_classes(packaged):
    signature = json.loads((packaged["out"] / "signature.json").read_text())
    prepared = json.loads((packaged["prepared"] / "prepared.json").read_text())
    assert signature["input"]["name"] == "image" and signature["input"]["dtype"] == "float32"
    assert signature["input"]["shape"] == [None, 1, 32, 32]
    assert signature["input"]["color_mode"] == "L" and signature["input"]["channels"] == 1
    assert signature["input"]["resize"] == {"height": 32, "width": 32, "interpolation": "bilinear"}
    assert signature["input"]["normalization"]["mean"] == prepared["normalization"]["mean"]
    assert signature["input"]["normalization"]["std"] == prepared["normalization"]["std"]
    assert signature["output"]["classes"] == [str(d) for d in range(10)]
    assert signature["output"]["top_k"] == 3


@pytest.mark.integration
def test_onnx_metadata_carries_signature_and_lineage(packaged):
    props = {p.key: p.value for p in onnx.load(str(packaged["out"] / "model.onnx")).metadata_props}
    assert json.loads(props["signature"]) == json.loads((packaged["out"] / "signature.json").read_text())
    assert "git_commit" not in props
    assert props["data_hash"] == yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]["md5"]
    assert props["config_hash"] == config_hash(select(packaged["cfg"], SECTIONS))
    assert props["code_hash"] == code_hash("components.package", CODE_FILES)
    model_spec = json.loads((packaged["model"] / "model.json").read_text())
    assert json.loads(props["model_lineage"]) == model_spec["lineage"]
    assert packaged["manifest"]["lineage"]["config_hash"] == props["config_hash"]


@pytest.mark.integration
def test_mar_holds_handler_model_signature_and_features(packaged):
    out, manifest = packaged["out"], packaged["manifest"]
    mar = out / "digits.mar"
    assert manifest["mar"] == {"file": "digits.mar", "sha256": file_digest(mar)}
    with zipfile.ZipFile(mar) as z:
        assert set(z.namelist()) == {"MAR-INF/MANIFEST.json", "handler.py", "model.onnx", "signature.json",
                                     "reference_stats.json", "components/__init__.py", "components/drift/__init__.py",
                                     "components/drift/features.py", "components/drift/prediction_log.py",
                                     *(f"components/handler/{name}.py"
                                       for name in ("__init__", "inference", "request", "settings", "telemetry"))}
        assert z.read("components/__init__.py") == b""  # the project's checks this machine's interpreter, not the server's
        mar_manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        assert z.read("model.onnx") == (out / "model.onnx").read_bytes()
        assert z.read("handler.py") == (ROOT / "components" / "handler" / "handler.py").read_bytes()
        assert z.read("reference_stats.json") == (packaged["prepared"] / "reference_stats.json").read_bytes()
    assert mar_manifest["model"] == {"modelName": "digits", "modelVersion": manifest["version"],
                                     "serializedFile": "model.onnx", "handler": "handler.py"}


@pytest.mark.integration
def test_the_archived_handler_imports_only_what_it_carries_numpy_pil_and_onnxruntime(packaged, tmp_path):
    """Unpacked as TorchServe does, the handler loads the archive's own components/ and no other package."""
    with zipfile.ZipFile(packaged["out"] / "digits.mar") as z:
        z.extractall(tmp_path)
    code = ("import sys; sys.path.insert(0, '.'); import handler, components; print(components.__file__); "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names))))")
    shown = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True).stdout.splitlines()
    assert shown[0] == str(tmp_path / "components" / "__init__.py")
    assert {name for name in shown[1].split() if not name.startswith("_")} == {"handler", "components", "numpy", "PIL", "onnxruntime"}


@pytest.mark.integration
def test_samples_and_handler_preprocessing_reproduce_prepare(packaged):
    """The handler decodes a raw data file exactly as prepare did, and the samples' expected
    labels are the in-process ONNX predictions."""
    cfg, out, manifest = packaged["cfg"], packaged["out"], packaged["manifest"]
    signature = json.loads((out / "signature.json").read_text())
    def handler_decode(data: bytes) -> np.ndarray:
        return decode_image(data, signature, PixelBudget(cfg.serve.max_image_pixels))

    for file in sorted((ROOT / "data").glob("*/*.png"))[:20]:
        assert np.array_equal(handler_decode(file.read_bytes()), decode(file, 1, (32, 32)))
    test_images = np.array(load_prepared(packaged["prepared"]).split("test")[0])
    cheap, full = intensity(test_images), image_features(test_images)  # the handler's per-request metrics
    assert all(np.array_equal(cheap[name], full[name]) for name in ("brightness", "contrast"))
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    pixels = np.stack([handler_decode((out / s["file"]).read_bytes()) for s in manifest["samples"]])
    predicted = onnx_logits(session, pixels, signature).argmax(1)
    assert [s["expected"] for s in manifest["samples"]] == [signature["output"]["classes"][c] for c in predicted]
    assert len(manifest["samples"]) == cfg.package.smoke_samples


@pytest.mark.integration
def test_parity_failure_is_detected(packaged, tmp_path):
    out = packaged["out"]
    model, norm, _ = load_trained(packaged["model"])
    signature = json.loads((out / "signature.json").read_text())
    pixels = np.array(load_prepared(packaged["prepared"]).split("test")[0][:64])

    def tampered(shift: np.ndarray):
        graph = onnx.load(str(out / "model.onnx"))
        bias = next(t for t in graph.graph.initializer if t.dims == [10])  # the last layer's bias
        values = onnx.numpy_helper.to_array(bias) + shift.astype(np.float32)
        bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
        path = tmp_path / "tampered.onnx"
        onnx.save(graph, str(path))
        return path

    small = tampered(np.full(10, 1e-3))  # every logit off by 1e-3, same ranking
    with pytest.raises(ParityError) as err:
        check_parity(small, model, norm, pixels, signature, atol=1e-4)
    report = json.loads(str(err.value).split("test split (")[1].split("); ")[0])
    assert report["argmax_agreement"] == 1.0 and report["max_abs_diff"] == pytest.approx(1e-3, abs=1e-5)
    flipped = tampered(np.eye(10)[0] * 1e3)  # class 0 always wins
    with pytest.raises(ParityError) as err:
        check_parity(flipped, model, norm, pixels, signature, atol=1e9)
    report = json.loads(str(err.value).split("test split (")[1].split("); ")[0])
    assert report["argmax_agreement"] < 0.5


@pytest.mark.integration
def test_export_is_deterministic(packaged, tmp_path):
    again = package(packaged["cfg"], packaged["prepared"], packaged["model"], tmp_path / "again")
    assert again["version"] == packaged["manifest"]["version"]
    assert (tmp_path / "again" / "model.onnx").read_bytes() == (packaged["out"] / "model.onnx").read_bytes()


@pytest.mark.integration
def test_cli_missing_model_is_one_line_exit_2_and_leaves_nothing(digits_run, tmp_path):
    result = subprocess.run([sys.executable, "-m", "components.package", "--prepared", str(digits_run["prepared"]),
                             "--model", str(tmp_path / "none"),
                             "--out", str(tmp_path / "package")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'none'}: no trained model (model.json + model.safetensors); run the train step first"]
    assert not (tmp_path / "package").exists()


@pytest.mark.parametrize("override,message", [
    ("serve.host=0.0.0.0", "serve.host must be a loopback IP address"),
    ("serve.metrics_port=8080", "must be distinct"),
    ("package.model_name=my/model", "package.model_name must be"),
    ("serve.prediction_log.sample_rate=2", "serve.prediction_log.sample_rate must be between 0 and 1, got 2.0"),
])
def test_bad_package_and_serve_config_names_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        compose([override])
    assert message in str(err.value)


def test_a_small_model_is_exported_checked_and_archived_in_process(tiny_package):
    """The fast tier's package step: a 3-class 1x16x16 model through export, parity, signature and archive."""
    out, manifest = tiny_package["out"], tiny_package["manifest"]
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    assert manifest["parity"] == {"images": manifest["parity"]["images"], "argmax_agreement": 1.0, "atol": 1e-4}
    signature = json.loads((out / "signature.json").read_text())
    assert signature["input"]["shape"] == [None, 1, 16, 16] and signature["output"]["classes"] == ["a", "b", "c"]
    with zipfile.ZipFile(out / manifest["mar"]["file"]) as z:
        assert {"handler.py", "model.onnx", "signature.json", "reference_stats.json", "components/handler/request.py"} <= set(z.namelist())
    assert manifest["mar"]["sha256"] == file_digest(out / manifest["mar"]["file"])
