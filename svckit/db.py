"""Database access: one engine per process, and a single database thread that group-commits transactions.

Every unit of work handed to `Database.transaction` runs on that thread inside a savepoint of a
shared transaction; the transaction commits once for all the work queued meanwhile, and only then
are the results handed back. So each unit is atomic on its own, nothing is reported before it is
durable, and a busy process pays for one commit per batch instead of one per call. A unit alone
in its transaction (the usual case when the process is not busy) runs without a savepoint: rolling
the whole transaction back undoes exactly its work, for two round trips fewer on PostgreSQL.

Each unit also succeeds or fails alone, whatever else is in its batch:

- a unit that raises is rolled back to its savepoint, and the batch carries on without it;
- a unit that ends the transaction itself (SQLite's RAISE(ROLLBACK)) fails, and the others run again;
- a lock conflict (deadlock victim, lock timeout, unique-key race) is retried alone, after the batch;
  so is a conflict that ended the whole transaction (a database that cannot roll back to a savepoint
  after a serialization failure, 40001, or a deadlock, 40P01): it runs again alone, in a new transaction;
- a COMMIT the database refuses (a deferred constraint) is retried unit by unit, so only the guilty fails;
- a connection lost before COMMIT loses nothing durable: the batch runs again on a new connection;
- a connection lost during COMMIT, or a COMMIT answered 40003 (statement_completion_unknown), leaves
  the outcome unknown, and says so (`CommitOutcomeUnknown`, retryable) instead of running the units
  again: a retry with the same idempotency key then replays the unit if it committed, or runs it.

A unit whose conflict no retry inside its transaction can settle (`needs_new_transaction`: 40001,
40P01, or a key race on one snapshot at REPEATABLE READ or SERIALIZABLE) re-raises it, and is run
again alone in a new transaction.

On PostgreSQL, where two processes may share a database, a batch never waits for a lock in a way
that could close a cycle with another process's batch: units that lock rows other orders lock too
(stock levels) name them first with `declare_row_locks`, and a batch takes such locks in one
ascending order across all its units (a unit that would break the order is put back and leads the
next batch instead); a lock private to one entity (an order) is only tried inside a batch, and a
unit that finds it taken (`KeyBusy`) runs alone after its batch, where it may wait.

Hot-path statements are written with SQLAlchemy Core and wrapped in `Prepared`, which compiles
them once per dialect and runs them on the transaction's DBAPI cursor: the SQL still comes from
Core, without Core's per-execution cost (about 60-150 us a statement against 3-5 us).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import enum
import hashlib
import logging
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.elements import ClauseElement
from sqlmodel import SQLModel

from svckit.errors import CommitOutcomeUnknown, DatabaseUnavailable, TransactionConflict

__all__ = [
    "Database",
    "KeyBusy",
    "Prepared",
    "SqliteSynchronous",
    "UnitLeftTransactionAborted",
    "declare_row_locks",
    "is_postgres",
    "is_retryable_conflict",
    "key_lock_id",
    "may_wait_for_locks",
    "needs_new_transaction",
    "record_columns",
    "savepoint",
]

T = TypeVar("T")

log = logging.getLogger("sagasuite.db")

# Transient conflicts that running the work again resolves: SQLite's busy lock, PostgreSQL's
# serialization failure, deadlock victim and lock timeout. A unique-key race is retried too, since
# the retry then sees the winner's committed row (and an idempotent call replays it).
_TRANSIENT_SQLSTATES = {"40001", "40P01", "55P03"}
_UNIQUE_VIOLATION = "23505"
_RETRYABLE_SQLSTATES = {*_TRANSIENT_SQLSTATES, _UNIQUE_VIOLATION}
# Conflicts that no retry inside the same transaction can settle: its snapshot (or its SSI
# bookkeeping) is what lost. Only a new transaction can succeed.
_ENDS_SNAPSHOT_SQLSTATES = {"40001", "40P01"}
# statement_completion_unknown: the server cannot say whether a COMMIT took effect (CockroachDB's
# ambiguous result, on a live connection). Handled as a connection lost during COMMIT.
_COMMIT_UNKNOWN_SQLSTATES = {"40003"}
_MAX_ATTEMPTS = 5
_MAX_BATCH = 256
# Runs of one batch on a fresh connection after its connection broke before COMMIT.
_MAX_ROUNDS = 3
# A unit put back for lock order this many times runs alone instead of leading yet another batch.
_MAX_BOUNCES = 2
# One key for every process of the suite: schema creation takes turns on it.
_SCHEMA_LOCK_KEY = int.from_bytes(hashlib.sha256(b"sagasuite.create_schema").digest()[:8], "big", signed=True)
# psycopg's pq.TransactionStatus values, read without importing psycopg where SQLite is all there is.
_PG_IDLE = 0
_PG_IN_TRANSACTION = 2
_PG_IN_ERROR = 3


def is_postgres(url: str) -> bool:
    return url.startswith("postgresql")


def _sqlstate(error: BaseException) -> str | None:
    """The driver's SQLSTATE of an error, under SQLAlchemy's wrapper or not (None: SQLite, or not a database error)."""
    original = error.orig if isinstance(error, DBAPIError) else error
    return getattr(original, "sqlstate", None)


def _is_transient_conflict(error: BaseException) -> bool:
    """A conflict that says nothing about the work itself (unlike a unique-key clash, which may be its fault)."""
    original = error.orig if isinstance(error, DBAPIError) else error
    if isinstance(original, KeyBusy | sqlite3.OperationalError):
        return is_retryable_conflict(original)
    return _sqlstate(error) in _TRANSIENT_SQLSTATES


def is_retryable_conflict(error: BaseException) -> bool:
    """True for unique-key races, lock timeouts, deadlocks, serialization failures and busy keys."""
    original = error.orig if isinstance(error, DBAPIError) else error
    if isinstance(original, KeyBusy):
        return True
    if isinstance(original, sqlite3.IntegrityError):
        # Only a key race; a CHECK, NOT NULL or foreign key refusal would fail the same way again.
        return "unique constraint" in str(original).lower()
    if isinstance(original, sqlite3.OperationalError):
        return "locked" in str(original).lower() or "busy" in str(original).lower()
    return _sqlstate(error) in _RETRYABLE_SQLSTATES


def needs_new_transaction(connection: Connection, error: BaseException) -> bool:
    """True when trying the work again in this transaction (after a savepoint) cannot succeed.

    A serialization failure (40001) or a deadlock (40P01) on PostgreSQL, or a unique-key race
    (23505) at a level with one snapshot per transaction (REPEATABLE READ, SERIALIZABLE), where the
    snapshot never shows the winner's row. The unit should re-raise: `Database.transaction` then runs
    it again, alone, in a new transaction. At READ COMMITTED a key race is settled in the same
    transaction: the next statement sees the winner. Looks the level up only for a key race (rare).
    """
    state = _sqlstate(error)
    if state in _ENDS_SNAPSHOT_SQLSTATES:
        return True
    if state != _UNIQUE_VIOLATION or connection.dialect.name != "postgresql":
        return False
    raw = _raw(connection)
    if _pg_status(raw) != _PG_IN_TRANSACTION:
        return True  # the transaction is unusable anyway
    try:
        cursor = raw.cursor()
        cursor.execute("SELECT current_setting('transaction_isolation')")
        level = str(cursor.fetchone()[0])
    except Exception:
        log.debug("reading the isolation level failed", exc_info=True)
        return True
    return level != "read committed"


class KeyBusy(Exception):
    """Another transaction holds the key's lock right now: the unit steps out of its batch and runs alone after it."""

    def __init__(self, key: str) -> None:
        super().__init__(f"another transaction is working on {key!r}")
        self.key = key


