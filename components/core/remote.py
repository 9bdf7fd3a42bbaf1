"""Folders at a URL: an s3:// prefix (credentials and endpoint from the environment: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL), KFP's minio:// artifact URIs, or a local path."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from components.core.errors import DataError

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem


def fsspec_url(uri: str) -> str:
    """KFP names MinIO artifacts minio://bucket/key; fsspec reaches them as s3:// (AWS_ENDPOINT_URL set)."""
    return "s3://" + uri.removeprefix("minio://") if uri.startswith("minio://") else uri


@contextmanager
def _opened(uri: str) -> Iterator[tuple[AbstractFileSystem, str]]:
    """The filesystem holding `uri` and the path in it; access denied becomes one DataError naming `uri`."""
    import fsspec  # s3fs and botocore load only when a remote folder is read

    fs, root = fsspec.core.url_to_fs(fsspec_url(uri))
    try:
        yield fs, root.rstrip("/")
    except PermissionError as exc:
        raise DataError(f"{uri}: access denied ({exc}); check the S3 credentials") from None


def download_folder(uri: str, dest: str | Path, setting: str) -> Path:
    """The folder at `uri` copied into `dest`; DataError naming `uri` and the `setting` it came from when
    there is no such folder or access is denied."""
    with _opened(uri) as (fs, root):
        if not fs.isdir(root):
            raise DataError(f"{uri}: no such folder or S3 prefix ({setting})")
        Path(dest).mkdir(parents=True, exist_ok=True)
        fs.get(root + "/", str(dest) + "/", recursive=True)
    return Path(dest)


def listing_hash(uri: str, setting: str) -> str:
    """sha256 of the listing of the S3 prefix at `uri`: every key below it with its ETag and size, so an object rewritten
    under the same key changes it. Nothing is downloaded. DataError as for download_folder."""
    with _opened(uri) as (fs, root):
        try:
            found = fs.find(root, detail=True)
        except FileNotFoundError:  # no such bucket
            found = {}
    if not found:
        raise DataError(f"{uri}: no such folder or S3 prefix ({setting})")
    digest = hashlib.sha256()
    for key in sorted(found):
        info = found[key]
        digest.update(f"{key.removeprefix(root + '/')}\0{info.get('ETag', '')}\0{info['size']}\n".encode())
    return f"sha256:{digest.hexdigest()}"
