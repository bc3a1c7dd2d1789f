"""orchestrator.dispatcher on real SQLite and PostgreSQL, a fixed clock and seeded jitter: calls, leases, operations."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestrator import dispatcher as dispatcher_module
from orchestrator import store
from orchestrator.definition import DefinitionRegistry
from orchestrator.dispatcher import Dispatcher, DispatchObserver
from orchestrator.engine import ACTION, COMPENSATION, Command, SagaState, Status, Transition
from orchestrator.sagas.order import ORDER_SAGA
from orchestrator.store import EventRecord, PendingCommand
from svckit.db import Database
from svckit.errors import FailedPrecondition, NotFound
from svckit.server import IDEMPOTENCY_HEADER
from tests.unit.test_dispatcher_batch import LEASE_SECONDS, FakeChannels, order

T0 = 1_000_000.0
SEED = 7
WITHIN = 60.0  # generous: the machine is shared; a wait that needs it has failed anyway
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
NEVER = 3600.0  # a poll interval no test outlives: only dispatch right after a commit sends anything
RESERVE, CHARGE, SHIP, CONFIRM = (step.name for step in ORDER_SAGA.steps)


# -- fakes -----------------------------------------------------------------------------------------


class FixedClock:
    """The dispatcher's time module: time() answers what the test set; the rest is the real module."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


class SeededRandom:
    """The dispatcher's random module: every Random() it makes is seeded, so its jitter is known."""

    def Random(self, *_: Any) -> random.Random:
        return random.Random(SEED)

    def __getattr__(self, name: str) -> Any:
        return getattr(random, name)


class Conditions:
    """Waits that end when a predicate holds, checked each time the watched thing changes: no polling."""

    def __init__(self) -> None:
        self._waiting: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    def changed(self) -> None:
        for entry in list(self._waiting):
            predicate, future = entry
            if future.done() or predicate():
                if not future.done():
                    future.set_result(None)
                self._waiting.remove(entry)

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        if predicate():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((predicate, future))
        try:
            await asyncio.wait_for(future, WITHIN)
        except TimeoutError:
            pytest.fail(f"timed out after {WITHIN:.0f}s waiting for {what}")


class Participants(FakeChannels):
    """test_dispatcher_batch's fake channels, which can also refuse calls and tell a test when one arrives."""

    def __init__(self) -> None:
        super().__init__([ORDER_SAGA])
        self.arrived: list[str] = []  # idempotency keys, as calls arrive (before the gate)
        self.arrivals = Conditions()
        self._failures: dict[str, list[grpc.StatusCode]] = {}

    def fail(self, method: str, *codes: grpc.StatusCode) -> None:
        """Answer the next calls of method with codes, in turn; later ones succeed."""
        self._failures.setdefault(method, []).extend(codes)

    def unary_unary(self, path: str, request_serializer: Any = None, response_deserializer: Any = None) -> Any:
        succeed = super().unary_unary(path, request_serializer, response_deserializer)
        method = path.rsplit("/", 1)[1]

        async def call(request: Any, **options: Any) -> bytes:
            self.arrived.append(dict(options["metadata"])[IDEMPOTENCY_HEADER])
            self.arrivals.changed()
            failures = self._failures.get(method)
            if failures:
                await self.gate.wait()
                code = failures.pop(0)
                raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), f"{method}: no", None)
            result: bytes = await succeed(request, **options)
            return result

        return call

    async def until_called(self, key: str, times: int = 1) -> None:
        await self.arrivals.until(lambda: self.arrived.count(key) >= times, f"call {key} x{times}")


class Committed(DispatchObserver):
    """What the dispatchers committed, as they tell their observer after each commit."""

    def __init__(self) -> None:
        self.latest: dict[str, SagaState] = {}
        self.events: dict[str, list[str]] = {}
        self.changes = Conditions()

    def saga_changed(self, saga: SagaState, transition: Transition) -> None:
        self.latest[saga.saga_id] = dataclasses.replace(saga)
        self.events.setdefault(saga.saga_id, []).extend(event.type for event in transition.events)
        self.changes.changed()

    async def until_status(self, saga_id: str, status: str) -> None:
        def reached() -> bool:
            saga = self.latest.get(saga_id)
            return saga is not None and saga.status == status

        await self.changes.until(reached, f"saga {saga_id} to be {status}")

    async def until_event(self, saga_id: str, event_type: str, times: int = 1) -> None:
        def recorded() -> bool:
            return self.events.get(saga_id, []).count(event_type) >= times

        await self.changes.until(recorded, f"{event_type} x{times} in saga {saga_id}")


