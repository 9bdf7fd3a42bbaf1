"""The real TorchServe, started once for this module on free loopback ports: predictions,
bad inputs, token, load, a killed worker, version rollback, Prometheus, drift."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import fcntl
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil
import pytest
import requests
import yaml
from omegaconf import OmegaConf
from PIL import Image

from components.core.config.compose import compose
from components.core.config.schema import PORT_KEYS
from components.core.io import file_digest, write_json
from components.core.paths import ROOT
from components.data.dataset import load_prepared
from components.deploy import DeployError, deploy
from components.drift.prediction_log import rotate_log, rotated_logs
from components.drift.report import drift_report, load_window
from components.handler.telemetry import MONITOR_INTERVAL_S
from components.package import build_mar
from components.packaging.onnx import onnx_logits
from components.score import score
from components.torchserve import server
from components.torchserve.management import default_version, list_versions, register, set_default, unregister
from tests.helpers.servers import free_ports, prometheus_server

PROMETHEUS_DIR = ROOT / "serve" / "prometheus"


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels[0]).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def live(packaged, tmp_path_factory):
    """TorchServe started with the session's package deployed; always stopped at the end."""
    root = tmp_path_factory.mktemp("serve")
    ports = free_ports(5)
    # Every prediction logged, in files of 100 kB: the load test rotates the log a few times.
    overrides = ["train.epochs=3", f"serve.state_dir={root / 'state'}", "serve.prediction_log.sample_rate=1.0",
                 "serve.prediction_log.max_mb=0.1", "serve.prediction_log.backups=100",
                 *(f"serve.{key}={port}" for key, port in zip(PORT_KEYS, ports))]  # also the CLI's arguments
    cfg = compose(overrides)
    manifest = packaged["manifest"]
    try:
        server.start(cfg)
        deploy(cfg, packaged["out"] / "digits.mar", manifest["version"])
        yield {"cfg": cfg, "overrides": overrides, "root": root, "package": packaged["out"], "manifest": manifest,
               "endpoint": server.local_endpoint(cfg), "prepared": packaged["prepared"]}
    finally:
        server.stop(cfg)


def predict_url(live) -> str:
    return f"{live['endpoint'].inference_url}/predictions/digits"


def auth(live) -> dict:
    return server.bearer(live["endpoint"].inference_token)


def worker_pids(live) -> list[int]:
    endpoint = live["endpoint"]
    described = requests.get(f"{endpoint.management_url}/models/digits", headers=server.bearer(endpoint.management_token), timeout=10)
    return [w["pid"] for w in described.json()[0]["workers"] if w["status"] == "READY"]


def in_process_probabilities(live, pixels: np.ndarray) -> np.ndarray:
    """The packaged model's probabilities computed here with onnxruntime, for comparison with the server's."""
    signature = json.loads((live["package"] / "signature.json").read_text())
    session = ort.InferenceSession(str(live["package"] / "model.onnx"), providers=["CPUExecutionProvider"])
    probs = np.exp(onnx_logits(session, pixels, signature))
    return probs / probs.sum(1, keepdims=True)


@pytest.mark.integration
def test_predictions_match_the_onnx_model_in_process(live):
    pixels = np.array(load_prepared(live["prepared"]).split("test")[0][:60])
    probs = in_process_probabilities(live, pixels)
    for image, p in zip(pixels, probs):
        answer = requests.post(predict_url(live), data=png(image), headers=auth(live), timeout=30).json()
        assert [a["label"] for a in answer] == [str(c) for c in np.argsort(-p)[:3]]
        assert answer[0]["probability"] == pytest.approx(p.max(), abs=1e-5)
    as_multipart = requests.post(predict_url(live), files={"file": png(pixels[0])}, headers=auth(live), timeout=30).json()
    as_json = requests.post(predict_url(live), json={"instances": pixels[:2].tolist()}, headers=auth(live), timeout=30).json()
    assert as_multipart[0]["label"] == as_json["predictions"][0][0]["label"] == str(probs[0].argmax())
    assert as_json["predictions"][1][0]["label"] == str(probs[1].argmax())
    untyped_json = requests.post(predict_url(live), data=json.dumps({"instances": pixels[:1].tolist()}), headers=auth(live), timeout=30)
    assert untyped_json.headers["Content-Type"] == "application/json"
    assert untyped_json.json()["predictions"][0][0]["label"] == str(probs[0].argmax())


@pytest.mark.integration
def test_batch_scoring_answers_as_torchserve_does_for_the_same_images(live, tmp_path):
    """The same PNG files through TorchServe (the .mar's handler) and through batch scoring: identical top-k answers."""
    folder = tmp_path / "batch"
    folder.mkdir()
    for i, image in enumerate(load_prepared(live["prepared"]).split("test")[0][:40]):
        (folder / f"{i:02d}.png").write_bytes(png(image))
    score(compose([f"events.log_file={tmp_path / 'events.jsonl'}", "score.workers=1"]), str(folder), live["package"], out=tmp_path / "out")
    records = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    batch = {record["file"]: record["top_k"] for record in records}
    online = {path.name: requests.post(predict_url(live), data=path.read_bytes(), headers=auth(live), timeout=30).json()
              for path in sorted(folder.iterdir())}
    assert len(online) == 40 and online == batch


