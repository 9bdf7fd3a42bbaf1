"""model helpers (see docs/architecture.md)."""
