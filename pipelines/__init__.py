"""Kubeflow Pipelines: thin component wrappers, the pipeline graphs, preflight checks, compile / run-local / upload / submit."""

from components.core.paths import ROOT

OUT_DIR = ROOT / "artifacts" / "kfp"  # the compiled specs, and kfp.local's pipeline root (local/)
