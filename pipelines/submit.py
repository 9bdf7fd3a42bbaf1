"""The Kubeflow Pipelines API (kfp.Client): register the pipeline and a version named by the
commit (the UI's Pipelines page, recurring runs), and create runs of a fresh spec or of a
registered version. One clear SubmitError when the API cannot be reached or refuses."""

import contextlib
import datetime
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import yaml
from omegaconf import DictConfig

from components.core.errors import ConfigError, StepError
from pipelines.preflight import git


class SubmitError(StepError):
    pass


def data_hash_at(rev: str) -> str:
    """md5 of the data recorded in data.dvc at `rev` of this checkout ("unknown" when not found)."""
    text = git("show", f"{rev}:data.dvc")
    return ",".join(out["md5"] for out in yaml.safe_load(text)["outs"]) if text else "unknown"


def version_name() -> str:
    """A pipeline version is named by the commit it was compiled at."""
    dirty = "-dirty" if git("status", "--porcelain", "--untracked-files=no") else ""
    return f"commit-{git('rev-parse', '--short=12', 'HEAD')}{dirty}"


def run_name(cfg: DictConfig) -> str:
    commit = git("rev-parse", "--short=8", "HEAD") or "unknown"
    dirty = "-dirty" if git("status", "--porcelain", "--untracked-files=no") else ""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    return f"{cfg.pipeline.name} commit {commit}{dirty} data {data_hash_at(cfg.pipeline.data.rev or 'HEAD')[:8]} {stamp}"


def auth_token(cfg: DictConfig, token_file: str | None) -> str | None:
    s = cfg.pipeline.submit
    path = token_file or s.token_file
    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise ConfigError(f"{file}: token file not found (pipeline.submit.token_file / --token-file)")
        return file.read_text().strip()
    return os.environ.get(s.token_env) or None


@contextlib.contextmanager
def api_errors(host: str) -> Iterator[None]:
    import urllib3
    from kfp_server_api.exceptions import ApiException

    try:
        yield
    except urllib3.exceptions.HTTPError as exc:
        reason = str(getattr(exc, "reason", None) or exc).rsplit("): ", 1)[-1]  # drop urllib3's connection repr
        raise SubmitError(f"cannot reach the Kubeflow Pipelines API at {host}: {reason}") from None
    except ApiException as exc:
        raise SubmitError(f"the Kubeflow Pipelines API at {host} refused the request: HTTP {exc.status} {exc.reason}") from None


def client(host: str, namespace: str, token: str | None):
    import kfp

    warnings.filterwarnings("ignore", message="This client only works with Kubeflow Pipeline", category=FutureWarning)
    with api_errors(host):
        c = kfp.Client(host=host, namespace=namespace, existing_token=token)
    c.host_url = host
    return c


def upload(c, package: Path, name: str, version: str, cfg: DictConfig) -> tuple[str, str]:
    """Register `name` (once) and `version` of it; (pipeline id, version id)."""
    with api_errors(c.host_url):
        pipeline_id = c.get_pipeline_id(name)
        if pipeline_id is None:
            pipeline_id = c.upload_pipeline(str(package), pipeline_name=name, description=cfg.pipeline.name,
                                            namespace=cfg.pipeline.submit.namespace).pipeline_id
        made = c.upload_pipeline_version(str(package), pipeline_version_name=version, pipeline_id=pipeline_id,
                                         description=f"compiled at {version}")
    return pipeline_id, made.pipeline_version_id


def submit(c, package: Path, name: str, experiment: str, namespace: str, version_id: str | None = None,
           schedule: str | None = None) -> str:
    """Create the run (of the registered version `version_id`, else of `package`), or with `schedule`
    (a cron expression) a recurring run of the registered version; returns its id."""
    with api_errors(c.host_url):
        if version_id:
            exp = c.create_experiment(experiment, namespace=namespace)
            pipeline_id = _pipeline_of(c, version_id)
            if schedule:
                return c.create_recurring_run(exp.experiment_id, name, cron_expression=schedule, pipeline_id=pipeline_id,
                                              version_id=version_id).recurring_run_id
            return c.run_pipeline(exp.experiment_id, name, pipeline_id=pipeline_id, version_id=version_id).run_id
        run = c.create_run_from_pipeline_package(str(package), run_name=name, experiment_name=experiment, namespace=namespace)
    return run.run_id


def _pipeline_of(c, version_id: str) -> str:
    for pipeline in c.list_pipelines(page_size=200).pipelines or []:
        versions = c.list_pipeline_versions(pipeline.pipeline_id, page_size=200).pipeline_versions or []
        if any(v.pipeline_version_id == version_id for v in versions):
            return pipeline.pipeline_id
    raise SubmitError(f"no registered pipeline has version {version_id} (python -m pipelines upload registers one)")
