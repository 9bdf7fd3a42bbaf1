"""drift helpers (see docs/architecture.md): the per-image features and the prediction log that the
serving handler writes and the TorchServe archive carries (numpy and the standard library only, so
prepare, evaluate and the handler import them without the handler package), and the drift report
(report.py, scipy) of live or batch predictions against the training reference."""
