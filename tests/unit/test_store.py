"""orchestrator.store on a real SQLite file and a real PostgreSQL: sagas, history, outbox leases and queries."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import Connection, insert, select

from orchestrator import store
from orchestrator.engine import ACTION, COMPENSATION, Command, Event, SagaState, Status
from orchestrator.models import SCHEMA_VERSION, SchemaVersionRow
from orchestrator.status import EventType
from orchestrator.store import SagaFilter
from svckit.db import Database, is_retryable_conflict

T = TypeVar("T")

T0 = 1_000_000.0
LEASE = 30.0
SCHEMA = SchemaVersionRow.__table__  # type: ignore[attr-defined]


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    url = (
        f"sqlite:///{tmp_path / 'orchestrator.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    opened = Database(url)
    store.ensure_schema(opened)
    yield opened
    opened.close()


@pytest.fixture
def postgres_database(postgres_url: str) -> Iterator[Database]:
    opened = Database(postgres_url)
    store.ensure_schema(opened)
    yield opened
    opened.close()


@contextlib.contextmanager
def refused_as_a_duplicate() -> Iterator[None]:
    """The driver's unique-key refusal, which the dispatcher takes for a race and tries again."""
    # Any exception: the driver's class differs per database; the classifier says what it means.
    with pytest.raises(Exception) as refused:
        yield
    assert is_retryable_conflict(refused.value), refused.value


def run(database: Database, work: Callable[[Connection], T]) -> T:
    return database.transaction_sync(work)


def new_saga(
    saga_id: str = "s1",
    *,
    business_key: str | None = None,
    saga_type: str = "OrderSaga",
    status: Status = Status.RUNNING,
    created_at: float = T0,
    paused: bool = False,
) -> SagaState:
    ended = status in (Status.COMPLETED, Status.COMPENSATED, Status.TERMINATED)
    return SagaState(
        saga_id=saga_id,
        saga_type=saga_type,
        version=1,
        business_key=business_key or f"order-{saga_id}",
        input=b"\x00\xffinput",
        status=status,
        deadline_at=created_at + 300,
        created_at=created_at,
        updated_at=created_at,
        paused=paused,
        ended_at=created_at + 1 if ended else None,
    )


def insert_sagas(database: Database, *sagas: SagaState) -> None:
    def work(connection: Connection) -> None:
        for saga in sagas:
            store.insert_saga(connection, saga, f"hash-{saga.saga_id}")

    run(database, work)


def command(saga_id: str, *, due_at: float | None = T0, attempt: int = 1, step_index: int = 0) -> Command:
    return Command(saga_id, step_index, ACTION, attempt, T0, due_at=due_at)


def put(database: Database, *commands: Command, owner: str | None = None, expires_at: float = 0.0) -> None:
    """Insert each command's saga and the command itself, leased to owner until expires_at."""
    insert_sagas(database, *(new_saga(c.saga_id) for c in commands))

    def work(connection: Connection) -> None:
        for c in commands:
            store.put_command(connection, c, owner, expires_at)

    run(database, work)


def claim(database: Database, owner: str, now: float, limit: int = 10) -> list[tuple[Command, SagaState]]:
    return run(database, lambda c: store.claim_due(c, owner, now, LEASE, limit, skip_locked=database.is_postgres))


def lease_owners(database: Database, saga_ids: list[str]) -> list[str | None]:
    def work(connection: Connection) -> list[str | None]:
        pending = [store.load_pending(connection, saga_id) for saga_id in saga_ids]
        return [p.lease_owner if p else None for p in pending]

    return run(database, work)


def claimed_ids(claimed: list[tuple[Command, SagaState]]) -> list[str]:
    return [c.saga_id for c, _ in claimed]


# -- schema --------------------------------------------------------------------------------


def test_a_fresh_database_records_the_schema_version_once(database: Database) -> None:
    assert store.ensure_schema(database) == SCHEMA_VERSION  # the fixture ran it already: a restart
    rows = run(database, lambda c: c.execute(select(SCHEMA.c.version)).scalars().all())
    assert rows == [SCHEMA_VERSION]


