"""What the handler's runtime (components/handler, carried by the .mar) makes of a request, in-process:
images and JSON become pixels, every malformed request one RequestError with its status, and the
answers are the model's top-k. tests/test_serve.py sends the same kinds through a real TorchServe."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageFile

from components.handler import request
from components.handler.inference import create_session, probabilities, top_k
from components.handler.request import RequestError, RequestLimits, request_images

LIMITS = RequestLimits(max_image_pixels=1_000_000, max_instances=32)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def signature(tiny_package) -> dict:
    return json.loads((tiny_package["out"] / "signature.json").read_text())


def test_images_instances_and_v2_tensors_become_the_same_pixels(tiny_package, signature):
    sample = tiny_package["manifest"]["samples"][0]
    image = request_images({"body": (tiny_package["out"] / sample["file"]).read_bytes()}, signature, LIMITS)
    assert image.protocol == "image" and image.pixels.shape == (1, 1, 16, 16) and image.pixels.dtype == np.float32
    instances = request_images({"body": json.dumps({"instances": image.pixels.tolist()}).encode()}, signature, LIMITS)
    v2 = request_images({"body": {"id": "7", "inputs": [{"name": "image", "shape": [1, 1, 16, 16], "datatype": "UINT8",
                                                         "data": image.pixels.astype(int).ravel().tolist()}]}}, signature, LIMITS)
    assert (instances.protocol, v2.protocol, v2.request_id) == ("instances", "v2", "7")
    assert np.array_equal(instances.pixels, image.pixels) and np.array_equal(v2.pixels, image.pixels)

    session = create_session(tiny_package["out"] / "model.onnx", 1)
    probs = probabilities(session, image.pixels, signature)
    assert probs.shape == (1, 3) and probs.sum() == pytest.approx(1, abs=1e-5)
    assert top_k(probs, signature)[0][0]["label"] == sample["expected"]


def test_a_v2_bytes_tensor_of_encoded_images_is_read_as_the_images_themselves(tiny_package, signature):
    """KServe's TorchServe examples send {"datatype": "BYTES", "data": [base64 image, ...]}; shape [N] or [-1]."""
    files = [(tiny_package["out"] / sample["file"]).read_bytes() for sample in tiny_package["manifest"]["samples"][:2]]
    raw = np.concatenate([request_images({"body": f}, signature, LIMITS).pixels for f in files])
    for shape in ([2], [-1]):
        body = {"id": "b", "inputs": [{"name": "input-0", "shape": shape, "datatype": "BYTES",
                                       "data": [base64.b64encode(f).decode() for f in files]}]}
        encoded = request_images({"body": json.dumps(body).encode()}, signature, LIMITS)
        assert (encoded.protocol, encoded.request_id) == ("v2", "b") and np.array_equal(encoded.pixels, raw)


def _bytes_tensor(data: list, shape: list | None = None) -> dict:
    return {"body": {"inputs": [{"name": "input-0", "shape": shape or [len(data)], "datatype": "BYTES", "data": data}]}}


@pytest.mark.parametrize("row,status,message", [
    (_bytes_tensor(["not base64!"]), 400, "inputs[0].data[0]: not base64"),
    (_bytes_tensor([base64.b64encode(b"plain text").decode()]), 400, "inputs[0].data[0]: not a PNG or JPEG image"),
    (_bytes_tensor([base64.b64encode(png(np.zeros((1001, 1000), np.uint8))).decode()]), 413,
     "inputs[0].data[0]: image is 1000x1001 = 1001000 pixels, more than the server's limit of 1000000"),
    (_bytes_tensor(["AA=="] * 33), 413, "request carries 33 images, more than the server's limit of 32 (serve.max_instances)"),
    (_bytes_tensor(["AA=="], shape=[2]), 400, "inputs[0].shape must be [1] (or [-1]) for 1 encoded images"),
    (_bytes_tensor([7]), 400, "a BYTES tensor holds a non-empty list of base64-encoded PNG/JPEG images"),
], ids=["not base64", "not an image", "too many pixels", "too many images", "shape", "not strings"])
def test_a_malformed_bytes_tensor_is_one_error_naming_the_item(signature, row, status, message):
    with pytest.raises(RequestError) as err:
        request_images(row, signature, LIMITS)
    assert err.value.status == status and message in str(err.value)


