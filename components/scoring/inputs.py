"""The files a batch scores: every file with a listed suffix below a local folder or an s3://
prefix, read in chunks. S3 credentials and endpoint come from the environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL), as for the pipeline's data."""

from __future__ import annotations

from collections.abc import Iterator

import fsspec
from fsspec import AbstractFileSystem

from components.core.errors import DataError


def list_files(uri: str, extensions: list[str]) -> tuple[AbstractFileSystem, str, list[str]]:
    """(filesystem, root, sorted file paths below root with one of `extensions`); DataError if there are none."""
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    suffixes = tuple(ext.lower() for ext in extensions)
    try:
        if not fs.isdir(root):
            raise DataError(f"{uri}: no such folder or S3 prefix (score.input / --input)")
        files = sorted(path for path in fs.find(root) if path.lower().endswith(suffixes))
    except PermissionError as exc:
        raise DataError(f"{uri}: access denied ({exc}); check the S3 credentials") from None
    if not files:
        raise DataError(f"{uri}: no files ending in {', '.join(suffixes)} to score (score.extensions)")
    return fs, root, files


def read_chunks(fs: AbstractFileSystem, files: list[str], size: int) -> Iterator[tuple[list[str], list[bytes | Exception]]]:
    """(paths, contents) per chunk of `size` files; a file that cannot be read comes back as its exception."""
    for start in range(0, len(files), size):
        paths = files[start : start + size]
        contents = fs.cat(paths, on_error="return")
        yield paths, [contents.get(path, FileNotFoundError(path)) for path in paths]
