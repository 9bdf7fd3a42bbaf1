"""The handler's settings: the server that starts TorchServe (components/torchserve/server.py, or the
Kubernetes manifests) passes them as these environment variables, from conf/serve."""

PREDICTION_LOG_ENV = "SERVE_PREDICTION_LOG"
SAMPLE_RATE_ENV = "SERVE_PREDICTION_LOG_SAMPLE_RATE"
LOG_MAX_BYTES_ENV = "SERVE_PREDICTION_LOG_MAX_BYTES"
LOG_BACKUPS_ENV = "SERVE_PREDICTION_LOG_BACKUPS"
THREADS_ENV = "SERVE_ONNX_THREADS"
MAX_PIXELS_ENV = "SERVE_MAX_IMAGE_PIXELS"
MAX_INSTANCES_ENV = "SERVE_MAX_INSTANCES"
