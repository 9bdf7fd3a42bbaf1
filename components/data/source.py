"""Where the raw data of a pipeline run comes from: the DVC-tracked data of a git repository
at a revision (pulled from that project's DVC remote), an S3 prefix, or a local folder.

S3 credentials and endpoint come from the environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL; on a cluster from a Kubernetes secret), never
from code or the config.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from components.core.errors import ConfigError, DataError
from components.core.remote import download_folder, listing_hash


def fetch_data(dest: str | Path, data_path: str, repo: str = "", rev: str = "", uri: str = "") -> Path:
    """The raw data folder: `data_path` of git `repo` at `rev` via DVC, or `uri` (s3:// or a folder).

    Downloads land under `dest`; a local folder is used where it is.
    """
    _one_source(repo, uri)
    if repo:
        return _from_dvc(repo, rev, data_path, Path(dest) / "data")
    if uri.startswith("s3://"):
        return download_folder(uri, Path(dest) / "data", "pipeline.data.uri")
    folder = Path(uri.removeprefix("file://"))
    if not folder.is_dir():
        raise DataError(f"{uri}: data folder not found (pipeline.data.uri)")
    return folder


def data_hash_of(data_path: str, repo: str = "", rev: str = "", uri: str = "") -> str:
    """What identifies the data fetch_data(dest, data_path, repo, rev, uri) fetches, read where it is, without fetching it:
    DVC's md5 of `data_path` at `repo`@`rev` (what its .dvc file records there), the sha256 of an S3 prefix's listing
    (keys, ETags, sizes), or DVC's md5 of a local folder (what `dvc add` would record)."""
    _one_source(repo, uri)
    if repo:
        return _dvc_hash_at(repo, rev, data_path)
    if uri.startswith(("s3://", "minio://")):
        return listing_hash(uri, "pipeline.data.uri")
    folder = Path(uri.removeprefix("file://"))
    if not folder.is_dir():
        raise DataError(f"{uri}: data folder not found (pipeline.data.uri)")
    return dvc_dir_hash(folder)


def _one_source(repo: str, uri: str) -> None:
    if bool(repo) == bool(uri):
        raise ConfigError("pipeline.data: set either repo (+ rev) for DVC-tracked data or uri for an S3 prefix/folder, "
                          f"not {'both' if repo else 'neither'}")


def dvc_dir_hash(folder: Path) -> str:
    """The md5 DVC would record for `folder` (computed with DVC's own hashing library)."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db.local import LocalHashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as scratch:
        _, _, obj = build(LocalHashFileDB(fs, scratch), str(folder), fs, "md5")
    return obj.hash_info.value


def _dvc_hash_at(repo: str, rev: str, data_path: str) -> str:
    from dvc.api import DVCFileSystem
    from dvc.exceptions import DvcException
    from scmrepo.exceptions import SCMError

    try:
        info = DVCFileSystem(url=repo, rev=rev or None).info(data_path)
    except (DvcException, SCMError, FileNotFoundError) as exc:
        raise DataError(f"{repo}@{rev or 'HEAD'}: cannot read the DVC hash of {data_path!r}: {exc}") from None
    if "md5" not in info:
        raise DataError(f"{repo}@{rev or 'HEAD'}: {data_path!r} is not tracked by DVC")
    return info["md5"]


def _from_dvc(repo: str, rev: str, data_path: str, out: Path) -> Path:
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc_data.index.index import DataIndexError

    try:
        Repo.get(url=repo, path=data_path, out=str(out), rev=rev or None)
    except (DvcException, DataIndexError) as exc:  # DataIndexError: an object is missing on the remote
        raise DataError(f"{repo}@{rev or 'HEAD'}: cannot fetch {data_path!r} with DVC: {exc}") from None
    return out
