"""ONNX export of a trained model: dynamo exporter with a dynamic batch axis, the model
signature, onnx.checker, parity with torch, and metadata (signature + lineage) in the file.

The ONNX model takes normalised float32 (N, C, H, W); the preprocessing that produces it
(decode, colour mode, resize, normalisation) is written in the signature and run by
components/handler/handler.py, whose functions the parity check uses too.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from components.core.errors import StepError
from components.handler.inference import normalize
from components.model.networks import Normalize, predict_logits

INPUT_NAME, OUTPUT_NAME = "image", "logits"


class ParityError(StepError):
    pass


def model_signature(spec: dict, top_k: int) -> dict:
    """What a client and the handler need to know: input layout and preprocessing, output classes."""
    channels, (height, width) = spec["channels"], spec["image_size"]
    return {
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "shape": [None, channels, height, width],
            "layout": "NCHW",
            "channels": channels,
            "color_mode": "L" if channels == 1 else "RGB",
            "resize": {"height": height, "width": width, "interpolation": "bilinear"},
            "normalization": {"formula": "(pixel - 255 * mean) / (255 * std)", **spec["normalization"]},
            "json_instances": "pixel values in [0, 255] shaped [channels, height, width]",
        },
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [None, len(spec["classes"])],
                   "classes": list(spec["classes"]), "activation": "softmax", "top_k": top_k},
    }


def export_onnx(model: nn.Module, signature: dict, path: Path, opset_version: int) -> None:
    example = torch.zeros(2, *signature["input"]["shape"][1:])
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        program = torch.onnx.export(
            model.eval(), (example,), dynamo=True, opset_version=opset_version, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    program.save(str(path), external_data=False)


def embed_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Write metadata_props into the model, then run the full onnx.checker on the result.

    The exporter annotates every node with the Python stack that made it (absolute paths of this
    checkout and of the venv): dropped, so the bytes depend on the model, not on where it was built."""
    model = onnx.load(str(path))
    for node in [*model.graph.node, *(n for f in model.functions for n in f.node)]:
        del node.metadata_props[:]
    onnx.helper.set_model_props(model, metadata)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def onnx_logits(session: ort.InferenceSession, pixels: np.ndarray, signature: dict, batch: int = 512) -> np.ndarray:
    outs = [session.run(None, {INPUT_NAME: normalize(pixels[i : i + batch], signature)})[0] for i in range(0, len(pixels), batch)]
    return np.concatenate(outs)


def check_parity(onnx_path: Path, model: nn.Module, norm: Normalize, pixels: np.ndarray, signature: dict, atol: float) -> dict:
    """torch vs onnxruntime on uint8 images: max |logit difference| <= atol and identical argmax.
    The record holds what passed, not the measured difference: onnxruntime picks its kernels by
    the CPU's ISA (nothing pins them), so that difference is this machine's, not the package's."""
    expected = predict_logits(model, norm, torch.from_numpy(pixels), torch.device("cpu")).numpy()
    got = onnx_logits(ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]), pixels, signature)
    max_diff = float(np.abs(expected - got).max())
    agreement = float((expected.argmax(1) == got.argmax(1)).mean())
    report = {"images": len(pixels), "argmax_agreement": agreement, "atol": atol}
    if not max_diff <= atol or agreement < 1.0:
        raise ParityError(f"{onnx_path}: ONNX output differs from torch on the test split "
                          f"({json.dumps(report | {'max_abs_diff': max_diff})}); "
                          "package.parity_atol bounds the difference")
    return report
