"""Serving under hostile load: one valid client's p50 latency alone (the baseline) and while
other clients keep sending an attack, measured in turn in every round; printed as the ratio
attacked p50 / baseline p50 of the same round (min / median / max over the rounds).

    .venv/bin/python bench/serve_hostile_bench.py [--attack images|json] [--package artifacts/package] [--rounds 5]
                                                  [--requests 300] [serve.key=value ...]

--attack images (default): 8 clients sending the valid sample (what any busy neighbour costs: the
reference), a 4000x3999 PNG (16 kB on the wire; refused before decoding), the same size as JPEG
(decoded at 1/8 scale) and a PNG just under serve.max_image_pixels (decoded in full). Run once on
a server with the configured limit and once with the limit raised to 16,000,000 pixels (before
the limit, the server decoded such images).

--attack json: 4 clients sending the valid sample (the baseline here: equal valid load), JSON
bodies of 200 instances (~600 kB; refused before parsing) and JSON bodies of the configured
serve.max_instances instances (the most a request may carry); the ratio is p50 beside them / p50 beside the valid
sample. Run once with the configured serve.max_instances and once with it raised to 1,000
(before the limit, the server parsed and answered 200 instances).

Starts its own TorchServe on free loopback ports.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import math
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve_bench import load  # noqa: E402
from components.core.config.compose import compose  # noqa: E402
from components.core.config.schema import PORT_KEYS  # noqa: E402
from components.deploy import read_package  # noqa: E402
from components.torchserve import server  # noqa: E402
from components.torchserve.management import copy_checked, register  # noqa: E402
from tests.helpers.servers import free_ports  # noqa: E402

ATTACKERS = 8
UNLIMITED = 16_000_000
JSON_ATTACKERS = 4
JSON_INSTANCES = 200
UNLIMITED_INSTANCES = 1000
VALID_LOAD = "valid sample"


def encoded(width: int, height: int, fmt: str) -> bytes:
    """A gradient image: compresses like a scan, not like a blank page."""
    row = np.linspace(0, 255, width, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.broadcast_to(row, (height, width)).copy()).save(buffer, format=fmt)
    return buffer.getvalue()


def attacks(sample: bytes, max_pixels: int) -> dict[str, bytes]:
    side = math.isqrt(max_pixels)
    return {"8 clients, valid sample": sample, "8 clients, 4000x3999 PNG": encoded(4000, 3999, "PNG"),
            "8 clients, 4000x3999 JPEG": encoded(4000, 3999, "JPEG"), f"8 clients, {side}x{side} PNG": encoded(side, side, "PNG")}


def instances_body(count: int, image_shape: list[int]) -> bytes:
    """JSON {"instances": [...]} of `count` random images, one digit per value (~3 bytes)."""
    pixels = np.random.default_rng(0).integers(0, 10, (count, *image_shape))
    return json.dumps({"instances": pixels.tolist()}).encode()


def json_attacks(sample: bytes, max_instances: int, image_shape: list[int]) -> dict[str, bytes]:
    return {f"{JSON_ATTACKERS} clients, {VALID_LOAD}": sample,
            f"{JSON_ATTACKERS} clients, {JSON_INSTANCES} instances": instances_body(JSON_INSTANCES, image_shape),
            f"{JSON_ATTACKERS} clients, {max_instances} instances": instances_body(max_instances, image_shape)}


def p50_ms(url: str, body: bytes, headers: dict, count: int) -> float:
    """One valid client's p50 latency over `count` requests, each answered 200."""
    return load(url, body, headers, count, clients=1)[0]


def p50_under_attack(url: str, body: bytes, headers: dict, count: int, attack: bytes, attackers: int) -> tuple[float, dict[int, int]]:
    """The valid client's p50 while `attackers` clients send `attack` without pause; their status counts."""
    stop, statuses, lock = threading.Event(), {}, threading.Lock()

    def attacker() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                status = session.post(url, data=attack, headers=headers, timeout=60).status_code
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1

    with concurrent.futures.ThreadPoolExecutor(attackers) as pool:
        running = [pool.submit(attacker) for _ in range(attackers)]
        time.sleep(0.5)  # every attacker is sending
        try:
            return p50_ms(url, body, headers, count), statuses
        finally:
            stop.set()
            for future in running:
                future.result()


