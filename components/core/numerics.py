"""Numerics profiles: which CPU kernels a step's floats come from (conf/numerics).

`reference` (the default) gives the same bytes on every x86-64 CPU with AVX2, whatever its vendor,
core count or higher ISA, and whatever the shell exports:
- ATen's AVX2 kernels (`ATEN_CPU_CAPABILITY`, read once, at torch's first operation: so this module
  pins the environment from `components/__init__.py`, before any step uses torch);
- oneDNN's convolutions on its AVX2 kernels (`ONEDNN_MAX_CPU_ISA`) in strict fp32: with the ISA and
  the thread count fixed they gave the same bytes on an emulated Intel Haswell (other vendor, other
  cache sizes) as on an AMD EPYC (tests/test_numerics.py); no NNPACK (its kernels follow the CPU);
- MKL's conditional numerical reproducibility on its one branch every vendor's CPU honours
  (`MKL_CBWR=COMPATIBLE`: on AMD, MKL ignores `AVX2`); the train step's AdamW is the fused one,
  whose kernel is torch's own (MKL's vectorised `sqrt` differs by CPU vendor);
- a fixed thread count (`numerics.threads`), which OpenMP and MKL may not lower on their own;
- OpenBLAS (numpy, scipy) on its Haswell (AVX2) kernels, one thread; interpret's EBM on its scalar code.

`native` takes this machine's fastest kernels and all its cores: the bytes are this machine's.
Every output's lineage records the profile actually used (`record`).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

from components.core.errors import StepError

REFERENCE_ISA = "AVX2"
X86 = ("x86_64", "amd64")


class NumericsError(StepError):
    """The process cannot give the numerics profile its config asks for."""


def _not_reference_machine(machine: str, isa: str) -> str:
    if machine.lower() not in X86:
        return f"this is a {machine} machine; the reference numerics are x86-64 AVX2 kernels"
    return f"torch runs {isa} kernels here (no AVX2); the reference numerics are x86-64 AVX2 kernels"


def reference_host() -> str | None:
    """None when this machine can give the reference bytes; else why not."""
    import torch

    if platform.machine().lower() in X86 and torch.cpu._is_avx2_supported():
        return None
    return _not_reference_machine(platform.machine(), torch.backends.cpu.get_cpu_capability())


def activate(profile: str, threads: int) -> dict:
    """Apply `profile` to torch in this process and return what lineage records of it."""
    import torch

    reference = profile == "reference"
    torch.backends.mkldnn.enabled = True
    torch.backends.nnpack.set_flags(not reference)
    if reference:
        torch.set_num_threads(threads)
        if reference_host() is None and torch.backends.cpu.get_cpu_capability() != REFERENCE_ISA:
            raise NumericsError(f"torch chose its {torch.backends.cpu.get_cpu_capability()} kernels (at its first operation) before "
                                f"the reference numerics pinned {REFERENCE_ISA}: import `components` before using torch "
                                "(docs/reproducibility.md)")
    return record(profile)


def record(profile: str) -> dict:
    """The numerics a process uses: the profile, torch's kernel ISA and thread count, the machine."""
    import torch

    return {"profile": profile, "isa": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "machine": platform.machine()}


METRICS_FILES = ("reports/metrics.json", "dvclive/metrics.json")


def _why_not_reference(used: dict, device: str) -> str | None:
    """Why outputs made with `used` numerics on `device` are not the reference bytes (None: they are)."""
    if device == "cuda":
        return "the model was trained on a GPU (bf16 autocast)"
    if used["profile"] == "native":
        return f"numerics.profile=native ({used['isa']} kernels, {used['threads']} threads on {used['machine']})"
    if used["isa"] != REFERENCE_ISA:
        return _not_reference_machine(used["machine"], used["isa"])
    return None


def _float_leaves(tree: dict, prefix: str = "") -> dict[str, float]:
    leaves = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            leaves |= _float_leaves(value, f"{prefix}{key}.")
        elif isinstance(value, float):
            leaves[prefix + key] = value
    return leaves


def _committed_floats(root: Path, path: str) -> dict[str, float]:
    shown = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=root, capture_output=True, text=True)
    return _float_leaves(json.loads(shown.stdout)) if shown.returncode == 0 else {}


def metric_deltas(root: Path) -> dict[str, float]:
    """Every float metric of this workspace minus its committed value."""
    deltas = {}
    for path in METRICS_FILES:
        committed = _committed_floats(root, path)
        current = _float_leaves(json.loads((root / path).read_text())) if (root / path).exists() else {}
        deltas |= {name: current[name] - committed[name] for name in sorted(committed.keys() & current.keys())}
    return deltas


def explain(root: Path, tolerance: float) -> tuple[str, bool]:
    """One line on the workspace's numerics, and whether its metrics are those of the commit:
    the reference bytes, or why they differ with each metric's delta against the commit."""
    lineage = json.loads((root / "artifacts" / "model" / "model.json").read_text())["lineage"]
    used, device = lineage["numerics"], lineage["environment"]["device"]
    reason = _why_not_reference(used, device)
    if reason is None:
        return (f"numerics: reference ({used['isa']} kernels, {used['threads']} threads): "
                "the bytes every x86-64 AVX2 machine gives, so `git status` stays clean"), True
    deltas = metric_deltas(root)
    within = all(abs(delta) <= tolerance for delta in deltas.values())
    shown = ", ".join(f"{name} {delta:+.4f}" for name, delta in deltas.items()) or "no committed metrics to compare"
    verdict = "within" if within else "BEYOND"
    return (f"numerics: {reason}: the bytes are this machine's, not the committed reference; metrics vs the commit: "
            f"{shown} ({verdict} numerics.metric_tolerance {tolerance})"), within


if __name__ == "__main__":
    from components.core.config.params_file import load_config
    from components.core.paths import ROOT

    line, within = explain(ROOT, load_config().numerics.metric_tolerance)
    print(line)
    sys.exit(0 if within else 1)
