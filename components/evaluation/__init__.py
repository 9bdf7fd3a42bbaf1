"""evaluation helpers (see docs/architecture.md)."""
