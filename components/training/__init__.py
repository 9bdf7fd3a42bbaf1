"""training helpers (see docs/architecture.md)."""
