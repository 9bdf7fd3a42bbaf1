"""Where the raw data of a pipeline run comes from: the DVC-tracked data of a git repository
at a revision (pulled from that project's DVC remote), an S3 prefix, or a local folder.

S3 credentials and endpoint come from the environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL; on a cluster from a Kubernetes secret), never
from code or the config.
"""

from __future__ import annotations

from pathlib import Path

from components.core.errors import ConfigError, DataError
from components.core.remote import download_folder


def fetch_data(dest: str | Path, data_path: str, repo: str = "", rev: str = "", uri: str = "") -> Path:
    """The raw data folder: `data_path` of git `repo` at `rev` via DVC, or `uri` (s3:// or a folder).

    Downloads land under `dest`; a local folder is used where it is.
    """
    if bool(repo) == bool(uri):
        raise ConfigError("pipeline.data: set either repo (+ rev) for DVC-tracked data or uri for an S3 prefix/folder, "
                          f"not {'both' if repo else 'neither'}")
    if repo:
        return _from_dvc(repo, rev, data_path, Path(dest) / "data")
    if uri.startswith("s3://"):
        return download_folder(uri, Path(dest) / "data", "pipeline.data.uri")
    folder = Path(uri.removeprefix("file://"))
    if not folder.is_dir():
        raise DataError(f"{uri}: data folder not found (pipeline.data.uri)")
    return folder


def _from_dvc(repo: str, rev: str, data_path: str, out: Path) -> Path:
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc_data.index.index import DataIndexError

    try:
        Repo.get(url=repo, path=data_path, out=str(out), rev=rev or None)
    except (DvcException, DataIndexError) as exc:  # DataIndexError: an object is missing on the remote
        raise DataError(f"{repo}@{rev or 'HEAD'}: cannot fetch {data_path!r} with DVC: {exc}") from None
    return out
