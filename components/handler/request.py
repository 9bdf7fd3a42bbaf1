"""One request to the model server -> its images as pixel arrays.

A request is PNG/JPEG bytes (raw body or one multipart field), JSON {"instances": [pixels, ...]}
with pixels shaped [channels, height, width] in 0-255, or an Open Inference Protocol (KServe v2)
body {"inputs": [{"name", "shape": [N, C, H, W], "datatype": "UINT8" | "FP32", "data"}]}, or one whose
tensor holds encoded images: {"name", "shape": [N] (or [-1]), "datatype": "BYTES", "data": [base64 PNG/JPEG, ...]},
the form KServe's TorchServe examples send.
Whatever a client sends, a malformed request raises RequestError with the HTTP status and one
message naming the problem; nothing else escapes, so one request never fails another. What one
request may cost is bounded (RequestLimits) and checked before its pixels are decoded or allocated.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_FORMATS = ["PNG", "JPEG"]
# Values a JSON body may hold beyond its images' pixels: keys, the v2 shape and id.
JSON_OVERHEAD_VALUES = 64
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
V2_DATATYPES = {"UINT8": np.uint8, "FP32": np.float32}
USAGE = 'send a PNG/JPEG image (Content-Type: image/png or image/jpeg) or JSON {"instances": [...]}'


class RequestError(Exception):
    """A client's mistake: its request alone is answered with `status` and this message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class PixelBudget:
    """The pixels one request may still make the worker decode or hold: serve.max_image_pixels, shared by all of the
    request's images whatever carried them (raw body, JSON, Open Inference Protocol tensor or BYTES items)."""

    def __init__(self, limit: int):
        self.limit, self.left = limit, limit

    def spend(self, pixels: int, what: str) -> None:
        """Take `pixels` for `what` ("image is WxH = P pixels"); RequestError 413 when fewer are left."""
        if pixels > self.left:
            limit = f"the server's limit of {self.limit}"
            if self.left < self.limit:
                limit = f"the {self.left} left of {limit} per request"
            raise RequestError(f"{what}, more than {limit} (serve.max_image_pixels)", 413)
        self.left -= pixels


