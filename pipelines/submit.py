"""submit: create a run of a compiled pipeline on a Kubeflow Pipelines cluster with kfp.Client."""

import datetime
import os
import subprocess
import warnings
from pathlib import Path

import yaml
from omegaconf import DictConfig

from components.core.config import ROOT
from components.core.errors import ConfigError, StepError


class SubmitError(StepError):
    pass


def git(*args: str) -> str:
    result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def data_source(cfg: DictConfig) -> dict[str, str]:
    """The pipeline's data arguments: conf/pipeline's, else this repo's origin at the current commit."""
    data = cfg.pipeline.data
    if data.uri:
        return {"data_repo": data.repo, "data_rev": data.rev, "data_uri": data.uri}
    repo = data.repo or git("remote", "get-url", "origin")
    if not repo:
        raise ConfigError("pipeline.data: this checkout has no git remote 'origin'; set pipeline.data.repo "
                          "(git URL of the project) or pipeline.data.uri (s3://bucket/prefix)")
    return {"data_repo": repo, "data_rev": data.rev or git("rev-parse", "HEAD"), "data_uri": ""}


def data_hash_at(rev: str) -> str:
    """md5 of the data recorded in data.dvc at `rev` of this checkout ("unknown" when not found)."""
    text = git("show", f"{rev}:data.dvc")
    return ",".join(out["md5"] for out in yaml.safe_load(text)["outs"]) if text else "unknown"


def run_name(cfg: DictConfig, data_rev: str) -> str:
    commit = git("rev-parse", "--short=8", "HEAD") or "unknown"
    dirty = "-dirty" if git("status", "--porcelain", "--untracked-files=no") else ""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    return f"{cfg.pipeline.name} commit {commit}{dirty} data {data_hash_at(data_rev or 'HEAD')[:8]} {stamp}"


def auth_token(cfg: DictConfig, token_file: str | None) -> str | None:
    s = cfg.pipeline.submit
    path = token_file or s.token_file
    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise ConfigError(f"{file}: token file not found (pipeline.submit.token_file / --token-file)")
        return file.read_text().strip()
    return os.environ.get(s.token_env) or None


def submit(package: Path, arguments: dict, name: str, host: str, namespace: str, experiment: str, token: str | None) -> str:
    """Create the run; returns its id. One clear SubmitError when the API cannot be reached or refuses."""
    import kfp
    import urllib3
    from kfp_server_api.exceptions import ApiException

    warnings.filterwarnings("ignore", message="This client only works with Kubeflow Pipeline", category=FutureWarning)
    try:
        client = kfp.Client(host=host, namespace=namespace, existing_token=token)
        run = client.create_run_from_pipeline_package(str(package), arguments=arguments, run_name=name,
                                                      experiment_name=experiment, namespace=namespace)
    except urllib3.exceptions.HTTPError as exc:
        reason = str(getattr(exc, "reason", None) or exc).rsplit("): ", 1)[-1]  # drop urllib3's connection repr
        raise SubmitError(f"cannot reach the Kubeflow Pipelines API at {host}: {reason}") from None
    except ApiException as exc:
        raise SubmitError(f"the Kubeflow Pipelines API at {host} refused the request: HTTP {exc.status} {exc.reason}") from None
    return run.run_id
