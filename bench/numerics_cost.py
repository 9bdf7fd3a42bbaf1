"""What the reference numerics cost: the train step under `numerics.profile=reference` vs `native`
(this machine's kernels: oneDNN, NNPACK, its widest ISA, all cores), side by side.

Each run is a fresh process (torch picks its kernels once per process), the two profiles take
turns, each first in every other turn; a run's clock covers the train step only (no imports).
Printed per epoch count: images/s of each profile and the ratio reference / native of each turn
(min/median/max). Target: the reference profile costs at most 15 % (ratio >= 0.85).

    python -m bench.numerics_cost [--epochs 5 15] [--repeats 5] [overrides ...]

Needs artifacts/prepared (`make run` or `dvc repro prepare` first).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import components  # noqa: F401  (first: it pins the reference numerics before torch loads)
from bench.train_throughput import bench_config, spread, template_step
from components.core.numerics_env import restart_for

PROFILES = ("reference", "native")


def one_run(profile: str, epochs: int, prepared: Path, overrides: list[str]) -> float:
    """images/s of the train step in a new process under `profile`."""
    child = subprocess.run([sys.executable, "-m", "bench.numerics_cost", "--child", profile, "--epochs", str(epochs),
                            "--prepared", str(prepared), *overrides], capture_output=True, text=True, check=True)
    return json.loads(child.stdout.splitlines()[-1])["images_per_s"]


def compare(epochs: int, repeats: int, prepared: Path, overrides: list[str]) -> None:
    speeds = {profile: [] for profile in PROFILES}
    for turn in range(repeats):
        for profile in PROFILES if turn % 2 == 0 else reversed(PROFILES):
            speeds[profile].append(one_run(profile, epochs, prepared, overrides))
    ratios = [r / n for r, n in zip(speeds["reference"], speeds["native"])]
    print(f"epochs={epochs:>3}  reference {spread(speeds['reference'], '.0f')} images/s (min/median/max)  "
          f"native {spread(speeds['native'], '.0f')}  ratio reference/native {spread(ratios, '.3f')}  (target >= 0.85)")


def child(profile: str, epochs: int, prepared: Path, overrides: list[str]) -> None:
    cfg = bench_config(epochs, [*overrides, f"numerics.profile={profile}"])
    restart_for(profile)
    speed, _ = template_step(cfg, prepared)
    print(json.dumps({"images_per_s": speed}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, nargs="+", default=[5, 15])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prepared", type=Path, default=Path("artifacts/prepared"))
    parser.add_argument("--child", choices=PROFILES, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, as for every command")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.epochs[0], args.prepared, args.overrides)
        return
    print(f"train step, reference vs native numerics, {args.repeats} turns, a new process per run")
    for epochs in args.epochs:
        compare(epochs, args.repeats, args.prepared, args.overrides)


if __name__ == "__main__":
    main()