@dataclass(frozen=True)
class RequestLimits:
    """What one request may cost: `max_image_pixels` pixels (the sum over all of its images: width x height as decoded,
    or as sent in a JSON tensor; see PixelBudget) and `max_instances` images (JSON instances, the N of an Open Inference
    Protocol tensor, the items of a BYTES tensor)."""

    max_image_pixels: int
    max_instances: int

    def pixel_budget(self) -> PixelBudget:
        return PixelBudget(self.max_image_pixels)

    def check_image_count(self, count: int, image_shape: tuple[int, ...], budget: PixelBudget) -> None:
        """RequestError 413 when `count` images shaped (C, H, W) exceed either limit; their pixels come out of `budget`."""
        if count > self.max_instances:
            raise RequestError(f"request carries {count} images, more than the server's limit of {self.max_instances} "
                               "(serve.max_instances)", 413)
        pixels = count * image_shape[1] * image_shape[2]
        budget.spend(pixels, f"request carries {count} images of {image_shape[2]}x{image_shape[1]}, {pixels} pixels in all")

    def check_json_size(self, body: bytes | str, image_shape: tuple[int, ...]) -> None:
        """RequestError 413 when a JSON body holds more values than its allowed images can, before it is parsed:
        parsing 200 instances costs the worker 100 times what one image does. Each comma separates two values, so
        a JSON text holds (commas + 1) values, counting empty lists and objects; a comma in a string counts too."""
        values = body.count(b"," if isinstance(body, (bytes, bytearray)) else ",") + 1
        images = min(self.max_instances, self.max_image_pixels // (image_shape[1] * image_shape[2]))
        if values > images * math.prod(image_shape) + JSON_OVERHEAD_VALUES:
            binding = "serve.max_instances" if images == self.max_instances else "serve.max_image_pixels"
            raise RequestError(f"JSON body holds {values} values, more than the server's limit of {images} images of "
                               f"{'x'.join(map(str, image_shape))} values ({binding})", 413)


@dataclass(frozen=True)
class ParsedRequest:
    """The images of one request, float32 (N, C, H, W) in [0, 255], and the protocol it came in:
    "image" (answer: one top-k list), "instances" ({"predictions": [...]}) or "v2" (Open Inference Protocol)."""

    pixels: np.ndarray
    protocol: str
    request_id: str | None = None


def decode_image(data: bytes, signature: dict, budget: PixelBudget) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 (C, H, W), converted and resized as the signature says. Its pixels come out of
    `budget` before they are decoded: a 50 kB PNG can hold 16 megapixels. A large JPEG decodes at 1/2, 1/4
    or 1/8 scale (its DCT allows it); then the budget pays for what is actually decoded."""
    spec = signature["input"]
    size = (spec["resize"]["width"], spec["resize"]["height"])
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            img.draft(None, size)  # JPEG only; never below the model's input size
            budget.spend(img.width * img.height, f"image is {img.width}x{img.height} = {img.width * img.height} pixels")
            img.load()
            if img.mode != spec["color_mode"]:
                img = img.convert(spec["color_mode"])
            if img.size != size:
                img = img.resize(size, Image.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except UnidentifiedImageError:
        raise RequestError(f"not a PNG or JPEG image: {USAGE}") from None
    except Image.DecompressionBombError:
        raise RequestError(f"image has more pixels than the server's limit of {budget.limit} (serve.max_image_pixels)", 413) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise RequestError(f"truncated or corrupt image ({exc.__class__.__name__})") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def pixel_array(values: object, shape: tuple[int, ...], what: str, axes: str = "") -> np.ndarray:
    """JSON numbers -> float32 array of `shape` (its `axes` named in messages), every value finite and in [0, 255]."""
    try:
        array = np.asarray(values)
    except (ValueError, TypeError, OverflowError):  # ragged lists, numbers beyond any float
        array = None
    expected = f"{list(shape)} {axes}".rstrip()
    if array is None or array.dtype.kind not in "iuf":
        raise RequestError(f"{what}: values must be numbers in [0, 255] shaped {expected}")
    if array.shape != shape:
        raise RequestError(f"{what}: expected shape {expected}, got {list(array.shape)}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise RequestError(f"{what}: values must be finite numbers in [0, 255]")
    return array


def parse_instances(body: dict, signature: dict, limits: RequestLimits, budget: PixelBudget) -> ParsedRequest:
    instances = body.get("instances")
    if not isinstance(instances, list) or not instances:
        raise RequestError('JSON body must be an object with a non-empty list "instances" (or "inputs": Open Inference Protocol)')
    shape = tuple(signature["input"]["shape"][1:])
    limits.check_image_count(len(instances), shape, budget)
    pixels = [pixel_array(instance, shape, f"instance {i}", "(channels, height, width)") for i, instance in enumerate(instances)]
    return ParsedRequest(np.stack(pixels), "instances")


def parse_v2(body: dict, signature: dict, limits: RequestLimits, budget: PixelBudget) -> ParsedRequest:
    """An Open Inference Protocol request: one input tensor [N, C, H, W], data flat or nested."""
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError('"inputs" must hold exactly one tensor {"name", "shape", "datatype", "data"}')
    tensor = inputs[0]
    datatype, shape = tensor.get("datatype"), tensor.get("shape")
    if datatype == "BYTES":
        return ParsedRequest(_encoded_images(tensor, signature, limits, budget), "v2", _request_id(body))
    if not isinstance(datatype, str) or datatype not in V2_DATATYPES:
        shown = datatype[:20] if isinstance(datatype, str) else type(datatype).__name__
        raise RequestError(f"inputs[0].datatype must be one of {sorted([*V2_DATATYPES, 'BYTES'])}, got {shown}")
    image_shape = tuple(signature["input"]["shape"][1:])
    if not (isinstance(shape, list) and len(shape) == 4 and all(type(n) is int for n in shape)
            and tuple(shape[1:]) == image_shape and shape[0] > 0):
        raise RequestError(f"inputs[0].shape must be [N, {', '.join(map(str, image_shape))}] (N images, channels, height, width)")
    limits.check_image_count(shape[0], image_shape, budget)
    data = tensor.get("data")
    flat = np.ravel(pixel_array(data, (math.prod(shape),), "inputs[0].data")) if _is_flat(data) else None
    pixels = flat.reshape(shape) if flat is not None else pixel_array(data, tuple(shape), "inputs[0].data", "(N, channels, height, width)")
    if datatype == "UINT8" and not np.array_equal(pixels, np.round(pixels)):
        raise RequestError("inputs[0].data: UINT8 values must be whole numbers")
    return ParsedRequest(pixels, "v2", _request_id(body))


def _encoded_images(tensor: dict, signature: dict, limits: RequestLimits, budget: PixelBudget) -> np.ndarray:
    """A BYTES tensor's images: base64 PNG/JPEG strings, each decoded as a raw image body is; together they share
    the request's pixel budget, so N items cost at most what one image may."""
    data, shape = tensor.get("data"), tensor.get("shape")
    if not isinstance(data, list) or not data or not all(isinstance(item, str) for item in data):
        raise RequestError("inputs[0].data: a BYTES tensor holds a non-empty list of base64-encoded PNG/JPEG images")
    if not (isinstance(shape, list) and len(shape) == 1 and shape[0] in (len(data), -1)):
        raise RequestError(f"inputs[0].shape must be [{len(data)}] (or [-1]) for {len(data)} encoded images")
    # What the images hold once resized, as for a JSON tensor; then what decoding them costs, from the request's budget.
    limits.check_image_count(len(data), tuple(signature["input"]["shape"][1:]), limits.pixel_budget())
    images = []
    for i, item in enumerate(data):
        try:
            encoded = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"inputs[0].data[{i}]: not base64") from None
        try:
            images.append(decode_image(encoded, signature, budget))
        except RequestError as exc:
            raise RequestError(f"inputs[0].data[{i}]: {exc}", exc.status) from None
    return np.stack(images).astype(np.float32)