def test_a_database_migrated_by_a_newer_release_is_refused(database: Database) -> None:
    run(database, lambda c: c.execute(insert(SCHEMA).values(version=SCHEMA_VERSION + 1, applied_at=T0)))
    with pytest.raises(store.SchemaTooNew, match=f"version {SCHEMA_VERSION + 1}.*up to {SCHEMA_VERSION}"):
        store.ensure_schema(database)


# -- sagas ---------------------------------------------------------------------------------


def test_a_saga_reads_back_as_it_was_inserted(database: Database) -> None:
    saga = replace(
        new_saga(),
        step_index=2,
        compensations=[1, 0],
        results={"reserve_stock": b"\x00\x01", "charge_payment": b""},
        last_error="charge_payment: UNAVAILABLE: down",
        trace_context="00-abc-def-01",
        cancel_requested=True,
        paused=True,
        event_seq=4,
    )
    insert_sagas(database, saga)
    assert run(database, lambda c: store.load_sagas(c, ["s1", "missing"])) == {"s1": saga}


def test_an_update_changes_what_moves_and_keeps_the_input(database: Database) -> None:
    saga = new_saga()
    insert_sagas(database, saga)
    moved = replace(
        saga,
        input=b"other",
        deadline_at=T0 + 1,
        status=Status.COMPENSATING,
        step_index=1,
        compensations=[0],
        results={"reserve_stock": b"r"},
        last_error="out of\x00stock" + "x" * 3000,
        event_seq=7,
        updated_at=T0 + 5,
    )
    run(database, lambda c: store.update_sagas(c, [moved]))
    loaded = run(database, lambda c: store.load_sagas(c, ["s1"]))["s1"]
    # A NUL (which PostgreSQL cannot hold) is replaced the same way on both, and the error is clipped.
    assert loaded.last_error == ("out of\ufffdstock" + "x" * 3000)[:2000]
    assert loaded == replace(moved, input=saga.input, deadline_at=saga.deadline_at, last_error=loaded.last_error)


def test_find_by_business_key_returns_the_saga_and_its_input_hash_within_its_type(database: Database) -> None:
    saga = new_saga(business_key="order-7")
    insert_sagas(database, saga)
    assert run(database, lambda c: store.find_by_business_key(c, "OrderSaga", "order-7")) == (saga, "hash-s1")
    assert run(database, lambda c: store.find_by_business_key(c, "LoyaltySaga", "order-7")) is None
    assert run(database, lambda c: store.find_by_business_key(c, "OrderSaga", "order-8")) is None


def test_one_business_key_has_one_saga_per_type(database: Database) -> None:
    insert_sagas(database, new_saga("s1", business_key="order-7"))
    insert_sagas(database, new_saga("s2", business_key="order-7", saga_type="LoyaltySaga"))
    with refused_as_a_duplicate():
        insert_sagas(database, new_saga("s3", business_key="order-7"))


# -- history -------------------------------------------------------------------------------


def append(database: Database, saga: SagaState, *types: str) -> None:
    """Append events to saga's history and store its new event_seq, in one transaction."""

    rows: list[dict[str, Any]] = []
    events = [Event(EventType(t), T0 + saga.event_seq + i, step="reserve_stock") for i, t in enumerate(types)]
    # Numbered outside the transaction: transaction_sync runs work again after a unique-key clash.
    store.append_events(saga, events, rows)

    def work(connection: Connection) -> None:
        store.insert_events(connection, rows)
        store.update_sagas(connection, [saga])

    run(database, work)


def test_events_are_numbered_after_the_sagas_last_one_and_read_back_in_order(database: Database) -> None:
    saga = new_saga()
    insert_sagas(database, saga)
    append(database, saga, "SagaStarted", "StepFailed")
    append(database, saga, "StepRetryScheduled", "StepSucceeded")
    events = run(database, lambda c: store.load_events(c, "s1"))
    assert [(e.seq, e.type, e.at) for e in events] == [
        (1, "SagaStarted", T0),
        (2, "StepFailed", T0 + 1),
        (3, "StepRetryScheduled", T0 + 2),
        (4, "StepSucceeded", T0 + 3),
    ]
    assert run(database, lambda c: store.load_sagas(c, ["s1"]))["s1"].event_seq == 4
    assert [e.seq for e in run(database, lambda c: store.load_events(c, "s1", after_seq=2))] == [3, 4]


