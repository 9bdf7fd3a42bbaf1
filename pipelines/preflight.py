"""Checks made before `compile`, `upload` or `submit` writes anything a cluster would run, so a
mistake is one clear error here and not a pod failing (and retried) on the cluster: the data
source (a scheme the pod can reach, the commit pushed, its DVC data on the remote,
credentials for a private repo, or an S3 `uri`) and the deploy target. The config itself
was validated when it was composed.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import yaml
from omegaconf import DictConfig

from components.core.paths import ROOT
from components.core.errors import ConfigError
from components.core.config.validation import check_shared_volume
from components.core.git import GitError, git

CLONABLE = re.compile(r"^(https?://|ssh://|[\w.-]+@[\w.-]+:)")  # scp-like ssh: git@host:path
SSH = re.compile(r"^(ssh://|[\w.-]+@[\w.-]+:)")


def head_commit(repo: Path = ROOT) -> str:
    try:
        return git(repo, "rev-parse", "HEAD")
    except GitError:
        raise ConfigError(f"{repo}: not a git repository with a commit; the images and the pipeline are named by commit") from None


def _origin_url(repo: Path) -> str:
    try:
        return git(repo, "remote", "get-url", "origin")
    except GitError:
        return ""


def cluster_data_source(cfg: DictConfig, repo_dir: Path = ROOT) -> dict[str, str]:
    """The data arguments of a cluster run: an s3:// `uri`, or a git repo + a pushed commit whose DVC data is pushed."""
    data = cfg.pipeline.data
    if data.uri and data.repo:
        raise ConfigError("pipeline.data: set either repo (+ rev) or uri, not both")
    if data.uri:
        if not data.uri.startswith("s3://"):
            raise ConfigError(f"pipeline.data.uri={data.uri!r}: a cluster pod reaches only s3:// URIs "
                              "(a local folder exists only on this machine)")
        return {"data_repo": "", "data_rev": "", "data_uri": data.uri}
    url = data.repo or _origin_url(repo_dir)
    if not url:
        raise ConfigError("pipeline.data: this checkout has no git remote 'origin'; set pipeline.data.repo "
                          "(git URL of the project) or pipeline.data.uri (s3://bucket/prefix)")
    check_clonable(url, data.git_secret)
    commit = pushed_commit(data.rev or "HEAD", repo_dir)
    check_dvc_data_pushed(commit, repo_dir)
    return {"data_repo": url, "data_rev": commit, "data_uri": ""}


def check_clonable(url: str, git_secret: str) -> None:
    """A URL a pod can clone, with credentials when it needs them."""
    if not CLONABLE.match(url):
        raise ConfigError(f"pipeline.data.repo={url!r}: not a URL a pod can clone (https://, ssh:// or git@host:path); "
                          "a local path or file:// exists only on this machine")
    if git_secret:
        return
    if SSH.match(url):
        raise ConfigError(f"pipeline.data.repo={url!r} is an SSH URL: set pipeline.data.git_secret to a Kubernetes secret "
                          "with key ssh-privatekey (docs/kubeflow.md)")
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true", "GIT_CONFIG_GLOBAL": os.devnull}
    probe = subprocess.run(["git", "-c", "credential.helper=", "ls-remote", "--heads", url], capture_output=True, text=True,
                           env=env, timeout=60)
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["no answer"])[-1]
        raise ConfigError(f"pipeline.data.repo={url!r}: cannot be read without credentials ({reason}); a pod clones it "
                          "anonymously unless pipeline.data.git_secret names a secret with key git-credentials")


