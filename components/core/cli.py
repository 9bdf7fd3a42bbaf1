"""The one command line of every step: path options, then Hydra overrides of conf/.

    python -m components.train                          # params.yaml (what `dvc repro` runs)
    python -m components.train train.lr=0.01 model=resnet18 experiment=quick

Without overrides a step reads params.yaml, and refuses it when conf/ has changed since it was
generated; with overrides it composes conf/ exactly as `dvc exp run -S` does; `--params FILE`
reads another params file (how the train step hands its config to its torchrun processes).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from components.core.config import command_config
from components.core.errors import run_cli
from components.core.lifetime import die_with_parent
from components.core.numerics_env import restart_for

OVERRIDES_HELP = "Hydra overrides of conf/: keys (train.lr=0.01), groups (model=resnet18), presets (experiment=quick)"


def run_step(step: Callable, description: str, summary: Callable[[object, argparse.Namespace], str | None], **paths: str | None) -> None:
    """Parse `--<path>` options (defaults given here, in the order `step` takes them) and overrides,
    run `step(cfg, *paths)`, print its summary."""
    parser = argparse.ArgumentParser(description=description)
    for name, default in paths.items():
        parser.add_argument(f"--{name}", default=default)
    parser.add_argument("--params", help="a params file instead of params.yaml (not with overrides)")
    parser.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)

    def main() -> None:
        args = parser.parse_args()
        cfg = command_config(args.params, args.overrides)
        restart_for(cfg.numerics.profile)
        die_with_parent()  # killing `dvc repro` stops the step it runs  # torch picks its kernels once per process: the other profile needs a new one
        result = step(cfg, *(getattr(args, name) for name in paths))
        message = summary(result, args)
        if message:
            print(message)

    run_cli(main)
