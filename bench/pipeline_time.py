"""Wall time of the local pipeline on the sample data, in a fresh copy of the project:
prepare + train from clean (target <= 60 s on 2 cores), every stage from clean, a no-op
`dvc repro` (target <= 1.0 s) and a no-op `make run` (target <= 1.5 s, the local server
already serving the model), each next to DVC's own floor (`dvc status` on the same repo).

    .venv/bin/python bench/pipeline_time.py [Hydra overrides, e.g. train.epochs=5]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from components.core.config.schema import PORT_KEYS  # noqa: E402
from tests.helpers.project import VENV_BIN, copy_project, run  # noqa: E402
from tests.helpers.servers import free_ports  # noqa: E402


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    run(cmd, cwd)
    return time.perf_counter() - start


def main() -> None:
    overrides = sys.argv[1:]  # Hydra overrides of conf/, as for every command: written into the copy's params.yaml
    with tempfile.TemporaryDirectory() as tmp:
        repo = copy_project(Path(tmp) / "repo")
        # The copy's own server settings live in its params.yaml, as a user's would: `make run` then
        # runs exactly as typed, with no SERVE_ARGS.
        serve = [f"serve.state_dir={Path(tmp) / 'serve'}", *(f"serve.{k}={p}" for k, p in zip(PORT_KEYS, free_ports(len(PORT_KEYS))))]
        run(["python", "-m", "components.core.config", *overrides, *serve], repo)
        prepare_train = timed(["dvc", "repro", "train"], repo)
        rest = timed(["dvc", "repro"], repo)
        make = ["make", f"VENV={Path(VENV_BIN).parent}"]
        run([*make, "run"], repo)  # starts the server and deploys
        try:
            rounds = [(timed(["dvc", "status"], repo), timed(["dvc", "repro"], repo), timed([*make, "run"], repo)) for _ in range(5)]
        finally:
            run([*make, "stop"], repo)
    floor, noop, make_run = zip(*rounds)
    print(f"prepare + train from clean: {prepare_train:6.1f} s   (target <= 60 s)")
    print(f"remaining stages:           {rest:6.1f} s")
    for name, times, target in (("dvc status (DVC's floor)", floor, None), ("no-op dvc repro", noop, 1.0),
                                ("no-op make run", make_run, 1.5)):
        line = f"{name:<25} min {min(times):5.2f}  median {statistics.median(times):5.2f}  max {max(times):5.2f} s"
        if target:
            line += f"   x{statistics.median(times) / statistics.median(floor):.2f} of dvc status   (target <= {target} s)"
        print(line)


if __name__ == "__main__":
    main()