def test_history_is_append_only_a_writer_with_a_stale_copy_cannot_overwrite_an_event(database: Database) -> None:
    saga = new_saga()
    insert_sagas(database, saga)
    stale = replace(saga)
    append(database, saga, "SagaStarted")
    with refused_as_a_duplicate():
        append(database, stale, "SagaTerminated")
    assert [e.type for e in run(database, lambda c: store.load_events(c, "s1"))] == ["SagaStarted"]


def test_an_event_message_is_clipped_and_made_storable(database: Database) -> None:
    saga = new_saga()
    insert_sagas(database, saga)

    rows: list[dict[str, Any]] = []
    store.append_events(saga, [Event(EventType.STEP_FAILED, T0, message="out of\x00stock" + "x" * 3000)], rows)
    run(database, lambda c: store.insert_events(c, rows))
    (event,) = run(database, lambda c: store.load_events(c, "s1"))
    assert event.message == ("out of\ufffdstock" + "x" * 3000)[:2000]


# -- outbox --------------------------------------------------------------------------------


def test_claim_due_leases_due_commands_earliest_first_up_to_the_limit(database: Database) -> None:
    put(database, command("late", due_at=T0 - 1), command("early", due_at=T0 - 3), command("mid", due_at=T0 - 2))
    claimed = claim(database, "replica-a", T0, limit=2)
    # The two due earliest, each with its saga (RETURNING promises no order).
    assert sorted((c.saga_id, s.saga_id) for c, s in claimed) == [("early", "early"), ("mid", "mid")]
    pending = run(database, lambda c: store.load_pending(c, "early"))
    assert pending == store.PendingCommand(command("early", due_at=T0 - 3), "replica-a", T0 + LEASE)
    assert run(database, lambda c: store.load_pending(c, "late")) == store.PendingCommand(
        command("late", due_at=T0 - 1), None, 0.0
    )


def test_a_command_not_yet_due_or_paused_is_not_claimed(database: Database) -> None:
    put(database, command("later", due_at=T0 + 0.5), command("paused", due_at=None))
    assert claim(database, "replica-a", T0) == []
    assert claimed_ids(claim(database, "replica-a", T0 + 0.5)) == ["later"]


def test_a_leased_command_is_skipped_until_its_lease_expires(database: Database) -> None:
    put(database, command("s1"), owner="replica-a", expires_at=T0 + LEASE)
    assert claim(database, "replica-b", T0 + LEASE - 1) == []
    assert claim(database, "replica-b", T0 + LEASE) == []
    claimed = claim(database, "replica-b", T0 + LEASE + 1)
    assert claimed_ids(claimed) == ["s1"]
    pending = run(database, lambda c: store.load_pending(c, "s1"))
    assert pending is not None and (pending.lease_owner, pending.lease_expires_at) == ("replica-b", T0 + 2 * LEASE + 1)


def test_fence_records_an_outcome_only_for_the_holder_of_that_exact_command(database: Database) -> None:
    held = command("s1", attempt=2)
    put(database, held, owner="replica-b", expires_at=T0 + LEASE)

    def fence(which: Command, owner: str) -> bool:
        return run(database, lambda c: store.fence(c, which, owner))

    assert not fence(held, "replica-a")  # its lease was taken over
    assert not fence(replace(held, attempt=1), "replica-b")  # an earlier attempt's late outcome
    assert not fence(replace(held, direction=COMPENSATION), "replica-b")
    assert not fence(replace(held, step_index=1), "replica-b")
    assert run(database, lambda c: store.load_pending(c, "s1")) is not None
    assert fence(held, "replica-b")
    assert run(database, lambda c: store.load_pending(c, "s1")) is None
    assert not fence(held, "replica-b")  # recorded once


