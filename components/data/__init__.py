"""data helpers (see docs/architecture.md)."""
