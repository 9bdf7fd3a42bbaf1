"""Kubeflow Pipelines: thin component wrappers, the pipeline graphs, preflight checks, compile / run-local / upload / submit."""
