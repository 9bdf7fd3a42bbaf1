"""Kubeflow Pipelines: thin component wrappers, the pipeline graphs, compile / run-local / submit."""
