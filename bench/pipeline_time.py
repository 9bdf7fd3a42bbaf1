"""Wall time of the local pipeline on the sample data, in a fresh copy of the project:
prepare + train from clean (target <= 60 s on 2 cores), every stage from clean, and a no-op
`dvc repro` (target <= 1.5 s) next to DVC's own floor (`dvc status` on the same repo).

    .venv/bin/python bench/pipeline_time.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.support import copy_project, run  # noqa: E402


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    run(cmd, cwd)
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        repo = copy_project(Path(tmp) / "repo")
        prepare_train = timed(["dvc", "repro", "train"], repo)
        rest = timed(["dvc", "repro"], repo)
        noop = [timed(["dvc", "repro"], repo) for _ in range(5)]
        floor = [timed(["dvc", "status"], repo) for _ in range(5)]
    print(f"prepare + train from clean: {prepare_train:6.1f} s   (target <= 60 s)")
    print(f"remaining stages:           {rest:6.1f} s")
    print(f"no-op dvc repro (median 5): {statistics.median(noop):6.2f} s   (target <= 1.5 s)")
    print(f"dvc status floor (median 5):{statistics.median(floor):6.2f} s   ratio {statistics.median(noop) / statistics.median(floor):.2f}")


if __name__ == "__main__":
    main()
