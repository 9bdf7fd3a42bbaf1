"""Lifecycle events: one schema, the local events log, and delivery to real HTTP receivers
(http.server on loopback, allowed by events.allow_loopback); a receiver that fails or is down
never fails the caller. Deadlines, redirects and refused destinations: tests/test_outbound.py."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from components.core.config.compose import compose
from components.core.errors import ConfigError
from components.core.events import EVENT_TYPES, SCHEMA, emit
from tests.helpers.servers import free_ports, http_server


@contextlib.contextmanager
def receiver(status: int = 200) -> Iterator[tuple[str, list[dict]]]:
    """A real HTTP server that answers every POST with `status` and keeps the JSON bodies it got."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"content_type": self.headers["Content-Type"], "event": json.loads(body)})
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    with http_server(Handler) as url:
        yield f"{url}/hook", received


def events_cfg(log: Path, *webhooks: str):
    urls = "[" + ",".join(webhooks) + "]"
    return compose([f"events.log_file={log}", f"events.webhooks={urls}", "events.timeout_s=2", "events.allow_loopback=true"]).events


def test_every_event_type_reaches_every_receiver_and_the_log_with_one_schema(tmp_path):
    log = tmp_path / "events.jsonl"
    with receiver() as (first, got_first), receiver() as (second, got_second):
        cfg = events_cfg(log, first, second)
        sent = [emit(cfg, kind, f"{kind} happened", model="digits", version="v1.0.0", stage="prod", commit="abc123")
                for kind in EVENT_TYPES]
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert logged == sent == [r["event"] for r in got_first] == [r["event"] for r in got_second]
    assert {r["content_type"] for r in got_first} == {"application/json"}
    assert [e["type"] for e in logged] == list(EVENT_TYPES)
    keys = {"schema", "id", "time", "type", "model", "version", "stage", "commit", "message", "details"}
    assert all(e.keys() == keys and e["schema"] == SCHEMA for e in logged)
    assert len({e["id"] for e in logged}) == len(logged)


def test_a_failing_or_absent_receiver_never_fails_the_caller(tmp_path, capsys):
    log = tmp_path / "events.jsonl"
    nobody = f"http://127.0.0.1:{free_ports(1)[0]}/hook"
    with receiver(status=500) as (broken, got_broken), receiver() as (working, got_working):
        event = emit(events_cfg(log, broken, nobody, working), "deployed", "digits v1 is the default", model="digits")
    assert [r["event"] for r in got_broken] == [r["event"] for r in got_working] == [event]
    err = capsys.readouterr().err
    assert f"not delivered to {broken} (HTTP 500)" in err and f"not delivered to {nobody} (ConnectionRefusedError" in err
    assert json.loads(log.read_text()) == event


def test_unknown_event_type_and_bad_webhook_config_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown event type 'model_exploded'"):
        emit(events_cfg(tmp_path / "e.jsonl"), "model_exploded", "?")
    with pytest.raises(ConfigError, match="events.webhooks: 'hooks.example.com' is not an http"):
        compose(["events.webhooks=[hooks.example.com]"])
    with pytest.raises(ConfigError, match="events.timeout_s must be above 0, got 0.0"):
        compose(["events.timeout_s=0"])