def _request_id(body: dict) -> str | None:
    request_id = body.get("id")
    return request_id if isinstance(request_id, str) else None


def _is_flat(data: object) -> bool:
    return isinstance(data, list) and not any(isinstance(value, list) for value in data[:1])


def parse_json(body: bytes | str) -> object:
    try:
        return json.loads(body)
    except RecursionError:  # json's C decoder recurses once per bracket: "[[[[..." of any length
        raise RequestError("body is not valid JSON: nested too deeply") from None
    except ValueError:
        raise RequestError("body is not valid JSON") from None


def request_images(row: dict, signature: dict, limits: RequestLimits) -> ParsedRequest:
    """The images of one request (TorchServe's dict of body or form fields); RequestError if malformed or over `limits`."""
    fields = [value for value in row.values() if value not in (None, b"", bytearray(), "")]
    if not fields:
        raise RequestError(f"empty request: {USAGE}")
    if len(fields) > 1:
        raise RequestError("send one image per request (or several as JSON instances)")
    body, budget = fields[0], limits.pixel_budget()
    if isinstance(body, str) or (isinstance(body, (bytes, bytearray)) and body.lstrip()[:1] in (b"{", b"[")):
        limits.check_json_size(body, tuple(signature["input"]["shape"][1:]))
        body = parse_json(body)
    if isinstance(body, dict) and "inputs" in body:
        return parse_v2(body, signature, limits, budget)
    if isinstance(body, dict):
        return parse_instances(body, signature, limits, budget)
    if isinstance(body, (bytes, bytearray)):
        return ParsedRequest(decode_image(bytes(body), signature, budget)[None].astype(np.float32), "image")
    raise RequestError(USAGE)
