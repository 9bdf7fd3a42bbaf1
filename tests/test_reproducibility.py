"""The reproducibility contract: a stage's outputs are a pure function of its declared deps and
params, the committed dvc.lock and reports are what a fresh copy reproduces, and a change re-runs
exactly what it affects."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import typing
from pathlib import Path

import pytest
import yaml
from omegaconf import MISSING

import components.evaluate
import components.package
import components.prepare
import components.train
from components.core import lineage as lineage_module
from components.core.config import schema
from components.core.config.compose import compose
from components.core.config.sections import select
from components.core.lineage import code_hash, environment, lineage, source_files
from components.core.numerics import reference_host
from components.core.paths import ROOT
from tests.helpers.project import VENV_BIN, copy_project, run

STEPS = {"prepare": components.prepare, "train": components.train, "evaluate": components.evaluate, "package": components.package}
STAGE_INPUTS = {"prepare": ["${data.root}"], "train": ["artifacts/prepared"],
                "evaluate": ["artifacts/prepared", "artifacts/model"], "package": ["artifacts/prepared", "artifacts/model"]}


def stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(STEPS))
def test_stage_deps_are_exactly_the_import_closure_and_params_the_steps_sections(name):
    module = STEPS[name]
    expected = [*STAGE_INPUTS[name], "requirements.lock", *source_files(module.__name__, getattr(module, "CODE_FILES", ()))]
    stage = stages()[name]
    assert stage["deps"] == expected, "regenerate them: python -m components.core.config.dvc_yaml"
    assert stage["params"] == list(module.SECTIONS)


def test_the_config_check_runs_before_every_stage_and_depends_on_conf():
    config = stages()["config"]
    assert config["deps"] == ["conf", *source_files("components.core.config.__main__")]
    assert config["outs"] == [{"params.yaml": {"cache": False, "persist": True}}]


def test_the_on_demand_score_stage_deps_are_its_import_closure():
    import components.score

    stage = yaml.safe_load((ROOT / "serve" / "batch" / "dvc.yaml").read_text())["stages"]["score"]
    assert stage["deps"] == ["${score.input}", "artifacts/package", "requirements.lock", *source_files("components.score")]
    assert stage["params"] == [{"params.yaml": list(components.score.SECTIONS)}]


def test_an_edit_of_the_report_code_does_not_retrain():
    assert "components/evaluation/report.py" not in stages()["train"]["deps"]
    assert "components/evaluation/report.py" in stages()["evaluate"]["deps"]


def test_serving_pipeline_and_registry_settings_never_touch_the_steps_lineage():
    base = compose([])
    changed = compose(["serve.inference_port=9999", "pipeline.image.cpu_repository=example.org/other", "pipeline.submit.host=http://x",
                       "registry.stages=[dev,prod]"])
    for name, module in STEPS.items():
        assert lineage(select(base, module.SECTIONS), module.__name__) == lineage(select(changed, module.SECTIONS), module.__name__), name
        assert not {"serve", "pipeline", "registry"} & {s.split(".")[0] for s in module.SECTIONS}


def test_the_environment_hash_is_the_runtime_locks_and_ignores_the_test_tools(tmp_path, monkeypatch):
    """A test-tool bump (requirements-test.lock) leaves every lineage, hence the trained model, alone."""
    for lock in ("requirements.lock", "requirements-test.lock"):
        (tmp_path / lock).write_bytes((ROOT / lock).read_bytes())
    monkeypatch.setattr(lineage_module, "ROOT", tmp_path)
    before = environment()
    assert before["requirements_lock"] == hashlib.sha256((ROOT / "requirements.lock").read_bytes()).hexdigest()[:16]
    with (tmp_path / "requirements-test.lock").open("a") as file:
        file.write("pytest==99.0\n")
    assert environment() == before
    with (tmp_path / "requirements.lock").open("a") as file:
        file.write("numpy==99.0\n")
    assert environment()["requirements_lock"] != before["requirements_lock"]


def test_a_step_cannot_read_outside_its_sections():
    view = select(compose([]), components.package.SECTIONS)
    with pytest.raises(Exception, match="serve"):
        view.serve.inference_port  # noqa: B018


def _fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        yield prefix + f.name, f
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            yield from _fields(f.default_factory, prefix + f.name + ".")


def test_defaults_live_only_in_conf():
    """The schema declares types; every value comes from conf/ (a default in both places drifts)."""
    values = []
    model_settings = [item for cls in schema.MODEL_SETTINGS.values() for item in _fields(cls, "model.")]
    for key, f in [*_fields(schema.Config), *model_settings]:
        structural = f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)
        optional_absent = f.default is None and type(None) in typing.get_args(typing.get_type_hints(schema.Toleration).get(f.name, int))
        if not (f.default is MISSING or structural or optional_absent):
            values.append(key)
    assert values == []


@pytest.mark.integration
def test_one_override_language_for_every_step_cli(tiny_dataset, tmp_path):
    """Group choices and experiment= presets work on a step's command line as in `dvc exp run -S`."""
    from tests.helpers.datasets import small_overrides

    result = run(["python", "-m", "components.prepare", "--data", str(tiny_dataset), "--out", str(tmp_path / "prepared"),
                  *small_overrides(tiny_dataset), "model=resnet18", "experiment=quick"], ROOT)
    assert "prepare: {'train':" in result.stdout
    bad = run(["python", "-m", "components.prepare", "--out", str(tmp_path / "x"), "experiment=nope"], ROOT, check=False)
    assert bad.returncode == 2 and "Could not find 'experiment/nope'" in bad.stderr
    assert not (tmp_path / "x").exists()


