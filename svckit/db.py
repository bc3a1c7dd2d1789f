"""Database access: one engine per process, and a single database thread that group-commits transactions.

Every unit of work handed to `Database.transaction` runs on that thread inside a savepoint of a
shared transaction; the transaction commits once for all the work queued meanwhile, and only then
are the results handed back. So each unit is atomic on its own, nothing is reported before it is
durable, and a busy process pays for one commit per batch instead of one per call.

Hot-path statements are written with SQLAlchemy Core and wrapped in `Prepared`, which compiles
them once per dialect and runs them on the transaction's DBAPI cursor: the SQL still comes from
Core, without Core's per-execution cost (about 60-150 us a statement against 3-5 us).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.elements import ClauseElement
from sqlmodel import SQLModel

__all__ = [
    "Database",
    "Prepared",
    "is_postgres",
    "is_retryable_conflict",
    "record_columns",
    "savepoint",
]

T = TypeVar("T")

log = logging.getLogger("sagasuite.db")

# Transient conflicts that running the work again resolves: SQLite's busy lock, PostgreSQL's
# serialization failure and deadlock victim. A unique-key race is retried too, since the
# retry then sees the winner's committed row (and an idempotent call replays it).
_RETRYABLE_SQLSTATES = {"40001", "40P01", "23505"}
_MAX_ATTEMPTS = 5
_MAX_BATCH = 256


def is_postgres(url: str) -> bool:
    return url.startswith("postgresql")


def is_retryable_conflict(error: BaseException) -> bool:
    """True for unique-key races, lock timeouts, deadlocks and serialization failures."""
    original = error.orig if isinstance(error, DBAPIError) else error
    if isinstance(original, sqlite3.IntegrityError):
        return True
    if isinstance(original, sqlite3.OperationalError):
        return "locked" in str(original).lower() or "busy" in str(original).lower()
    return getattr(original, "sqlstate", None) in _RETRYABLE_SQLSTATES


# Connections whose transactions the batch runner drives on the DBAPI connection directly.
_BATCH_CONNECTIONS: weakref.WeakSet[Connection] = weakref.WeakSet()


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
        if connection in _BATCH_CONNECTIONS:
            return  # the batch runner issues BEGIN and COMMIT on this one itself
        # Take the write lock up front: two writers never deadlock upgrading a read lock.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


class Prepared:
    """A Core statement compiled once per dialect and run on the DBAPI cursor of a connection.

    Parameters are plain values by bind name; the statement must not use expanding (IN list)
    parameters, and values go to the driver as they are (no SQLAlchemy type processing).
    """

    def __init__(self, statement: ClauseElement) -> None:
        self._statement = statement
        self._compiled: dict[str, tuple[str, tuple[str, ...] | None]] = {}

    def _sql(self, connection: Connection) -> tuple[str, tuple[str, ...] | None]:
        dialect = connection.dialect
        found = self._compiled.get(dialect.name)
        if found is None:
            compiled = self._statement.compile(dialect=dialect)
            # SQLite's driver takes positional (?) parameters, psycopg named ones.
            position_names = getattr(compiled, "positiontup", None) if getattr(compiled, "positional", False) else None
            positions = tuple(position_names) if position_names else None
            found = (str(compiled), positions)
            self._compiled[dialect.name] = found
        return found

    def execute(self, connection: Connection, params: Mapping[str, Any] | None = None) -> Any:
        """Run the statement; returns the DBAPI cursor (fetchone, fetchall, rowcount)."""
        sql, positions = self._sql(connection)
        cursor = connection.connection.cursor()
        values = params or {}
        cursor.execute(sql, tuple(values[name] for name in positions) if positions else values)
        return cursor

    def executemany(self, connection: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        sql, positions = self._sql(connection)
        cursor = connection.connection.cursor()
        if positions:
            cursor.executemany(sql, [tuple(row[name] for name in positions) for row in rows])
        else:
            cursor.executemany(sql, rows)


class savepoint:
    """A SAVEPOINT on the DBAPI connection: work inside rolls back alone when it raises."""

    _counter = 0

    def __init__(self, connection: Connection) -> None:
        savepoint._counter += 1
        self._name = f"sp_{savepoint._counter}"
        self._cursor = connection.connection.cursor()

    def __enter__(self) -> None:
        self._cursor.execute(f"SAVEPOINT {self._name}")

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        if exc_type is not None:
            self._cursor.execute(f"ROLLBACK TO SAVEPOINT {self._name}")
        self._cursor.execute(f"RELEASE SAVEPOINT {self._name}")


@dataclass
class _Job(Generic[T]):
    work: Callable[[Connection], T]
    context: contextvars.Context
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[T]
    result: Any = None
    error: BaseException | None = None
    done: bool = field(default=False)


class Database:
    """An engine plus one database thread that runs every transaction of the process, in batches."""

    def __init__(self, url: str, *, pool_size: int = 4, inline: bool | None = None) -> None:
        self.url = url
        if url.startswith("sqlite"):
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(url, poolclass=NullPool if path == ":memory:" else None)
            _configure_sqlite(self.engine)
        else:
            self.engine = create_engine(url, pool_size=pool_size, pool_pre_ping=True)
        self._jobs: list[_Job[Any]] = []
        self._wakeup = threading.Condition()
        self._closed = False
        # SQLite answers in microseconds from a local file, so its batches run on the event loop
        # itself: no thread hand-off per call. PostgreSQL waits on the network: a thread.
        self._inline = (not is_postgres(url)) if inline is None else inline
        self._inline_connection: Connection | None = None
        self._flush_scheduled = False
        self._thread: threading.Thread | None = None
        if not self._inline:
            self._thread = threading.Thread(target=self._run, name="db", daemon=True)
            self._thread.start()

    @property
    def is_postgres(self) -> bool:
        return is_postgres(self.url)

    def create_schema(self, metadata: Any = None) -> None:
        (metadata or SQLModel.metadata).create_all(self.engine)

    def transaction_sync(self, work: Callable[[Connection], T]) -> T:
        """Run work in a transaction of its own on the calling thread (start-up and tools only)."""
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                with self.engine.begin() as connection:
                    return work(connection)
            except Exception as error:
                if attempt == _MAX_ATTEMPTS or not is_retryable_conflict(error):
                    raise
                time.sleep(0.001 * attempt)
        raise AssertionError("unreachable")

    async def transaction(self, work: Callable[[Connection], T]) -> T:
        """Run work atomically on the database thread; returns once its transaction has committed."""
        loop = asyncio.get_running_loop()
        job: _Job[T] = _Job(work, contextvars.copy_context(), loop, loop.create_future())
        if self._inline:
            if self._closed:
                raise RuntimeError("the database is closed")
            self._jobs.append(job)
            if not self._flush_scheduled:
                # Everything queued until the loop gets round to the flush shares one commit.
                self._flush_scheduled = True
                loop.call_soon(self._flush_inline)
            return await job.future
        with self._wakeup:
            if self._closed:
                raise RuntimeError("the database is closed")
            self._jobs.append(job)
            self._wakeup.notify()
        return await job.future

    def close(self) -> None:
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._inline_connection is not None:
            self._inline_connection.close()
        self.engine.dispose()

    def _flush_inline(self) -> None:
        self._flush_scheduled = False
        batch, self._jobs = self._jobs, []
        connection = self._inline_connection
        if connection is None or connection.invalidated or connection.closed:
            connection = self._inline_connection = self._connect(batch)
        if connection is not None and not self._commit_batch(connection, batch):
            connection.close()
            self._inline_connection = None
        _settle_all(batch)

    # -- the database thread -----------------------------------------------------------------

    def _run(self) -> None:
        # The thread keeps one connection for its life instead of a pool checkout per batch.
        connection: Connection | None = None
        while True:
            with self._wakeup:
                while not self._jobs and not self._closed:
                    self._wakeup.wait()
                if not self._jobs and self._closed:
                    break
                batch, self._jobs = self._jobs[:_MAX_BATCH], self._jobs[_MAX_BATCH:]
            if connection is None or connection.invalidated or connection.closed:
                connection = self._connect(batch)
            if connection is not None and not self._commit_batch(connection, batch):
                connection.close()
                connection = None
            by_loop: dict[asyncio.AbstractEventLoop, list[_Job[Any]]] = {}
            for job in batch:
                by_loop.setdefault(job.loop, []).append(job)
            # One wake-up of each event loop per batch, not one per job.
            for loop, jobs in by_loop.items():
                loop.call_soon_threadsafe(_settle_all, jobs)
        if connection is not None:
            connection.close()

    def _connect(self, batch: list[_Job[Any]]) -> Connection | None:
        try:
            return self.engine.connect()
        except Exception as error:
            log.exception("cannot connect to the database")
            for job in batch:
                job.error, job.result = error, None
            return None

    def _commit_batch(self, connection: Connection, batch: list[_Job[Any]]) -> bool:
        """Run the batch in one transaction; False when the connection should be replaced.

        BEGIN and COMMIT go straight to the DBAPI connection: SQLAlchemy's transaction objects
        cost more per batch than the commit itself. Core statements run inside all the same.
        """
        _BATCH_CONNECTIONS.add(connection)
        dbapi_connection = connection.connection
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                if not self.is_postgres:  # psycopg begins implicitly with the first statement
                    dbapi_connection.cursor().execute("BEGIN IMMEDIATE")
                try:
                    for job in batch:
                        self._run_job(connection, job)
                    dbapi_connection.commit()
                except BaseException:
                    dbapi_connection.rollback()
                    raise
                return True
            except Exception as error:
                # The commit itself failed (or the connection broke): nothing of the batch is
                # durable, so every job runs again in a fresh transaction, or fails.
                if attempt < _MAX_ATTEMPTS and is_retryable_conflict(error):
                    time.sleep(0.001 * attempt)
                    continue
                log.exception("a transaction of %d jobs failed", len(batch))
                for job in batch:
                    job.error, job.result = error, None
                return False
        return True

    @staticmethod
    def _run_job(connection: Connection, job: _Job[Any]) -> None:
        job.error = None
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                with savepoint(connection):
                    job.result = job.context.run(job.work, connection)
                return
            except Exception as error:
                if attempt < _MAX_ATTEMPTS and is_retryable_conflict(error):
                    continue
                job.error = error
                return


def _settle_all(jobs: list[_Job[Any]]) -> None:
    for job in jobs:
        if job.future.done():
            continue
        if job.error is not None:
            job.future.set_exception(job.error)
        else:
            job.future.set_result(job.result)


def record_columns(record_class: Any, table: Any) -> tuple[str, ...]:
    """A dataclass's fields, which must be exactly the table's columns: the order rows are selected in.

    Stores build rows as small dataclasses from cursor tuples by position; a SQLModel table
    object costs far more to build (about 170 us) than the statement that fetched it.
    """
    names = tuple(field.name for field in dataclasses.fields(record_class))
    if set(names) != set(table.c.keys()):
        raise RuntimeError(f"{record_class.__name__} fields {sorted(names)} differ from table {table.name} columns")
    return names
