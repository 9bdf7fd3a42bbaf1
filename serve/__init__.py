"""The serving entry points: the `python -m serve` CLI (local TorchServe, deploy by stage, status, drift) and the
deployment files (Kubernetes manifests, Prometheus/Grafana config, TorchServe logging, the batch-scoring dvc.yaml)."""