BAD_REQUESTS = {
    "not an image": ({"data": b"hello, world"}, 400, "not a PNG or JPEG image"),
    "a GIF": ({"data": b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"}, 400, "not a PNG or JPEG image"),
    "truncated image": ("truncated", 400, "truncated or corrupt image"),
    "empty body": ({"data": b""}, 400, "empty request"),
    "oversized body": ({"data": b"\x89PNG" + b"x" * 2_000_000}, 413, ""),
    "invalid JSON": ({"data": b'{"instances": [', "headers": {"Content-Type": "application/json"}}, 400, "body is not valid JSON"),
    "JSON without instances": ({"json": {"images": []}}, 400, 'non-empty list "instances"'),
    "JSON list": ({"json": [1, 2]}, 400, 'send a PNG/JPEG image (Content-Type: image/png or image/jpeg) or JSON {"instances": [...]}'),
    "JSON wrong size": ({"json": {"instances": [np.zeros((1, 28, 28)).tolist()]}}, 400,
                        "instance 0: expected shape [1, 32, 32] (channels, height, width), got [1, 28, 28]"),
    "JSON wrong channels": ({"json": {"instances": [np.zeros((3, 32, 32)).tolist()]}}, 400, "got [3, 32, 32]"),
    "JSON non-numeric": ({"json": {"instances": [[[["x"] * 32] * 32]]}}, 400, "instance 0: values must be numbers"),
    "JSON out of range": ({"json": {"instances": [np.full((1, 32, 32), 300).tolist()]}}, 400, "finite numbers in [0, 255]"),
    "two multipart files": ({"files": {"a": b"1", "b": b"2"}}, 400, "one image per request"),
    "decompression bomb": ("huge", 413,
                           "image is 5000x5000 = 25000000 pixels, more than the server's limit of 1000000 (serve.max_image_pixels)"),
}


@pytest.mark.integration
@pytest.mark.parametrize("kind", BAD_REQUESTS)
def test_malformed_request_gets_4xx_with_a_message_and_the_worker_keeps_serving(live, kind):
    request, status, message = BAD_REQUESTS[kind]
    good = (live["package"] / "samples" / "00.png").read_bytes()
    if request == "truncated":
        request = {"data": good[: len(good) // 2]}
    elif request == "huge":  # a 30 kB PNG that would decode to 25 megapixels
        request = {"data": png(np.zeros((1, 5000, 5000), np.uint8))}
    else:
        request = dict(request)
    workers_before = worker_pids(live)
    headers = {**auth(live), **request.pop("headers", {})}
    response = requests.post(predict_url(live), headers=headers, timeout=30, **request)
    assert response.status_code == status
    if kind == "oversized body":  # refused by TorchServe's frontend before any handler
        assert response.reason == "Request Entity Too Large"
    else:
        body = response.json()
        assert response.headers["Content-Type"] == "application/json"
        assert body["code"] == status and message in body["error"]
    assert requests.post(predict_url(live), data=good, headers=auth(live), timeout=30).status_code == 200
    assert worker_pids(live) == workers_before


@contextlib.contextmanager
def batched_model(live, name: str):
    """The package registered again as `name`, batching up to 8 requests that arrive within 200 ms."""
    endpoint, version = live["endpoint"], live["manifest"]["version"]
    register(endpoint, f"digits-{version}.mar", OmegaConf.merge(live["cfg"].serve, {"batch_size": 8, "max_batch_delay_ms": 200}),
             model_name=name)
    try:
        yield f"{endpoint.inference_url}/predictions/{name}"
    finally:
        unregister(endpoint, name, version)


@pytest.mark.integration
def test_batched_requests_are_answered_one_by_one_with_their_own_status(live):
    """A TorchServe batch mixing good and malformed requests: each gets its own answer."""
    samples = live["manifest"]["samples"]
    bodies = [(live["package"] / s["file"]).read_bytes() for s in samples[:6]] + [b"not an image", b""]
    with batched_model(live, "batched") as url, concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: requests.post(url, data=body, headers=auth(live), timeout=30), bodies))
    assert [a.json()[0]["label"] for a in answers[:6]] == [s["expected"] for s in samples[:6]]
    assert [a.status_code for a in answers] == [200] * 6 + [400, 400]
    assert "not a PNG or JPEG image" in answers[6].json()["error"] and "empty request" in answers[7].json()["error"]


NESTED = b"[" * 100_000  # json.loads raises RecursionError on it
HOSTILE_REQUESTS = {  # kind: (requests.post arguments, status, message)
    "nested brackets, no content type": ({"data": NESTED}, 400, "body is not valid JSON: nested too deeply"),
    "nested brackets as application/json": ({"data": NESTED, "headers": {"Content-Type": "application/json"}}, 400, "nested too deeply"),
    "nested brackets as text/plain": ({"data": NESTED, "headers": {"Content-Type": "text/plain"}}, 400, "nested too deeply"),
    "nested brackets in a multipart JSON field": ({"files": {"file": ("x.json", NESTED, "application/json")}}, 400, "nested too deeply"),
    "nested instances": ({"data": b'{"instances": ' + NESTED, "headers": {"Content-Type": "application/json"}}, 400, "nested too deeply"),
    "instance nested 500 deep": ({"json": {"instances": [json.loads("[" * 500 + "]" * 500)]}}, 400, "instance 0: values must be numbers"),
    "a number beyond any float": ({"data": b'{"instances": [[[' + b"9" * 4000 + b"]]]}"}, 400, "instance 0: values must be numbers"),
    "numbers as strings": ({"json": {"instances": [[["1"] * 32] * 32]}}, 400, "instance 0: values must be numbers"),
    "v2 with a list as datatype": ({"json": {"inputs": [{"name": "image", "shape": [1, 1, 32, 32], "datatype": [[["UINT8"]]],
                                                         "data": []}]}},
                                   400, "inputs[0].datatype must be one of ['BYTES', 'FP32', 'UINT8'], got list"),
    "v2 with fractional dimensions": ({"json": {"inputs": [{"name": "image", "shape": [1.0, 1, 32, 32], "datatype": "UINT8",
                                                            "data": [0] * 1024}]}},
                                      400, "inputs[0].shape must be [N, 1, 32, 32]"),
    "invalid UTF-8 as application/json": ({"data": b"{\xff\xfe}", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
    "16 megapixel PNG": ("16 megapixels", 413, "image is 4000x3999 = 15996000 pixels, more than the server's limit of 1000000"),
    "200 instances in 600 kB": ({"data": json.dumps({"instances": np.random.default_rng(0).integers(0, 10, (200, 1, 32, 32)).tolist()}),
                                 "headers": {"Content-Type": "application/json"}}, 413,
                                "JSON body holds 204800 values, more than the server's limit of 32 images of 1x32x32 values "
                                "(serve.max_instances)"),
    "v2 tensor of 1000 images": ({"json": {"inputs": [{"name": "image", "shape": [1000, 1, 32, 32], "datatype": "UINT8", "data": []}]}},
                                 413, "request carries 1000 images, more than the server's limit of 32 (serve.max_instances)"),
}


def hostile_request(live, kind: str) -> dict:
    request, _, _ = HOSTILE_REQUESTS[kind]
    if request == "16 megapixels":  # 16 kB on the wire
        return {"data": png(np.zeros((1, 3999, 4000), np.uint8)), "headers": auth(live)}
    request = dict(request)
    return {**request, "headers": {**auth(live), **request.get("headers", {})}}


@pytest.mark.integration
@pytest.mark.parametrize("kind", HOSTILE_REQUESTS)
def test_hostile_request_gets_4xx_naming_the_problem(live, kind):
    _, status, message = HOSTILE_REQUESTS[kind]
    response = requests.post(predict_url(live), timeout=30, **hostile_request(live, kind))
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"code", "error"} and body["code"] == status and message in body["error"]


@pytest.mark.integration
def test_hostile_clients_beside_valid_ones_fail_no_valid_request_and_log_one_line_per_second(live):
    """4 clients cycling through the hostile requests, 4 valid clients, all in the same batches."""
    model_log = server.state_dir(live["cfg"]).logs / "model_log.log"
    logged_before = model_log.stat().st_size
    samples = live["manifest"]["samples"]
    good = [((live["package"] / s["file"]).read_bytes(), s["expected"]) for s in samples]
    hostile = [hostile_request(live, kind) for kind in HOSTILE_REQUESTS]

    def valid_client(n: int) -> list[object]:
        with requests.Session() as session:
            answers = [session.post(url, data=body, headers=auth(live), timeout=30) for body, _ in good * n]
        return [a.json()[0]["label"] if a.status_code == 200 else a.status_code for a in answers]

    def hostile_client(n: int) -> list[int]:
        with requests.Session() as session:
            return [session.post(url, timeout=30, **request).status_code for request in hostile * n]

    started = time.monotonic()
    with batched_model(live, "mixed") as url, concurrent.futures.ThreadPoolExecutor(8) as pool:
        valid = [pool.submit(valid_client, 10) for _ in range(4)]
        bad = [pool.submit(hostile_client, 10) for _ in range(4)]
        valid_answers, bad_statuses = [f.result() for f in valid], [f.result() for f in bad]
        time.sleep(2 * MONITOR_INTERVAL_S)  # the worker's summary of the last interval lands
    elapsed = time.monotonic() - started
    assert valid_answers == [[expected for _, expected in good] * 10] * 4
    assert bad_statuses == [[status for _, status, _ in HOSTILE_REQUESTS.values()] * 10] * 4
    added = model_log.read_text(errors="replace")[logged_before:]
    assert "Traceback" not in added and "RecursionError" not in added
    summaries = [line for line in added.splitlines() if "malformed requests" in line]
    assert 1 <= len(summaries) <= elapsed / MONITOR_INTERVAL_S + 2  # one line per interval, not per request
    assert len(added.splitlines()) <= len(summaries) + 10, added[-2000:]


@pytest.mark.integration
def test_a_body_sent_as_a_form_gets_415_or_the_frontends_500_logged_in_one_line(live):
    """curl --data-binary sends Content-Type application/x-www-form-urlencoded. TorchServe's Java
    frontend decodes such a body as a form before any handler runs: when it holds a '%' not followed
    by two hex digits (most PNGs do), the decoder throws and the frontend answers 500 itself, echoing
    the body; otherwise the handler gets the decoded fields and answers 415 with what to do."""
    logs = server.state_dir(live["cfg"]).logs
    console, ts_log = (logs / "console.log").stat().st_size, _line_count(logs / "ts_log.log")
    sample = live["package"] / "samples" / "00.png"
    assert b"%(" in sample.read_bytes()
    curl = subprocess.run(["curl", "-s", "-X", "POST", predict_url(live), "--data-binary", f"@{sample}",
                           "-H", f"Authorization: Bearer {live['endpoint'].inference_token}", "-w", "\n%{http_code}"],
                          capture_output=True, check=True)
    body, status = curl.stdout.rsplit(b"\n", 1)
    assert status == b"500" and json.loads(body)["type"] == "ErrorDataDecoderException"
    assert (logs / "console.log").stat().st_size == console
    [logged] = (logs / "ts_log.log").read_text(errors="replace").splitlines()[ts_log:]
    assert logged.endswith("HttpRequestHandler - io.netty.handler.codec.http.multipart.HttpPostStandardRequestDecoder"), logged

    decodable = png(np.zeros((1, 28, 28), np.uint8))
    assert b"%" not in decodable
    response = requests.post(predict_url(live), data=decodable, timeout=30,
                             headers={**auth(live), "Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 415 and "send it with -H 'Content-Type: image/png'" in response.json()["error"]
    with_type = requests.post(predict_url(live), data=sample.read_bytes(), headers={**auth(live), "Content-Type": "image/png"}, timeout=30)
    assert with_type.status_code == 200 and with_type.json()[0]["label"] == live["manifest"]["samples"][0]["expected"]


@pytest.mark.integration
def test_open_inference_protocol_requests_get_v2_answers(live):
    pixels = np.array(load_prepared(live["prepared"]).split("test")[0][:3])
    probs = in_process_probabilities(live, pixels)
    url = f"{live['endpoint'].inference_url}/v2/models/digits/infer"
    flat_uint8 = {"id": "r-1", "inputs": [{"name": "image", "shape": [3, 1, 32, 32], "datatype": "UINT8", "data": pixels.ravel().tolist()}]}
    nested_fp32 = {"inputs": [{"name": "image", "shape": [3, 1, 32, 32], "datatype": "FP32", "data": pixels.astype(float).tolist()}]}
    encoded_png = {"id": "r-2", "inputs": [{"name": "input-0", "shape": [-1], "datatype": "BYTES",  # KServe's TorchServe examples
                                            "data": [base64.b64encode(png(image)).decode() for image in pixels]}]}
    for body in (flat_uint8, nested_fp32, encoded_png):
        response = requests.post(url, json=body, headers=auth(live), timeout=30)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer.get("id") == body.get("id")
        assert (answer["model_name"], answer["model_version"]) == ("digits", live["manifest"]["version"])
        [probabilities, labels] = answer["outputs"]
        assert (probabilities["name"], probabilities["shape"], probabilities["datatype"]) == ("probabilities", [3, 10], "FP32")
        assert np.allclose(np.reshape(probabilities["data"], (3, 10)), probs, atol=1e-5)
        assert labels == {"name": "label", "shape": [3], "datatype": "BYTES", "data": [str(c) for c in probs.argmax(1)]}
    bad = {"datatype": ({"datatype": "INT64"}, "inputs[0].datatype must be one of ['BYTES', 'FP32', 'UINT8'], got INT64"),
           "shape": ({"shape": [3, 1, 28, 28]}, "inputs[0].shape must be [N, 1, 32, 32]"),
           "data length": ({"data": pixels.ravel().tolist()[:-1]}, "inputs[0].data: expected shape [3072], got [3071]"),
           "fractional UINT8": ({"data": [0.5] * 3072}, "UINT8 values must be whole numbers")}
    for change, message in bad.values():
        body = {"inputs": [{**flat_uint8["inputs"][0], **change}]}
        response = requests.post(url, json=body, headers=auth(live), timeout=30)
        assert response.status_code == 400 and message in response.json()["error"], response.text


@pytest.mark.integration
def test_token_is_required_on_inference_and_management(live):
    endpoint, sample = live["endpoint"], (live["package"] / "samples" / "00.png").read_bytes()
    for url, method, good_token in ((predict_url(live), "POST", endpoint.inference_token),
                                    (f"{endpoint.management_url}/models", "GET", endpoint.management_token)):
        wrong_token = endpoint.inference_token if method == "GET" else endpoint.management_token
        for headers in ({}, server.bearer("wrong-key"), server.bearer(wrong_token)):
            response = requests.request(method, url, data=sample, headers=headers, timeout=10)
            assert response.status_code == 400 and "Token Authorization failed" in response.json()["message"]
        assert requests.request(method, url, data=sample, headers=server.bearer(good_token), timeout=10).status_code == 200


@pytest.mark.integration
def test_only_loopback_and_only_the_model_store_can_be_registered(live):
    endpoint, cfg = live["endpoint"], live["cfg"]
    listening = {c.laddr for c in psutil.Process(server.running_pid(cfg)).net_connections() if c.status == psutil.CONN_LISTEN}
    assert {address.ip.removeprefix("::ffff:") for address in listening} == {"127.0.0.1"}  # IPv4 on an IPv6 socket
    assert {address.port for address in listening} == {cfg.serve[key] for key in PORT_KEYS}
    management = server.bearer(endpoint.management_token)
    for url in ("http://127.0.0.1:1/model.mar", "file:///etc/passwd", "../package/digits.mar"):
        response = requests.post(f"{endpoint.management_url}/models", params={"url": url}, headers=management, timeout=10)
        assert 400 <= response.status_code < 500, url
    # The model API is not served on the inference address.
    response = requests.post(f"{endpoint.inference_url}/models", params={"url": "digits.mar"}, headers=management, timeout=10)
    assert response.status_code in (400, 404, 405)


def run_load(live, count: int, clients: int, timeout_s: float = 30, progress: list | None = None) -> list[object]:
    """`count` requests over `clients` threads; each result is a status code or the exception raised.
    Every answer also appends to `progress`, for a caller watching from another thread."""
    body, url, headers = (live["package"] / "samples" / "00.png").read_bytes(), predict_url(live), auth(live)
    expected = live["manifest"]["samples"][0]["expected"]

    def worker(n: int) -> list[object]:
        results = []
        with requests.Session() as session:
            for _ in range(n):
                try:
                    response = session.post(url, data=body, headers=headers, timeout=timeout_s)
                    ok = response.status_code == 200 and response.json()[0]["label"] == expected
                    results.append(200 if ok else response.status_code)
                except requests.RequestException as exc:
                    results.append(exc)
                if progress is not None:
                    progress.append(results[-1])
        return results

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        shares = [count // clients + (i < count % clients) for i in range(clients)]
        return [r for part in pool.map(worker, shares) for r in part]


@pytest.mark.integration
def test_bounded_load_2000_requests_at_8_clients_has_zero_errors(live):
    logs = server.state_dir(live["cfg"]).logs
    sizes = {name: (logs / name).stat().st_size for name in ("console.log", "ts_log.log", "model_log.log")}
    access_lines, logged = _line_count(logs / "access_log.log"), _logged_predictions(live, settle=True)
    rotated = rotated_logs(server.prediction_log(live["cfg"]))
    results = run_load(live, 2000, 8)
    assert len(results) == 2000
    assert results.count(200) == 2000, {str(r) for r in results if r != 200}
    # One access-log line per request and no other per-request logging (serve/log4j2.xml).
    assert _line_count(logs / "access_log.log") == access_lines + 2000
    growth = {name: (logs / name).stat().st_size - size for name, size in sizes.items()}
    assert growth["console.log"] == 0 and growth["ts_log.log"] < 2000 and growth["model_log.log"] < 2000, growth
    # The prediction log (every prediction here) rotates at 100 kB and loses no line doing so.
    _wait_for_logged_predictions(live, logged + 2000)
    assert len(rotated_logs(server.prediction_log(live["cfg"]))) > len(rotated)


@pytest.mark.integration
def test_killed_worker_recovers_with_no_hung_requests(live):
    [victim] = worker_pids(live)
    progress: list = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        load = pool.submit(run_load, live, 800, 8, progress=progress)
        deadline = time.monotonic() + 60
        while len(progress) < 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(victim, signal.SIGKILL)
        answered_before_kill = len(progress)
        seen_while_restarting = _state_until_not_serving(live)
        results = load.result(timeout=180)
    assert 100 <= answered_before_kill < 800
    state, lines = seen_while_restarting
    assert state == "down" and "0/1 workers READY" in lines[0], lines
    hung = [r for r in results if isinstance(r, requests.Timeout)]
    assert len(results) == 800 and not hung
    assert all(r == 200 or (isinstance(r, int) and r >= 500) for r in results), {str(r) for r in results}
    assert results.count(200) >= 700
    deadline = time.monotonic() + 60
    while not worker_pids(live) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert worker_pids(live) and worker_pids(live) != [victim]
    assert run_load(live, 40, 4).count(200) == 40
    assert server.serving_state(live["endpoint"], "digits")[0] == "serving"


def _state_until_not_serving(live, timeout_s: float = 10) -> tuple[str, list[str]]:
    """What `serve status` reports, polled until a worker is seen missing (TorchServe restarts it in ~2.5 s)."""
    deadline = time.monotonic() + timeout_s
    while (seen := server.serving_state(live["endpoint"], "digits"))[0] == "serving" and time.monotonic() < deadline:
        time.sleep(0.02)
    return seen


def _variant(live, tmp_path: Path, version: str, signature_change=None) -> Path:
    """A copy of the package rebuilt as another version, optionally with an altered signature."""
    variant = tmp_path / version
    shutil.copytree(live["package"], variant)
    (variant / "digits.mar").unlink()
    if signature_change:
        signature = json.loads((variant / "signature.json").read_text())
        signature_change(signature)
        write_json(variant / "signature.json", signature)
    mar = build_mar("digits", version, variant)
    manifest = {**live["manifest"], "version": version, "mar": {"file": mar.name, "sha256": file_digest(mar)}}
    write_json(variant / "package.json", manifest)
    return mar


@pytest.mark.integration
def test_deploy_new_version_then_roll_back_a_failing_one(live, tmp_path):
    cfg, endpoint, good = live["cfg"], live["endpoint"], live["manifest"]["version"]
    second = _variant(live, tmp_path, "second")
    result = deploy(cfg, second, "second")
    assert result["previous_version"] == good and default_version(endpoint, "digits") == "second"
    assert sorted(list_versions(endpoint, "digits")) == sorted([good, "second"])

    # Reversed class names: the smoke test sees wrong labels and the deploy rolls back.
    broken = _variant(live, tmp_path, "broken", lambda s: s["output"]["classes"].reverse())
    with pytest.raises(DeployError, match="smoke test failed on 8/8 sample.*default version is back to second"):
        deploy(cfg, broken, "broken")
    assert default_version(endpoint, "digits") == "second"
    assert "broken" not in list_versions(endpoint, "digits")

    set_default(endpoint, "digits", good)
    unregister(endpoint, "digits", "second")
    assert list_versions(endpoint, "digits") == [good]
    sample = live["manifest"]["samples"][0]
    answer = requests.post(predict_url(live), data=(live["package"] / sample["file"]).read_bytes(), headers=auth(live), timeout=30)
    assert answer.json()[0]["label"] == sample["expected"]


@pytest.mark.integration
def test_deploy_to_a_stopped_server_loads_the_model_as_it_starts_and_is_ready_when_it_answers(live, tmp_path, monkeypatch):
    """No separate registration: the server starts with the package loaded under the settings register() would give it,
    its workers READY when start() returns; a failing smoke test still leaves no version behind."""
    cfg = compose([f"serve.state_dir={tmp_path / 'state'}", "serve.batch_size=3", "serve.max_batch_delay_ms=0",
                   *(f"serve.{key}={port}" for key, port in zip(PORT_KEYS, free_ports(len(PORT_KEYS)), strict=True))])
    states_at_start, real_start = [], server.start

    def start(cfg, preload=None):
        endpoint = real_start(cfg, preload)
        states_at_start.append(server.serving_state(endpoint, "digits")[0])
        return endpoint

    monkeypatch.setattr(server, "start", start)
    monkeypatch.setattr("components.deploy.register", lambda *args, **kwargs: pytest.fail("registered after the start"))
    version, sample = live["manifest"]["version"], live["manifest"]["samples"][0]
    try:
        record = deploy(cfg, live["package"] / "digits.mar", version)
        assert states_at_start == ["serving"] and record["previous_version"] is None
        endpoint = server.local_endpoint(cfg)
        [described] = requests.get(f"{endpoint.management_url}/models/digits/all", headers=server.bearer(endpoint.management_token),
                                   timeout=10).json()
        assert (described["modelVersion"], described["batchSize"], described["maxBatchDelay"], described["minWorkers"],
                described["maxWorkers"], described["responseTimeout"]) == (version, 3, 0, 1, 1, cfg.serve.response_timeout_s)
        answer = requests.post(f"{endpoint.inference_url}/predictions/digits", data=(live["package"] / sample["file"]).read_bytes(),
                               headers=server.bearer(endpoint.inference_token), timeout=30)
        assert answer.json()[0]["label"] == sample["expected"]
        server.stop(cfg)

        broken = _variant(live, tmp_path, "broken", lambda s: s["output"]["classes"].reverse())
        with pytest.raises(DeployError, match="smoke test failed on 8/8 sample.*no previous version to roll back to"):
            deploy(cfg, broken, "broken")
        assert states_at_start == ["serving", "serving"] and list_versions(server.local_endpoint(cfg), "digits") == []
    finally:
        server.stop(cfg)


@pytest.mark.integration
def test_deploy_refuses_a_corrupt_archive_or_a_wrong_version(live, tmp_path):
    cfg = live["cfg"]
    corrupt = _variant(live, tmp_path, "corrupt")
    with open(corrupt, "ab") as f:
        f.write(b"\0")
    with pytest.raises(DeployError, match="sha256 differs from package.json"):
        deploy(cfg, corrupt, "corrupt")
    with pytest.raises(DeployError, match=f"holds version {live['manifest']['version']}, not v9"):
        deploy(cfg, live["package"] / "digits.mar", "v9")
    assert list_versions(live["endpoint"], "digits") == [live["manifest"]["version"]]


@contextlib.contextmanager
def deploy_log_watcher(log: Path) -> Iterator[tuple[str, list[tuple[str, int]]]]:
    """A webhook receiver (loopback port 18600-18699) that notes, for each event it gets, how many records the deploy log held."""
    seen: list[tuple[str, int]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            event = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((event["type"], len(log.read_text().splitlines())))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    receiver = _on_free_port(Handler)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{receiver.server_address[1]}/hook", seen
    finally:
        receiver.shutdown()
        receiver.server_close()


def _on_free_port(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    for port in range(18600, 18700):
        with contextlib.suppress(OSError):
            return ThreadingHTTPServer(("127.0.0.1", port), handler)
    raise RuntimeError("no free loopback port in 18600-18699")


@pytest.mark.integration
def test_the_deploy_record_is_written_before_the_deployed_event_is_sent(live, tmp_path):
    """A receiver that stalls until the job is killed can no longer cost the deploy record."""
    log = server.state_dir(live["cfg"]).deploy_log
    records = len(log.read_text().splitlines())
    with deploy_log_watcher(log) as (url, seen):
        cfg = compose([*live["overrides"], f"events.webhooks=['{url}']", "events.allow_loopback=true",
                       f"events.log_file={tmp_path / 'events.jsonl'}"])
        record = deploy(cfg, live["package"] / "digits.mar", live["manifest"]["version"])
    assert seen == [("deployed", records + 1)]
    assert json.loads(log.read_text().splitlines()[-1]) == record

@contextlib.contextmanager
def prometheus(workdir: Path, metrics_port: int):
    """The Debian `prometheus` with the shipped config, scraping the test server every second."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / "alerts.yml")]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    with prometheus_server(workdir, config) as url:
        yield url


def query_until_present(url: str, query: str, timeout_s: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = requests.get(f"{url}/api/v1/query", params={"query": query}, timeout=10).json()["data"]["result"]
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"Prometheus has no {query} after {timeout_s}s")


@pytest.mark.integration
def test_prometheus_scrapes_the_custom_metrics_and_loads_the_alerts(live, tmp_path):
    assert subprocess.run(["promtool", "test", "rules", str(PROMETHEUS_DIR / "alerts_test.yml")]).returncode == 0
    with prometheus(tmp_path / "prometheus", live["cfg"].serve.metrics_port) as url:
        for sample in live["manifest"]["samples"]:
            requests.post(predict_url(live), data=(live["package"] / sample["file"]).read_bytes(), headers=auth(live), timeout=30)
        requests.post(predict_url(live), data=b"not an image", headers=auth(live), timeout=30)
        predicted = query_until_present(url, 'PredictionsTotal{ModelName="digits"}')
        assert {r["metric"]["Class"] for r in predicted} >= {s["expected"] for s in live["manifest"]["samples"]}
        assert float(query_until_present(url, "ConfidenceTotal")[0]["value"][1]) > 0
        features = query_until_present(url, "InputFeatureTotal")
        assert {r["metric"]["Feature"] for r in features} == {"brightness", "contrast"}
        assert float(query_until_present(url, 'RejectedInputsTotal{Status="400"}')[0]["value"][1]) >= 1
        assert float(query_until_present(url, 'up{job="torchserve"}')[0]["value"][1]) == 1
        groups = requests.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        assert {rule["name"] for g in groups for rule in g["rules"]} == {
            "ModelInputDrift", "ModelLowConfidence", "ModelRejectedInputs", "TorchServeDown", "TorchServeErrorRate",
            "TorchServeHighLatency"}
        assert all(rule["health"] == "ok" or rule["health"] == "unknown" for g in groups for rule in g["rules"])


def _metric_total(live, name: str, **labels: str) -> float:
    """Sum of a custom metric over its series on TorchServe's Prometheus endpoint."""
    text = requests.get(f"http://{live['cfg'].serve.host}:{live['cfg'].serve.metrics_port}/metrics", timeout=10).text
    wanted = [f'{key}="{value}"' for key, value in {"ModelName": "digits", **labels}.items()]
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(label in line for label in wanted))


@pytest.mark.integration
def test_custom_metrics_count_every_prediction_and_rejection(live):
    samples = live["manifest"]["samples"]
    time.sleep(2 * MONITOR_INTERVAL_S)  # counts of earlier tests' requests are emitted by now
    before = {"predictions": _metric_total(live, "PredictionsTotal"), "rejected": _metric_total(live, "RejectedInputsTotal", Status="400"),
              "first class": _metric_total(live, "PredictionsTotal", Class=samples[0]["expected"])}
    for sample in samples:
        assert requests.post(predict_url(live), data=(live["package"] / sample["file"]).read_bytes(), headers=auth(live), timeout=30).ok
    for _ in range(3):
        assert requests.post(predict_url(live), data=b"not an image", headers=auth(live), timeout=30).status_code == 400
    time.sleep(3 * MONITOR_INTERVAL_S)  # the worker emits its counters once per interval
    assert _metric_total(live, "PredictionsTotal") - before["predictions"] == len(samples)
    assert _metric_total(live, "RejectedInputsTotal", Status="400") - before["rejected"] == 3
    first_class = sum(s["expected"] == samples[0]["expected"] for s in samples)
    assert _metric_total(live, "PredictionsTotal", Class=samples[0]["expected"]) - before["first class"] == first_class


def _line_count(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def _logged_predictions(live, settle: bool = False) -> int:
    """Lines in the prediction log and its rotated files; `settle`: once earlier requests are written too."""
    if settle:
        time.sleep(2 * MONITOR_INTERVAL_S)
    log_file = server.prediction_log(live["cfg"])
    return sum(_line_count(path) for path in [log_file, *rotated_logs(log_file)])


def _send_instances(live, pixels: np.ndarray) -> None:
    """Sends the images and waits until the worker's monitoring thread has logged them all."""
    expected = _logged_predictions(live, settle=True) + len(pixels)
    chunk = live["cfg"].serve.max_instances
    for i in range(0, len(pixels), chunk):
        response = requests.post(predict_url(live), json={"instances": pixels[i : i + chunk].tolist()}, headers=auth(live), timeout=60)
        assert response.status_code == 200
    _wait_for_logged_predictions(live, expected)


def _wait_for_logged_predictions(live, expected: int) -> None:
    """The worker's monitoring thread writes the log once per interval."""
    deadline = time.monotonic() + 10
    while _logged_predictions(live) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _logged_predictions(live) == expected


def _drift_cli(live, count: int, out: Path | None) -> subprocess.CompletedProcess:
    """`serve drift`; without `out`, its default folder (serve.state_dir/drift)."""
    return subprocess.run([sys.executable, "-m", "serve", "drift", "--package", str(live["package"]), *(["--out", str(out)] if out else []),
                           *live["overrides"], f"serve.drift.window={count}", f"serve.drift.min_samples={count}"],
                          cwd=ROOT, capture_output=True, text=True)


def test_prediction_log_rotation_keeps_the_newest_files_and_drift_reads_across_them(tmp_path):
    log_file = tmp_path / "predictions.jsonl"
    for i in range(100):
        with open(log_file, "a") as f:
            f.write(json.dumps({"i": i}) + "\n")
        if log_file.stat().st_size > 50:
            rotate_log(log_file, 50, backups=2)
    assert [path.name for path in rotated_logs(log_file)] == ["predictions.jsonl.1", "predictions.jsonl.2"]
    kept = [record["i"] for record in load_window(log_file, 1000)[0]]
    assert 10 < len(kept) < 100 and kept == list(range(100 - len(kept), 100))  # the newest, in order, none missing
    assert load_window(log_file, 15) == ([{"i": i} for i in range(85, 100)], 0)
    rotate_log(log_file, 0, backups=3)  # just rotated: no current file until the next write
    assert not log_file.exists() and load_window(log_file, 15) == ([{"i": i} for i in range(85, 100)], 0)


@pytest.mark.integration
def test_drift_is_detected_on_shifted_inputs_and_not_on_unshifted_ones(live, tmp_path):
    pixels = np.array(load_prepared(live["prepared"]).split("test")[0], dtype=np.float64)
    reference = json.loads((live["package"] / "reference_stats.json").read_text())
    log_file, drift_cfg = server.prediction_log(live["cfg"]), live["cfg"].serve.drift

    _send_instances(live, pixels)
    unshifted = drift_report(load_window(log_file, len(pixels))[0], reference, drift_cfg)
    assert not unshifted["drift"], unshifted
    assert all(f["psi"] < drift_cfg.psi_threshold for f in unshifted["features"].values())
    tracked_before = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    result = _drift_cli(live, len(pixels), None)
    assert result.returncode == 0, result.stderr
    assert "no drift" in result.stdout
    default_out = Path(live["cfg"].serve.state_dir) / "drift"  # runtime output: outside every tracked folder
    assert json.loads((default_out / "drift.json").read_text())["samples"] == len(pixels)
    assert subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout == tracked_before

    _send_instances(live, np.clip(pixels * 0.5 + 110, 0, 255))  # washed out: brighter, half the contrast
    shifted = drift_report(load_window(log_file, len(pixels))[0], reference, drift_cfg)
    assert shifted["drift"] and shifted["features"]["brightness"]["drifted"] and shifted["features"]["contrast"]["drifted"]
    assert shifted["features"]["brightness"]["ks_statistic"] > 0.5
    result = _drift_cli(live, len(pixels), tmp_path / "shifted")
    assert result.returncode == 1 and "drift detected" in result.stdout
    saved = json.loads((tmp_path / "shifted" / "drift.json").read_text())
    assert saved["drift"] and saved["samples"] == len(pixels)
    page = (tmp_path / "shifted" / "drift.html").read_text()
    assert "Drift detected" in page and "data:image/png;base64," in page and "http" not in page.replace("http-equiv", "")


@contextlib.contextmanager
def rotation_lock_held(log_file: Path) -> Iterator[None]:
    """What another worker rotating the log holds (components/drift/prediction_log.py rotate_log)."""
    with open(log_file.with_name(log_file.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.mark.integration
def test_with_the_prediction_log_locked_metrics_keep_counting_and_the_worker_drops_lines_instead_of_growing(live):
    """With the log's rotation lock held, the worker's writer waits once the log outgrows live's serve.prediction_log.max_mb;
    before, monitoring waited with it: metrics froze and every request's pixels piled up in the worker."""
    images = np.array(load_prepared(live["prepared"]).split("test")[0][: live["cfg"].serve.max_instances]).tolist()
    log_file, max_bytes = server.prediction_log(live["cfg"]), live["cfg"].serve.prediction_log.max_mb * 1e6
    queued = live["cfg"].serve.prediction_log.max_queued_lines
    worker = psutil.Process(worker_pids(live)[0])
    time.sleep(2 * MONITOR_INTERVAL_S)  # earlier requests are counted and logged by now
    predicted, dropped = _metric_total(live, "PredictionsTotal"), _metric_total(live, "PredictionLogDroppedTotal")
    memory, sent = worker.memory_info().rss, 0
    with rotation_lock_held(log_file), requests.Session() as session:

        def send(count: int) -> int:
            for _ in range(count):
                assert session.post(predict_url(live), json={"instances": images}, headers=auth(live), timeout=30).status_code == 200
            return count * len(images)

        while not log_file.exists() or log_file.stat().st_size <= max_bytes:
            sent += send(1)
            time.sleep(0.05)
        time.sleep(2 * MONITOR_INTERVAL_S)  # the writer now waits for the lock, to rotate the log
        logged = _logged_predictions(live)
        burst = send((queued + 5000) // len(images))
        time.sleep(2 * MONITOR_INTERVAL_S)
        assert _metric_total(live, "PredictionsTotal") - predicted == sent + burst
        assert _metric_total(live, "PredictionLogDroppedTotal") - dropped >= burst - queued
        assert _logged_predictions(live) == logged
        assert worker.memory_info().rss - memory < 40e6  # the pixels of 15,000 images alone are 60 MB
    _send_instances(live, np.array(images))  # the lock released, logging goes on


@pytest.mark.integration
def test_serve_drift_skips_a_half_written_line_and_says_so(live, tmp_path):
    """What a write cut short by a full disk leaves (tests/test_monitoring.py makes a real one)."""
    with open(server.prediction_log(live["cfg"]), "a") as log:
        log.write('{"time": "2026-12-03T14:20:01.\n')
    _send_instances(live, np.array(load_prepared(live["prepared"]).split("test")[0][:100]))
    result = subprocess.run([sys.executable, "-m", "serve", "drift", "--package", str(live["package"]), "--out", str(tmp_path / "drift"),
                             *live["overrides"], "serve.drift.window=101", "serve.drift.min_samples=100"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode in (0, 1), result.stderr  # no drift, or drift: judged either way
    assert "serve: skipped 1 malformed lines of" in result.stdout
    assert json.loads((tmp_path / "drift" / "drift.json").read_text())["skipped_lines"] == 1


@pytest.mark.integration
def test_cli_status_and_predict_use_the_key_file(live):
    params = live["overrides"]
    status = subprocess.run([sys.executable, "-m", "serve", "status", *params], cwd=ROOT, capture_output=True, text=True)
    assert status.returncode == 0 and status.stdout.startswith("serve: digits serving;")
    assert f"digits {live['manifest']['version']} (default): 1/1 workers READY (pid {worker_pids(live)[0]} READY)" in status.stdout
    sample = live["manifest"]["samples"][0]
    predicted = subprocess.run([sys.executable, "-m", "serve", "predict", str(live["package"] / sample["file"]), *params],
                               cwd=ROOT, capture_output=True, text=True)
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads(predicted.stdout)[0]["label"] == sample["expected"]
    again = subprocess.run([sys.executable, "-m", "serve", "up", "--package", str(live["package"]), *params], cwd=ROOT,
                           capture_output=True, text=True)  # what a no-op `make run` does last
    assert again.returncode == 0 and again.stdout.strip() == f"serve: digits version {live['manifest']['version']} is already the default"


@pytest.mark.integration
def test_expired_keys_are_renewed_by_every_command_and_status_exit_codes_tell_the_state(live, tmp_path):
    """A second TorchServe whose keys live 30 s (token_expiration_min is a float for TorchServe too)."""
    overrides = ["serve.token_expiration_min=0.5", f"serve.state_dir={tmp_path / 'state'}",
                 *(f"serve.{key}={port}" for key, port in zip(PORT_KEYS, free_ports(len(PORT_KEYS))))]
    cfg = compose(overrides)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "serve", *args, *overrides], cwd=ROOT, capture_output=True, text=True)

    assert cli("status").returncode == 1
    try:
        first = server.start(cfg)
        keys = json.loads(server.state_dir(cfg).key_file.read_text())
        expiry = max(datetime.fromisoformat(keys[kind]["expiration time"]) for kind in ("inference", "management"))
        unregistered = cli("status")
        assert unregistered.returncode == 4 and "digits: not registered" in unregistered.stdout, unregistered.stderr
        deployed = cli("up", "--package", str(live["package"]))
        assert deployed.returncode == 0, deployed.stderr
        assert first.inference_token not in deployed.stdout + deployed.stderr  # CI logs keep no key
        assert '-H "Authorization: Bearer $(.venv/bin/python -m serve token)"' in deployed.stdout
        time.sleep(max(0.0, (expiry - datetime.now(UTC)).total_seconds()) + 1)  # the first keys have expired
        for url, token in ((first.inference_url + "/ping", first.inference_token),
                           (first.management_url + "/models", first.management_token)):
            expired = requests.get(url, headers=server.bearer(token), timeout=10)
            assert expired.status_code == 400 and "Token Authorization failed" in expired.json()["message"]
        up = cli("up", "--package", str(live["package"]))  # what `make run` runs
        # keys renewed, nothing to redeploy
        assert up.returncode == 0 and f"digits version {live['manifest']['version']} is already the default" in up.stdout, up.stderr
        renewed = server.local_endpoint(cfg, renew=False)
        assert {renewed.inference_token, renewed.management_token}.isdisjoint({first.inference_token, first.management_token})
        assert cli("token").stdout.strip() == renewed.inference_token
        status = cli("status")
        assert status.returncode == 0, status.stderr
        assert f"digits {live['manifest']['version']} (default): 1/1 workers READY" in status.stdout, status.stderr
        sample = live["manifest"]["samples"][0]
        predicted = cli("predict", str(live["package"] / sample["file"]))
        assert predicted.returncode == 0 and json.loads(predicted.stdout)[0]["label"] == sample["expected"], predicted.stderr
    finally:
        server.stop(cfg)
