"""Byte-reproducible TorchServe archives: torch-model-archiver stamps every entry, and the
manifest's `createdOn`, with the build time, so two builds of the same model differ. The
archive is rewritten with sorted entries, a fixed timestamp and fixed permissions."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry
MANIFEST = "MAR-INF/MANIFEST.json"


def make_reproducible(archive: Path) -> None:
    with zipfile.ZipFile(archive) as source:
        entries = {info.filename: source.read(info) for info in source.infolist()}
    manifest = json.loads(entries[MANIFEST])
    manifest["createdOn"] = "01/01/1980 00:00:00"
    entries[MANIFEST] = json.dumps(manifest, indent=2).encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{archive.name}.", dir=archive.parent)
    os.close(fd)
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as target:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, FIXED_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            target.writestr(info, entries[name])
    os.chmod(tmp, 0o644)
    os.replace(tmp, archive)
