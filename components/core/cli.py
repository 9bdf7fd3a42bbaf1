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
from pathlib import Path

import yaml

from components.core.config.command import command_config
from components.core.errors import run_cli
from components.core.lifetime import die_with_parent
from components.core.numerics_env import restart_for
from components.core.paths import ROOT

OUTPUT_OPTIONS = ("out", "live", "reports", "checkpoints")  # the path options a step writes
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
        restart_for(cfg.numerics.profile)  # torch picks its kernels once per process: the other profile needs a new one
        die_with_parent()  # killing `dvc repro` stops the step it runs
        result = step(cfg, *(getattr(args, name) for name in paths))
        message = summary(result, args)
        if message:
            print(message)
        if args.overrides or args.params:
            print(overwritten_note([getattr(args, name) for name in paths if name in OUTPUT_OPTIONS]) or "", end="")

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
