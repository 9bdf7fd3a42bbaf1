"""`python -m components.core.config` (`make params`): params.yaml and the model artifact's declarations
from conf/; with `--check` (the `config` stage), only check that they are current."""

from __future__ import annotations

import argparse
import os

from components.core.config.dvc_yaml import check_artifacts, write_artifacts
from components.core.config.params_file import (
    baseline_overrides,
    check_params,
    load_config,
    record_experiment,
    refresh_params,
    write_params,
)
from components.core.errors import run_cli

parser = argparse.ArgumentParser(description="params.yaml and the model artifact's declarations from conf/: regenerate them, "
                                             "or check that they are current.")
parser.add_argument("--check", action="store_true", help="only check that they match conf/ (the `config` stage)")
parser.add_argument("--reset", action="store_true", help="drop the overrides params.yaml records (an applied experiment)")
parser.add_argument("overrides", nargs="*", help="Hydra overrides written into params.yaml, e.g. train.lr=0.01")


def check() -> None:
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        kept = record_experiment(baseline=baseline_overrides())
        print(f"params.yaml: this experiment's overrides recorded{f', the baseline overrides {kept} kept' if kept else ''}")
    check_params()
    check_artifacts(load_config().package.model_name)
    print("params.yaml, artifacts.yaml and dvc.yaml's `artifacts:` match conf/")


def write(overrides: list[str], reset: bool) -> None:
    if overrides:
        status = f"{'regenerated' if write_params(overrides) else 'already up to date'} with overrides {overrides}"
    else:
        status = refresh_params(reset)
    name = load_config().package.model_name
    written = write_artifacts(name)
    declared = f"{' and '.join(written)} rewritten" if written else "artifacts.yaml and dvc.yaml already declare it"
    print(f"params.yaml {status}")
    print(f"model artifact {name!r}: {declared}")


def main() -> None:
    args = parser.parse_args()
    if args.check:
        check()
    else:
        write(args.overrides, args.reset)


if __name__ == "__main__":
    run_cli(main)