def key_lock_id(key: str) -> int:
    """The PostgreSQL advisory lock id of key: stable across processes, 64 bits."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)


class UnitLeftTransactionAborted(Exception):
    """A statement of the unit failed and the unit caught the error without rolling back to a savepoint."""

    def __init__(self) -> None:
        super().__init__(
            "a statement of this unit failed and its error was caught without a savepoint; "
            "the unit's writes were rolled back"
        )


# Connections whose transactions the batch runner drives on the DBAPI connection directly.
_BATCH_CONNECTIONS: weakref.WeakSet[Connection] = weakref.WeakSet()


class SqliteSynchronous(enum.StrEnum):
    """How long a SQLite commit waits for the disk (`PRAGMA synchronous` in WAL mode); docs/operations.md#durability."""

    # No fsync per commit: survives kill -9 of any process; a power loss or OS crash may take back
    # the last commits (never corrupting the file), including ones already answered.
    NORMAL = "normal"
    # The WAL is fsynced before each COMMIT returns: a commit that was answered survives a power loss too.
    FULL = "full"


def _configure_sqlite(engine: Engine, synchronous: SqliteSynchronous) -> None:
    pragma = f"PRAGMA synchronous={SqliteSynchronous(synchronous).name}"

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, own transaction boundaries so BEGIN IMMEDIATE works.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(pragma)
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
        if len(rows) == 1:
            # psycopg runs executemany in pipeline mode, whose set-up and syncs cost more than one
            # plain execute (measured: docs/scaling.md#round-trips-per-unit-on-postgresql).
            self.execute(connection, rows[0])
            return
        sql, positions = self._sql(connection)
        cursor = connection.connection.cursor()
        if positions:
            cursor.executemany(sql, [tuple(row[name] for name in positions) for row in rows])
        else:
            cursor.executemany(sql, rows)


