"""package: the trained model as ONNX (checked against torch) and as a TorchServe archive.

Outputs (in `out_dir`): model.onnx (signature + lineage in its metadata), signature.json,
<model_name>.mar (handler, model, signature, reference statistics), reference_stats.json
(from prepare, for drift), samples/ (test images for the deploy smoke test) and
package.json (version, sha256 of the .mar, the parity check passed, samples, lineage).
"""

from __future__ import annotations

from components.core.cli import run_step, step_command

if __name__ == "__main__":  # before the imports below (torch, onnxruntime): a bad config is refused at once
    command = step_command("Export the trained model to ONNX and build the TorchServe archive.",
                           prepared="artifacts/prepared", model="artifacts/model", out="artifacts/package")

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from omegaconf import DictConfig
from PIL import Image

from components.core.config.sections import select
from components.core.paths import ROOT
from components.data.dataset import load_prepared
from components.core.errors import DataError, StepError
from components.core.io import atomic_dir, file_digest, write_bytes_atomic, write_json
from components.core.lineage import lineage
from components.core.numerics import activate
from components.model.networks import load_trained
from components.packaging.archive import make_reproducible
from components.packaging.onnx import check_parity, embed_metadata, export_onnx, model_signature, onnx_logits

SECTIONS = ("package", "numerics")  # the config this step reads: its DVC params and its config hash
# What the .mar carries beside the model: the handler TorchServe loads, the modules it imports (tests/test_package.py
# checks this is their whole import closure), the features and prediction log its telemetry uses. Part of this step's
# code hash and DVC deps; a literal, which components/core/lineage.py reads from this file.
CODE_FILES = ("components/drift/__init__.py", "components/drift/features.py", "components/drift/prediction_log.py",
              "components/handler/__init__.py", "components/handler/handler.py", "components/handler/inference.py",
              "components/handler/request.py", "components/handler/settings.py", "components/handler/telemetry.py")
HANDLER = "components/handler/handler.py"  # TorchServe's entry, at the archive's root
ARCHIVER = shutil.which("torch-model-archiver", path=Path(sys.executable).parent) or "torch-model-archiver"


class ArchiveError(StepError):
    pass


def _carry_code(extras: Path) -> None:
    """CODE_FILES but the handler below `extras`, importable; components/__init__.py is empty in the archive
    (the project's own checks this machine's environment, not the server's)."""
    (extras / "components").mkdir(parents=True)
    (extras / "components" / "__init__.py").touch()
    for name in CODE_FILES:
        if name != HANDLER:
            (extras / name).parent.mkdir(exist_ok=True)
            shutil.copyfile(ROOT / name, extras / name)


def build_mar(model_name: str, version: str, package_dir: Path, handler: Path = ROOT / HANDLER) -> Path:
    """torch-model-archiver: handler + model.onnx + signature + reference statistics + the code the handler imports."""
    with tempfile.TemporaryDirectory() as scratch:
        extras = Path(scratch) / "extras"
        _carry_code(extras)
        for name in ("signature.json", "reference_stats.json"):
            shutil.copy(package_dir / name, extras)
        command = [ARCHIVER, "--model-name", model_name, "--version", version,
                   "--serialized-file", str(package_dir / "model.onnx"), "--handler", str(handler),
                   "--extra-files", str(extras), "--export-path", str(package_dir), "--force"]
        # The archiver stages files in $TMPDIR/<model_name>: a private TMPDIR keeps parallel builds apart.
        result = subprocess.run(command, env={**os.environ, "TMPDIR": scratch}, capture_output=True, text=True)
    if result.returncode != 0:
        raise ArchiveError(f"torch-model-archiver failed for {model_name}: {result.stderr.strip()[-2000:]}")
    make_reproducible(package_dir / f"{model_name}.mar")
    return package_dir / f"{model_name}.mar"


def write_samples(out: Path, pixels: np.ndarray, labels: list[str], expected: list[str]) -> list[dict]:
    """Test images as PNG files, with the label and the prediction the server must reproduce."""
    samples = []
    for i, (image, label, prediction) in enumerate(zip(pixels, labels, expected)):
        buffer = io.BytesIO()
        Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(buffer, format="PNG")
        write_bytes_atomic(out / f"samples/{i:02d}.png", buffer.getvalue())
        samples.append({"file": f"samples/{i:02d}.png", "label": label, "expected": prediction})
    return samples


def package(cfg: DictConfig, prepared_dir: str | Path, model_dir: str | Path, out_dir: str | Path) -> dict:
    cfg = select(cfg, SECTIONS)
    p = cfg.package
    prepared = load_prepared(prepared_dir)
    model, norm, spec = load_trained(model_dir)
    if spec["classes"] != prepared.meta["classes"] or spec["image_size"] != prepared.meta["image_size"]:
        raise DataError(f"{model_dir}: trained on other classes or image size than {prepared_dir}; re-run train")
    pixels, index = prepared.split("test")
    if len(pixels) == 0:
        raise DataError(f"{prepared_dir}: the test split is empty; parity cannot be checked")
    signature = model_signature(spec, p.top_k)
    run_lineage = lineage(cfg, __spec__.name, code_files=CODE_FILES, numerics=activate(cfg.numerics.profile, cfg.numerics.threads))

    with atomic_dir(out_dir) as tmp:
        onnx_path = tmp / "model.onnx"
        export_onnx(model, signature, onnx_path, p.opset_version)
        parity = check_parity(onnx_path, model, norm, pixels, signature, p.parity_atol)
        embed_metadata(onnx_path, {"signature": json.dumps(signature, sort_keys=True), "model_lineage": json.dumps(spec["lineage"], sort_keys=True),
                                   **{key: value if isinstance(value, str) else json.dumps(value, sort_keys=True) for key, value in run_lineage.items()}})
        write_json(tmp / "signature.json", signature)
        shutil.copyfile(Path(prepared_dir) / "reference_stats.json", tmp / "reference_stats.json")
        # The version names what the server runs: model, signature, reference and the handler's code.
        served = [onnx_path, tmp / "signature.json", tmp / "reference_stats.json", *(ROOT / name for name in CODE_FILES)]
        version = hashlib.sha256(b"".join(path.read_bytes() for path in served)).hexdigest()[:12]

        chosen = np.linspace(0, len(pixels) - 1, min(p.smoke_samples, len(pixels))).astype(int)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        predicted = onnx_logits(session, pixels[chosen], signature).argmax(1)
        samples = write_samples(tmp, pixels[chosen], index["label"].iloc[chosen].tolist(), [spec["classes"][c] for c in predicted])

        mar = build_mar(p.model_name, version, tmp)
        manifest = {
            "model_name": p.model_name,
            "version": version,
            "mar": {"file": mar.name, "sha256": file_digest(mar)},
            "parity": parity,
            "samples": samples,
            "lineage": {**run_lineage, "model": spec["lineage"]},
        }
        write_json(tmp / "package.json", manifest)
    return manifest


def summary(manifest: dict, args) -> str:
    parity = manifest["parity"]
    return (f"package: {manifest['model_name']} version {manifest['version']}, ONNX matches torch within {parity['atol']:.0e} "
            f"on {parity['images']} test images -> {args.out}/{manifest['mar']['file']}")


if __name__ == "__main__":
    run_step(command, package, summary)
