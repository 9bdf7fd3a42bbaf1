"""Lifecycle events: one JSON object of one schema per thing that happened to a model
(EVENT_TYPES), appended to a local JSON-lines log and POSTed to every configured webhook.

Events are a side channel: no step output depends on them, so no step declares `events` among
its config sections (changing a webhook reruns nothing), and a receiver that is down, slow or
answers an error is reported on stderr and never fails the caller.

A receiver is an outside party, so a delivery is bounded and goes only where conf/events allows:
`events.timeout_s` bounds the whole delivery (DNS lookup, connect, TLS, sending, the answer's status
line and headers), however slowly a receiver trickles bytes; a redirect is not followed (a 3xx is a
failed delivery); the host name is resolved once, every address it resolves to must be allowed
(never link-local, multicast or unspecified such as 169.254.169.254; loopback only with
`events.allow_loopback`, private networks only with `events.allow_private`), and the connection goes
to the address that was checked. HTTP(S) proxy variables are not used.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import os
import socket
import ssl
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import certifi
from omegaconf import DictConfig

from components.core.paths import ROOT

SCHEMA = "kfp-dvc-template/event/v1"
EVENT_TYPES = ("experiment_finished", "version_registered", "stage_assigned", "deployed", "rolled_back", "drift_detected",
               "gate_closed")


def make_event(kind: str, message: str, model: str | None = None, version: str | None = None, stage: str | None = None,
               commit: str | None = None, details: dict | None = None) -> dict:
    """The one event schema: what happened (type, message), to what (model, version, stage, commit), and the detail."""
    if kind not in EVENT_TYPES:
        raise ValueError(f"unknown event type {kind!r}; known: {', '.join(EVENT_TYPES)}")
    return {"schema": SCHEMA, "id": uuid.uuid4().hex, "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "type": kind, "model": model, "version": version, "stage": stage, "commit": commit, "message": message,
            "details": details or {}}


def append_to_log(log_file: Path, event: dict) -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:  # one O_APPEND write per event: concurrent writers never interleave lines
        os.write(fd, (json.dumps(event, sort_keys=True) + "\n").encode())
    finally:
        os.close(fd)


class Refused(OSError):
    """A destination that conf/events does not allow."""


class Deadline:
    """One monotonic deadline for a whole outbound call."""

    def __init__(self, seconds: float):
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete answer within {self.seconds}s")
        return left


def refusal(address: str, events: DictConfig) -> str | None:
    """Why conf/events does not allow a connection to the IP `address` (None: allowed)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    ip = getattr(ip, "ipv4_mapped", None) or ip
    if ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved:
        return f"{ip} is link-local, multicast, unspecified or reserved (never allowed)"
    if ip.is_loopback:
        return None if events.allow_loopback else f"{ip} is loopback (events.allow_loopback is false)"
    if ip.is_private and not events.allow_private:
        return f"{ip} is a private address (events.allow_private is false)"
    return None


def resolve_allowed(host: str, port: int, events: DictConfig, deadline: Deadline) -> str:
    """The address to connect to: `host` resolved within the deadline, every address it has allowed."""
    found: dict = {}

    def lookup() -> None:
        try:
            found["addresses"] = [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
        except OSError as exc:
            found["error"] = exc

    resolver = threading.Thread(target=lookup, daemon=True)  # getaddrinfo has no timeout: abandoned when too slow
    resolver.start()
    resolver.join(deadline.left())
    if resolver.is_alive():
        raise TimeoutError(f"resolving {host} took longer than {deadline.seconds}s")
    if "error" in found:
        raise found["error"]
    refused = [why for why in (refusal(address, events) for address in found["addresses"]) if why]
    if refused:
        raise Refused(f"destination refused: {host} resolves to {'; '.join(refused)}")
    return found["addresses"][0]


class PinnedConnection(http.client.HTTPSConnection):
    """HTTP(S) to one already checked IP address, with the URL's host name in the Host header and for TLS."""

    def __init__(self, url: str, address: str, timeout: float):
        parts = urlsplit(url)
        self.tls, self.address = parts.scheme == "https", address
        self.default_port = 443 if self.tls else 80  # the Host header omits the scheme's own port
        super().__init__(parts.hostname, parts.port or self.default_port, timeout=timeout,
                         context=ssl.create_default_context(cafile=certifi.where()))

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)
        if self.tls:  # handshake after self.sock is set, so an abort can interrupt it
            self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host, do_handshake_on_connect=False)
            self.sock.do_handshake()

    def abort(self) -> None:
        """Shut the socket down under a blocked read or write (from another thread): the call fails at once."""
        if self.sock is not None:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self.sock, socket.SHUT_RDWR)


def post_json(url: str, body: dict, events: DictConfig) -> int:
    """POST `body` to `url` within events.timeout_s in total, to an allowed destination; the HTTP status."""
    deadline = Deadline(events.timeout_s)
    parts = urlsplit(url)
    address = resolve_allowed(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80), events, deadline)
    connection = PinnedConnection(url, address, timeout=deadline.left())
    watchdog = threading.Timer(deadline.left(), connection.abort)
    watchdog.start()
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        return connection.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        if time.monotonic() >= deadline.end:  # the watchdog cut the connection
            raise TimeoutError(f"no complete answer within events.timeout_s={events.timeout_s}s") from None
        raise exc
    finally:
        watchdog.cancel()
        connection.close()


def deliver(url: str, event: dict, events: DictConfig) -> str | None:
    """POST the event (no redirects followed); the reason it failed, or None."""
    try:
        status = post_json(url, event, events)
    except (OSError, http.client.HTTPException) as exc:
        return f"{exc.__class__.__name__}: {exc}"
    if 300 <= status < 400:
        return f"HTTP {status}: redirects are not followed"
    return None if 200 <= status < 300 else f"HTTP {status}"


DVC_EXPERIMENT_COPIES = (".dvc", "tmp", "exps")  # where DVC runs queued and --temp experiments, in copies it deletes


def workspace_root(root: Path = ROOT) -> Path:
    """The user's project: `root`, or, when `root` is one of DVC's experiment copies inside a project, that project."""
    for i in range(len(root.parts) - len(DVC_EXPERIMENT_COPIES)):
        if root.parts[i:i + len(DVC_EXPERIMENT_COPIES)] == DVC_EXPERIMENT_COPIES:
            return Path(*root.parts[:i])
    return root


def emit(events: DictConfig, kind: str, message: str, **subject) -> dict:
    """Record one event (the `events` config section) and send it to every webhook; returns the event."""
    event = make_event(kind, message, **subject)
    if events.log_file:
        append_to_log(workspace_root() / events.log_file, event)
    for url in events.webhooks:
        failure = deliver(url, event, events)
        if failure:
            print(f"events: {kind} event not delivered to {url} ({failure})", file=sys.stderr)
    return event