@pytest.mark.parametrize("row,status,message", [
    ({"body": b""}, 400, "empty request"),
    ({"body": b"a", "data": b"b"}, 400, "send one image per request"),
    ({"body": b"not an image"}, 400, "not a PNG or JPEG image"),
    ({"body": b"[" * 100_000}, 400, "body is not valid JSON: nested too deeply"),
    ({"body": b"{\xff\xfe}"}, 400, "body is not valid JSON"),
    ({"body": b'{"instances": [[["1"]]]}'}, 400, "instance 0: values must be numbers"),
    ({"body": json.dumps({"instances": np.zeros((1, 28, 28)).tolist()}).encode()}, 400, "instance 0: expected shape [1, 16, 16]"),
    ({"body": {"inputs": [{"name": "image", "shape": [1, 1, 16, 16], "datatype": "INT64", "data": [0] * 256}]}}, 400,
     "inputs[0].datatype must be one of ['BYTES', 'FP32', 'UINT8'], got INT64"),
    ({"body": {"inputs": [{"name": "image", "shape": [1.0, 1, 16, 16], "datatype": "UINT8", "data": [0] * 256}]}}, 400,
     "inputs[0].shape must be [N, 1, 16, 16]"),
    ({"body": {"inputs": [{"name": "image", "shape": [1, 1, 16, 16], "datatype": "UINT8", "data": [0.5] * 256}]}}, 400,
     "UINT8 values must be whole numbers"),
    ({"body": png(np.zeros((1001, 1000), np.uint8))}, 413, "image is 1000x1001 = 1001000 pixels, more than the server's limit of 1000000"),
    ({"body": json.dumps({"instances": [[]] * 33}).encode()}, 413, "request carries 33 images, more than the server's limit of 32 "
     "(serve.max_instances)"),
    ({"body": {"inputs": [{"name": "image", "shape": [10**9, 1, 16, 16], "datatype": "UINT8", "data": []}]}}, 413,
     "request carries 1000000000 images, more than the server's limit of 32 (serve.max_instances)"),
], ids=["empty", "two fields", "not an image", "nested brackets", "invalid UTF-8", "numbers as strings", "wrong size",
        "v2 datatype", "v2 fractional shape", "v2 fractional UINT8", "too many pixels", "too many instances", "v2 too many images"])
def test_a_malformed_request_is_one_error_with_its_status(signature, row, status, message):
    with pytest.raises(RequestError) as err:
        request_images(row, signature, LIMITS)
    assert err.value.status == status and message in str(err.value)


def test_a_json_body_with_more_values_than_its_images_can_hold_is_refused_before_it_is_parsed(signature, monkeypatch):
    monkeypatch.setattr(request, "parse_json", lambda body: pytest.fail("the body was parsed"))
    instances = {"instances": np.zeros((200, 1, 16, 16), int).tolist()}
    v2 = {"inputs": [{"name": "image", "shape": [200, 1, 16, 16], "datatype": "UINT8", "data": [0] * 200 * 256}]}
    for body in (json.dumps(instances).encode(), json.dumps(v2)):
        with pytest.raises(RequestError) as err:
            request_images({"body": body}, signature, LIMITS)
        assert err.value.status == 413
        assert str(err.value).startswith("JSON body holds 51")
        assert str(err.value).endswith("values, more than the server's limit of 32 images of 1x16x16 values (serve.max_instances)")


def test_the_pixels_of_all_instances_count_against_the_pixel_limit(signature):
    three_images = RequestLimits(max_image_pixels=3 * 256, max_instances=32)
    with pytest.raises(RequestError) as err:
        request_images({"body": json.dumps({"instances": np.zeros((4, 1, 16, 16), int).tolist()}).encode()}, signature, three_images)
    assert err.value.status == 413 and str(err.value) == ("JSON body holds 1024 values, more than the server's limit of 3 images of "
                                                          "1x16x16 values (serve.max_image_pixels)")
    with pytest.raises(RequestError) as err:
        request_images({"body": {"instances": [[]] * 4}}, signature, three_images)
    assert err.value.status == 413 and str(err.value) == ("request carries 4 images of 16x16, 1024 pixels in all, more than the "
                                                          "server's limit of 768 (serve.max_image_pixels)")


def test_requests_at_the_limits_are_answered(signature):
    pixels = np.random.default_rng(0).integers(0, 255, (32, 1, 16, 16))
    v2 = {"id": "a, b, c", "parameters": {"note": "x"}, "inputs": [{"name": "image", "shape": [32, 1, 16, 16], "datatype": "FP32",
                                                                    "data": (pixels + 0.25).tolist()}]}
    for body, protocol in (({"instances": pixels.tolist()}, "instances"), (v2, "v2")):
        parsed = request_images({"body": json.dumps(body, indent=1).encode()}, signature, LIMITS)
        assert parsed.protocol == protocol and parsed.pixels.shape == (32, 1, 16, 16)


def test_the_items_of_a_bytes_tensor_share_the_request_pixel_budget(signature, monkeypatch):
    """Two 800x800 PNGs (640,000 pixels each) are 1,280,000 pixels: over the limit of 1,000,000 per request, like
    one image of that size or JSON instances of as many pixels. The second is refused before its pixels are decoded."""
    item = base64.b64encode(png(np.zeros((800, 800), np.uint8))).decode()
    decoded, load = [], ImageFile.ImageFile.load  # an image's tiles are its encoded pixels, decoded by its first load()
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda img: (decoded.append(img.size) if img.tile else None) or load(img))
    with pytest.raises(RequestError) as err:
        request_images(_bytes_tensor([item, item]), signature, LIMITS)
    assert err.value.status == 413 and str(err.value) == (
        "inputs[0].data[1]: image is 800x800 = 640000 pixels, more than the 360000 left of the server's limit of 1000000 "
        "per request (serve.max_image_pixels)")
    assert decoded == [(800, 800)]
