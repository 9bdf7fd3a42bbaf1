"""How long each command line takes to refuse a bad config (issue 24 item 4: under 2 s, where torch
and kfp once loaded first), beside a baseline of `python -c pass` on the same interpreter.

Each command runs with one bad override (default `train.lr=-1`; any other, e.g. `train.lrr=0.1` for an
unknown key) in a throw-away copy of this checkout, so a command that took the config would write
nothing that matters; the `config` stage gets a params.yaml with the bad value, as `dvc exp run -S`
composes it. Each run is checked to be a refusal (exit 2, `error: ...`). Per command, `--repeats`
turns of the baseline and the command, each first in every other turn; printed: seconds of each
(min/median/max) and the ratio command / baseline of each turn (min/median/max). With `--before REV`,
the same commands in a copy of REV (e.g. 288beed, before the commands checked their config first)
take turns too.

    python -m bench.config_refusal [--repeats 5] [--override train.lr=-1] [--before REV] [--only train serve]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from components.core.paths import ROOT
from tests.helpers.project import copy_project, git_commit, run

TARGET_S = 2.0
# Each command line, `{bad}` its bad override, `{out}` a scratch folder.
COMMANDS = {
    "prepare": ["-m", "components.prepare", "--out", "{out}/prepared", "{bad}"],
    "train": ["-m", "components.train", "--out", "{out}/model", "--live", "{out}/live", "--checkpoints", "{out}/ckpt", "{bad}"],
    "evaluate": ["-m", "components.evaluate", "--reports", "{out}/reports", "{bad}"],
    "package": ["-m", "components.package", "--out", "{out}/package", "{bad}"],
    "score": ["-m", "components.score", "--out", "{out}/score", "{bad}"],
    "promote": ["-m", "components.promote", "versions", "{bad}"],
    "config": ["-m", "components.core.config", "--check"],  # the `config` stage under `dvc exp run -S {bad}`
    "pipelines": ["-m", "pipelines", "compile", "--out", "{out}/spec.yaml", "{bad}"],
    "pipelines.score": ["-m", "pipelines.score", "compile", "--out", "{out}/score.yaml", "{bad}"],
    "serve": ["-m", "serve", "status", "{bad}"],
    "serve.k8s": ["-m", "serve.k8s", "--check", "{bad}"],
}


def spread(values: list[float], fmt: str) -> str:
    """min/median/max (bench/train_throughput.py's, which loads torch: this bench's own process stays light)."""
    return "/".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def checkout(rev: str | None, dst: Path) -> Path:
    """A git repository holding this checkout (rev None) or the tree of `rev`, without the data."""
    if rev is None:
        return copy_project(dst, with_data=False)
    dst.mkdir(parents=True)
    subprocess.run(f"git archive {rev} | tar -x -C {dst}", shell=True, cwd=ROOT, check=True)
    run(["git", "init", "-q", "-b", "main"], dst)
    git_commit(dst, f"tree of {rev}")
    return dst


def as_composed_by_dvc(repo: Path, bad: str) -> None:
    """params.yaml as `dvc exp run -S <bad>` leaves it for the `config` stage: conf/ with the bad override, no header."""
    key, value = bad.split("=", 1)
    params = OmegaConf.load(repo / "params.yaml")
    OmegaConf.update(params, key.lstrip("+"), yaml.safe_load(value), force_add=True)
    OmegaConf.save(params, repo / "params.yaml")


def timed_refusal(name: str, repo: Path, bad: str, out: Path) -> float:
    """Seconds `name` takes to refuse `bad` in `repo`; stops the bench if it does not refuse."""
    env = dict(os.environ)
    if name == "config":
        as_composed_by_dvc(repo, bad)  # the stage puts the last good params.yaml back when it refuses
        env["DVC_EXP_BASELINE_REV"] = "HEAD"
    command = [sys.executable, *(part.format(bad=bad, out=out) for part in COMMANDS[name])]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True, env=env)
    spent = time.perf_counter() - start
    if result.returncode != 2 or not result.stderr.startswith("error: "):
        raise SystemExit(f"{' '.join(command[1:])} in {repo} did not refuse {bad} (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return spent


def baseline() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - start


def compare(name: str, repos: dict[str, Path], bad: str, repeats: int, out: Path) -> str:
    runs = {"baseline": baseline, **{label: (lambda repo=repo: timed_refusal(name, repo, bad, out)) for label, repo in repos.items()}}
    spent: dict[str, list[float]] = {label: [] for label in runs}
    for turn in range(repeats):
        for label in list(runs) if turn % 2 == 0 else reversed(list(runs)):
            spent[label].append(runs[label]())
    ratios = [t / b for t, b in zip(spent["now"], spent["baseline"])]
    line = (f"{name:<16} {spread(spent['now'], '.2f'):>16}  {spread(spent['baseline'], '.3f'):>17}  {spread(ratios, '.0f'):>12}"
            f"  {'ok' if statistics.median(spent['now']) < TARGET_S else 'SLOW'}")
    if "before" in spent:
        line += f"  before {spread(spent['before'], '.2f')}"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--override", default="train.lr=-1", help="the bad override every command gets")
    parser.add_argument("--before", default=None, metavar="REV", help="also time the commands of this git revision")
    parser.add_argument("--only", nargs="+", choices=list(COMMANDS), default=list(COMMANDS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="config-refusal-") as tmp:
        repos = {"now": checkout(None, Path(tmp) / "now")}
        if args.before:
            repos["before"] = checkout(args.before, Path(tmp) / "before")
        print(f"a bad override ({args.override}) refused by each command line: {args.repeats} turns beside `python -c pass`, "
              f"target < {TARGET_S:.0f} s (median)")
        print(f"{'command':<16} {'refused in s':>16}  {'python -c pass s':>17}  {'ratio':>12}  (min/median/max)")
        for name in args.only:
            print(compare(name, repos, args.override, args.repeats, Path(tmp) / "out"), flush=True)


if __name__ == "__main__":
    main()