def _raw(connection: Connection) -> Any:
    """The driver's own connection under SQLAlchemy's (psycopg or sqlite3)."""
    return connection.connection.dbapi_connection


def _pg_status(raw: Any) -> int | None:
    """PostgreSQL's transaction status as libpq last saw it (no round trip); None on SQLite."""
    info = getattr(raw, "info", None)
    status = getattr(info, "transaction_status", None)
    return None if status is None else int(status)


class savepoint:
    """A SAVEPOINT on the DBAPI connection: work inside rolls back alone when it raises.

    Every way out leaves the transaction usable: after a failed statement PostgreSQL refuses
    everything until ROLLBACK TO SAVEPOINT, so the rollback runs even when the work caught the
    error itself and returned normally (it then fails with UnitLeftTransactionAborted).
    """

    _counter = 0

    def __init__(self, connection: Connection) -> None:
        savepoint._counter += 1
        self._name = f"sp_{savepoint._counter}"
        self._cursor = connection.connection.cursor()
        self._raw = _raw(connection)
        # A rollback to this savepoint gives back the row locks taken inside it: the batch must know.
        self._ledger = _LEDGERS.get(connection)

    def __enter__(self) -> None:
        self._cursor.execute(f"SAVEPOINT {self._name}")
        if self._ledger is not None:
            self._ledger.savepoint_entered()

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        if exc_type is None:
            if _pg_status(self._raw) == _PG_IN_ERROR:
                self._roll_back()
                raise UnitLeftTransactionAborted()
            if self._ledger is not None:
                self._ledger.savepoint_released()
            self._cursor.execute(f"RELEASE SAVEPOINT {self._name}")
            return
        self._roll_back()

    def _roll_back(self) -> None:
        if self._ledger is not None:
            self._ledger.savepoint_rolled_back()
        try:
            self._cursor.execute(f"ROLLBACK TO SAVEPOINT {self._name}")
            self._cursor.execute(f"RELEASE SAVEPOINT {self._name}")
        except Exception:
            # The transaction went with the savepoint (a lost connection, SQLite's RAISE(ROLLBACK)):
            # the error that got us here is the one to report; whoever runs the transaction sees it is gone.
            log.debug("rolling back to savepoint %s failed", self._name, exc_info=True)


# -- lock order ----------------------------------------------------------------------------------


