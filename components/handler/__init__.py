"""What the TorchServe archive carries: the handler TorchServe loads (handler.py) and what it runs,
request parsing, inference on onnxruntime, telemetry (custom metrics, the prediction log). Only
numpy, PIL, onnxruntime, the standard library and components/drift's features and prediction log,
so the .mar runs anywhere TorchServe does; batch scoring and the pipeline steps import the same
code (decoding, normalisation, inference)."""
