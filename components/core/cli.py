"""The one command line of every step: path options, then Hydra overrides of conf/.

    python -m components.train                          # params.yaml (what `dvc repro` runs)
    python -m components.train train.lr=0.01 model=resnet18 experiment=quick

Without overrides a step reads params.yaml, and refuses it when conf/ has changed since it was
generated; with overrides it composes conf/ exactly as `dvc exp run -S` does; `--params FILE`
reads another params file (how the train step hands its config to its torchrun processes).

A bad config is refused before the step loads torch, numpy and the rest (seconds): the step's module
calls `step_command` at its top, before those imports, and `run_step` at its end.

    if __name__ == "__main__":  # at the top of components/<step>.py
        command = step_command("What the step does.", out="artifacts/out")
    import torch
    ...
    if __name__ == "__main__":
        run_step(command, step, lambda result, args: f"step: ... -> {args.out}")
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig

from components.core.config.command import command_config
from components.core.errors import run_cli
from components.core.lifetime import die_with_parent
from components.core.numerics_env import restart_for
from components.core.paths import ROOT

OUTPUT_OPTIONS = ("out", "live", "reports", "checkpoints")  # the path options a step writes
OVERRIDES_HELP = "Hydra overrides of conf/: keys (train.lr=0.01), groups (model=resnet18), presets (experiment=quick)"


@dataclass(frozen=True)
class StepCommand:
    """A step's command line, parsed, and its config, checked."""

    args: argparse.Namespace
    cfg: DictConfig
    paths: tuple[str, ...]  # the path options, in the order the step takes them


def step_command(description: str, **paths: str | None) -> StepCommand:
    """Parse `--<path>` options (defaults given here, in the order the step takes them) and overrides, and get
    the config: a bad one is refused here (one line, exit 2), before the step's module imports what it computes with."""
    parser = argparse.ArgumentParser(description=description)
    for name, default in paths.items():
        parser.add_argument(f"--{name}", default=default)
    parser.add_argument("--params", help="a params file instead of params.yaml (not with overrides)")
    parser.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    args = parser.parse_args()
    cfg = run_cli(lambda: command_config(args.params, args.overrides))
    restart_for(cfg.numerics.profile)  # torch picks its kernels once per process: the other profile needs a new one
    die_with_parent()  # killing `dvc repro` stops the step it runs
    return StepCommand(args, cfg, tuple(paths))


def run_step(command: StepCommand, step: Callable, summary: Callable[[object, argparse.Namespace], str | None]) -> None:
    """Run `step(cfg, *paths)` for a command `step_command` parsed, print its summary."""
    args = command.args

    def main() -> None:
        result = step(command.cfg, *(getattr(args, name) for name in command.paths))
        message = summary(result, args)
        if message:
            print(message)
        if args.overrides or args.params:
            print(overwritten_note([getattr(args, name) for name in command.paths if name in OUTPUT_OPTIONS]) or "", end="")

    run_cli(main)


def _pipeline_outputs(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, bool]:
    """Every output of the pipeline's stages (outs, metrics, plots), and whether DVC caches it."""
    outputs = {}
    for stage in (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}).values():
        for entry in (item for kind in ("outs", "metrics", "plots") for item in stage.get(kind) or []):
            path, options = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
            outputs[path] = (options or {}).get("cache", True)
    return outputs


def overwritten_note(written: list[str | None]) -> str | None:
    """After a hand-run with a config other than params.yaml: which pipeline outputs it replaced
    (dvc.lock no longer matches them) and how to bring the pipeline's back; None when it wrote none."""
    hits = {path: cached for path, cached in _pipeline_outputs().items()
            for out in written if out and (ROOT / out).resolve() in ((ROOT / path).resolve(), *(ROOT / path).resolve().parents)}
    if not hits:
        return None
    cached, tracked = [p for p, c in hits.items() if c], [p for p, c in hits.items() if not c]
    restore = [f"`dvc checkout --force {' '.join(cached)}`"] * bool(cached) + [f"`git checkout -- {' '.join(tracked)}`"] * bool(tracked)
    return (f"note: this run's config is not params.yaml, and it replaced pipeline outputs that dvc.lock records "
            f"({', '.join(hits)}); bring the pipeline's back with {' and '.join(restore)}, or write elsewhere with --out\n")
