"""The PostgreSQL proxy that loses COMMIT replies, for tests: it ships as orchestrator/faultproxy.py for chaos runs."""

from orchestrator.faultproxy import CommitFault, PgProxy

__all__ = ["CommitFault", "PgProxy"]
