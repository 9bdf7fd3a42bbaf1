"""run-local: the whole pipeline through kfp.local on this machine, no cluster.

Every component runs as a subprocess of this venv (`SubprocessRunner(use_venv=False)`),
exactly the code the image runs on a cluster. The data defaults to the working tree's
data folder; deploy goes to the local TorchServe of conf/serve, started for the run and
stopped afterwards (a server that was already running is used and left running).
"""

import builtins
import contextlib
import json
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kfp import local
from omegaconf import DictConfig

from components.core.paths import ROOT
from components.core.errors import StepError
from components.torchserve import server

# kfp.local warns for every task whose image is not a python image, and for settings
# (resources, GPU) that only a cluster applies; both are expected here.
warnings.filterwarnings("ignore", message=r".*non-Python base image.*", category=RuntimeWarning)
warnings.filterwarnings("ignore", message=r".*have no effect in the current local runner.*")


class LocalRunFailed(StepError):
    pass


@dataclass
class TaskResult:
    task: str
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> local path
    metrics: dict[str, dict] = field(default_factory=dict)   # name -> values (Metrics live in executor_output.json)
    parameters: dict[str, object] = field(default_factory=dict)


@dataclass
class LocalRun:
    root: Path
    tasks: dict[str, TaskResult]
    seconds: float
    failure: str | None  # kfp.local's message naming the failed task


def local_data_uri(cfg: DictConfig) -> str:
    """The working tree's data folder, unless conf/pipeline names a repo or a URI."""
    if cfg.pipeline.data.repo or cfg.pipeline.data.uri:
        return cfg.pipeline.data.uri
    root = Path(cfg.data.root)
    return str(root if root.is_absolute() else ROOT / root)


@contextlib.contextmanager
def local_torchserve(cfg: DictConfig, needed: bool) -> Iterator[None]:
    """The local TorchServe for the deploy step, started for the run and stopped afterwards."""
    started = needed and server.running_pid(cfg) is None
    if started:
        began = time.monotonic()
        server.start(cfg)
        print(f"run-local: TorchServe started in {time.monotonic() - began:.1f} s (state in {shown(server.state_dir(cfg).root)})")
    try:
        yield
    finally:
        if started:
            began = time.monotonic()
            server.stop(cfg)
            print(f"run-local: TorchServe stopped in {time.monotonic() - began:.1f} s")


def run_pipeline(pipeline, arguments: dict, output_dir: Path, deploys_locally: bool, cfg: DictConfig) -> LocalRun:
    """Run a pipeline with kfp.local; what it produced, and why it failed if it did."""
    output_dir = output_dir.resolve()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(output_dir), raise_on_error=True)
    before = set(output_dir.glob("*")) if output_dir.exists() else set()
    started = time.monotonic()
    failure = None
    original_print = builtins.print  # kfp.local's ParallelFor threads can leave it patched to indent every line
    with local_torchserve(cfg, deploys_locally):
        try:
            pipeline(**arguments)
        except RuntimeError as exc:  # kfp.local: "Pipeline ... finished with status FAILURE. Inner task failed: ..."
            failure = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        finally:
            builtins.print = original_print
    run_root = max(set(output_dir.glob("*")) - before, key=lambda p: p.stat().st_mtime)
    if failure and "'gate-op'" in failure:
        failure += " The gate (conf/gate) closed: package and deploy did not run (the reason is in gate-op's log)."
    return LocalRun(run_root, collect_results(run_root), time.monotonic() - started, failure)


def collect_results(run_root: Path) -> dict[str, TaskResult]:
    """Each task's artifacts, metrics and output parameters, from its executor_output.json, in execution order."""
    results = {}
    for output in sorted(run_root.rglob("executor_output.json"), key=lambda p: p.stat().st_mtime):
        task = output.parent.relative_to(run_root).as_posix()
        executor_output = json.loads(output.read_text())
        result = TaskResult(task, parameters=executor_output.get("parameterValues", {}))
        for name, listed in executor_output.get("artifacts", {}).items():
            artifact = listed["artifacts"][0]
            if Path(artifact["uri"]).exists():
                result.artifacts[name] = artifact["uri"]
            else:
                result.metrics[name] = artifact.get("metadata", {})
        results[task] = result
    return results


def shown(path: str | Path) -> str:
    """A path relative to the working directory when it is inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def describe(run: LocalRun) -> str:
    lines = [f"run-local: {shown(run.root)} ({run.seconds:.1f} s)"]
    for result in run.tasks.values():
        lines.append(f"  {result.task}")
        lines += [f"    {name:<18} {shown(path)}" for name, path in result.artifacts.items()]
        for name, values in result.metrics.items():
            numbers = {k: v for k, v in values.items() if isinstance(v, (int, float))}
            first = ", ".join(f"{k}={v:.4g}" for k, v in list(numbers.items())[:5])
            more = f", ... ({len(numbers)} values)" if len(numbers) > 5 else ""
            lines.append(f"    {name:<18} {first or ', '.join(values) + ' (in executor_output.json)'}{more}")
        lines += [f"    {name:<18} = {value}" for name, value in result.parameters.items()]
    return "\n".join(lines)
