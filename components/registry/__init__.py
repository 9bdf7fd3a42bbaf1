"""registry helpers (see docs/architecture.md)."""
