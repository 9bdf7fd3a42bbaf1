"""DVC experiment sweeps as docs/experiments.md runs them: `dvc exp run --queue -S ...` with a
comma list queues one experiment per value, `dvc queue start` runs them, and `make exps` is a
readable table of the headline metrics and what changed."""

from __future__ import annotations

import json
import sys
import time

import pytest

from components.core.paths import ROOT
from tests.helpers.project import copy_project, run


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
        time.sleep(1)
    run(["dvc", "queue", "stop", "--kill"], repo, check=False)
    return repo, queued.stdout, status


def experiments(repo) -> list[dict]:
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    return [exp for baseline in shown for exp in (baseline.get("experiments") or [])]


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_make_exps_is_a_table_of_the_headline_metrics_and_what_varied(swept):
    repo, _, _ = swept
    table = run(["make", "-s", "exps", f"VENV={sys.prefix}"], repo).stdout  # this environment: no install in the copy
    columns = _header(table)
    assert len(columns) <= 25
    assert {"Experiment", "train.lr", "train.epochs", "accuracy", "balanced_accuracy", "ece", "val.loss", "gate"} <= set(columns)
    assert not [c for c in columns if "/" in c or c in ("Created", "data.root", "model.name")]  # no dep hashes, no unchanged params
    assert len(table.strip().splitlines()) == 2 + 4  # header, rule, workspace, main and its two experiments
    documented = (ROOT / "docs" / "experiments.md").read_text().split("$ make exps\n", 1)[1].split("```", 1)[0]
    assert _header(documented) == columns  # the docs show this table
    for baseline in ("workspace", "main"):  # with the committed metrics (the swept copy's baseline)
        assert _row(documented, baseline) == _row(table, baseline)
    plain = run(["dvc", "exp", "show", "--no-pager", "--csv"], repo).stdout  # what plain `dvc exp show` lists
    assert len(plain.splitlines()[0].split(",")) > 100


def _header(table: str) -> list[str]:
    return [c.strip() for c in table.strip().splitlines()[0].strip("|").split("|")]


def _row(table: str, first_cell: str) -> list[str]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.strip().splitlines() if line.startswith("|")]
    return next(row for row in rows if row[0] == first_cell)