class Replicas:
    """Dispatchers on one database, sharing one observer; each has its own fake participants."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.committed = Committed()
        self.running: list[Dispatcher] = []
        self.channels: list[Participants] = []

    async def start(
        self, replica_id: str = "replica-a", *, poll_interval: float = 0.05
    ) -> tuple[Dispatcher, Participants]:
        channels = Participants()
        dispatcher = Dispatcher(
            self.database,
            DefinitionRegistry([ORDER_SAGA]),
            channels,  # type: ignore[arg-type]
            replica_id=replica_id,
            lease_seconds=LEASE_SECONDS,
            poll_interval=poll_interval,
            observer=self.committed,
        )
        await dispatcher.start()
        self.running.append(dispatcher)
        self.channels.append(channels)
        return dispatcher, channels

    async def stop(self, dispatcher: Dispatcher, grace: float) -> None:
        self.running.remove(dispatcher)
        await dispatcher.stop(grace)

    async def stop_all(self) -> None:
        for channels in self.channels:
            channels.gate.set()
        for dispatcher in list(self.running):
            await self.stop(dispatcher, 5)


# -- fixtures and helpers --------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'orchestrator.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    opened = Database(url)
    store.ensure_schema(opened)
    yield opened
    opened.close()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FixedClock:
    fixed = FixedClock(T0)
    monkeypatch.setattr(dispatcher_module, "time", fixed)
    monkeypatch.setattr(dispatcher_module, "random", SeededRandom())
    return fixed


@pytest.fixture
async def replicas(database: Database, clock: FixedClock) -> AsyncIterator[Replicas]:
    started = Replicas(database)
    yield started
    await started.stop_all()


def key(saga_id: str, step: str, direction: str = ACTION) -> str:
    return f"{saga_id}/{step}/{direction}"


async def place(dispatcher: Dispatcher, business_key: str = "order-1") -> SagaState:
    saga, created = await dispatcher.start_saga(ORDER_SAGA, business_key, order(business_key), 300)
    assert created
    return saga


async def events_of(database: Database, saga_id: str) -> list[EventRecord]:
    return await database.transaction(lambda c: store.load_events(c, saga_id))


async def history(database: Database, saga_id: str) -> list[tuple[str, str, int, str]]:
    return [(e.type, e.step, e.attempt, e.code) for e in await events_of(database, saga_id)]


async def pending_of(database: Database, saga_id: str) -> PendingCommand | None:
    return await database.transaction(lambda c: store.load_pending(c, saga_id))


async def stored(database: Database, saga_id: str) -> SagaState:
    return (await database.transaction(lambda c: store.load_sagas(c, [saga_id])))[saga_id]


def successes(steps: Iterable[str]) -> list[tuple[str, str, int, str]]:
    return [("StepSucceeded", step, 1, "OK") for step in steps]


# -- dispatch and history --------------------------------------------------------------------------


async def test_a_start_sends_its_first_call_right_after_its_commit_without_a_poll(
    replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    claims: list[str] = []
    claim_due = store.claim_due

    def counted(connection: Any, owner: str, *args: Any, **kwargs: Any) -> Any:
        claims.append(owner)
        return claim_due(connection, owner, *args, **kwargs)

    monkeypatch.setattr(store, "claim_due", counted)
    dispatcher, channels = await replicas.start(poll_interval=NEVER)
    channels.gate.clear()
    saga = await place(dispatcher)
    await channels.until_called(key(saga.saga_id, RESERVE))
    # Leased to this replica in the start's own transaction.
    first = Command(saga.saga_id, 0, ACTION, 1, T0, due_at=T0)
    assert await pending_of(replicas.database, saga.saga_id) == PendingCommand(first, "replica-a", T0 + LEASE_SECONDS)
    channels.gate.set()
    await replicas.committed.until_status(saga.saga_id, Status.COMPLETED)
    assert claims == []


async def test_each_outcome_advances_the_saga_and_is_recorded_in_its_history(replicas: Replicas) -> None:
    dispatcher, channels = await replicas.start(poll_interval=NEVER)
    saga = await place(dispatcher)
    await replicas.committed.until_status(saga.saga_id, Status.COMPLETED)
    events = await events_of(replicas.database, saga.saga_id)
    assert [(e.type, e.step, e.attempt, e.code) for e in events] == [
        ("SagaStarted", "", 0, ""),
        *successes([RESERVE, CHARGE, SHIP, CONFIRM]),
        ("SagaCompleted", "", 0, ""),
    ]
    assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6]
    assert {e.at for e in events} == {T0}
    assert channels.keys == [key(saga.saga_id, step) for step in (RESERVE, CHARGE, SHIP, CONFIRM)]
    done = await stored(replicas.database, saga.saga_id)
    assert (done.status, done.ended_at, sorted(done.results)) == (
        Status.COMPLETED,
        T0,
        sorted([RESERVE, CHARGE, SHIP, CONFIRM]),
    )
    assert await pending_of(replicas.database, saga.saga_id) is None


async def test_a_retryable_failure_is_sent_again_once_its_backoff_with_seeded_jitter_is_due(
    replicas: Replicas, clock: FixedClock
) -> None:
    rng = random.Random(SEED)
    first_delay, second_delay = ORDER_SAGA.step(0).retry.delay(1, rng), ORDER_SAGA.step(0).retry.delay(2, rng)
    dispatcher, channels = await replicas.start()
    channels.fail("ReserveStock", UNAVAILABLE, UNAVAILABLE)
    saga = await place(dispatcher)

    await replicas.committed.until_event(saga.saga_id, "StepRetryScheduled")
    retry = await pending_of(replicas.database, saga.saga_id)
    assert retry is not None and (retry.command.attempt, retry.command.due_at, retry.lease_owner) == (
        2,
        T0 + first_delay,
        None,
    )
    clock.now = T0 + first_delay
    await replicas.committed.until_event(saga.saga_id, "StepRetryScheduled", times=2)
    retry = await pending_of(replicas.database, saga.saga_id)
    assert retry is not None and (retry.command.attempt, retry.command.due_at) == (3, T0 + first_delay + second_delay)
    clock.now = T0 + first_delay + second_delay
    await replicas.committed.until_status(saga.saga_id, Status.COMPLETED)

    events = [e for e in await events_of(replicas.database, saga.saga_id) if e.step == RESERVE]
    assert [(e.type, e.attempt, e.code, e.message) for e in events] == [
        ("StepFailed", 1, "UNAVAILABLE", "ReserveStock: no"),
        ("StepRetryScheduled", 2, "", f"in {first_delay * 1000:.0f} ms"),
        ("StepFailed", 2, "UNAVAILABLE", "ReserveStock: no"),
        ("StepRetryScheduled", 3, "", f"in {second_delay * 1000:.0f} ms"),
        ("StepSucceeded", 3, "OK", ""),
    ]
    # Every attempt under one key: a participant that saw an earlier one replays it.
    assert channels.arrived.count(key(saga.saga_id, RESERVE)) == 3


# -- leases ----------------------------------------------------------------------------------------


async def test_a_late_outcome_from_a_replica_whose_lease_was_taken_over_is_ignored(
    replicas: Replicas, clock: FixedClock
) -> None:
    first, first_channels = await replicas.start("replica-a", poll_interval=NEVER)
    first_channels.gate.clear()
    saga = await place(first)
    reserve = key(saga.saga_id, RESERVE)
    await first_channels.until_called(reserve)

    clock.now = T0 + LEASE_SECONDS + 1  # the first replica's lease has expired
    _, second_channels = await replicas.start("replica-b")
    second_channels.gate.clear()
    await second_channels.until_called(reserve)
    taken = await pending_of(replicas.database, saga.saga_id)
    assert taken is not None and (taken.lease_owner, taken.command.attempt) == ("replica-b", 1)

    # The first call returns now; stop() waits until its outcome went through the committer.
    first_channels.gate.set()
    await replicas.stop(first, WITHIN)
    assert first_channels.keys == [reserve]
    assert await history(replicas.database, saga.saga_id) == [("SagaStarted", "", 0, "")]
    assert await pending_of(replicas.database, saga.saga_id) == taken

    second_channels.gate.set()
    await replicas.committed.until_status(saga.saga_id, Status.COMPLETED)
    assert (await history(replicas.database, saga.saga_id))[1:-1] == successes([RESERVE, CHARGE, SHIP, CONFIRM])


async def test_stop_records_the_call_on_the_wire_and_leaves_the_next_command_to_any_replica(
    replicas: Replicas,
) -> None:
    first, first_channels = await replicas.start("replica-a", poll_interval=NEVER)
    first_channels.gate.clear()
    saga = await place(first)
    await first_channels.until_called(key(saga.saga_id, RESERVE))
    stopping = asyncio.create_task(replicas.stop(first, WITHIN))
    await asyncio.sleep(0)  # one turn of the loop: stop() has begun, so nothing new goes out from here
    first_channels.gate.set()
    await stopping

    assert await history(replicas.database, saga.saga_id) == [("SagaStarted", "", 0, ""), *successes([RESERVE])]
    left = await pending_of(replicas.database, saga.saga_id)
    assert left is not None and (left.command.step_index, left.lease_owner) == (1, None)
    _, second_channels = await replicas.start("replica-b")
    await replicas.committed.until_status(saga.saga_id, Status.COMPLETED)
    assert first_channels.keys == [key(saga.saga_id, RESERVE)]
    assert second_channels.keys == [key(saga.saga_id, step) for step in (CHARGE, SHIP, CONFIRM)]


async def test_stop_gives_up_the_lease_of_a_call_still_on_the_wire(replicas: Replicas) -> None:
    first, first_channels = await replicas.start("replica-a", poll_interval=NEVER)
    first_channels.gate.clear()
    saga = await place(first)
    await first_channels.until_called(key(saga.saga_id, RESERVE))
    await replicas.stop(first, 0)  # the call never returns to it
    released = await pending_of(replicas.database, saga.saga_id)
    assert released is not None and (released.lease_owner, released.lease_expires_at) == (None, 0.0)

    # The clock has not moved: another replica takes the command at once, not when the lease would expire.
    _, second_channels = await replicas.start("replica-b")
    await replicas.committed.until_status(saga.saga_id, Status.COMPLETED)
    assert second_channels.keys[0] == key(saga.saga_id, RESERVE)


# -- operator calls --------------------------------------------------------------------------------


async def test_pause_holds_the_next_step_until_resume(replicas: Replicas) -> None:
    dispatcher, channels = await replicas.start(poll_interval=NEVER)
    channels.gate.clear()
    saga = await place(dispatcher)
    await channels.until_called(key(saga.saga_id, RESERVE))
    paused = await dispatcher.operate("pause", saga.saga_id, "ops", "look first")
    assert (paused.status, paused.paused) == (Status.RUNNING, True)

    channels.gate.set()  # the call on the wire finishes; what it leads to waits
    await replicas.committed.until_event(saga.saga_id, "StepSucceeded")
    held = await pending_of(replicas.database, saga.saga_id)
    assert held is not None and (held.command.step_index, held.command.due_at, held.lease_owner) == (1, None, None)

    resumed = await dispatcher.operate("resume", saga.saga_id, "ops")
    assert (resumed.status, resumed.paused) == (Status.RUNNING, False)
    await replicas.committed.until_status(saga.saga_id, Status.COMPLETED)
    events = await events_of(replicas.database, saga.saga_id)
    assert [(e.type, e.actor, e.message) for e in events[:4]] == [
        ("SagaStarted", "orchestrator", "OrderSaga v1"),
        ("SagaPaused", "ops", "look first"),
        ("StepSucceeded", "orchestrator", ""),
        ("SagaResumed", "ops", ""),
    ]
    assert channels.keys == [key(saga.saga_id, step) for step in (RESERVE, CHARGE, SHIP, CONFIRM)]


async def test_cancel_while_a_call_is_on_the_wire_compensates_once_it_returns(replicas: Replicas) -> None:
    dispatcher, channels = await replicas.start(poll_interval=NEVER)
    channels.gate.clear()
    saga = await place(dispatcher)
    await channels.until_called(key(saga.saga_id, RESERVE))
    cancelled = await dispatcher.operate("cancel", saga.saga_id, "ops", "customer asked")
    assert (cancelled.status, cancelled.cancel_requested) == (Status.RUNNING, True)

    channels.gate.set()
    await replicas.committed.until_status(saga.saga_id, Status.COMPENSATED)
    assert await history(replicas.database, saga.saga_id) == [
        ("SagaStarted", "", 0, ""),
        ("SagaCancelRequested", "", 0, ""),
        ("StepSucceeded", RESERVE, 1, "OK"),
        ("CompensationStarted", "", 0, ""),
        ("CompensationSucceeded", RESERVE, 1, "OK"),
        ("SagaCompensated", "", 0, ""),
    ]
    assert channels.keys == [key(saga.saga_id, RESERVE), key(saga.saga_id, RESERVE, COMPENSATION)]


async def test_terminate_ends_a_saga_waiting_for_a_retry_and_removes_its_command(replicas: Replicas) -> None:
    dispatcher, channels = await replicas.start()
    channels.fail("ReserveStock", UNAVAILABLE)
    saga = await place(dispatcher)
    await replicas.committed.until_event(saga.saga_id, "StepRetryScheduled")
    terminated = await dispatcher.operate("terminate", saga.saga_id, "ops", "fraud")
    assert (terminated.status, terminated.ended_at, terminated.last_error) == (
        Status.TERMINATED,
        T0,
        "terminated: fraud",
    )
    assert await pending_of(replicas.database, saga.saga_id) is None  # nothing is left to send
    last = (await events_of(replicas.database, saga.saga_id))[-1]
    assert (last.type, last.actor, last.message) == ("SagaTerminated", "ops", "fraud")


async def test_retry_runs_a_saga_that_needs_attention_again_from_its_failed_step(
    replicas: Replicas, clock: FixedClock
) -> None:
    dispatcher, channels = await replicas.start()
    channels.fail("SendConfirmation", UNAVAILABLE, UNAVAILABLE)
    saga = await place(dispatcher)
    await replicas.committed.until_event(saga.saga_id, "StepRetryScheduled")
    clock.now = T0 + 200  # past the confirmation's 120 s budget: its next failure is its last
    await replicas.committed.until_status(saga.saga_id, Status.NEEDS_ATTENTION)

    retried = await dispatcher.operate("retry", saga.saga_id, "ops")
    assert retried.status == Status.RUNNING
    await replicas.committed.until_status(saga.saga_id, Status.COMPLETED)
    assert (await history(replicas.database, saga.saga_id))[4:] == [
        ("StepFailed", CONFIRM, 1, "UNAVAILABLE"),
        ("StepRetryScheduled", CONFIRM, 2, ""),
        ("StepFailed", CONFIRM, 2, "UNAVAILABLE"),
        ("SagaNeedsAttention", "", 0, ""),
        ("SagaRetried", "", 0, ""),
        ("StepSucceeded", CONFIRM, 1, "OK"),
        ("SagaCompleted", "", 0, ""),
    ]
    assert channels.arrived.count(key(saga.saga_id, CONFIRM)) == 3


async def test_an_operator_call_its_status_forbids_is_refused_and_changes_nothing(replicas: Replicas) -> None:
    dispatcher, _ = await replicas.start(poll_interval=NEVER)
    saga = await place(dispatcher)
    await replicas.committed.until_status(saga.saga_id, Status.COMPLETED)
    before = await history(replicas.database, saga.saga_id)
    for operation in ("pause", "resume", "cancel", "terminate", "retry"):
        with pytest.raises(FailedPrecondition) as refused:
            await dispatcher.operate(operation, saga.saga_id, "ops")
        assert refused.value.reason == f"ILLEGAL_STATE_FOR_{operation.upper()}"
        assert refused.value.metadata == {"saga_id": saga.saga_id, "status": "COMPLETED"}
    assert await history(replicas.database, saga.saga_id) == before


async def test_an_operator_call_on_an_unknown_saga_is_not_found(replicas: Replicas) -> None:
    dispatcher, _ = await replicas.start(poll_interval=NEVER)
    with pytest.raises(NotFound) as refused:
        await dispatcher.operate("pause", "no-such-saga", "ops")
    assert (refused.value.reason, refused.value.metadata) == ("SAGA_NOT_FOUND", {"saga_id": "no-such-saga"})


# -- business keys ---------------------------------------------------------------------------------


async def test_a_start_with_a_business_key_in_use_returns_that_saga(replicas: Replicas) -> None:
    dispatcher, channels = await replicas.start(poll_interval=NEVER)
    saga = await place(dispatcher, "order-7")
    await replicas.committed.until_status(saga.saga_id, Status.COMPLETED)
    again, created = await dispatcher.start_saga(ORDER_SAGA, "order-7", order("order-7"), 300)
    assert (again.saga_id, again.status, created) == (saga.saga_id, Status.COMPLETED, False)
    assert len(channels.keys) == len(ORDER_SAGA.steps)  # nothing ran twice


async def test_a_start_with_a_business_key_in_use_and_another_payload_is_a_conflict(replicas: Replicas) -> None:
    dispatcher, _ = await replicas.start(poll_interval=NEVER)
    saga = await place(dispatcher, "order-7")
    other = order("order-7")
    other.payment_token = "tok_other"
    with pytest.raises(FailedPrecondition) as refused:
        await dispatcher.start_saga(ORDER_SAGA, "order-7", other, 300)
    assert refused.value.reason == "BUSINESS_KEY_CONFLICT"
    assert refused.value.metadata == {"saga_id": saga.saga_id, "business_key": "order-7"}
