"""The Kubeflow Pipelines API (kfp.Client): register the pipeline and a version named by the
commit (the UI's Pipelines page, recurring runs), and create runs of a fresh spec or of a
registered version. One clear SubmitError when the API cannot be reached, refuses (with the
server's own reason), is hidden behind an auth proxy's login page, is older than the pipeline
needs, or answers without the id of what it was asked to create."""

import contextlib
import datetime
import html
import json
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig

from components.core.paths import ROOT
from components.core.errors import ConfigError, StepError
from components.core.git import GitError, git

# The exit handler (dsl.PipelineTaskFinalStatus) and the sweep's dsl.Collected need this KFP backend (docs/kubeflow.md).
MIN_KFP_BACKEND = (2, 14)
HEALTHZ = "/apis/v2beta1/healthz"


class SubmitError(StepError):
    pass


def data_hash_at(rev: str) -> str:
    """md5 of the data recorded in data.dvc at `rev` of this checkout ("unknown" when not found)."""
    try:
        text = git(ROOT, "show", f"{rev}:data.dvc")
    except GitError:
        return "unknown"
    return ",".join(out["md5"] for out in yaml.safe_load(text)["outs"])


def version_name() -> str:
    """A pipeline version is named by the commit it was compiled at."""
    dirty = "-dirty" if git(ROOT, "status", "--porcelain", "--untracked-files=no") else ""
    return f"commit-{git(ROOT, 'rev-parse', '--short=12', 'HEAD')}{dirty}"


def run_name(cfg: DictConfig) -> str:
    try:
        commit = git(ROOT, "rev-parse", "--short=8", "HEAD")
        dirty = "-dirty" if git(ROOT, "status", "--porcelain", "--untracked-files=no") else ""
    except GitError:  # the run is named by what is known
        commit, dirty = "unknown", ""
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


def server_reason(body: bytes | str | None, limit: int = 300) -> str:
    """What the server said: the message of a KFP (gRPC gateway) error, else its text without HTML tags."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else (body or "")
    with contextlib.suppress(ValueError, AttributeError):
        answer = json.loads(text)
        text = answer.get("message") or answer.get("error") or text
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", text)).split())
    return text[:limit] + ("..." if len(text) > limit else "")


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
        said = server_reason(exc.body)
        raise SubmitError(f"the Kubeflow Pipelines API at {host} refused the request: HTTP {exc.status} {exc.reason}"
                          + (f": {said}" if said else "")) from None


@dataclass(frozen=True)
class Server:
    """What the API's healthz tells: its version (tag_name, "unknown" on a dev build) and whether it is multi-user."""

    version: str
    multi_user: bool


def check_answer(host: str, status: int, headers: dict, body: bytes, token: str | None, token_hint: str) -> dict:
    """The JSON answer of the API, or a SubmitError saying what answered instead (an auth proxy, an error)."""
    where = f"the Kubeflow Pipelines API at {host}"
    login = "a token was sent but not accepted" if token else f"give a token ({token_hint})"
    if 300 <= status < 400:
        raise SubmitError(f"{where} redirected to {headers.get('location', '?')} (an auth proxy's login page?): {login}")
    if status in (401, 403):
        raise SubmitError(f"{where} refused the request: HTTP {status}: {server_reason(body) or 'no reason given'}: {login}")
    if status >= 400:
        raise SubmitError(f"{where} refused the request: HTTP {status}: {server_reason(body) or 'no reason given'}")
    try:
        return json.loads(body)
    except ValueError:
        kind = headers.get("content-type", "no content type")
        raise SubmitError(f"{where} answered {kind}, not the API's JSON ({server_reason(body, 80)!r}): is {host} the API's "
                          f"URL? Behind an auth proxy that is a login page: {login}") from None


def probe(host: str, token: str | None, token_hint: str) -> Server:
    """GET the API's healthz, following no redirect: a clear error for anything but the KFP API itself."""
    import urllib3

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with api_errors(host):
        response = urllib3.PoolManager().request("GET", host.rstrip("/") + HEALTHZ, headers=headers, redirect=False,
                                                 retries=False, timeout=30)
    answer = check_answer(host, response.status, {k.lower(): v for k, v in response.headers.items()}, response.data, token,
                          token_hint)
    return Server(str(answer.get("tag_name") or "unknown"), bool(answer.get("multi_user")))