def pushed_commit(rev: str, repo_dir: Path = ROOT) -> str:
    try:
        commit = git(repo_dir, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except GitError:
        raise ConfigError(f"pipeline.data.rev={rev!r}: no such commit in {repo_dir}") from None
    if not git(repo_dir, "branch", "-r", "--contains", commit):
        raise ConfigError(f"pipeline.data.rev: commit {commit[:10]} is on no remote branch of {repo_dir}: a pod cannot fetch "
                          "it; `git push` it first")
    return commit


def check_dvc_data_pushed(commit: str, repo_dir: Path = ROOT) -> None:
    """Every object of data.dvc at `commit` is on the DVC remote: checked object by object on the
    remote itself (`dvc status -c` trusts a cached remote index and can say "in sync" when it is not)."""
    from dvc.repo import Repo

    try:
        text = git(repo_dir, "show", f"{commit}:data.dvc")
    except GitError:
        raise ConfigError(f"data.dvc: not committed at {commit[:10]}; `dvc add` the data and commit data.dvc") from None
    with Repo(str(repo_dir)) as repo:
        remote = repo.cloud.get_remote_odb(None, "push")
        wanted = set()
        for out in yaml.safe_load(text)["outs"]:
            wanted |= _object_ids(repo, out["md5"])
        missing = wanted - _on_remote(remote, wanted)
    if missing:
        raise ConfigError(f"data.dvc at {commit[:10]}: {len(missing)} of {len(wanted)} DVC object(s) are not on the remote "
                          f"({remote.fs.unstrip_protocol(remote.path)}): run `dvc push` first")


def _on_remote(remote, wanted: set[str]) -> set[str]:
    """Which of `wanted` the DVC remote holds. Whatever stops the check (no credentials here, a refused or unreachable
    remote: botocore, aiohttp, OS errors) is one clear error naming the remote, not the client library's traceback."""
    try:
        return set(remote.oids_exist(sorted(wanted)))
    except Exception as exc:  # a boundary: any failure of the remote client means "cannot check"
        raise ConfigError(f"cannot check the DVC remote {remote.fs.unstrip_protocol(remote.path)} for the data of data.dvc: "
                          f"{type(exc).__name__}: {exc}. compile checks it with this machine's credentials for the remote "
                          "(the DVC remote's own config, or AWS_* for S3)") from None


def _object_ids(repo, md5: str) -> set[str]:
    """The object itself and, for a directory, the objects it lists (from the local DVC cache)."""
    if not md5.endswith(".dir"):
        return {md5}
    import json

    listing = Path(repo.cache.local.oid_to_path(md5))
    if not listing.exists():
        raise ConfigError(f"data.dvc: the directory listing {md5} is not in the local DVC cache, so what to check on the remote "
                          "is unknown: `dvc pull` (or `dvc commit`) first")
    return {md5} | {entry["md5"] for entry in json.loads(listing.read_text())}


PLACEHOLDER_REGISTRY = "ghcr.io/example/"


def check_images(cfg: DictConfig, gpu: bool | None = None) -> None:
    """The images the spec names are yours: a placeholder would wait out the pull until the step's timeout. `gpu`: whether
    the spec names the GPU image (default: as the training pipeline does, with pipeline.train.accelerator_count > 0)."""
    i = cfg.pipeline.image
    used = {"cpu_repository": i.cpu_repository}
    if cfg.pipeline.train.accelerator_count > 0 if gpu is None else gpu:
        used["gpu_repository"] = i.gpu_repository
    for key, repository in used.items():
        if repository.startswith(PLACEHOLDER_REGISTRY):
            raise ConfigError(f"pipeline.image.{key}={repository!r} is the template's placeholder: set it to your registry, "
                              "where `make image` pushes the images (pods would wait for an image that does not exist)")


def check_deploy_target(cfg: DictConfig) -> None:
    """A cluster run that deploys needs the in-cluster TorchServe of serve/k8s/: its URLs and the shared volume."""
    d = cfg.pipeline.deploy
    if not d.enabled:
        return
    missing = [f"pipeline.deploy.{key}" for key in ("management_url", "inference_url", "model_store_pvc") if not d[key]]
    if missing:
        raise ConfigError(f"{', '.join(missing)} empty: a cluster run deploys to the TorchServe of serve/k8s/ "
                          "(or set pipeline.deploy.enabled=false)")
    for key in ("management_url", "inference_url"):
        url = urlparse(d[key])
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(f"pipeline.deploy.{key}={d[key]!r}: not an http(s) URL")
    check_shared_volume(d)
