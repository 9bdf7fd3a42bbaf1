"""Every command line refuses a bad config (a bad value, an unknown key, a wrong type) with its one
message and exit 2 before it loads torch, kfp or the rest, which take seconds (issue 24 item 4).

A command is run as a user runs it, with Python's import log on (PYTHONPROFILEIMPORTTIME): the log names
every module the process imported, so a refusal that loaded torch first fails here, however fast the
machine. How long a refusal takes is measured by bench/config_refusal.py, never asserted here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from components.core.cli import step_command
from components.core.paths import ROOT
from tests.helpers.project import copy_project

# What takes seconds to load (torch alone several): none of it before the config is checked.
SLOW_IMPORTS = {"torch", "torchvision", "numpy", "pandas", "onnxruntime", "scipy", "sklearn", "fairlearn", "kfp", "gto"}
TIMEOUT_S = 120  # a command that accepted the config would run its step: stop it rather than wait


def refused(command: list[str], cwd: Path = ROOT, env: dict | None = None) -> tuple[int, str, set[str]]:
    """Run `python -m <command>`: its exit code, its stderr without the import log, and the modules it imported."""
    result = subprocess.run([sys.executable, "-m", *command], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S,
                            env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1", **(env or {})})
    log = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    message = "\n".join(line for line in result.stderr.splitlines() if not line.startswith("import time:"))
    imported = {line.rsplit("|", 1)[1].strip() for line in log[1:]}  # the first line is the log's header
    return result.returncode, message, imported


def overrides_error(overrides: str, problem: str) -> str:
    return f"error: command-line overrides [{overrides!r}]: {problem}"


def unknown_key(override: str, close: str) -> tuple[str, str]:
    key = override.split("=", 1)[0]
    return override, f"Could not override '{key}'.\nTo append to your config use +{override} (did you mean {close}?)"


BAD_VALUE = ("train.lr=-1", "train.lr must be above 0, got -1.0")
UNKNOWN_KEY = unknown_key("train.lrr=0.1", "train.lr")
WRONG_TYPE = ("train.epochs=many", "Value 'many' of type 'str' could not be converted to Integer (key: train.epochs)")


# Each command line with one bad override (path options in a scratch folder: a command that took the config
# would write nothing that matters), the kinds of bad config spread over them.
CLIS = {
    "prepare": (["components.prepare", "--out", "{tmp}/prepared"], BAD_VALUE),
    "train": (["components.train", "--out", "{tmp}/model", "--live", "{tmp}/live", "--checkpoints", "{tmp}/checkpoints"], UNKNOWN_KEY),
    "evaluate": (["components.evaluate", "--reports", "{tmp}/reports"], WRONG_TYPE),
    "package": (["components.package", "--out", "{tmp}/package"], ("data.channels=2", "data.channels must be 1 or 3, got 2")),
    "score": (["components.score", "--out", "{tmp}/score"], unknown_key("trian.lr=0.1", "train.lr")),
    "promote": (["components.promote", "versions"], ("gate.on_fail=ignore", "gate.on_fail must be block or warn, got 'ignore'")),
    "pipelines": (["pipelines", "compile", "--out", "{tmp}/spec.yaml"], BAD_VALUE),
    "pipelines.score": (["pipelines.score", "compile", "--out", "{tmp}/score.yaml"],
                        ("train.lr=fast", "Value 'fast' of type 'str' could not be converted to Float (key: train.lr)")),
    "serve": (["serve", "status"], ("serve.max_batch_delay_ms=-1", "serve.max_batch_delay_ms must be at least 0, got -1")),
    "serve.k8s": (["serve.k8s", "--check"], unknown_key("serve.workerz=2", "serve.workers")),
}


@pytest.mark.integration  # a CLI in a subprocess: a second or two each, more on a busy machine
@pytest.mark.parametrize("cli", sorted(CLIS))
def test_a_command_line_refuses_a_bad_override_before_it_loads_torch(cli, tmp_path):
    command, (override, problem) = CLIS[cli]
    code, message, imported = refused([part.format(tmp=tmp_path) for part in command] + [override])
    assert (code, message) == (2, overrides_error(override, problem))
    assert imported & SLOW_IMPORTS == set()
    assert "components.core.config.compose" in imported  # the log is on: the config was checked


@pytest.mark.integration  # a copy of the project (a few seconds): the config stage reads the project's own params.yaml
def test_the_config_stage_refuses_what_dvc_exp_run_composed_before_it_loads_torch(tmp_path):
    """`dvc exp run -S train.lr=-1` composes params.yaml, then its `config` stage runs `python -m components.core.config
    --check`, which refuses it and puts the last good params.yaml back; `make params` refuses the same override."""
    repo = copy_project(tmp_path / "repo", with_data=False)
    good = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(re.sub(r"\n  lr: .*\n", "\n  lr: -1\n", good, count=1))
    code, message, imported = refused(["components.core.config", "--check"], repo, {"DVC_EXP_BASELINE_REV": "HEAD"})
    assert (code, message) == (2, f"error: params.yaml (composed by dvc exp run from conf/ and -S): {BAD_VALUE[1]}")
    assert imported & SLOW_IMPORTS == set() and (repo / "params.yaml").read_text() == good
    code, message, imported = refused(["components.core.config", *UNKNOWN_KEY[:1]], repo)
    assert (code, message) == (2, overrides_error(*UNKNOWN_KEY))
    assert imported & SLOW_IMPORTS == set() and (repo / "params.yaml").read_text() == good


@pytest.mark.parametrize("override,problem", [BAD_VALUE, UNKNOWN_KEY, WRONG_TYPE])
def test_a_step_command_refuses_a_bad_override_with_one_line_and_exit_2(override, problem, monkeypatch, capsys):
    """What the top of a step's module runs, before its imports: parse and check, nothing else."""
    monkeypatch.setattr(sys, "argv", ["train", "--out", "elsewhere", override])
    with pytest.raises(SystemExit) as exited:
        step_command("Train.", out="artifacts/model")
    assert exited.value.code == 2
    assert capsys.readouterr() == ("", overrides_error(override, problem) + "\n")


def test_a_step_command_refuses_a_params_file_with_overrides(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train", "--params", "params.yaml", "train.lr=0.1"])
    with pytest.raises(SystemExit) as exited:
        step_command("Train.", out="artifacts/model")
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: give either --params params.yaml or overrides of conf/ ['train.lr=0.1'], not both\n"
