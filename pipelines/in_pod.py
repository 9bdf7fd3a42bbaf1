"""What every KFP component does first, inside its pod: check that the image was built from
the commit the pipeline spec expects, and rebuild the step's config from the config
sections the spec passes it (plus the typed run parameters), validated against the schema.

The sections a step does not read come from the image's own conf/ (the same commit, checked
above), so each step's cache key depends only on the sections it reads.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from components.core.config.compose import compose
from components.core.config.schema import gate_parameters
from components.core.config.validation import validate
from components.core.errors import ConfigError
from components.core.lineage import DATA_HASH_ENV

# Baked into the component images by pipelines/Dockerfile* from `make image`'s GIT_COMMIT build arg.
IMAGE_COMMIT_ENV = "IMAGE_GIT_COMMIT"


def check_image(expected_commit: str) -> None:
    actual = os.environ.get(IMAGE_COMMIT_ENV, "")
    if actual != expected_commit:
        raise ConfigError(f"this image was built from commit {actual or '(unknown: no $' + IMAGE_COMMIT_ENV + ')'}, but the "
                          f"pipeline spec expects commit {expected_commit}: build and push the images of that commit "
                          "(`make image` at it), or compile the pipeline at the images' commit")


def step_config(sections: str, expected_commit: str, run_parameters: dict | None = None, data_hash: str = "") -> DictConfig:
    """The step's config: the image's conf/ defaults, then `sections` (JSON), then the run parameters (dotted keys).
    `data_hash`, the run's (the data-hash task's), is what the step's lineage records."""
    check_image(expected_commit)
    if data_hash:
        os.environ[DATA_HASH_ENV] = data_hash
    cfg = OmegaConf.merge(OmegaConf.to_container(compose([])), json.loads(sections))
    for key, value in (run_parameters or {}).items():
        OmegaConf.update(cfg, key, value)
    return validate(cfg, "pipeline parameters (config sections and run parameters)")


def gate_config(expected_commit: str, parameters: dict) -> DictConfig:
    """The gate policy of a run: conf/gate with the run's gate parameters (named as gate_parameters names them)."""
    return step_config("{}", expected_commit, {key: parameters[name] for name, (key, _) in gate_parameters().items()}).gate


# Typed run parameter of the train task -> the config key it sets.
RUN_PARAMETERS = {"epochs": "train.epochs", "lr": "train.lr", "batch_size": "train.batch_size", "model_name": "model.name"}


def train_step_config(sections: str, expected_commit: str, gpus: int, data_hash: str, **run: object) -> DictConfig:
    """The train step's config in a pod (one node's, for a TrainJob): the typed run parameters set;
    with GPUs the device is cuda, never a silent CPU fallback, and one process per GPU."""
    overrides = {RUN_PARAMETERS[name]: value for name, value in run.items()}
    if gpus:
        overrides |= {"train.device": "cuda", "train.processes": gpus}
    return step_config(sections, expected_commit, overrides, data_hash)


# pipeline.data.git_secret's keys arrive in these (kubernetes.io/ssh-auth names its key ssh-privatekey).
GIT_CREDENTIALS_ENV, GIT_SSH_KEY_ENV = "GIT_CREDENTIALS", "GIT_SSH_PRIVATE_KEY"


@contextlib.contextmanager
def git_credentials(scratch: str) -> Iterator[None]:
    """Git (and so DVC's clone of pipeline.data.repo) authenticates with the secret's credentials, if any:
    an https credential-store line, or an SSH private key."""
    env = {}
    if os.environ.get(GIT_CREDENTIALS_ENV):
        store = _private_file(Path(scratch) / "git-credentials", os.environ[GIT_CREDENTIALS_ENV])
        env |= {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "credential.helper", "GIT_CONFIG_VALUE_0": f"store --file={store}"}
    if os.environ.get(GIT_SSH_KEY_ENV):
        key = _private_file(Path(scratch) / "ssh-key", os.environ[GIT_SSH_KEY_ENV].rstrip("\n") + "\n")
        env["GIT_SSH_COMMAND"] = f"ssh -i {key} -o IdentitiesOnly=yes -o StrictHostKeyChecking=accept-new"
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def _private_file(path: Path, text: str) -> Path:
    path.touch(mode=0o600)
    path.write_text(text)
    return path


def server_keys(key_file: str, management_url: str, lifetime_min: float) -> dict[str, str]:
    """TorchServe's current keys from the key file it rewrites at every start, on the volume the deploy step
    shares with it; expiring keys renewed first, as for the local server."""
    from components.torchserve.server import fresh_keys

    path = Path(key_file)
    if not path.is_file():
        raise ConfigError(f"{key_file}: TorchServe key file not found; mount the server's volume "
                          "(pipeline.deploy.model_store_pvc, pipeline.deploy.key_file)")
    return fresh_keys(path, management_url, lifetime_min)
