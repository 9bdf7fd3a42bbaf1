"""The experiment loop round-trips with the real DVC and git: an experiment applied and committed is
accepted by every command and kept by `make params` and by later experiments; a bad override never
leaves a broken params.yaml; any params.yaml state is recovered from by content."""

from __future__ import annotations

import json

import pytest

from components.core.config.compose import compose
from components.core.config.params_file import recorded_overrides
from components.core.errors import ConfigError
from components.core.paths import PARAMS_FILE
from tests.helpers.project import copy_project, git_commit, run


def _settings(repo, *keys: str) -> list:
    """The values every step of the project at `repo` reads for `keys`."""
    code = ("import json, sys; from omegaconf import OmegaConf; from components.core.config.command import command_config; "
            "cfg = command_config(None, []); print(json.dumps([OmegaConf.select(cfg, key) for key in sys.argv[1:]]))")
    return json.loads(run(["python", "-c", code, *keys], repo).stdout)


def _params(repo) -> tuple[float, int]:
    return tuple(_settings(repo, "train.lr", "train.epochs"))


@pytest.fixture(scope="module")
def applied(tmp_path_factory):
    """A project copy whose committed baseline is an applied experiment (train.lr=0.005, quick)."""
    repo = copy_project(tmp_path_factory.mktemp("exp") / "repo")
    run(["dvc", "exp", "run", "-n", "lr5", "-S", "train.lr=0.005", "-S", "experiment=quick"], repo)
    run(["git", "checkout", "--", "."], repo)
    run(["dvc", "exp", "apply", "lr5"], repo)
    git_commit(repo, "the lr5 experiment is the new baseline")
    return repo


@pytest.mark.e2e
def test_an_applied_and_committed_experiment_is_accepted_and_kept(applied):
    assert 'train.lr=0.005' in recorded_overrides(applied / PARAMS_FILE.name)
    assert "match conf/" in run(["python", "-m", "components.core.config", "--check"], applied).stdout
    assert "params.yaml already up to date" in run(["python", "-m", "components.core.config"], applied).stdout  # make params
    assert _params(applied) == (0.005, 2)  # what every step reads
    assert run(["git", "status", "--porcelain"], applied).stdout == ""


@pytest.mark.e2e
def test_a_later_experiment_keeps_the_baselines_overrides(applied):
    # An evaluate setting: only evaluate reruns (a training setting takes the same path, at a training's cost).
    result = run(["dvc", "exp", "run", "-n", "boot200", "-S", "evaluate.bootstrap_samples=200"], applied, check=False)
    kept = next(line for line in result.stdout.splitlines() if line.startswith("params.yaml: this experiment's overrides recorded"))
    assert "the baseline overrides [" in kept and "'train.lr=0.005'" in kept
    assert _settings(applied, "train.lr", "train.epochs", "evaluate.bootstrap_samples") == [0.005, 2, 200]
    run(["git", "checkout", "--", "."], applied)


@pytest.mark.e2e
def test_an_experiment_run_in_dvcs_temporary_copy_logs_its_event_in_the_project(applied):
    log = applied / ".events" / "events.jsonl"
    before = log.read_text().count("\n") if log.exists() else 0
    # DVC's copy: .dvc/tmp/exps/tmp*
    run(["dvc", "exp", "run", "--temp", "-n", "in-a-copy", "-S", "evaluate.bootstrap_samples=300"], applied)
    events = [json.loads(line) for line in log.read_text().splitlines()[before:]]
    assert [e["type"] for e in events] == ["experiment_finished"]
    assert not list((applied / ".dvc" / "tmp" / "exps").glob("tmp*"))  # the copy is gone, the event is not


@pytest.mark.e2e
def test_a_bad_override_names_the_key_and_leaves_the_last_good_params(applied):
    committed = (applied / "params.yaml").read_bytes()
    bad = run(["dvc", "exp", "run", "-S", "train.epochs=abc"], applied, check=False)
    assert bad.returncode != 0
    assert "Value 'abc' of type 'str' could not be converted to Integer (key: train.epochs)" in bad.stderr + bad.stdout
    assert (applied / "params.yaml").read_bytes() == committed
    assert "match conf/" in run(["python", "-m", "components.core.config", "--check"], applied).stdout


@pytest.mark.e2e
def test_make_params_recovers_from_any_params_file_by_content(applied):
    params = applied / "params.yaml"
    committed = params.read_bytes()
    params.write_bytes(committed.replace(b"lr: 0.005", b"lr: 0.9"))  # hand-edited, header kept: the overrides stay
    assert "regenerated from conf/ with overrides" in run(["python", "-m", "components.core.config"], applied).stdout
    assert params.read_bytes() == committed
    params.write_text("train:\n  epochs: abc\n")  # what a broken run or an editor may leave: no header, invalid
    run(["python", "-m", "components.core.config"], applied)
    assert recorded_overrides(params) == [] and _params(applied) == (0.002, 15)
    params.write_bytes(committed)
    run(["python", "-m", "components.core.config", "--reset"], applied)  # the documented way back to conf/ alone
    assert recorded_overrides(params) == [] and _params(applied) == (0.002, 15)
    params.write_bytes(committed)


def test_a_typo_in_an_override_suggests_the_key():
    with pytest.raises(ConfigError, match=r"(?s)Could not override 'train.epoch'.*did you mean train.epochs\?"):
        compose(["train.epoch=3"])
