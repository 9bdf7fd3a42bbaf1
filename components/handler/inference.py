"""The model on onnxruntime: the signature's preprocessing, the session, probabilities, top-k."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


def normalize(pixels: np.ndarray, signature: dict) -> np.ndarray:
    """(N, C, H, W) pixels in [0, 255] -> the model input (same arithmetic as training)."""
    norm = signature["input"]["normalization"]
    mean = np.asarray(norm["mean"], dtype=np.float32).reshape(1, -1, 1, 1) * np.float32(255)
    std = np.asarray(norm["std"], dtype=np.float32).reshape(1, -1, 1, 1) * np.float32(255)
    return (pixels.astype(np.float32) - mean) / std


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def create_session(model_file: Path, threads: int) -> ort.InferenceSession:
    """A CPU session with `threads` intra-op threads (0: onnxruntime's default)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Spinning pool threads would steal the cores TorchServe's frontend needs between requests.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])


def probabilities(session: ort.InferenceSession, pixels: np.ndarray, signature: dict) -> np.ndarray:
    """(N, C, H, W) pixels in [0, 255] -> (N, classes) probabilities."""
    return softmax(session.run(None, {signature["input"]["name"]: normalize(pixels, signature)})[0])


def top_k(probs: np.ndarray, signature: dict) -> list[list[dict]]:
    """Per row, the signature's top-k labels with their probabilities, most probable first."""
    classes = signature["output"]["classes"]
    k = min(signature["output"]["top_k"], len(classes))
    return [[{"label": classes[c], "probability": round(row[c], 6)} for c in sorted(range(len(row)), key=row.__getitem__, reverse=True)[:k]]
            for row in probs.tolist()]
