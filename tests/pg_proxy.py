"""The PostgreSQL proxy that loses COMMIT replies, for tests: it ships as devstack/faultproxy.py for chaos runs."""

from devstack.faultproxy import CommitFault, PgProxy

__all__ = ["CommitFault", "PgProxy"]
