"""What the TorchServe archive carries beside its handler: request parsing, inference and
monitoring. Only numpy, PIL, onnxruntime and the standard library, so the .mar runs anywhere
TorchServe does; the pipeline steps import the same code (features, normalisation)."""
