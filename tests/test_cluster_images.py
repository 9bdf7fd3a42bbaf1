"""Every image builds (as far as this machine, which has no Docker, can show): each Dockerfile's
`pip install` resolves for its base image's Python version and platform, with wheels only (what
`docker build` would have to find on the registry), and the code the serving image runs parses as
that image's Python. The base images' Python and glibc come from their published build files,
named per image below; a new base image must be added here, or the test fails."""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from components.core.paths import ROOT
from components.package import CODE_FILES


@dataclass(frozen=True)
class BaseImage:
    python: str | None  # None: the Dockerfile installs its own Python (python3.X -m venv)
    glibc: tuple[int, int]
    source: str


BASE_IMAGES = {
    "python:3.11.7-slim-bookworm": BaseImage("3.11", (2, 36), "docker-library/python 3.11/slim-bookworm: Debian 12 (glibc 2.36)"),
    "nvidia/cuda:13.0.0-base-ubuntu22.04": BaseImage(None, (2, 35), "nvidia/cuda ubuntu22.04 (glibc 2.35); Python from deadsnakes"),
    "pytorch/torchserve:0.12.0-cpu": BaseImage("3.9", (2, 31), "pytorch/serve v0.12.0 docker/build_image.sh: PYTHON_VERSION=3.9, "
                                                                "BASE_IMAGE=ubuntu:20.04 (glibc 2.31)"),
}
# Dockerfile -> its build context (`make image` sends `git archive HEAD`; serve/k8s/Dockerfile's header names its folder).
IMAGES = {"pipelines/Dockerfile": ROOT, "pipelines/Dockerfile.gpu": ROOT, "serve/k8s/Dockerfile": ROOT / "serve" / "k8s"}
# Pins of requirements.lock with no wheel on the registry: pure-Python source distributions that pip builds in the image.
SDIST_ONLY = {"antlr4-python3-runtime", "dash-cytoscape", "kfp-server-api"}


def base_image(dockerfile: str) -> str:
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.M))
    (image,) = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    return re.sub(r"\$\{(\w+)\}", lambda m: defaults[m[1]], image)


def python_of(dockerfile: str) -> str:
    """The Python the image's pip installs for: the base image's, or the one the Dockerfile makes its venv with."""
    own = re.search(r"\bpython(3\.\d+) -m venv", dockerfile)
    base = BASE_IMAGES[base_image(dockerfile)]
    assert own or base.python, f"no Python known for {base_image(dockerfile)}"
    return own[1] if own else base.python


@dataclass(frozen=True)
class PipInstall:
    requirements: list[str]
    index_url: str | None  # --index-url: another index than the one pip is configured with


def copied_files(dockerfile: str) -> dict[str, str]:
    """Image path (or file name, for a COPY into a folder) -> build-context path, of every COPY."""
    return {Path(dest).name if dest.endswith("/") else dest: source for source, dest in re.findall(r"^COPY (\S+) (\S+)$", dockerfile, re.M)}


def file_steps(dockerfile: str) -> list[str]:
    """The RUN instructions that only make files from copied ones (no pip, apt-get or venv): what a test can run itself."""
    runs = [" ".join(part.strip() for part in run.split("\\\n")) for run in re.findall(r"^RUN ((?:.*\\\n)*.*)$", dockerfile, re.M)]
    return [run for run in runs if not re.search(r"\b(pip|apt-get|venv)\b", run)]