class _OutOfLockOrder(Exception):
    """A unit asked for row locks below the highest one its batch holds: it must lead a batch instead."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        super().__init__(f"row locks {keys[:3]} come before locks the batch holds")
        self.keys = keys


@dataclass
class _LockLedger:
    """The shared-row locks a batch transaction holds; new ones are only ever taken above the highest so far."""

    held: set[str] = field(default_factory=set)
    highest: str | None = None
    # In the order taken, with the length at each open savepoint: a rollback gives back its own.
    taken: list[str] = field(default_factory=list)
    marks: list[int] = field(default_factory=list)

    def declare(self, keys: Iterable[str]) -> None:
        new = sorted(set(keys) - self.held)
        if not new:
            return
        if self.highest is not None and new[0] < self.highest:
            raise _OutOfLockOrder(tuple(sorted(set(keys))))
        self.held.update(new)
        self.taken.extend(new)
        self.highest = new[-1]

    def savepoint_entered(self) -> None:
        self.marks.append(len(self.taken))

    def savepoint_released(self) -> None:
        self.marks.pop()

    def savepoint_rolled_back(self) -> None:
        # PostgreSQL releases the row locks taken since the savepoint: taking one again later would
        # be a new lock, so it must obey the order. `highest` stays: stricter than needed, never looser.
        mark = self.marks.pop()
        self.held.difference_update(self.taken[mark:])
        del self.taken[mark:]


_LEDGERS: weakref.WeakKeyDictionary[Connection, _LockLedger] = weakref.WeakKeyDictionary()


def declare_row_locks(connection: Connection, keys: Iterable[str]) -> None:
    """Name the shared rows the unit is about to lock ("stock/BOOK-001"), before its first write to them.

    Call it once per unit with every such key, and write the rows in ascending key order. Inside a
    PostgreSQL batch the keys must not fall below those the batch already holds; when they do the
    unit is undone here and runs again first in the next batch, so locks are always taken in one
    order and two batches cannot deadlock. Elsewhere (SQLite, a transaction of its own) it costs nothing.
    """
    ledger = _LEDGERS.get(connection)
    if ledger is not None:
        ledger.declare(keys)


def may_wait_for_locks(connection: Connection) -> bool:
    """False inside a PostgreSQL batch: a unit there must try a contended lock and raise KeyBusy, not wait.

    A batch holds the locks of all its units until COMMIT; one that waited for another
    transaction's lock could close a cycle with it. Alone (or on SQLite) waiting is safe.
    """
    return connection not in _LEDGERS


# -- jobs ----------------------------------------------------------------------------------------


class _State(enum.Enum):
    PENDING = "pending"
    DONE = "done"  # ran; its writes wait for the batch's COMMIT
    FAILED = "failed"  # raised; rolled back alone, its error is its answer
    CONFLICT = "conflict"  # a lock conflict: runs again alone, after the batch
    BOUNCED = "bounced"  # out of lock order: leads the next batch


@dataclass
class _Job(Generic[T]):
    work: Callable[[Connection], T]
    context: contextvars.Context
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[T]
    result: Any = None
    error: BaseException | None = None
    state: _State = _State.PENDING
    lock_keys: tuple[str, ...] = ()
    bounces: int = 0


class _ConnectionBroke(Exception):
    """The connection died before COMMIT: nothing of the transaction is durable."""


class _TransactionEnded(Exception):
    """A unit ended the whole transaction (its own state says FAILED); the others must run again."""


class _Round(enum.Enum):
    COMMITTED = "committed"
    COMMIT_UNKNOWN = "commit-unknown"  # the connection broke during COMMIT
    COMMIT_REFUSED = "commit-refused"  # the database refused the COMMIT; the connection is fine
    BROKEN = "broken"  # the connection broke before COMMIT
    ENDED = "ended"  # a unit ended the transaction


class Database:
    """An engine plus one database thread that runs every transaction of the process, in batches."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 4,
        inline: bool | None = None,
        sqlite_synchronous: SqliteSynchronous = SqliteSynchronous.NORMAL,
    ) -> None:
        """sqlite_synchronous (SQLITE_SYNCHRONOUS) applies to SQLite only; PostgreSQL's durability is the server's."""
        self.url = url
        if url.startswith("sqlite"):
            path = url.split("///", 1)[1] if "///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(url, poolclass=NullPool if path == ":memory:" else None)
            _configure_sqlite(self.engine, sqlite_synchronous)
        else:
            self.engine = create_engine(url, pool_size=pool_size, pool_pre_ping=True)
        self._jobs: list[_Job[Any]] = []
        self._wakeup = threading.Condition()
        self._closed = False
        # SQLite answers in microseconds from a local file, so its batches run on the event loop
        # itself: no thread hand-off per call. PostgreSQL waits on the network: a thread.
        self._inline = (not is_postgres(url)) if inline is None else inline
        # Lock order only matters where another process's transactions wait on ours row by row;
        # SQLite's BEGIN IMMEDIATE lets one writer in at a time.
        self._orders_locks = is_postgres(url)
        self._connection: Connection | None = None
        self._flush_scheduled = False
        self._thread: threading.Thread | None = None
        if not self._inline:
            self._thread = threading.Thread(target=self._run, name="db", daemon=True)
            self._thread.start()

    @property
    def is_postgres(self) -> bool:
        return is_postgres(self.url)

    @property
    def inline(self) -> bool:
        """True when batches run on the event loop (SQLite), False when on the database thread."""
        return self._inline

    def create_schema(self, metadata: Any = None) -> None:
        """Create the missing tables; processes starting together on an empty database take turns."""
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                with self.engine.begin() as connection:
                    if self.is_postgres:
                        # Two processes would both see a table missing and both create it (and its row
                        # type: UniqueViolation on pg_type). The lock is held to COMMIT, so the second
                        # looks only once the first's tables are there. SQLite's BEGIN IMMEDIATE does as much.
                        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
                    (metadata or SQLModel.metadata).create_all(connection)
                return
            except Exception as error:
                if attempt == _MAX_ATTEMPTS or not is_retryable_conflict(error):
                    raise
                time.sleep(0.01 * attempt)

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
        """Run work atomically on the database thread; returns once its transaction has committed.

        Raises what work raised (nothing of it is applied), DatabaseUnavailable when the database
        cannot be reached (nothing applied), or CommitOutcomeUnknown when the connection broke
        during COMMIT (it may have been applied: a retry must be idempotent).
        """
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
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self.engine.dispose()

    def _flush_inline(self) -> None:
        self._flush_scheduled = False
        batch, self._jobs = self._jobs, []
        self._run_batch(batch)

    # -- the database thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._jobs and not self._closed:
                    self._wakeup.wait()
                if not self._jobs and self._closed:
                    break
                batch, self._jobs = self._jobs[:_MAX_BATCH], self._jobs[_MAX_BATCH:]
            self._run_batch(batch)
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _settle(self, jobs: list[_Job[Any]]) -> None:
        if not jobs:
            return
        if self._inline:
            _settle_all(jobs)
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[_Job[Any]]] = {}
        for job in jobs:
            by_loop.setdefault(job.loop, []).append(job)
        # One wake-up of each event loop per batch, not one per job.
        for loop, loop_jobs in by_loop.items():
            loop.call_soon_threadsafe(_settle_all, loop_jobs)

    def _connect(self) -> Connection | BaseException:
        """The runner's connection, kept for its life instead of a pool checkout per batch."""
        connection = self._connection
        if connection is not None and not connection.invalidated and not connection.closed:
            return connection
        try:
            connection = self.engine.connect()
        except Exception as error:
            log.warning("cannot connect to the database: %s", error)
            return error
        _BATCH_CONNECTIONS.add(connection)
        self._connection = connection
        return connection

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.invalidate()  # the pool must not hand this one out again
                connection.close()
            except Exception:
                log.debug("discarding a broken connection failed", exc_info=True)

    def _run_batch(self, batch: list[_Job[Any]]) -> None:
        """Run a batch to the end: every job is settled, except those put back to lead the next batch."""
        todo = batch
        if any(job.lock_keys for job in batch):
            # Units put back for lock order go first, in the order of their locks; the rest as they came.
            todo = sorted(batch, key=lambda job: (not job.lock_keys, job.lock_keys))
        alone: list[_Job[Any]] = []
        bounced: list[_Job[Any]] = []
        broken_rounds = 0
        while todo:
            connection = self._connect()
            if isinstance(connection, BaseException):
                self._fail(todo, DatabaseUnavailable(f"cannot connect: {type(connection).__name__}"))
                return
            outcome, commit_error = self._round(connection, todo, order_locks=self._orders_locks)
            self._settle([job for job in todo if job.state is _State.FAILED])
            done = [job for job in todo if job.state is _State.DONE]
            conflicts = [job for job in todo if job.state is _State.CONFLICT]
            out_of_order = [job for job in todo if job.state is _State.BOUNCED]
            if outcome is _Round.COMMITTED:
                self._settle(done)
                alone, bounced = alone + conflicts, out_of_order
                break
            if outcome is _Round.COMMIT_UNKNOWN:
                log.warning("the connection broke during the COMMIT of %d units: their outcome is unknown", len(done))
                for job in done:
                    job.result, job.error = None, CommitOutcomeUnknown(_unknown_cause(commit_error))
                self._settle(done)
                self._drop_connection()
                alone += conflicts + out_of_order
                break
            if outcome is _Round.COMMIT_REFUSED:
                # Some unit's writes cannot commit (a deferred constraint): each commits alone, so only it fails.
                log.warning("the database refused the COMMIT of %d units; committing each alone", len(done))
                alone += done + conflicts + out_of_order
                break
            if outcome is _Round.BROKEN:
                self._drop_connection()
                broken_rounds += 1
                if broken_rounds >= _MAX_ROUNDS:
                    self._fail(
                        [job for job in todo if job.state is not _State.FAILED],
                        DatabaseUnavailable("the connection kept breaking"),
                    )
                    return
                log.warning("the connection broke before COMMIT; nothing was applied, running the units again")
            # BROKEN or ENDED: nothing of the round is durable; all but the failed units run again,
            # those that met a conflict alone after the batch (so a conflict cannot end round after round).
            ended_by_conflict = [job for job in todo if job.state is _State.CONFLICT]
            alone += ended_by_conflict
            todo = [job for job in todo if job.state is not _State.FAILED and job not in ended_by_conflict]
        for job in bounced:
            job.bounces += 1
        again = [] if self._inline else [job for job in bounced if job.bounces <= _MAX_BOUNCES]
        alone += [job for job in bounced if job not in again]
        if again:
            with self._wakeup:
                self._jobs[0:0] = again
        for job in alone:
            self._run_alone(job)
            self._settle([job])

    def _fail(self, jobs: list[_Job[Any]], error: BaseException) -> None:
        for job in jobs:
            job.result, job.error, job.state = None, error, _State.FAILED
        self._settle(jobs)

    def _round(
        self, connection: Connection, jobs: list[_Job[Any]], *, order_locks: bool
    ) -> tuple[_Round, BaseException | None]:
        """Run jobs in one transaction and commit it; each job's state says how it ended.

        Returns how the transaction ended, with the COMMIT's error when the database refused it.
        BEGIN and COMMIT go straight to the DBAPI connection: SQLAlchemy's transaction objects
        cost more per batch than the commit itself. Core statements run inside all the same.
        """
        raw = _raw(connection)
        for job in jobs:
            job.state = _State.PENDING
        ledger = _LockLedger() if order_locks else None
        if ledger is not None:
            _LEDGERS[connection] = ledger
        try:
            try:
                if not self.is_postgres:  # psycopg begins implicitly with the first statement
                    raw.execute("BEGIN IMMEDIATE")
                # A unit alone in its transaction needs no savepoint: if it fails, rolling the whole
                # transaction back undoes exactly its work, and saves two round trips on PostgreSQL.
                alone = len(jobs) == 1
                for job in jobs:
                    self._run_unit(connection, job, alone=alone)
            except (_ConnectionBroke, _TransactionEnded) as stop:
                _roll_back_quietly(raw)
                return (_Round.BROKEN if isinstance(stop, _ConnectionBroke) else _Round.ENDED), None
            except Exception as error:  # BEGIN itself failed
                log.warning("starting a transaction failed: %s", error)
                _roll_back_quietly(raw)
                return _Round.BROKEN, error
            if not any(job.state is _State.DONE for job in jobs):
                # Nothing to commit (a lone unit that failed was rolled back already): settled as it is.
                if self._transaction_open(raw):
                    _roll_back_quietly(raw)
                return _Round.COMMITTED, None
            if len(jobs) == 1 and _pg_status(raw) == _PG_IDLE:
                # A lone unit that ran no statement: psycopg never began a transaction, nothing to commit.
                return _Round.COMMITTED, None
            if not self._transaction_open(raw):
                # Never COMMIT a transaction that is no longer there: the COMMIT would "succeed".
                _roll_back_quietly(raw)
                return _Round.COMMIT_REFUSED, None
            try:
                raw.commit()
            except Exception as error:
                if self._disconnected(connection, error):
                    return _Round.COMMIT_UNKNOWN, error
                if _sqlstate(error) in _COMMIT_UNKNOWN_SQLSTATES:
                    # The server cannot say whether the COMMIT took effect: running the units again
                    # could apply one twice. Their callers hear CommitOutcomeUnknown and retry by key.
                    log.warning("the database could not say whether the COMMIT took effect: %s", error)
                    _roll_back_quietly(raw)
                    return _Round.COMMIT_UNKNOWN, error
                log.warning("COMMIT failed: %s", error)
                _roll_back_quietly(raw)
                return _Round.COMMIT_REFUSED, error
            return _Round.COMMITTED, None
        finally:
            if ledger is not None:
                _LEDGERS.pop(connection, None)

    def _run_unit(self, connection: Connection, job: _Job[Any], *, alone: bool = False) -> None:
        """Run one unit of a round: in a savepoint when it shares the transaction, bare when it is alone."""
        job.result, job.error = None, None
        try:
            if alone:
                job.result = job.context.run(job.work, connection)
                if self.is_postgres and _pg_status(_raw(connection)) == _PG_IN_ERROR:
                    raise UnitLeftTransactionAborted()
            else:
                with savepoint(connection):
                    job.result = job.context.run(job.work, connection)
        except _OutOfLockOrder as bounce:
            job.result, job.lock_keys, job.state = None, bounce.keys, _State.BOUNCED
            if alone:
                _roll_back_quietly(_raw(connection))
            return
        except Exception as error:
            job.result, job.error = None, error
            if self._disconnected(connection, error):
                job.state = _State.PENDING
                raise _ConnectionBroke() from error
            if alone:
                # The transaction held this unit's work only: rolling it back is the savepoint's rollback.
                _roll_back_quietly(_raw(connection))
                job.state = _State.CONFLICT if is_retryable_conflict(error) else _State.FAILED
                return
            if not self._transaction_open(_raw(connection)):
                # A conflict that took the transaction with it (a database that cannot roll back to a
                # savepoint after a serialization failure) runs again alone; anything else is the unit's own.
                job.state = _State.CONFLICT if _is_transient_conflict(error) else _State.FAILED
                raise _TransactionEnded() from error
            job.state = _State.CONFLICT if is_retryable_conflict(error) else _State.FAILED
            return
        job.state = _State.DONE

    def _run_alone(self, job: _Job[Any]) -> None:
        """Run one job in a transaction of its own: lock conflicts and a connection lost before COMMIT are retried."""
        self._try_alone(job)
        if job.error is not None and _is_transient_conflict(job.error):
            # Still conflicting after every try: a retryable answer (ABORTED), not an internal error.
            cause = job.error
            job.error = TransactionConflict(type(cause).__name__)
            job.error.__cause__ = cause

    def _try_alone(self, job: _Job[Any]) -> None:
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            last = attempt == _MAX_ATTEMPTS
            connection = self._connect()
            if isinstance(connection, BaseException):
                job.result, job.error = None, DatabaseUnavailable(f"cannot connect: {type(connection).__name__}")
                return
            # Alone, the unit takes its locks in its own (sorted) order: no other unit shares the transaction.
            outcome, commit_error = self._round(connection, [job], order_locks=False)
            if outcome is _Round.COMMITTED:
                if job.state is _State.CONFLICT and not last:
                    time.sleep(0.002 * attempt)
                    continue
                return  # done, or failed with its own error
            if outcome is _Round.COMMIT_UNKNOWN:
                job.result, job.error = None, CommitOutcomeUnknown(_unknown_cause(commit_error))
                self._drop_connection()
                return
            if outcome is _Round.COMMIT_REFUSED:
                job.result = None
                job.error = commit_error or job.error or RuntimeError("the transaction ended before its COMMIT")
                if is_retryable_conflict(job.error) and not last:
                    time.sleep(0.002 * attempt)
                    continue
                return
            if outcome is _Round.ENDED:
                if job.state is _State.CONFLICT and not last:
                    time.sleep(0.002 * attempt)  # a conflict ended it: a new transaction may succeed
                    continue
                return  # the unit ended its own transaction: failed with that error
            self._drop_connection()  # BROKEN: nothing applied, try again on a new connection
            job.result, job.error = None, DatabaseUnavailable("the connection broke before COMMIT")

    def _transaction_open(self, raw: Any) -> bool:
        if self.is_postgres:
            return _pg_status(raw) == _PG_IN_TRANSACTION
        return bool(raw.in_transaction)

    def _disconnected(self, connection: Connection, error: BaseException) -> bool:
        if isinstance(error, DBAPIError) and error.connection_invalidated:
            return True
        if not self.is_postgres:
            return False
        try:
            raw = _raw(connection)
        except Exception:
            return True
        return bool(raw.closed or getattr(raw, "broken", False))


def _unknown_cause(error: BaseException | None) -> str:
    if error is not None and _sqlstate(error) in _COMMIT_UNKNOWN_SQLSTATES:
        return "the database answered COMMIT with 40003, statement_completion_unknown"
    return "the connection broke during COMMIT"


def _roll_back_quietly(raw: Any) -> None:
    try:
        raw.rollback()
    except Exception:
        log.debug("rollback failed", exc_info=True)


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
