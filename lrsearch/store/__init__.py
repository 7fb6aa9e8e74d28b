"""Optuna's store: URLs, schemas, files, locks and heartbeats, and every call made to outlive a lost connection."""
