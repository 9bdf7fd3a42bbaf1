"""conf/ is the single source of truth: params.yaml mirrors it, and bad keys fail loudly."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from components.core.config import params_file
from components.core.config.compose import compose
from components.core.config.params_file import check_params, load_config, write_params
from components.core.errors import ConfigError
from components.core.paths import PARAMS_FILE, ROOT
from tests.helpers.project import copy_project, run


def test_params_yaml_is_in_sync_with_conf():
    composed = OmegaConf.to_container(compose([]))
    on_disk = OmegaConf.to_container(load_config(PARAMS_FILE))
    assert on_disk == composed, "params.yaml is stale: run `make params` and commit it"


def test_write_params_is_idempotent_and_applies_overrides(tmp_path):
    target = tmp_path / "params.yaml"
    assert write_params(["train.lr=0.5", "model=resnet18"], target) is True
    assert write_params(["train.lr=0.5", "model=resnet18"], target) is False
    cfg = load_config(target)
    assert cfg.train.lr == 0.5 and cfg.model.name == "resnet18"


def test_a_params_file_conf_still_matches_is_checked_without_recomposing_conf(tmp_path, monkeypatch):
    params = tmp_path / "params.yaml"
    write_params(["train.lr=0.5"], params)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)

    def no_compose(*args):
        raise AssertionError("conf/ was recomposed")

    with monkeypatch.context() as fast:
        fast.setattr(params_file, "compose", no_compose)
        check_params(params)  # the digests of conf/ and of the body match what write_params wrote
    params.write_text(params.read_text().replace("epochs: 15", "epochs: 3"))  # a hand edit: the body's digest no longer matches
    with pytest.raises(ConfigError, match=r"params.yaml is stale: .*train.epochs: 3 -> 15"):
        check_params(params)  # ...so conf/ is recomposed (with the recorded overrides) and the edit is named


def test_experiment_preset_is_applied_last():
    assert compose(["experiment=balanced"]).train.balanced_sampling is True
    assert compose([]).train.balanced_sampling is False


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lrr=0.1", "Could not override 'train.lrr'"),
        ("+train.lrr=0.1", "Key 'lrr' not in 'TrainConfig' (key: train.lrr)"),
        ("train.lr=fast", "could not be converted to Float (key: train.lr)"),
        ("model=vgg", "Could not find 'model/vgg'"),
        ("data.channels=2", "data.channels must be 1 or 3"),
        ("train.device=tpu", "train.device must be auto, cpu or cuda, got 'tpu'"),
        ("data.format=zip", "data.format must be csv or imagefolder, got 'zip'"),
        ("numerics.profile=fast", "numerics.profile must be reference or native, got 'fast'"),
        ("evaluate.attribution_method=shap", "evaluate.attribution_method must be integrated_gradients or occlusion, got 'shap'"),
        ("gate.on_fail=ignore", "gate.on_fail must be block or warn, got 'ignore'"),
        ("pipeline.sweep.goal=best", "pipeline.sweep.goal must be maximize or minimize, got 'best'"),
        ("serve.max_batch_delay_ms=-1", "serve.max_batch_delay_ms must be at least 0, got -1"),
        ("serve.prediction_log.backups=0", "serve.prediction_log.backups must be at least 1, got 0"),
        ("train.lr=0", "command-line overrides ['train.lr=0']: train.lr must be above 0, got 0.0"),
        ("train.lr=nan", "train.lr must be above 0, got nan"),
        ("train.lr=-1", "train.lr must be above 0, got -1.0"),
        ("model.dropout=1", "model.dropout must be between 0 and 0.99, got 1.0"),
        ("package.model_name=shapes-",
         "package.model_name must be letters, digits, '_' or '-', starting and ending with a letter or digit"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        compose([override])
    assert message in str(err.value)


def test_a_choice_reads_as_its_plain_value():
    cfg = compose([])
    assert cfg.train.device == "auto" and f"{cfg.gate.on_fail}" == "block" and str(cfg.data.format) == "csv"


def test_a_model_carries_only_its_own_settings():
    assert dict(compose(["model=resnet18"]).model) == {"name": "resnet18"}
    assert set(compose(["model=cnn"]).model) == {"name", "width", "dropout"}
    with pytest.raises(ConfigError, match=r"Key 'width' not in 'ModelConfig' \(key: model.width\)"):
        compose(["model=resnet18", "+model.width=64"])


def test_a_model_setting_missing_from_its_yaml_is_named(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS_FILE.read_text().replace("  width: 32\n", ""))
    with pytest.raises(ConfigError, match="no value for model.width"):
        load_config(params)


def test_unknown_key_in_params_file_names_file_and_key(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(PARAMS_FILE.read_text().replace("  lr:", "  learning_rate:"))
    with pytest.raises(ConfigError, match=r"params.yaml: Key 'learning_rate' not in 'TrainConfig' \(key: train.learning_rate\)"):
        load_config(bad)


@pytest.mark.integration
def test_config_check_refuses_a_stale_artifacts_yaml_and_the_writer_repairs_it(tmp_path):
    repo = copy_project(tmp_path / "repo", with_data=False)
    name = load_config().package.model_name
    index = repo / "artifacts.yaml"
    index.write_text(index.read_text().replace(f"{name}:", "renamed:", 1))
    checked = run([sys.executable, "-m", "components.core.config", "--check"], repo, check=False)
    assert checked.returncode == 2
    assert checked.stderr.strip() == (f"error: artifacts.yaml is stale (declares ['renamed']): params.yaml names the model artifact "
                                      f"{name!r} (package.model_name, from data.name). Run `make params`, which writes the declarations "
                                      "from conf/ (choose the dataset in conf/config.yaml: "
                                      "`dvc exp run -S data...` cannot declare its artifact).")
    written = run([sys.executable, "-m", "components.core.config"], repo).stdout
    assert f"model artifact {name!r}: artifacts.yaml rewritten" in written
    assert index.read_text() == (ROOT / "artifacts.yaml").read_text()
    assert (repo / "dvc.yaml").read_text() == (ROOT / "dvc.yaml").read_text()  # already current: left byte for byte
    assert run([sys.executable, "-m", "components.core.config", "--check"], repo).returncode == 0


@pytest.mark.integration
def test_cli_reports_config_error_in_one_line_and_exit_2():
    result = subprocess.run([sys.executable, "-m", "components.train", "train.lr=abc"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: command-line overrides ['train.lr=abc']: Value 'abc' of type 'str' could not be converted to Float (key: train.lr)"
    ]


def test_every_numeric_setting_declares_its_range():
    import dataclasses
    import typing

    from components.core.config import schema

    def numeric_fields(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default_factory):
                yield from numeric_fields(f.default_factory, f"{prefix}{f.name}.")
            elif hints[f.name] in (int, float):
                yield f"{prefix}{f.name}", f

    model_settings = [item for cls in schema.MODEL_SETTINGS.values() for item in numeric_fields(cls, "model.")]
    unranged = [key for key, f in [*numeric_fields(schema.Config), *model_settings] if "range" not in f.metadata]
    assert unranged == []
