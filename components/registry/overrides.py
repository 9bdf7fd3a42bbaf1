"""Overrides of failed gates, on the record: `promote --force --reason` commits one record on the
current branch (the same tree as its parent: the index, the working tree and the pipeline stay as
they are) whose message names the model version, stage and commit, the failed gates it accepts,
the reason and the command line, with a machine-readable `Gate-Override:` trailer.

`check` accepts an override only from such a commit in the history of the policy ref (the branch
that deploys). A tag message can say anything and anyone who may push a tag can write one; a record
counts once it is in that branch, which is where review and branch protection apply."""

from __future__ import annotations

import json
from pathlib import Path

from components.core.git import git

TRAILER = "Gate-Override: "
SUBJECT_KEYS = ("artifact", "version", "stage", "commit")  # what a record must name exactly to cover a promotion


def override_message(record: dict) -> str:
    failures = "".join(f"  {failure}\n" for failure in record["failures"])
    return (f"Override failed gates: {record['artifact']} {record['version']} -> {record['stage']}\n\n"
            f"Reason: {record['reason']}\nCommand: {record['command']}\nModel commit: {record['commit']}\nFailed gates:\n{failures}\n"
            f"{TRAILER}{json.dumps(record, sort_keys=True)}\n")


def record_override(repo: Path, record: dict, push: bool = False) -> str:
    """Commit `record` on HEAD (index and working tree untouched); returns the record's commit."""
    head = git(repo, "rev-parse", "HEAD")
    commit = git(repo, "commit-tree", f"{head}^{{tree}}", "-p", head, "-m", override_message(record))
    git(repo, "update-ref", "-m", "promote --force: gate override record", "HEAD", commit, head)
    if push:  # before the tag: the deploy workflow looks for the record in the branch it deploys from
        git(repo, "push", "origin", "HEAD")
    return commit


def find_override(repo: Path, ref: str, subject: dict, failures: list[str]) -> dict | None:
    """The newest record in `ref`'s history that names `subject` (artifact, version, stage, commit) and
    accepts every one of `failures`; with its commit as `record`. None when there is none."""
    log = git(repo, "log", "--format=%H%x00%B%x1e", "--fixed-strings", f"--grep={TRAILER}", ref, "--")
    for entry in filter(None, (e.strip() for e in log.split("\x1e"))):
        commit, _, message = entry.partition("\x00")
        for line in message.splitlines():
            record = _parsed(line)
            if (record and all(record.get(key) == subject[key] for key in SUBJECT_KEYS)
                    and set(failures) <= set(record.get("failures") or [])):
                return {**record, "record": commit}
    return None


def _parsed(line: str) -> dict | None:
    if not line.startswith(TRAILER):
        return None
    try:
        record = json.loads(line[len(TRAILER):])
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