def run_file_steps(dockerfile: str, context: Path, workdir: Path) -> Path:
    """The copied files and what the file steps make of them, in `workdir` (the image's WORKDIR, as a scratch folder)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name, source in copied_files(dockerfile).items():
        if (context / source).is_file():
            shutil.copy(context / source, workdir / Path(name).name)
    for step in file_steps(dockerfile):
        subprocess.run(["bash", "-euo", "pipefail", "-c", step], cwd=workdir, check=True)
    return workdir


def pip_installs(dockerfile: str, context: Path, made: Path | None = None) -> list[PipInstall]:
    """The requirement arguments of each `pip install` (ARG defaults substituted, `-r` files read from the build
    context through the COPY that put them in the image, or from `made`, where run_file_steps made them), leaving out
    installs of the project itself (`-e .`)."""
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.M))
    copied = copied_files(dockerfile)
    installs = []
    for line in re.findall(r"pip install ([^&\n\\]+)", dockerfile):
        words = shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: defaults[m[1]], line))
        if "-e" in words:
            continue
        requirements, index_url, i = [], None, 0
        while i < len(words):
            if words[i] in ("-r", "--index-url"):
                name = words[i + 1]
                if words[i] == "--index-url":
                    index_url = name
                elif made is not None and (made / name).is_file() and name not in copied:
                    requirements.append(str(made / name))
                else:
                    requirements.append(str(context / copied.get(name, copied.get(Path(name).name, name))))
                i += 2
                continue
            if not words[i].startswith("-"):
                requirements.append(words[i])
            i += 1
        installs.append(PipInstall(requirements, index_url))
    return installs


def platforms(glibc: tuple[int, int]) -> list[str]:
    """Every manylinux tag a wheel may carry to install on x86_64 with this glibc."""
    major, minor = glibc
    return [*(f"manylinux_{major}_{m}_x86_64" for m in range(minor, 16, -1)), "manylinux2014_x86_64", "manylinux2010_x86_64",
            "manylinux1_x86_64"]


def resolve(requirements: list[str], python: str, glibc: tuple[int, int], scratch: Path, index_url: str | None = None,
            ) -> subprocess.CompletedProcess:
    """pip's dry run of one `pip install` for another Python and platform, wheels only. A lock pins every
    transitive dependency, so it is resolved pin by pin (--no-deps), its source-only pins left out."""
    arguments = []
    for requirement in requirements:
        if requirement.endswith(".lock"):
            pins = [line for line in Path(requirement).read_text().splitlines()
                    if line and not line.startswith("#") and re.split(r"[=<>;\[ ]", line)[0].lower().replace("_", "-") not in SDIST_ONLY]
            filtered = scratch / Path(requirement).name
            filtered.write_text("\n".join(pins) + "\n")
            arguments += ["--no-deps", "-r", str(filtered)]
        else:
            arguments += ["-r", requirement] if Path(requirement).is_file() else [requirement]
    if index_url:
        arguments += ["--index-url", index_url]
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--python-version", python,
               *(f"--platform={tag}" for tag in platforms(glibc)), "--only-binary=:all:", "--target", str(scratch / "target"), *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_every_image_has_a_known_base_and_python():
    for name in IMAGES:
        text = (ROOT / name).read_text()
        assert base_image(text) in BASE_IMAGES, f"{name}: add {base_image(text)}'s Python and glibc (from its build files) to BASE_IMAGES"
    assert python_of((ROOT / "serve/k8s/Dockerfile").read_text()) == "3.9"
    assert python_of((ROOT / "pipelines/Dockerfile.gpu").read_text()) == "3.11"


def test_the_serving_image_installs_from_its_own_requirements_for_python_3_9():
    text = (ROOT / "serve" / "k8s" / "Dockerfile").read_text()
    assert pip_installs(text, IMAGES["serve/k8s/Dockerfile"]) == [PipInstall([str(ROOT / "serve" / "k8s" / "requirements.txt")], None)]
    assert "onnxruntime==1.19.2" in (ROOT / "serve" / "k8s" / "requirements.txt").read_text().split()


CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def reachable(url: str) -> bool:
    try:
        socket.getaddrinfo(urlparse(url).hostname, 443)
    except OSError:
        return False
    return True


@pytest.mark.integration
@pytest.mark.parametrize("name", list(IMAGES))
def test_each_dockerfile_pip_install_resolves_for_its_base_python_and_platform(name, tmp_path):
    """Each install from the registry pip is configured with; one from another index (the CPU image's torch from
    PyTorch's CPU index) only where that host resolves: this machine reaches the package registries only."""
    text = (ROOT / name).read_text()
    python, glibc = python_of(text), BASE_IMAGES[base_image(text)].glibc
    for install in pip_installs(text, IMAGES[name], run_file_steps(text, IMAGES[name], tmp_path / "app")):
        if install.index_url and not reachable(install.index_url):
            print(f"{name}: not resolved here, {install.index_url} cannot be reached: {install.requirements}")
            continue
        result = resolve(install.requirements, python, glibc, tmp_path, install.index_url)
        errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
        assert result.returncode == 0, f"{name}: pip install {' '.join(install.requirements)} does not resolve for Python {python}: {errors}"


def cuda_dependencies_of_torch() -> set[str]:
    """What the CUDA build of torch (installed here, as the lock pins it) needs on Linux beyond the CPU build:
    its requirements with a Linux marker, and theirs (with the extras asked for)."""
    def requirements(name: str, extras: tuple[str, ...]) -> list[Requirement]:
        env = {"platform_system": "Linux", "sys_platform": "linux", "platform_machine": "x86_64", "python_version": "3.11"}
        found = [Requirement(r) for r in metadata.requires(name) or []]
        return [r for r in found if r.marker is None or any(r.marker.evaluate(env | {"extra": e}) for e in extras or ("",))]

    todo = [(r.name, tuple(r.extras)) for r in requirements("torch", ()) if r.marker and "platform_system" in str(r.marker)]
    seen: set[str] = set()
    while todo:
        name, extras = todo.pop()
        if canonicalize_name(name) not in seen:
            seen.add(canonicalize_name(name))
            todo += [(r.name, tuple(r.extras)) for r in requirements(name, extras)]
    return seen


def pins(path: Path) -> dict[str, str]:
    return {canonicalize_name(line.split("==")[0]): line.split("==")[1] for line in path.read_text().splitlines()
            if "==" in line and not line.startswith("#")}


def test_the_cpu_image_installs_torch_s_cpu_build_and_none_of_its_cuda_libraries(tmp_path):
    """The lock pins torch's CUDA build (about 5 GB of CUDA libraries); pipelines/Dockerfile's file steps, run here on the
    lock, take the lock's torch and torchvision as +cpu builds from PyTorch's CPU index, and leave out exactly what only the
    CUDA build needs. (That index cannot be reached from this machine: that the +cpu wheels of these versions exist there is
    checked by the resolution test only where it can be.)"""
    text = (ROOT / "pipelines" / "Dockerfile").read_text()
    made = run_file_steps(text, ROOT, tmp_path / "app")
    installs = pip_installs(text, ROOT, made)
    lock = pins(ROOT / "requirements.lock")
    torch_install = next(i for i in installs if i.index_url)
    assert torch_install.index_url == CPU_INDEX and "--no-deps" in text
    assert pins(Path(torch_install.requirements[0])) == {"torch": f"{lock['torch']}+cpu", "torchvision": f"{lock['torchvision']}+cpu"}
    (rest,) = [r for i in installs for r in i.requirements if r.endswith(".lock")]
    assert Path(rest).parent == made  # made from the lock in the image, not the lock itself
    left_out = set(lock) - set(pins(Path(rest)))
    assert left_out - {"torch", "torchvision"} == cuda_dependencies_of_torch() & set(lock)
    assert len(left_out) > 15 and "nvidia-ml-py" not in left_out  # NVML's Python binding is no CUDA library
    gpu = pip_installs((ROOT / "pipelines" / "Dockerfile.gpu").read_text(), ROOT)
    assert PipInstall([str(ROOT / "requirements.lock")], None) in gpu  # the GPU image keeps the CUDA build


@pytest.mark.integration
def test_the_old_serving_pin_does_not_resolve_for_python_3_9(tmp_path):
    """What the check catches: onnxruntime 1.32.0 (requirements.lock's, Python 3.11) has no Python 3.9 wheel."""
    result = resolve(["onnxruntime==1.32.0"], "3.9", BASE_IMAGES["pytorch/torchserve:0.12.0-cpu"].glibc, tmp_path)
    assert result.returncode != 0 and "No matching distribution found for onnxruntime==1.32.0" in result.stderr


def test_the_code_the_serving_image_runs_parses_as_its_python():
    """The code the .mar carries (components/package.py CODE_FILES) runs on the serving image's Python (3.9)."""
    major, minor = map(int, python_of((ROOT / "serve/k8s/Dockerfile").read_text()).split("."))
    for path in (ROOT / name for name in CODE_FILES):
        source = path.read_text()
        ast.parse(source, str(path), feature_version=(major, minor))
        annotated = any(isinstance(node, (ast.AnnAssign, ast.FunctionDef)) for node in ast.walk(ast.parse(source)))
        assert not annotated or "from __future__ import annotations" in source, f"{path}: `X | None` annotations need it on 3.9"
