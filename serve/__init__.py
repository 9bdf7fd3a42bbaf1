"""The serving layer: TorchServe handler, local server lifecycle, drift monitoring and the `python -m serve` CLI."""
