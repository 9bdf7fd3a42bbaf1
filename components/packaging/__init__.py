"""packaging helpers (see docs/architecture.md)."""
