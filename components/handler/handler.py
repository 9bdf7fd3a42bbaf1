"""TorchServe handler: the packaged ONNX model run with onnxruntime.

A request is a PNG/JPEG image, JSON {"instances": [...]} or an Open Inference Protocol (KServe
v2) tensor (components/handler/request.py); the answer is the top-k labels with probabilities,
or the v2 outputs. A malformed request gets a 4xx and one message, alone: the rest of its batch
and the worker carry on. Its parts live beside it in components/handler/, which the archive carries.

To adapt it, replace one step (override its method); each keeps this contract, so the others
stay as they are:

- initialize(context): load the model and its settings once per worker.
- preprocess(data, context): each request -> ParsedRequest (its pixels) or RequestError.
- inference(pixels): float32 (N, C, H, W) pixels in [0, 255] -> (N, classes) probabilities.
- postprocess(parsed, probs, context): one JSON answer per request, statuses set on the context.

handle() only chains them. TorchServe loads the one class a handler file defines. Settings come
from environment variables set by components/torchserve/server.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from components.drift.prediction_log import LogWriter, PredictionLog
from components.handler.inference import create_session, probabilities, top_k
from components.handler.request import FORM_CONTENT_TYPE, ParsedRequest, RequestError, RequestLimits, request_images
from components.handler.settings import (
    ERROR_INTERVAL_ENV,
    LOG_BACKUPS_ENV,
    LOG_MAX_BYTES_ENV,
    LOG_QUEUE_LINES_ENV,
    MAX_INSTANCES_ENV,
    MAX_PIXELS_ENV,
    PREDICTION_LOG_ENV,
    SAMPLE_RATE_ENV,
    THREADS_ENV,
)
from components.handler.telemetry import Monitor


class OnnxImageClassifier:
    def initialize(self, context) -> None:
        """Signature, onnxruntime session and monitoring of the archive in context's model_dir."""
        model_dir = Path(context.system_properties["model_dir"])
        self.signature = json.loads((model_dir / "signature.json").read_text())
        self.classes = self.signature["output"]["classes"]
        self.model_name, self.version = context.model_name, context.manifest["model"]["modelVersion"]
        self.limits = RequestLimits(int(_required(MAX_PIXELS_ENV, "serve.max_image_pixels")),
                                    int(_required(MAX_INSTANCES_ENV, "serve.max_instances")))
        self.session = create_session(model_dir / "model.onnx", int(os.environ.get(THREADS_ENV, "0")))
        reference = json.loads((model_dir / "reference_stats.json").read_text())["features"]
        error_interval_s = float(_required(ERROR_INTERVAL_ENV, "serve.error_report_interval_s"))
        self.monitor = Monitor(context.metrics, self.model_name, self.version, self.classes,
                               {name: (h["edges"][0], h["edges"][-1]) for name, h in reference.items()},
                               _log_writer(error_interval_s), error_interval_s)
        self.monitor.start()

    def handle(self, data: list[dict], context) -> list[str]:
        parsed = self.preprocess(data, context)
        images = [request.pixels for request in parsed if isinstance(request, ParsedRequest)]
        probs = self.inference(np.concatenate(images)) if images else np.empty((0, len(self.classes)), np.float32)
        return self.postprocess(parsed, probs, context)

    def preprocess(self, data: list[dict], context) -> list[ParsedRequest | RequestError]:
        """Each request parsed on its own: whatever one holds, it cannot fail the others."""
        parsed = []
        for i, row in enumerate(data):
            try:
                if _header(context, i, "content-type").startswith(FORM_CONTENT_TYPE):
                    raise RequestError("the body was sent as a form (Content-Type: application/x-www-form-urlencoded, "
                                       "curl's default for --data-binary); send it with -H 'Content-Type: image/png'", 415)
                parsed.append(request_images(row, self.signature, self.limits))
            except RequestError as exc:
                parsed.append(exc)
            except Exception as exc:  # a parser bug: this request fails, the batch goes on
                parsed.append(RequestError(f"request could not be parsed ({exc.__class__.__name__})", 500))
        return parsed

    def inference(self, pixels: np.ndarray) -> np.ndarray:
        return probabilities(self.session, pixels, self.signature)

    def postprocess(self, parsed: list[ParsedRequest | RequestError], probs: np.ndarray, context) -> list[str]:
        """Per request: its top-k answer (or v2 outputs), or its error with its status. Queues monitoring."""
        if len(probs):
            self.monitor.record(np.concatenate([r.pixels for r in parsed if isinstance(r, ParsedRequest)]), probs)
        answers, start = [], 0
        for i, request in enumerate(parsed):
            context.set_response_content_type(i, "application/json")
            if isinstance(request, RequestError):
                context.set_response_status(request.status, str(request), i)
                self.monitor.reject(request.status, str(request))
                answers.append({"code": request.status, "error": str(request)})
                continue
            mine, start = probs[start : start + len(request.pixels)], start + len(request.pixels)
            answers.append(self._answer(request, mine))
        return [json.dumps(answer) for answer in answers]

    def _answer(self, request: ParsedRequest, probs: np.ndarray) -> object:
        ranked = top_k(probs, self.signature)
        if request.protocol == "image":
            return ranked[0]
        if request.protocol == "instances":
            return {"predictions": ranked}
        answer = {"model_name": self.model_name, "model_version": self.version, "outputs": [
            {"name": "probabilities", "shape": list(probs.shape), "datatype": "FP32", "data": probs.ravel().tolist()},
            {"name": "label", "shape": [len(probs)], "datatype": "BYTES", "data": [top[0]["label"] for top in ranked]}]}
        return {**answer, "id": request.request_id} if request.request_id else answer


def _log_writer(error_interval_s: float) -> LogWriter | None:
    """The prediction log's writer as the environment sets it (None: no log)."""
    log_file = os.environ.get(PREDICTION_LOG_ENV)
    if not log_file:
        return None
    log = PredictionLog(Path(log_file), float(os.environ[SAMPLE_RATE_ENV]), int(os.environ[LOG_MAX_BYTES_ENV]),
                        int(os.environ[LOG_BACKUPS_ENV]))
    return LogWriter(log, int(os.environ[LOG_QUEUE_LINES_ENV]), error_interval_s)


def _required(env: str, key: str) -> str:
    """A setting from the environment; fail closed (no request limit would let one client stall the worker)."""
    if env not in os.environ:
        raise RuntimeError(f"{env} is not set: components/torchserve/server.py sets it from {key}; "
                           "a TorchServe started otherwise needs it in its environment")
    return os.environ[env]


def _header(context, idx: int, name: str) -> str:
    """A request header, whatever case the client wrote it in ("" if absent)."""
    headers = context.get_all_request_header(idx) or {}
    return next((value for key, value in headers.items() if key.lower() == name and isinstance(value, str)), "")
