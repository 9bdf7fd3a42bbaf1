"""The layout shows the architecture, and imports point one way (contracts in pyproject.toml)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from components.core.paths import ROOT

STEPS = {"prepare", "train", "evaluate", "package", "deploy", "promote", "score"}


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_no_module_imports_by_name_where_the_contracts_cannot_see_it():
    """An importlib.import_module climb (core/lineage.py importing the steps) is an import import-linter misses."""
    calls = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in ROOT.glob("components/**/*.py")
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)
             and getattr(node.func, "attr", getattr(node.func, "id", None)) in {"import_module", "__import__"}]
    assert calls == []


def test_top_of_components_holds_the_steps_and_nothing_else():
    modules = {p.stem for p in (ROOT / "components").glob("*.py")} - {"__init__"}
    assert modules == STEPS


def test_tests_never_import_bench_and_bench_imports_only_the_test_helpers():
    """What both need (a copy of the project, commands run in it, free ports) lives in tests/helpers/."""
    by_tests = {p.name: m for p in (ROOT / "tests").rglob("*.py") for m in imported_modules(p) if m.split(".")[0] == "bench"}
    by_bench = {p.name: m for p in (ROOT / "bench").glob("*.py") for m in imported_modules(p)
                if m.split(".")[0] == "tests" and not m.startswith("tests.helpers.")}
    assert (by_tests, by_bench) == ({}, {})


def test_the_interpreter_check_runs_where_a_step_command_starts_not_on_import():
    """`python -S` is this interpreter without its site-packages, like a system python without the project's packages."""
    command = subprocess.run([sys.executable, "-S", "-m", "components.prepare"], cwd=ROOT, capture_output=True, text=True)
    assert command.returncode == 1 and len(command.stderr.splitlines()) == 1
    assert "is not this project's environment (it lacks omegaconf, numpy, torch, dvc)" in command.stderr
    imported = subprocess.run([sys.executable, "-S", "-c", "import components"], cwd=ROOT, capture_output=True, text=True)
    assert "ModuleNotFoundError" in imported.stderr and "environment" not in imported.stderr  # an importer gets an ImportError
def test_every_project_import_names_something_that_exists():
    """Scripts nothing imports (bench/) break silently when a module moves; this reads them all."""
    import importlib.util

    missing = []
    for path in sorted([*ROOT.glob("components/**/*.py"), *ROOT.glob("pipelines/*.py"), *ROOT.glob("serve/*.py"),
                        *ROOT.glob("bench/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.ImportFrom) and node.module
                    and node.module.split(".")[0] in {"components", "pipelines", "serve", "bench"}):
                module = importlib.import_module(node.module)
                missing += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(module, a.name) and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert missing == []
