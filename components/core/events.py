"""Lifecycle events: one JSON object of one schema per thing that happened to a model
(EVENT_TYPES), appended to a local JSON-lines log and POSTed to every configured webhook.

Events are a side channel: no step output depends on them, so no step declares `events` among
its config sections (changing a webhook reruns nothing), and a receiver that is down, slow or
answers an error is reported on stderr and never fails the caller.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

import requests
from omegaconf import DictConfig

from components.core.config import ROOT

SCHEMA = "kfp-dvc-template/event/v1"
EVENT_TYPES = ("experiment_finished", "version_registered", "stage_assigned", "deployed", "rolled_back", "drift_detected",
               "gate_closed")


def make_event(kind: str, message: str, model: str | None = None, version: str | None = None, stage: str | None = None,
               commit: str | None = None, details: dict | None = None) -> dict:
    """The one event schema: what happened (type, message), to what (model, version, stage, commit), and the detail."""
    if kind not in EVENT_TYPES:
        raise ValueError(f"unknown event type {kind!r}; known: {', '.join(EVENT_TYPES)}")
    return {"schema": SCHEMA, "id": uuid.uuid4().hex, "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "type": kind, "model": model, "version": version, "stage": stage, "commit": commit, "message": message,
            "details": details or {}}


def append_to_log(log_file: Path, event: dict) -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:  # one O_APPEND write per event: concurrent writers never interleave lines
        os.write(fd, (json.dumps(event, sort_keys=True) + "\n").encode())
    finally:
        os.close(fd)


def deliver(url: str, event: dict, timeout_s: float) -> str | None:
    """POST the event; the reason it failed, or None."""
    try:
        response = requests.post(url, json=event, timeout=timeout_s)
    except requests.RequestException as exc:
        return f"{exc.__class__.__name__}: {exc}"
    return None if response.ok else f"HTTP {response.status_code}"


def emit(events: DictConfig, kind: str, message: str, **subject) -> dict:
    """Record one event (the `events` config section) and send it to every webhook; returns the event."""
    event = make_event(kind, message, **subject)
    if events.log_file:
        append_to_log(ROOT / events.log_file, event)
    for url in events.webhooks:
        failure = deliver(url, event, events.timeout_s)
        if failure:
            print(f"events: {kind} event not delivered to {url} ({failure})", file=sys.stderr)
    return event
