"""The reference numerics: the pipeline gives the same bytes on any x86-64 AVX2 host, proved here by
simulating other hosts on this one (one visible core, the ISA capped, hostile exports); the native
profile says what it is; a workspace whose bytes cannot be the reference ones explains itself."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from components.core.paths import ROOT
from components.core.numerics import explain, reference_host
from components.core.numerics_env import REFERENCE_ENV, SCHEDULING_ENV
from tests.helpers.project import run

# Hosts simulated on this machine: what each changes is what a user's machine or shell may differ in.
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
             "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR", "OPENBLAS_CORETYPE": "Haswell"}
HOSTILE_SHELL = {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": "2",
                 "MKL_CBWR": "AUTO", "MKL_DYNAMIC": "TRUE", "OMP_DYNAMIC": "TRUE", "OPENBLAS_CORETYPE": "Prescott",
                 "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR", "ONEDNN_MAX_CPU_ISA": "SSE41",
                 "ONEDNN_DEFAULT_FPMATH_MODE": "BF16", "OMP_WAIT_POLICY": "ACTIVE"}
HOSTS = {"all cores": ([], {}), "one core": (["taskset", "-c", "0"], {}), "AVX2-only CPU": ([], AVX2_ONLY),
         "hostile shell": ([], HOSTILE_SHELL)}
STEPS = (("prepare", ["--out", "prepared"]), ("train", ["--prepared", "prepared", "--out", "model", "--live", "live", "--checkpoints", "ckpt"]),
         ("evaluate", ["--prepared", "prepared", "--model", "model", "--reports", "reports"]),
         ("package", ["--prepared", "prepared", "--model", "model", "--out", "package"]))
not_a_reference_host = pytest.mark.skipif(reference_host() is not None, reason=f"{reference_host()}: no reference bytes here")


def _pipeline(out: Path, prefix: list[str], env: dict, *overrides: str) -> dict[str, str]:
    """The four steps' command lines as DVC runs them, into `out`; the sha256 of every file they wrote."""
    out.mkdir()
    for step, paths in STEPS:
        run([*prefix, "python", "-m", f"components.{step}", *(p if p.startswith("--") else str(out / p) for p in paths),
             "experiment=quick", *overrides], ROOT, env=env)
    return {str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.rglob("*")) if f.is_file()}


@pytest.mark.e2e
@not_a_reference_host
def test_every_output_is_byte_identical_on_every_simulated_host(tmp_path, digits_subset):
    outputs = {host: _pipeline(tmp_path / str(i), prefix, env, f"data.root={digits_subset}")
               for i, (host, (prefix, env)) in enumerate(HOSTS.items())}
    reference = outputs["all cores"]
    assert {"model/model.safetensors", "reports/metrics.json", "reports/evaluation.html", "package/model.onnx",
            "package/digits.mar", "prepared/reference_stats.json"} <= reference.keys()
    for host, files in outputs.items():
        differing = sorted(name for name in reference.keys() | files.keys() if reference.get(name) != files.get(name))
        assert differing == [], f"{host}: these outputs differ from the all-cores run"


