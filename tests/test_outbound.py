"""Outbound calls to outside parties (event webhooks), probed as a hostile receiver would: one that
trickles its answer a byte a second, one that redirects, and destinations that must never be reached
(link-local such as cloud metadata, loopback unless conf/events allows it). Real socket servers on
loopback ports 18600-18699."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from components.core.config.compose import compose
from components.core.errors import ConfigError
from components.core.events import emit

TRICKLED = b"HTTP/1.1 200 OK\r\n\r\n"  # at one byte a second, 19 s; every single read is quick


def events_cfg(tmp_path, *webhooks: str, allow_loopback: bool = True, allow_private: bool = True, timeout_s: float = 2):
    return compose([f"events.log_file={tmp_path / 'events.jsonl'}", "events.webhooks=[" + ",".join(f"'{url}'" for url in webhooks) + "]",
                    f"events.timeout_s={timeout_s}", f"events.allow_loopback={str(allow_loopback).lower()}",
                    f"events.allow_private={str(allow_private).lower()}"]).events


def listener() -> socket.socket:
    """A loopback listening socket on the first free port of 18600-18699."""
    for port in range(18600, 18700):
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            sock.close()
            continue
        sock.listen()
        sock.settimeout(0.2)
        return sock
    raise RuntimeError("no free loopback port in 18600-18699")


def read_request(conn: socket.socket) -> dict:
    """One HTTP request read whole; its JSON body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += conn.recv(65536)
    return json.loads(body)


@contextlib.contextmanager
def receiver(answer: Callable[[socket.socket, threading.Event], None]) -> Iterator[tuple[str, list[dict], threading.Event]]:
    """A threaded socket server: keeps each request's JSON body, then `answer(connection, stop)` writes the reply.
    Yields its URL, the bodies, and an event set once a connection has been answered (or its client hung up)."""
    sock, received, stop, answered = listener(), [], threading.Event(), threading.Event()

    def handle(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            received.append(read_request(conn))
            answer(conn, stop)
        answered.set()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                threading.Thread(target=handle, args=(sock.accept()[0],), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/hook", received, answered
    finally:
        stop.set()
        thread.join()
        sock.close()


def replying(status_line: str, *headers: str) -> Callable[[socket.socket, threading.Event], None]:
    reply = "\r\n".join([status_line, *headers, "Content-Length: 0", "", ""]).encode()
    return lambda conn, stop: conn.sendall(reply)


@pytest.mark.integration
def test_a_trickling_receiver_is_cut_off_at_timeout_s_in_total(tmp_path, capsys):
    sent: list[int] = []

    def trickle(conn: socket.socket, stop: threading.Event) -> None:
        for byte in TRICKLED:
            if stop.wait(1):
                return
            conn.sendall(bytes([byte]))
            sent.append(byte)

    with receiver(trickle) as (url, received, answered):
        event = emit(events_cfg(tmp_path, url, timeout_s=2), "drift_detected", "drift in the last 500 predictions")
        assert answered.wait(10)  # the receiver notices the client gone
    assert [e["id"] for e in received] == [event["id"]]
    assert f"not delivered to {url} (TimeoutError: no complete answer within events.timeout_s=2.0s)" in capsys.readouterr().err
    assert len(sent) <= 4 < len(TRICKLED)  # about two bytes in two seconds, then the connection was gone


def test_a_redirect_is_not_followed(tmp_path, capsys):
    with receiver(replying("HTTP/1.1 200 OK")) as (elsewhere, got_elsewhere, _):
        with receiver(replying("HTTP/1.1 307 Temporary Redirect", f"Location: {elsewhere}")) as (url, received, _):
            event = emit(events_cfg(tmp_path, url), "deployed", "digits v1 is the default")
    assert [e["id"] for e in received] == [event["id"]] and got_elsewhere == []
    assert f"not delivered to {url} (HTTP 307: redirects are not followed)" in capsys.readouterr().err


def test_loopback_is_refused_after_resolution_unless_allowed(tmp_path, capsys):
    with receiver(replying("HTTP/1.1 204 No Content")) as (url, received, _):
        by_name = url.replace("127.0.0.1", "localhost")
        emit(events_cfg(tmp_path, by_name, allow_loopback=False), "deployed", "digits v1 is the default")
        assert received == []
        assert f"not delivered to {by_name} (Refused: destination refused: localhost resolves to" in capsys.readouterr().err
        emit(events_cfg(tmp_path, by_name, allow_loopback=True), "deployed", "digits v1 is the default")
        assert len(received) == 1


@pytest.mark.parametrize("url, why", [
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is link-local"),
    ("http://[::ffff:169.254.169.254]/", "169.254.169.254 is link-local"),
    ("http://[fe80::1]/hook", "fe80::1 is link-local"),
    ("http://0.0.0.0:18650/hook", "0.0.0.0 is link-local, multicast, unspecified"),
    ("http://10.1.2.3/hook", "10.1.2.3 is a private address (events.allow_private is false)"),
])
def test_refused_destinations_are_never_contacted_and_never_fail_the_caller(tmp_path, capsys, url, why):
    event = emit(events_cfg(tmp_path, url, allow_private=False), "gate_closed", "digits v2 refused for prod")
    assert f"not delivered to {url} (Refused: destination refused: " in (err := capsys.readouterr().err) and why in err
    assert json.loads((tmp_path / "events.jsonl").read_text()) == event  # still logged


def test_the_destination_flags_are_typed_config_keys():
    assert (compose([]).events.allow_loopback, compose([]).events.allow_private) == (False, True)
    with pytest.raises(ConfigError, match="events.allow_loopback"):
        compose(["events.allow_loopback=sometimes"])