def test_an_unleased_command_is_fenced_for_nobody(database: Database) -> None:
    put(database, command("s1"))
    assert not run(database, lambda c: store.fence(c, command("s1"), "replica-a"))


def test_release_leases_gives_one_owners_commands_back_at_once(database: Database) -> None:
    put(database, command("a1"), command("a2"), owner="replica-a", expires_at=T0 + LEASE)
    put(database, command("b1"), owner="replica-b", expires_at=T0 + LEASE)
    assert run(database, lambda c: store.release_leases(c, "replica-a")) == 2
    assert lease_owners(database, ["a1", "a2", "b1"]) == [None, None, "replica-b"]
    assert sorted(claimed_ids(claim(database, "replica-c", T0))) == ["a1", "a2"]
    assert run(database, lambda c: store.release_leases(c, "replica-a")) == 0


def test_a_saga_has_at_most_one_command_and_delete_removes_it(database: Database) -> None:
    put(database, command("s1"))
    with refused_as_a_duplicate():
        run(database, lambda c: store.put_command(c, command("s1", step_index=1), None, 0.0))
    run(database, lambda c: store.delete_command(c, "s1"))
    assert run(database, lambda c: store.load_pending(c, "s1")) is None
    assert claim(database, "replica-a", T0) == []


def test_two_claims_at_once_skip_each_others_rows_on_postgresql(postgres_database: Database) -> None:
    database = postgres_database
    put(database, *(command(f"s{i}", due_at=T0 - 10 + i) for i in range(4)))
    with database.engine.connect() as first, database.engine.connect() as second:
        with first.begin():
            mine = store.claim_due(first, "replica-a", T0, LEASE, 2, skip_locked=True)
            with second.begin():
                # Without SKIP LOCKED this claim would wait for the first transaction: fail, not hang.
                second.exec_driver_sql("SET LOCAL lock_timeout = '20s'")
                theirs = store.claim_due(second, "replica-b", T0, LEASE, 4, skip_locked=True)
    assert sorted(claimed_ids(mine)) == ["s0", "s1"]
    assert sorted(claimed_ids(theirs)) == ["s2", "s3"]
    assert lease_owners(database, ["s0", "s1", "s2", "s3"]) == ["replica-a", "replica-a", "replica-b", "replica-b"]


# -- queries -------------------------------------------------------------------------------


@pytest.fixture
def population(database: Database) -> Database:
    """Six sagas of two types, created a second apart (s2 and s3 at the same instant)."""
    insert_sagas(
        database,
        new_saga("s1", created_at=T0 + 1, status=Status.COMPLETED),
        new_saga("s2", created_at=T0 + 2, status=Status.RUNNING),
        new_saga("s3", created_at=T0 + 2, status=Status.RUNNING, paused=True),
        new_saga("s4", created_at=T0 + 4, status=Status.NEEDS_ATTENTION, saga_type="LoyaltySaga"),
        new_saga("s5", created_at=T0 + 5, status=Status.COMPENSATING, paused=True),
        new_saga("s6", created_at=T0 + 6, status=Status.COMPENSATED, business_key="order-x"),
    )
    return database


FILTERS = [
    (SagaFilter(), ["s6", "s5", "s4", "s3", "s2", "s1"]),
    # A paused saga is reported as PAUSED: its stored status does not match it.
    (SagaFilter(statuses=(Status.RUNNING, Status.COMPENSATING)), ["s2"]),
    (SagaFilter(include_paused=True), ["s5", "s3"]),
    (SagaFilter(statuses=(Status.RUNNING,), include_paused=True), ["s5", "s3", "s2"]),
    (SagaFilter(saga_type="LoyaltySaga"), ["s4"]),
    (SagaFilter(business_key="order-x"), ["s6"]),
    (SagaFilter(created_after=T0 + 2, created_before=T0 + 5), ["s4", "s3", "s2"]),
    (SagaFilter(saga_type="OrderSaga", statuses=(Status.NEEDS_ATTENTION,)), []),
    (SagaFilter(saga_id_prefix="s"), ["s6", "s5", "s4", "s3", "s2", "s1"]),
    (SagaFilter(saga_id_prefix="s4"), ["s4"]),
    (SagaFilter(saga_id_prefix="s%"), []),  # LIKE's wildcards are matched as themselves
    (SagaFilter(business_key_prefix="order-x"), ["s6"]),
    (SagaFilter(business_key_prefix="order-s"), ["s5", "s4", "s3", "s2", "s1"]),
    (SagaFilter(at_steps=(("LoyaltySaga", 1, (0,)),)), ["s4"]),
    (SagaFilter(at_steps=()), []),
]


