"""Database access: one engine per process, transactions run on a single dedicated thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.pool import NullPool
from sqlmodel import SQLModel

__all__ = ["Database", "is_postgres"]

T = TypeVar("T")

# Transient conflicts that a fresh transaction resolves: SQLite's busy lock, PostgreSQL's
# serialization failure and deadlock victim. A unique-key race is retried too, since the
# retry then sees the winner's committed row and replays it.
_RETRYABLE_SQLSTATES = {"40001", "40P01"}
_MAX_TRANSACTION_ATTEMPTS = 5


def is_postgres(url: str) -> bool:
    return url.startswith("postgresql")


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, own transaction boundaries so BEGIN IMMEDIATE works.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash (kill -9); only an OS crash may lose
        # the last transactions, and never corrupts the file.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # Take the write lock up front: two writers never deadlock upgrading a read lock.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _is_retryable(error: DBAPIError) -> bool:
    if isinstance(error, IntegrityError):
        return True
    sqlstate = getattr(error.orig, "sqlstate", None)
    if sqlstate in _RETRYABLE_SQLSTATES:
        return True
    return isinstance(error, OperationalError) and "locked" in str(error.orig).lower()


class Database:
    """An engine plus a one-thread executor: every transaction of the process runs there, in order."""

    def __init__(self, url: str, *, pool_size: int = 4) -> None:
        self.url = url
        if url.startswith("sqlite"):
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(url, poolclass=NullPool if path == ":memory:" else None)
            _configure_sqlite(self.engine)
        else:
            self.engine = create_engine(url, pool_size=pool_size, pool_pre_ping=True)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="db")

    @property
    def is_postgres(self) -> bool:
        return is_postgres(self.url)

    def create_schema(self, metadata: Any = None) -> None:
        (metadata or SQLModel.metadata).create_all(self.engine)

    def transaction_sync(self, work: Callable[[Connection], T]) -> T:
        """Run work in one transaction, retrying transient conflicts with a fresh transaction."""
        for attempt in range(1, _MAX_TRANSACTION_ATTEMPTS + 1):
            try:
                with self.engine.begin() as connection:
                    return work(connection)
            except DBAPIError as error:
                if attempt == _MAX_TRANSACTION_ATTEMPTS or not _is_retryable(error):
                    raise
                time.sleep(0.001 * attempt)
        raise AssertionError("unreachable")

    async def transaction(self, work: Callable[[Connection], T]) -> T:
        """Run work in one transaction on the database thread, without blocking the event loop."""
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        return await loop.run_in_executor(self._executor, context.run, self.transaction_sync, work)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.engine.dispose()
