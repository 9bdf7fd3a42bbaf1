"""DVC experiment sweeps as docs/experiments.md runs them: `dvc exp run --queue -S ...` with a
comma list queues one experiment per value, `dvc queue start` runs them, and `dvc exp show` with
the documented options is a readable table of what changed and what came out."""

from __future__ import annotations

import json
import time

import pytest

from tests.helpers.project import copy_project, run

pytestmark = pytest.mark.slow  # real servers, real pipeline steps or subprocesses: seconds each

# docs/experiments.md: what changed and what came out, without timestamps, executors and dependency hashes.
SHOW = ["dvc", "exp", "show", "--only-changed", "--drop", "Created|State|Executor|step|.*/.*|conf|data|requirements.lock",
        "--keep", "gate", "--md"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    repo = copy_project(tmp_path_factory.mktemp("experiments") / "repo")
    run(["dvc", "add", "data"], repo)  # data.dvc unchanged; the queued experiments check the data out of this cache
    queued = run(["dvc", "exp", "run", "--queue", "-S", "experiment=quick", "-S", "train.epochs=1",
                  "-S", "train.lr=0.001,0.005"], repo)
    run(["dvc", "queue", "start", "--jobs", "1"], repo)
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], repo).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    run(["dvc", "queue", "stop", "--kill"], repo, check=False)
    return repo, queued.stdout, status


def experiments(repo) -> list[dict]:
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    return [exp for baseline in shown for exp in (baseline.get("experiments") or [])]


def test_a_queued_sweep_runs_one_experiment_per_value(swept):
    repo, queued, status = swept
    assert queued.count("Queued experiment") == 2
    assert status.count("Success") == 2, status
    runs = [exp["revs"][0]["data"] for exp in experiments(repo)]
    lrs = sorted(r["params"]["params.yaml"]["data"]["train"]["lr"] for r in runs)
    assert lrs == [0.001, 0.005]
    assert all(r["params"]["params.yaml"]["data"]["train"]["epochs"] == 1 for r in runs)
    accuracies = [r["metrics"]["reports/metrics.json"]["data"]["accuracy"] for r in runs]
    assert len(set(accuracies)) == 2 and all(0 < a <= 1 for a in accuracies)


def test_exp_show_with_the_documented_options_is_a_readable_table(swept):
    repo, _, _ = swept
    table = run(SHOW, repo).stdout
    header = table.splitlines()[0]
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert {"Experiment", "train.lr", "train.epochs", "accuracy", "val.accuracy", "gate"} <= set(columns)
    assert not [c for c in columns if "/" in c or c in ("Created", "data.root", "model.name")]  # no dep hashes, no unchanged params
    assert len(table.strip().splitlines()) == 2 + 4  # header, rule, workspace, main and its two experiments
