"""serving helpers (see docs/architecture.md)."""