def run(package_dir: Path, overrides: list[str], attack: str, raised: bool, rounds: int, count: int) -> None:
    """Every round: the valid client alone, then beside each attack; with the attack's limit raised when `raised`."""
    package = read_package(package_dir)
    sample = (package_dir / package["samples"][0]["file"]).read_bytes()
    image_shape = json.loads((package_dir / "signature.json").read_text())["input"]["shape"][1:]
    with tempfile.TemporaryDirectory(prefix="serve-hostile-bench-") as tmp:
        limit = {"images": [f"serve.max_image_pixels={UNLIMITED}"], "json": [f"serve.max_instances={UNLIMITED_INSTANCES}"]}[attack]
        cfg = compose([*overrides, *(limit if raised else []), f"serve.state_dir={tmp}", "serve.prediction_log.sample_rate=0",
                       *(f"serve.{key}={port}" for key, port in zip(PORT_KEYS, free_ports(len(PORT_KEYS))))])
        try:
            endpoint = server.start(cfg)
            copy_checked(package_dir / package["mar"]["file"], package["mar"]["sha256"], server.state_dir(cfg).model_store,
                         package["mar"]["file"])
            register(endpoint, package["mar"]["file"], cfg.serve)
            url, headers = f"{endpoint.inference_url}/predictions/{package['model_name']}", server.bearer(endpoint.inference_token)
            p50_ms(url, sample, headers, 500)  # warm-up
            if attack == "images":
                bodies, attackers = attacks(sample, cfg.serve.max_image_pixels), ATTACKERS
            else:
                bodies, attackers = json_attacks(sample, compose(overrides).serve.max_instances, image_shape), JSON_ATTACKERS
            p50s, alone, statuses = {name: [] for name in bodies}, [], {name: {} for name in bodies}
            for _ in range(rounds):
                alone.append(p50_ms(url, sample, headers, count))
                for name, body in bodies.items():
                    attacked, seen = p50_under_attack(url, sample, headers, count, body, attackers)
                    p50s[name].append(attacked)
                    statuses[name] = {k: statuses[name].get(k, 0) + v for k, v in seen.items()}
        finally:
            server.stop(cfg)
    key = {"images": "serve.max_image_pixels", "json": "serve.max_instances"}[attack]
    print(f"{key}={cfg.serve[key.split('.')[1]]}: valid client alone p50 {statistics.median(alone):.2f} ms "
          f"(min {min(alone):.2f}, max {max(alone):.2f}) over {rounds} rounds of {count} requests")
    if attack == "images":
        report(bodies, {name: [p / a for p, a in zip(values, alone)] for name, values in p50s.items()}, statuses, "alone")
    else:
        reference = p50s[f"{JSON_ATTACKERS} clients, {VALID_LOAD}"]
        print(f"  beside {JSON_ATTACKERS} valid clients: p50 {statistics.median(reference):.2f} ms (min {min(reference):.2f}, "
              f"max {max(reference):.2f})")
        report(bodies, {name: [p / r for p, r in zip(values, reference)] for name, values in p50s.items()}, statuses, "beside valid load")


def report(bodies: dict[str, bytes], ratios: dict[str, list[float]], statuses: dict[str, dict[int, int]], baseline: str) -> None:
    """One line per attack: its body's size, the valid client's p50 ratio to `baseline`, what the attackers got."""
    print(f"  {'beside':<32}{'size':>9}   p50 / p50 {baseline}: min / median / max   attackers' answers")
    for name, values in ratios.items():
        answers = ", ".join(f"{n} x {status}" for status, n in sorted(statuses[name].items()))
        ratios_text = f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f}"
        print(f"  {name:<32}{len(bodies[name]) / 1e3:>6.0f} kB   {ratios_text:<{len(baseline) + 30}}   {answers}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", choices=["images", "json"], default="images")
    parser.add_argument("--package", default="artifacts/package")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=300, help="valid requests per measurement")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. serve.workers=2")
    args = parser.parse_args()
    for raised in (False, True):
        run(Path(args.package), args.overrides, args.attack, raised, args.rounds, args.requests)


if __name__ == "__main__":
    main()
