"""core helpers (see docs/architecture.md)."""