def listed(database: Database, saga_filter: SagaFilter) -> list[str]:
    return [s.saga_id for s in run(database, lambda c: store.list_sagas(c, saga_filter, 100, None))]


def test_list_sagas_filters_newest_first(population: Database) -> None:
    # One database for every filter: a fresh PostgreSQL database per case costs seconds here.
    for saga_filter, expected in FILTERS:
        assert listed(population, saga_filter) == expected, saga_filter


def test_pages_of_list_sagas_cover_every_saga_once_in_order(database: Database) -> None:
    rng = random.Random(11)
    # Few distinct instants, so many sagas share a created_at and the cursor must break ties.
    sagas = [new_saga(f"s{i:02d}", created_at=T0 + rng.randrange(5)) for i in range(23)]
    rng.shuffle(sagas)
    insert_sagas(database, *sagas)

    def page_after(cursor: tuple[float, str] | None) -> list[SagaState]:
        return run(database, lambda c: store.list_sagas(c, SagaFilter(), 4, cursor))

    pages: list[list[str]] = []
    page = page_after(None)
    while page:
        pages.append([s.saga_id for s in page])
        page = page_after((page[-1].created_at, page[-1].saga_id))
    assert all(len(page) == 4 for page in pages[:-1])
    newest_first = sorted(sagas, key=lambda s: (s.created_at, s.saga_id), reverse=True)
    assert [saga_id for page in pages for saga_id in page] == [s.saga_id for s in newest_first]


def test_count_by_status_counts_paused_sagas_apart(population: Database) -> None:
    assert run(population, lambda c: store.count_by_status(c, None)) == {
        Status.COMPLETED: 1,
        Status.RUNNING: 1,
        "PAUSED": 2,
        Status.NEEDS_ATTENTION: 1,
        Status.COMPENSATED: 1,
    }
    assert run(population, lambda c: store.count_by_status(c, T0 + 4)) == {
        Status.NEEDS_ATTENTION: 1,
        "PAUSED": 1,
        Status.COMPENSATED: 1,
    }


IN_FLIGHT = (Status.RUNNING, Status.COMPENSATING)


def test_the_oldest_in_flight_is_the_oldest_running_or_compensating_saga(population: Database) -> None:
    oldest = run(population, lambda c: store.oldest_with_status(c, IN_FLIGHT))
    assert oldest is not None and oldest.saga_id in {"s2", "s3"} and oldest.created_at == T0 + 2
    # Counted as the counts are: created at or after created_after.
    later = run(population, lambda c: store.oldest_with_status(c, IN_FLIGHT, T0 + 3))
    assert later is not None and later.saga_id == "s5"
    # A saga that needs attention is not in flight: it has its own oldest.
    attention = run(population, lambda c: store.oldest_with_status(c, [Status.NEEDS_ATTENTION]))
    assert attention is not None and attention.saga_id == "s4"


def test_no_saga_is_in_flight_when_every_one_ended(database: Database) -> None:
    insert_sagas(database, new_saga("s1", status=Status.COMPLETED), new_saga("s2", status=Status.TERMINATED))
    assert run(database, lambda c: store.oldest_with_status(c, IN_FLIGHT)) is None
    insert_sagas(database, new_saga("s3", created_at=T0 + 9))
    oldest = run(database, lambda c: store.oldest_with_status(c, IN_FLIGHT))
    assert oldest is not None and oldest.saga_id == "s3"
