"""monitoring helpers (see docs/architecture.md): drift of live or batch predictions against the training reference."""
