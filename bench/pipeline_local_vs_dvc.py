"""`python -m pipelines run-local` vs `dvc repro`: wall time of the whole pipeline from clean
on the same config (target: run-local <= 1.3x dvc repro), side by side, alternating rounds.

dvc repro runs every stage of dvc.yaml in a fresh copy of the project. run-local runs the
same steps through kfp.local plus what dvc repro does not do: the gate, the deploy step and
the local TorchServe it starts and stops. The second ratio leaves those out (deploy task,
TorchServe start and stop, from run-local's own log lines).

    .venv/bin/python bench/pipeline_local_vs_dvc.py [--rounds 2] [Hydra overrides, default experiment=quick]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from components.core.config.schema import PORT_KEYS  # noqa: E402
from components.core.paths import ROOT  # noqa: E402
from tests.helpers.project import copy_project, run  # noqa: E402
from tests.helpers.servers import free_ports  # noqa: E402

OPEN_GATE = "gate.on_fail=warn"  # so package and deploy run whatever the verdicts (gate.on_inconclusive warns by default)


def dvc_repro(overrides: list[str], tmp: Path) -> float:
    repo = copy_project(tmp / "repo")
    run(["python", "-m", "components.core.config", *overrides], repo)
    start = time.perf_counter()
    run(["dvc", "repro"], repo)
    return time.perf_counter() - start


def run_local(overrides: list[str], tmp: Path) -> tuple[float, float]:
    """(wall time, seconds spent on what dvc repro does not do: deploy task + TorchServe start/stop)."""
    serve = [f"serve.state_dir={tmp / 'serve'}", *(f"serve.{k}={p}" for k, p in zip(PORT_KEYS, free_ports(len(PORT_KEYS))))]
    start = time.perf_counter()
    result = run(["python", "-m", "pipelines", "run-local", "--output-dir", str(tmp / "kfp"), *overrides, OPEN_GATE, *serve], ROOT)
    wall = time.perf_counter() - start
    log = result.stdout + result.stderr
    server = sum(float(s) for s in re.findall(r"TorchServe (?:started|stopped) in ([0-9.]+) s", log))
    return wall, server + task_seconds(log, "deploy-op")


def task_seconds(log: str, task: str) -> float:
    """Duration of one kfp.local task from its 'Executing task' and 'finished' log lines."""
    stamps = [datetime.strptime(m, "%H:%M:%S.%f") for m in
              re.findall(rf"(\d\d:\d\d:\d\d\.\d+) - \w+ - (?:Executing task|Task) '{task}'", log)]
    return (stamps[-1] - stamps[0]).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("overrides", nargs="*", default=["experiment=quick"])
    args = parser.parse_args()
    dvc, local, extra = [], [], []
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            dvc.append(dvc_repro(args.overrides, Path(tmp)))
        with tempfile.TemporaryDirectory() as tmp:
            wall, outside = run_local(args.overrides, Path(tmp))
        local.append(wall)
        extra.append(outside)
        print(f"round {i + 1}: dvc repro {dvc[-1]:6.1f} s   run-local {wall:6.1f} s (deploy + TorchServe {outside:4.1f} s)")
    d, r, e = statistics.median(dvc), statistics.median(local), statistics.median(extra)
    print(f"median of {args.rounds}, {' '.join(args.overrides)}:")
    print(f"  dvc repro from clean               {d:6.1f} s")
    print(f"  run-local from clean               {r:6.1f} s   ratio {r / d:.2f}   (target <= 1.3)")
    print(f"  run-local without deploy/serving   {r - e:6.1f} s   ratio {(r - e) / d:.2f}")


if __name__ == "__main__":
    main()