@pytest.mark.e2e
@not_a_reference_host
def test_native_numerics_use_this_machines_kernels_and_say_so(tmp_path, digits_run):
    """numerics.profile=native restarts the step outside the reference pins; lineage records what ran."""
    for name, profile in (("ref", "reference"), ("native", "native")):
        run(["python", "-m", "components.train", "--prepared", str(digits_run["prepared"]), "--out", str(tmp_path / name),
             "--live", str(tmp_path / f"{name}-live"), "--checkpoints", str(tmp_path / f"{name}-ckpt"), "experiment=quick",
             "train.epochs=1", f"numerics.profile={profile}"], ROOT)
    record = {name: json.loads((tmp_path / name / "model.json").read_text())["lineage"]["numerics"] for name in ("ref", "native")}
    assert record["ref"] == {"profile": "reference", "isa": "AVX2", "threads": 2, "machine": "x86_64"}
    with subprocess.Popen([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())"],
                          stdout=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin"}) as probe:  # torch outside the project
        isa, threads = probe.communicate()[0].split()
    assert record["native"] == {"profile": "native", "isa": isa, "threads": int(threads), "machine": "x86_64"}


def test_the_environment_pins_override_whatever_the_shell_exports():
    env = {"PATH": "/usr/bin:/bin", **HOSTILE_SHELL}
    shown = subprocess.run([sys.executable, "-c", "import components, json, os; print(json.dumps(dict(os.environ)))"], cwd=ROOT, env=env,
                           capture_output=True, text=True, check=True)
    pinned = json.loads(shown.stdout)
    assert {name: pinned[name] for name in REFERENCE_ENV} == REFERENCE_ENV


@pytest.mark.parametrize("shell", [{}, {"OMP_WAIT_POLICY": "ACTIVE"}], ids=["unset", "exported"])
def test_waiting_threads_sleep_unless_the_shell_says_otherwise(shell):
    """Not a numerics pin (the hostile-shell host above spins its threads and gives the same bytes): the shell wins."""
    shown = subprocess.run([sys.executable, "-c", "import components, os; print(os.environ['OMP_WAIT_POLICY'])"], cwd=ROOT,
                           env={"PATH": "/usr/bin:/bin", **shell}, capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == shell.get("OMP_WAIT_POLICY", SCHEDULING_ENV["OMP_WAIT_POLICY"])


@pytest.mark.integration
def test_torch_used_before_the_pins_is_refused_not_silently_native():
    code = "import torch; torch.ones(2).sum(); import components; from components.core.numerics import activate; activate('reference', 2)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "ATEN_CPU_CAPABILITY": "default"})
    assert result.returncode != 0
    assert "torch chose its DEFAULT kernels (at its first operation) before the reference numerics pinned AVX2" in result.stderr


def _workspace(root: Path, numerics: dict, device: str, committed: dict, current: dict) -> Path:
    """A git repo whose HEAD holds `committed` metrics and whose workspace holds `current` ones."""
    (root / "reports").mkdir(parents=True)
    (root / "artifacts" / "model").mkdir(parents=True)
    (root / "reports" / "metrics.json").write_text(json.dumps(committed))
    run(["git", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "reference"], root)
    (root / "reports" / "metrics.json").write_text(json.dumps(current))
    lineage = {"numerics": numerics, "environment": {"device": device}}
    (root / "artifacts" / "model" / "model.json").write_text(json.dumps({"lineage": lineage}))
    return root


REFERENCE = {"profile": "reference", "isa": "AVX2", "threads": 2, "machine": "x86_64"}


def test_reference_bytes_say_so_in_one_line(tmp_path):
    line, same = explain(_workspace(tmp_path, REFERENCE, "cpu", {"accuracy": 0.9}, {"accuracy": 0.9}), 0.02)
    assert same and line.startswith("numerics: reference (AVX2 kernels, 2 threads)")


@pytest.mark.parametrize(("numerics", "device", "reason"), [
    ({**REFERENCE, "profile": "native", "isa": "AVX512", "threads": 8}, "cpu", "numerics.profile=native (AVX512 kernels, 8 threads on x86_64)"),
    (REFERENCE, "cuda", "the model was trained on a GPU (bf16 autocast)"),
    ({**REFERENCE, "isa": "DEFAULT", "machine": "aarch64"}, "cpu", "this is a aarch64 machine; the reference numerics are x86-64 AVX2"),
    ({**REFERENCE, "isa": "DEFAULT"}, "cpu", "torch runs DEFAULT kernels here (no AVX2)"),
])
def test_other_bytes_explain_why_with_each_metrics_delta(tmp_path, numerics, device, reason):
    committed = {"accuracy": 0.95, "ece": 0.03, "n_test": 271, "fairness": {"worst_accuracy_gap": 0.02}}
    current = {"accuracy": 0.9625, "ece": 0.029, "n_test": 271, "fairness": {"worst_accuracy_gap": 0.02}}
    line, same = explain(_workspace(tmp_path, numerics, device, committed, current), 0.02)
    assert same and reason in line
    assert "accuracy +0.0125, ece -0.0010, fairness.worst_accuracy_gap +0.0000 (within numerics.metric_tolerance 0.02)" in line


def test_a_delta_beyond_the_tolerance_is_refused(tmp_path):
    native = {**REFERENCE, "profile": "native"}
    line, same = explain(_workspace(tmp_path, native, "cpu", {"accuracy": 0.95}, {"accuracy": 0.90}), 0.02)
    assert not same and "accuracy -0.0500 (BEYOND numerics.metric_tolerance 0.02)" in line


@pytest.mark.e2e
@not_a_reference_host
def test_training_gives_the_same_bytes_on_an_emulated_intel_cpu_without_avx512(tmp_path, digits_subset):
    """Another vendor, another ISA, other caches: the train step under qemu's Intel Haswell (AVX2, no
    AVX-512, GenuineIntel, 32 KB L1 and 4 MB L2 caches: MKL, OpenBLAS and oneDNN dispatch or block by
    vendor, model and cache size) gives this machine's bytes."""
    prepared = tmp_path / "prepared"
    run(["python", "-m", "components.prepare", "--out", str(prepared), f"data.root={digits_subset}"], ROOT)
    weights = {}
    for name, prefix in (("here", []), ("haswell", ["qemu-x86_64", "-cpu", "Haswell"])):
        run([*prefix, str(Path(sys.executable)), "-m", "components.train", "--prepared", str(prepared),
             "--out", str(tmp_path / name), "--live", str(tmp_path / f"{name}-live"), "--checkpoints", str(tmp_path / f"{name}-ckpt"),
             "experiment=quick", "train.epochs=1"], ROOT)
        weights[name] = (tmp_path / name / "model.safetensors").read_bytes()
    assert weights["haswell"] == weights["here"]