def check_version(server: Server, host: str) -> str | None:
    """A SubmitError when the backend is older than the pipeline needs; a warning (returned) when it cannot tell."""
    found = re.match(r"v?(\d+)\.(\d+)", server.version)
    if not found:
        return f"the KFP backend at {host} does not tell its version ({server.version!r}): it must be >= 2.14 (docs/kubeflow.md)"
    if tuple(map(int, found.groups())) < MIN_KFP_BACKEND:
        raise SubmitError(f"the KFP backend at {host} is {server.version}; this pipeline needs >= 2.14 (its exit handler's "
                          "PipelineTaskFinalStatus, the sweep's dsl.Collected): upgrade Kubeflow Pipelines (docs/kubeflow.md, "
                          "version matrix)")
    return None


def client(host: str, namespace: str, token: str | None, server: Server):
    import kfp

    warnings.filterwarnings("ignore", message="This client only works with Kubeflow Pipeline", category=FutureWarning)
    with api_errors(host):
        c = kfp.Client(host=host, namespace=namespace, existing_token=token)
    c.host_url, c.server = host, server
    return c


def created(c, what: str, value: str | None) -> str:
    """The id the API gave what it created; an answer without one created nothing that can be named."""
    if not value:
        raise SubmitError(f"the Kubeflow Pipelines API at {c.host_url} answered without the {what} id: nothing was created "
                          "(an auth proxy or another service answering in its place?)")
    return value


def upload(c, package: Path, name: str, version: str, namespace: str) -> tuple[str, str]:
    """Register `name` (once) and `version` of it; (pipeline id, version id). On a multi-user KFP, in `namespace`."""
    scope = namespace if c.server.multi_user else None
    with api_errors(c.host_url):
        pipeline_id = _pipeline_named(c, name, scope)
        if pipeline_id is None:
            pipeline_id = created(c, "pipeline", c.upload_pipeline(str(package), pipeline_name=name, description=name,
                                                                  namespace=scope).pipeline_id)
        made = c.upload_pipeline_version(str(package), pipeline_version_name=version, pipeline_id=pipeline_id,
                                         description=f"compiled at {version}")
    return pipeline_id, created(c, "pipeline version", made.pipeline_version_id)


def submit(c, package: Path, name: str, experiment: str, namespace: str, version_id: str | None = None,
           schedule: str | None = None) -> str:
    """Create the run (of the registered version `version_id`, else of `package`), or with `schedule`
    (a cron expression) a recurring run of the registered version; returns its id."""
    with api_errors(c.host_url):
        if version_id:
            exp = c.create_experiment(experiment, namespace=namespace)
            pipeline_id = _pipeline_of(c, version_id, namespace if c.server.multi_user else None)
            if schedule:
                return created(c, "recurring run", c.create_recurring_run(
                    created(c, "experiment", exp.experiment_id), name, cron_expression=schedule, pipeline_id=pipeline_id,
                    version_id=version_id).recurring_run_id)
            return created(c, "run", c.run_pipeline(created(c, "experiment", exp.experiment_id), name, pipeline_id=pipeline_id,
                                                    version_id=version_id).run_id)
        run = c.create_run_from_pipeline_package(str(package), run_name=name, experiment_name=experiment, namespace=namespace)
    return created(c, "run", run.run_id)


def _pipeline_named(c, name: str, namespace: str | None) -> str | None:
    found = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    pipelines = c.list_pipelines(filter=found, namespace=namespace).pipelines or []
    return pipelines[0].pipeline_id if pipelines else None


def _pipeline_of(c, version_id: str, namespace: str | None) -> str:
    for pipeline in c.list_pipelines(page_size=200, namespace=namespace).pipelines or []:
        versions = c.list_pipeline_versions(pipeline.pipeline_id, page_size=200).pipeline_versions or []
        if any(v.pipeline_version_id == version_id for v in versions):
            return pipeline.pipeline_id
    raise SubmitError(f"no registered pipeline has version {version_id} (python -m pipelines upload registers one)")
