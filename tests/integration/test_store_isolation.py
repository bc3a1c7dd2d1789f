"""The orchestrator store's claim, fence and business-key queries under each isolation level of PostgreSQL.

What docs/scaling.md relies on when it says what a distributed PostgreSQL would need: under READ
COMMITTED, REPEATABLE READ and SERIALIZABLE two claimers never take one command, a stale lease
holder's outcome is refused, and two starts of one business key leave one saga. Where a level with
one snapshot per transaction refuses a statement or a COMMIT instead (a serialization failure,
SQLSTATE 40001, or a key clash the snapshot cannot see), the test pins that down, and shows that
running the unit again in a new transaction (what svckit.db does with a 40001) settles it the same way.

Concurrency is made deterministic: two transactions are interleaved on two connections, and where
one must wait for the other's row lock a thread runs it and the test waits until PostgreSQL
reports it blocked (pg_blocking_pids), never for a lucky sleep.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from orchestrator import store
from orchestrator.engine import ACTION, Command, SagaState, Status
from svckit.db import Database, is_retryable_conflict, savepoint
from tests.orchestrator_helpers import fresh_postgres_database

T = TypeVar("T")

T0 = 1_000_000.0
NOW = T0 + 1.0
LEASE = 30.0
# Generous: the machine may be busy; every wait below ends as soon as its condition holds.
WITHIN = 30.0
SERIALIZATION_FAILURE = "40001"
UNIQUE_VIOLATION = "23505"
# REPEATABLE READ too: YugabyteDB runs READ COMMITTED as it unless yb_enable_read_committed_isolation is set.
LEVELS = ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"]
# As orchestrator.dispatcher._apply_alone: a unit whose write meets a conflict is tried again in its transaction.
UNIT_ATTEMPTS = 3


@pytest.fixture(scope="module")
def store_url(postgres_admin_url: str) -> Iterator[str]:
    with fresh_postgres_database(postgres_admin_url) as url:
        database = Database(url)
        try:
            store.ensure_schema(database)
        finally:
            database.close()
        yield url


@pytest.fixture(params=LEVELS, ids=lambda level: level.lower().replace(" ", "_"))
def engine(request: pytest.FixtureRequest, store_url: str) -> Iterator[Engine]:
    """An engine whose every transaction runs at one isolation level, on an empty store."""
    opened = create_engine(store_url, isolation_level=request.param, poolclass=NullPool)
    with opened.begin() as connection:
        connection.execute(text("DELETE FROM outbox"))
        connection.execute(text("DELETE FROM saga_event"))
        connection.execute(text("DELETE FROM saga"))
    yield opened
    opened.dispose()


@pytest.fixture
def watcher(store_url: str) -> Iterator[Engine]:
    """Reads pg_blocking_pids from outside the transactions under test."""
    opened = create_engine(store_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    yield opened
    opened.dispose()


@pytest.fixture
def background() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="tx") as pool:
        yield pool


def level_of(engine: Engine) -> str:
    with engine.connect() as connection:
        return str(connection.get_isolation_level())


def serializable(engine: Engine) -> bool:
    """SERIALIZABLE (SSI): also refuses read-write cycles, at a statement or at COMMIT."""
    return level_of(engine) == "SERIALIZABLE"


def one_snapshot(engine: Engine) -> bool:
    """REPEATABLE READ or SERIALIZABLE: one snapshot for the whole transaction, not one per statement."""
    return level_of(engine) != "READ COMMITTED"


def sqlstate(error: BaseException) -> str | None:
    original = error.orig if isinstance(error, DBAPIError) else error
    return getattr(original, "sqlstate", None)


def new_saga(saga_id: str, business_key: str | None = None) -> SagaState:
    return SagaState(
        saga_id=saga_id,
        saga_type="OrderSaga",
        version=1,
        business_key=business_key or f"order-{saga_id}",
        input=b"input",
        status=Status.RUNNING,
        deadline_at=T0 + 300,
        created_at=T0,
        updated_at=T0,
    )


def command(saga_id: str) -> Command:
    return Command(saga_id, 0, ACTION, 1, T0, due_at=T0)


def put_due(engine: Engine, count: int, *, owner: str | None = None, expires_at: float = 0.0) -> list[Command]:
    """count sagas, each with a due command leased to owner until expires_at (None: never handed out)."""
    commands = [command(f"s{index:03d}") for index in range(count)]
    with engine.begin() as connection:
        for c in commands:
            store.insert_saga(connection, new_saga(c.saga_id), "hash")
            store.put_command(connection, c, owner, expires_at)
    return commands


def claim(connection: Connection, owner: str, limit: int = 100) -> list[str]:
    return sorted(c.saga_id for c, _ in store.claim_due(connection, owner, NOW, LEASE, limit, skip_locked=True))


def lease_owners(engine: Engine) -> dict[str, str | None]:
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT saga_id, lease_owner FROM outbox ORDER BY saga_id")).all()
    return {saga_id: owner for saga_id, owner in rows}


def backend_pid(connection: Connection) -> int:
    """The server process of a connection, as libpq knows it: no statement, so no transaction begun."""
    return int(connection.connection.dbapi_connection.info.backend_pid)  # type: ignore[union-attr]


def wait_until_blocked(watcher: Engine, pid: int, running: Future[Any]) -> None:
    """Until the backend pid waits for another transaction's lock; fails if its work ended without waiting."""
    deadline = time.monotonic() + WITHIN
    with watcher.connect() as connection:
        while not connection.execute(text("SELECT cardinality(pg_blocking_pids(:pid)) > 0"), {"pid": pid}).scalar():
            if running.done():
                raise AssertionError(f"expected to wait for a row lock, but it finished: {running.exception()!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"backend {pid} never waited for a lock within {WITHIN} s")
            time.sleep(0.01)


def commit_or_error(transaction: Any) -> str | None:
    """Commit; the SQLSTATE of the refusal, or None when it committed."""
    try:
        transaction.commit()
    except DBAPIError as error:
        return sqlstate(error)
    return None


def in_new_transaction(engine: Engine, work: Callable[[Connection], T]) -> T:
    """Run work as svckit.db runs a unit that met a conflict: alone, in a new transaction, again while it conflicts."""
    for attempt in range(1, 6):
        try:
            with engine.begin() as connection:
                return work(connection)
        except Exception as error:
            if attempt == 5 or not is_retryable_conflict(error):
                raise
    raise AssertionError("unreachable")


# -- claims ------------------------------------------------------------------------------------


def test_two_claimers_at_once_take_disjoint_commands(engine: Engine) -> None:
    put_due(engine, 6)
    with engine.connect() as first, engine.connect() as second:
        first_tx, second_tx = first.begin(), second.begin()
        taken_first = claim(first, "replica-a", limit=3)
        # The first claim's rows are locked until its COMMIT: SKIP LOCKED passes them over without waiting.
        taken_second = claim(second, "replica-b")
        assert len(taken_first) == 3 and set(taken_first).isdisjoint(taken_second)
        assert sorted(taken_first + taken_second) == [f"s{i:03d}" for i in range(6)]
        assert commit_or_error(first_tx) is None
        refused = commit_or_error(second_tx)
    if not serializable(engine):
        assert refused is None
    else:
        # Each claim scanned rows the other wrote (a read-write cycle): SSI refuses the later COMMIT.
        # svckit.db classifies 40001 as transient and runs the claim alone again: it takes the rest.
        assert refused in (None, SERIALIZATION_FAILURE)
        if refused is not None:
            assert in_new_transaction(engine, lambda c: claim(c, "replica-b")) == taken_second
    owners = lease_owners(engine)
    assert {owners[saga_id] for saga_id in taken_first} == {"replica-a"}
    assert {owners[saga_id] for saga_id in taken_second} == {"replica-b"}


def test_a_claimer_that_began_before_another_claim_committed_takes_nothing_twice(engine: Engine) -> None:
    put_due(engine, 4)
    with engine.connect() as late, engine.connect() as early:
        late_tx = late.begin()
        # The late claimer's snapshot is taken here, before the other claim commits.
        assert late.execute(text("SELECT count(*) FROM outbox")).scalar_one() == 4
        with early.begin():
            assert claim(early, "replica-a") == ["s000", "s001", "s002", "s003"]
        if not one_snapshot(engine):
            # READ COMMITTED: each statement sees what committed before it: the leases are taken.
            assert claim(late, "replica-b") == []
            assert commit_or_error(late_tx) is None
        else:
            # One snapshot: it still shows them free; locking a row changed since is refused.
            with pytest.raises(Exception) as refused:
                claim(late, "replica-b")
            assert sqlstate(refused.value) == SERIALIZATION_FAILURE
            assert is_retryable_conflict(refused.value)
            late_tx.rollback()
            # Run again in a new transaction, as svckit.db does: nothing is left to take.
            assert in_new_transaction(engine, lambda c: claim(c, "replica-b")) == []
    assert set(lease_owners(engine).values()) == {"replica-a"}


def test_claimers_racing_on_many_threads_take_each_command_once(engine: Engine) -> None:
    commands = put_due(engine, 80)
    taken: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    lock = threading.Lock()

    def claimer(owner: str) -> None:
        deadline = time.monotonic() + WITHIN
        while time.monotonic() < deadline:
            try:
                with engine.begin() as connection:
                    got = claim(connection, owner, limit=5)
            except Exception as error:
                # A serialization failure rolls the whole claim back: nothing of it was taken.
                if not is_retryable_conflict(error):
                    raise
                with lock:
                    failures[sqlstate(error) or type(error).__name__] += 1
                continue
            with lock:
                taken.update(got)
            if not got and all(owner is not None for owner in lease_owners(engine).values()):
                return
        raise AssertionError("the claimers did not drain the outbox in time")

    with ThreadPoolExecutor(max_workers=4) as pool:
        for running in [pool.submit(claimer, f"replica-{n}") for n in range(4)]:
            running.result(timeout=WITHIN * 2)
    assert sorted(taken) == sorted(c.saga_id for c in commands)
    assert set(taken.values()) == {1}, [saga_id for saga_id, n in taken.items() if n > 1]
    if not one_snapshot(engine):
        assert not failures, failures
    assert set(failures) <= {SERIALIZATION_FAILURE}, failures


# -- fencing -----------------------------------------------------------------------------------


def test_a_stale_lease_holder_cannot_record_once_another_replica_took_the_command(engine: Engine) -> None:
    # replica-a's lease ran out (a stall, a partition): replica-b claims the command and commits.
    (stale,) = put_due(engine, 1, owner="replica-a", expires_at=NOW - 0.5)
    with engine.begin() as connection:
        assert claim(connection, "replica-b") == [stale.saga_id]
    with engine.begin() as connection:
        assert store.fence(connection, stale, "replica-a") is False
    assert lease_owners(engine) == {stale.saga_id: "replica-b"}
    with engine.begin() as connection:
        assert store.fence(connection, stale, "replica-b") is True
    assert lease_owners(engine) == {}


def test_a_stale_holder_recording_while_the_takeover_commits_is_refused(
    engine: Engine, watcher: Engine, background: ThreadPoolExecutor
) -> None:
    (stale,) = put_due(engine, 1, owner="replica-a", expires_at=NOW - 0.5)
    with engine.connect() as taker, engine.connect() as holder:
        take_tx = taker.begin()
        assert claim(taker, "replica-b") == [stale.saga_id]
        holder_pid = backend_pid(holder)

        def record_stale_outcome() -> bool:
            with holder.begin():
                return store.fence(holder, stale, "replica-a")

        # The fence's DELETE waits for the takeover's row lock, then looks at the row again.
        recording = background.submit(record_stale_outcome)
        wait_until_blocked(watcher, holder_pid, recording)
        assert commit_or_error(take_tx) is None
        if not one_snapshot(engine):
            assert recording.result(timeout=WITHIN) is False
        else:
            # The row changed after the holder's snapshot: its DELETE is refused, its unit rolled back.
            with pytest.raises(Exception) as refused:
                recording.result(timeout=WITHIN)
            assert sqlstate(refused.value) == SERIALIZATION_FAILURE
            # Run again (the dispatcher records an unrecorded outcome again, in a new transaction): refused.
            assert in_new_transaction(engine, lambda c: store.fence(c, stale, "replica-a")) is False
    assert lease_owners(engine) == {stale.saga_id: "replica-b"}


def test_a_claim_passes_over_a_command_its_holder_is_recording(engine: Engine) -> None:
    (held,) = put_due(engine, 1, owner="replica-a", expires_at=NOW - 0.5)
    with engine.connect() as holder, engine.connect() as taker:
        hold_tx = holder.begin()
        assert store.fence(holder, held, "replica-a") is True
        # The lease ran out, but the holder's DELETE locks the row: the claim skips it and does not wait.
        take_tx = taker.begin()
        assert claim(taker, "replica-b") == []
        assert commit_or_error(take_tx) is None
        assert commit_or_error(hold_tx) is None
    assert lease_owners(engine) == {}


# -- business keys -----------------------------------------------------------------------------


def start(connection: Connection, saga_id: str, business_key: str) -> tuple[str, list[str]]:
    """The dispatcher's start of a saga by business key, with its in-transaction retries.

    As orchestrator.dispatcher._apply_start inside _apply_alone: look the key up, insert a new saga
    if it has none, all inside a savepoint; a conflict rolls back to it and tries again, up to
    UNIT_ATTEMPTS times. Returns the saga id the start answers with, and what each try met.
    """
    tries: list[str] = []
    for _ in range(UNIT_ATTEMPTS):
        try:
            with savepoint(connection):
                found = store.find_by_business_key(connection, "OrderSaga", business_key)
                if found is not None:
                    tries.append("found")
                    return found[0].saga_id, tries
                store.insert_saga(connection, new_saga(saga_id, business_key), "hash")
                tries.append("inserted")
                return saga_id, tries
        except Exception as error:
            if not is_retryable_conflict(error):
                raise
            tries.append(sqlstate(error) or type(error).__name__)
    raise _StartConflict(tries)


class _StartConflict(Exception):
    """Every try of a start in its transaction met a conflict: the dispatcher runs it again in a new transaction."""

    def __init__(self, tries: list[str]) -> None:
        super().__init__(f"every try met a conflict: {tries}")
        self.tries = tries


def sagas_with_key(engine: Engine, business_key: str) -> list[str]:
    with engine.connect() as connection:
        query = text("SELECT saga_id FROM saga WHERE business_key = :key ORDER BY saga_id")
        return list(connection.execute(query, {"key": business_key}).scalars())


def test_two_starts_of_one_business_key_at_once_give_one_saga(
    engine: Engine, watcher: Engine, background: ThreadPoolExecutor
) -> None:
    with engine.connect() as first, engine.connect() as second:
        first_tx = first.begin()
        assert start(first, "saga-first", "order-42") == ("saga-first", ["inserted"])
        second_pid = backend_pid(second)

        def second_start() -> tuple[str, list[str]]:
            with second.begin():
                return start(second, "saga-second", "order-42")

        # The second insert waits on the unique index for the first transaction's outcome.
        starting = background.submit(second_start)
        wait_until_blocked(watcher, second_pid, starting)
        assert commit_or_error(first_tx) is None
        if not one_snapshot(engine):
            # The key race: the retry's lookup (a new statement, a new snapshot) finds the winner.
            assert starting.result(timeout=WITHIN) == ("saga-first", [UNIQUE_VIOLATION, "found"])
        else:
            # The snapshot never shows the winner: every try in the transaction fails the same way
            # (SERIALIZABLE reports the key clash as a serialization failure). So the dispatcher
            # does not try in the transaction: it hands the conflict to svckit.db, which runs the
            # unit again in a new one (tests/integration/test_pg_start_isolation.py), as below.
            with pytest.raises(_StartConflict) as conflicted:
                starting.result(timeout=WITHIN)
            clash = SERIALIZATION_FAILURE if serializable(engine) else UNIQUE_VIOLATION
            assert conflicted.value.tries == [clash] * UNIT_ATTEMPTS
            # A new transaction is answered with the one saga.
            assert in_new_transaction(engine, lambda c: start(c, "saga-retry", "order-42")) == ("saga-first", ["found"])
    assert sagas_with_key(engine, "order-42") == ["saga-first"]


def test_a_start_after_the_winner_committed_finds_it(engine: Engine) -> None:
    with engine.begin() as connection:
        assert start(connection, "saga-first", "order-7") == ("saga-first", ["inserted"])
    with engine.begin() as connection:
        assert start(connection, "saga-second", "order-7") == ("saga-first", ["found"])
    assert sagas_with_key(engine, "order-7") == ["saga-first"]


def test_many_starts_of_one_business_key_racing_give_one_saga(engine: Engine) -> None:
    answers: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(6)

    def starter(index: int) -> None:
        barrier.wait(timeout=WITHIN)
        # A caller that is told to retry does; a start is safe to repeat (invariant 9).
        saga_id, _ = in_new_transaction(engine, lambda c: _start_or_conflict(c, f"saga-{index}", "order-race"))
        with lock:
            answers.append(saga_id)

    with ThreadPoolExecutor(max_workers=6) as pool:
        for running in [pool.submit(starter, n) for n in range(6)]:
            running.result(timeout=WITHIN * 2)
    (winner,) = sagas_with_key(engine, "order-race")
    assert answers == [winner] * 6


def _start_or_conflict(connection: Connection, saga_id: str, business_key: str) -> tuple[str, list[str]]:
    """A start whose in-transaction tries all conflicted raises the conflict, for the caller to retry."""
    try:
        return start(connection, saga_id, business_key)
    except _StartConflict as conflicted:
        raise _Retry(conflicted.tries) from conflicted


class _Retry(Exception):
    """Stands for the RetryableError the caller sees; classified as a conflict so in_new_transaction retries."""

    sqlstate = SERIALIZATION_FAILURE
