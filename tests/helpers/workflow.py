"""Run the `run:` steps of a GitHub Actions job the way the runner does, on this machine: each
script under `bash --noprofile --norc -eo pipefail`, `${{ secrets.* }}`, `${{ vars.* }}` and
`${{ steps.<id>.outputs.* }}` substituted, `if: <context>.<name> != ''` evaluated, and the job
stopped at the first failing step. `uses:` steps (checkout, setup-python) are what the test did
before calling this; steps named in `skip` are replaced by the test's own setup."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.helpers.project import run

EXPRESSION = re.compile(r"\$\{\{\s*([\w.-]+)\s*\}\}")


@dataclass
class JobRun:
    steps: list[tuple[str, object]] = field(default_factory=list)  # (step name, CompletedProcess) in order

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.steps]


def _lookup(expr: str, context: dict) -> str:
    kind, _, rest = expr.partition(".")
    if kind == "steps":
        step_id, _, output = rest.partition(".outputs.")
        return context["steps"].get(step_id, {}).get(output, "")
    return str(context.get(kind, {}).get(rest, ""))


def _substitute(text: str, context: dict) -> str:
    return EXPRESSION.sub(lambda m: _lookup(m.group(1), context), text)


def _condition_holds(condition: str | None, context: dict) -> bool:
    if condition is None:
        return True
    match = re.fullmatch(r"\s*([\w.-]+)\s*(!=|==)\s*''\s*", condition)
    if not match:
        raise ValueError(f"unsupported if: {condition!r}")
    empty = _lookup(match.group(1), context) == ""
    return empty if match.group(2) == "==" else not empty


def _outputs(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line) if path.exists() else {}


def run_job(workflow: Path, job: str, repo: Path, env: dict[str, str], secrets: dict[str, str] | None = None,
            vars: dict[str, str] | None = None, skip: tuple[str, ...] = ()) -> JobRun:
    context = {"secrets": secrets or {}, "vars": vars or {}, "steps": {}}
    done = JobRun()
    for i, step in enumerate(yaml.safe_load(workflow.read_text())["jobs"][job]["steps"]):
        if "run" not in step or step.get("name") in skip or not _condition_holds(step.get("if"), context):
            continue
        output_file = repo.parent / f".github_output_{i}"
        step_env = {**env, "GITHUB_OUTPUT": str(output_file),
                    **{k: _substitute(str(v), context) for k, v in (step.get("env") or {}).items()}}
        result = run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", _substitute(step["run"], context)], repo,
                     check=False, env=step_env)
        done.steps.append((step.get("name", step["run"][:40]), result))
        context["steps"][step.get("id", f"step{i}")] = _outputs(output_file)
        if result.returncode != 0:
            break
    return done
