"""Shared plumbing for every Sagasuite process: settings, database, idempotency, errors, serving."""
