"""The train step on a busy machine: as many trainings side by side as there are cores, with the
OpenMP threads that wait for work spinning (`OMP_WAIT_POLICY=ACTIVE`, what OpenMP may do by
default) vs sleeping (`PASSIVE`, the project's default: components/core/numerics_env.py).

Each turn starts the trainings of one policy at once, each in a new process, and the policies take
turns, each first in every other turn; a run's clock covers the train step only (no imports).
Printed: images/s per training under each policy (min/median/max over every run) and the ratio
passive / active of each turn's mean. Same bytes either way: tests/test_numerics.py.

    python -m bench.busy_machine [--epochs 3] [--repeats 3] [--side-by-side N] [overrides ...]

Needs artifacts/prepared (`make run` or `dvc repro prepare` first).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import components  # noqa: F401  (first: it pins the reference numerics before torch loads)
from bench.train_throughput import bench_config, spread, template_step
from components.data.decoding import available_cores

POLICIES = ("ACTIVE", "PASSIVE")


def one_turn(policy: str, side_by_side: int, epochs: int, prepared: Path, overrides: list[str]) -> list[float]:
    """images/s of each of `side_by_side` train steps started together under `policy`."""
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    command = [sys.executable, "-m", "bench.busy_machine", "--child", "--epochs", str(epochs), "--prepared", str(prepared), *overrides]
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(side_by_side)]
    outputs = [child.communicate() for child in children]
    for child, (_, stderr) in zip(children, outputs):
        if child.returncode:
            raise SystemExit(f"a training under OMP_WAIT_POLICY={policy} failed:\n{stderr}")
    return [json.loads(stdout.splitlines()[-1])["images_per_s"] for stdout, _ in outputs]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--side-by-side", type=int, default=available_cores())
    parser.add_argument("--prepared", type=Path, default=Path("artifacts/prepared"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, as for every command")
    args = parser.parse_args()
    if args.child:
        speed, _ = template_step(bench_config(args.epochs, args.overrides), args.prepared)
        print(json.dumps({"images_per_s": speed}))
        return
    print(f"train step, {args.side_by_side} side by side on {available_cores()} cores, {args.epochs} epochs, {args.repeats} turns")
    speeds = {policy: [] for policy in POLICIES}
    ratios = []
    for turn in range(args.repeats):
        means = {}
        for policy in POLICIES if turn % 2 == 0 else reversed(POLICIES):
            runs = one_turn(policy, args.side_by_side, args.epochs, args.prepared, args.overrides)
            speeds[policy] += runs
            means[policy] = statistics.mean(runs)
        ratios.append(means["PASSIVE"] / means["ACTIVE"])
    for policy in POLICIES:
        print(f"  OMP_WAIT_POLICY={policy:<8} {spread(speeds[policy], '.0f')} images/s per training (min/median/max)")
    print(f"  ratio passive / active: {spread(ratios, '.2f')}")


if __name__ == "__main__":
    main()