def _tracked_changes(repo) -> str:
    return run(["git", "status", "--porcelain", "--untracked-files=no"], repo).stdout


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """A copy of the committed project, its pipeline reproduced from scratch (no caches)."""
    repo = copy_project(tmp_path_factory.mktemp("clone"))
    run(["dvc", "repro", "--no-run-cache"], repo)
    return repo


@pytest.mark.e2e
@pytest.mark.skipif(reference_host() is not None, reason=f"{reference_host()}: the committed bytes are the reference numerics'")
def test_a_fresh_copy_reproduces_every_committed_byte(reproduced):
    assert _tracked_changes(reproduced) == "", "dvc.lock or the reports do not match the committed code: run `dvc repro` and commit"
    assert "Data and pipelines are up to date" in run(["dvc", "repro"], reproduced).stdout


@pytest.mark.e2e
def test_outputs_made_by_the_stage_commands_name_their_code(reproduced):
    """`python -m components.<step>` (DVC) and an import (KFP, tests) record the same code hash."""
    quality = json.loads((reproduced / "reports" / "quality.json").read_text())
    assert quality["lineage"]["code_hash"] == code_hash("components.evaluate", components.evaluate.CODE_FILES)
    package = json.loads((reproduced / "artifacts" / "package" / "package.json").read_text())
    assert package["lineage"]["code_hash"] == code_hash("components.package", components.package.CODE_FILES)


@pytest.mark.e2e
def test_metrics_lead_with_a_dozen_headline_numbers(reproduced):
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], reproduced).stdout)
    columns = {f"{path}:{key}" for files in shown.values() for path, data in files["data"].items()
               for key in _flatten(data["data"])}
    names = {c.split(":")[1] for c in columns}
    assert len(columns) <= 18, sorted(columns)  # about a dozen numbers and a verdict per quality check; the detail stays in the reports
    assert {"accuracy", "balanced_accuracy", "f1_macro", "ece", "gate", "fairness.fail", "fairness.inconclusive",
            "fairness.worst_accuracy_gap", "val.loss", "val.accuracy",
            "quality.accuracy", "quality.balanced_accuracy", "quality.ece"} <= names
    assert not any(n.replace(".", "_") in names and "." in n for n in names), "one name per quantity"


def _flatten(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield prefix + key


@pytest.mark.e2e
def test_serving_settings_rerun_no_stage_and_a_stale_params_file_stops_repro(reproduced):
    conf = reproduced / "conf" / "serve" / "default.yaml"
    conf.write_text(conf.read_text().replace("inference_port: 8080", "inference_port: 9080"))
    run(["python", "-m", "components.core.config"], reproduced)
    statuses = json.loads(run(["dvc", "status", "--json"], reproduced).stdout)
    pipeline = {stage for stage in statuses if not stage.startswith("serve/batch/")}  # the on-demand score stage is never run here
    assert pipeline == {"config"}, statuses  # only the config check itself; no step re-runs

    train_conf = reproduced / "conf" / "train" / "default.yaml"
    train_conf.write_text(train_conf.read_text().replace("epochs: 15", "epochs: 1"))
    model_before = (reproduced / "artifacts" / "model" / "model.safetensors").read_bytes()
    failed = run(["dvc", "repro"], reproduced, check=False)
    assert failed.returncode != 0
    assert "params.yaml is stale" in failed.stderr + failed.stdout and "train.epochs: 15 -> 1" in failed.stderr + failed.stdout
    assert "make params" in failed.stderr + failed.stdout
    assert (reproduced / "artifacts" / "model" / "model.safetensors").read_bytes() == model_before


@pytest.mark.e2e
def test_a_failed_run_leaves_the_previous_outputs_in_place(reproduced):
    run(["git", "checkout", "--", "conf"], reproduced)
    run(["python", "-m", "components.core.config"], reproduced)
    prepared = reproduced / "artifacts" / "prepared" / "images.npy"
    before = prepared.read_bytes()

    system_bin = reproduced.parent / "system-bin"  # a shell whose `python` is the system's, not the venv's
    system_bin.mkdir(exist_ok=True)
    (system_bin / "python").symlink_to(sys.base_prefix + "/bin/python3")
    venv_dvc = str(Path(VENV_BIN) / "dvc")  # the README's command, typed in a shell without the venv on PATH
    wrong = run([venv_dvc, "repro", "-f", "-s", "prepare"], reproduced, check=False, env={"PATH": f"{system_bin}:/usr/bin:/bin"})
    assert wrong.returncode != 0
    assert "is not this project's environment" in wrong.stderr and "source .venv/bin/activate" in wrong.stderr
    assert prepared.read_bytes() == before

    image = next((reproduced / "data").rglob("*.png"))
    image.write_bytes(b"not an image")
    rejected = run(["dvc", "repro"], reproduced, check=False)
    assert rejected.returncode != 0 and f"{image.name}: cannot decode image" in rejected.stderr
    assert prepared.read_bytes() == before
