"""torchserve helpers (see docs/architecture.md): the local TorchServe's lifecycle and keys (server.py)
and a client of its management API (management.py)."""
