"""orchestrator.dispatcher on real SQLite and PostgreSQL: a bad unit of a group commit fails alone, none waits."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
import pytest

from orchestrator import store
from orchestrator.definition import DefinitionMissing, DefinitionRegistry, SagaDefinition, Step
from orchestrator.dispatcher import Dispatcher, DispatchObserver, NotRecorded
from orchestrator.engine import ACTION, Command, Outcome, SagaState, Status
from orchestrator.sagas.order import ORDER_SAGA
from sagasuite.orchestrator.v1.orchestrator_service_pb2 import PlaceOrderRequest
from svckit.db import Database
from svckit.errors import RetryableError
from svckit.server import IDEMPOTENCY_HEADER
from tests.integration.saga_definitions_for_tests import LOYALTY_SAGA

# Far longer than any wait below: an outcome that had to wait for its lease to expire fails the test.
LEASE_SECONDS = 120.0
WITHIN = 30.0
SAGAS = 40


class FakeChannels:
    """Stands in for the channel pool: every method answers OK at once (or once the gate opens)."""

    def __init__(self, definitions: Iterable[SagaDefinition]) -> None:
        self.responses = {
            call.method_path: call.response_type().SerializeToString()
            for definition in definitions
            for flat in definition.nodes
            if isinstance(step := flat.node, Step)
            for call in (step.action, step.compensation)
            if call is not None
        }
        self.gate = asyncio.Event()
        self.gate.set()
        self.keys: list[str] = []

    def channel(self, service: str) -> FakeChannels:
        return self

    def unary_unary(self, path: str, request_serializer: Any = None, response_deserializer: Any = None) -> Any:
        async def call(request: Any, **options: Any) -> bytes:
            await self.gate.wait()
            self.keys.append(dict(options["metadata"])[IDEMPOTENCY_HEADER])
            return self.responses[path]

        return call


class BrokenObserver(DispatchObserver):
    """An observer with a bug: the dispatcher must record outcomes all the same."""

    def __init__(self) -> None:
        self.missing: dict[tuple[str, int], int] = {}

    def call_finished(self, saga: SagaState, step: str, direction: str, outcome: Outcome) -> None:
        raise RuntimeError("observer bug")

    def definitions_missing(self, counts: dict[tuple[str, int], int]) -> None:
        self.missing.update(counts)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Any) -> Iterable[Database]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'orchestrator.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    opened = Database(url)
    store.ensure_schema(opened)
    yield opened
    opened.close()


@pytest.fixture
def postgres_database(postgres_url: str) -> Iterable[Database]:
    opened = Database(postgres_url)
    store.ensure_schema(opened)
    yield opened
    opened.close()


@pytest.fixture
async def unretrieved() -> AsyncIterator[list[dict[str, Any]]]:
    """Exceptions the event loop reports (a task's exception never retrieved, say): a test asserts none."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    yield reported
    gc.collect()
    loop.set_exception_handler(previous)


def order(key: str) -> PlaceOrderRequest:
    return PlaceOrderRequest(order_id=key, customer_email="ada@example.com", payment_token="tok_visa")


async def running(
    database: Database,
    definitions: Iterable[SagaDefinition] = (ORDER_SAGA,),
    *,
    replica_id: str = "replica-a",
    observer: DispatchObserver | None = None,
) -> tuple[Dispatcher, FakeChannels]:
    registered = list(definitions)
    channels = FakeChannels(registered)
    dispatcher = Dispatcher(
        database,
        DefinitionRegistry(registered),
        channels,  # type: ignore[arg-type]
        replica_id=replica_id,
        lease_seconds=LEASE_SECONDS,
        poll_interval=0.05,
        observer=observer,
    )
    await dispatcher.start()
    return dispatcher, channels


@pytest.fixture
async def dispatchers() -> AsyncIterator[list[Dispatcher]]:
    started: list[Dispatcher] = []
    yield started
    for dispatcher in started:
        await dispatcher.stop(5)


async def sagas_of(database: Database, saga_ids: Iterable[str]) -> dict[str, SagaState]:
    ids = list(saga_ids)
    return await database.transaction(lambda c: store.load_sagas(c, ids))


async def eventually(probe: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WITHIN
    while not await probe():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WITHIN:.0f}s waiting for {what}")
        await asyncio.sleep(0.02)


async def all_in(database: Database, saga_ids: Iterable[str], status: str) -> None:
    ids = list(saga_ids)

    async def probe() -> bool:
        return all(saga.status == status for saga in (await sagas_of(database, ids)).values())

    await eventually(probe, f"{len(ids)} sagas to be {status}")


def poison(monkeypatch: pytest.MonkeyPatch, name: str, bad: Callable[..., bool], times: int = 10**9) -> list[int]:
    """Make store.<name> fail (as a store that cannot hold a value would) for the calls bad() picks."""
    original = getattr(store, name)
    failures: list[int] = []

    def guarded(*args: Any, **kwargs: Any) -> Any:
        if len(failures) < times and bad(*args, **kwargs):
            failures.append(1)
            raise ValueError(f"poisoned {name}")
        return original(*args, **kwargs)

    monkeypatch.setattr(store, name, guarded)
    return failures


# -- starts ----------------------------------------------------------------------------------------


async def start_many(dispatcher: Dispatcher, keys: list[str]) -> list[Any]:
    # Queued together, so the committer takes them as one batch.
    return await asyncio.gather(
        *(dispatcher.start_saga(ORDER_SAGA, key, order(key), 300) for key in keys), return_exceptions=True
    )


async def test_a_start_the_store_refuses_fails_alone_and_the_rest_of_its_batch_runs(
    database: Database, dispatchers: list[Dispatcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    dispatcher, _ = await running(database)
    dispatchers.append(dispatcher)
    keys = [f"order-{uuid.uuid4().hex[:8]}" for _ in range(SAGAS)]
    bad_key = keys[17]
    poison(monkeypatch, "insert_saga", lambda connection, saga, input_hash: saga.business_key == bad_key)
    results = await start_many(dispatcher, keys)

    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 1 and isinstance(refused[0], NotRecorded), refused
    assert refused[0].reason == "SAGA_STORE_REFUSED" and "poisoned insert_saga" in refused[0].message
    assert isinstance(results[17], NotRecorded)
    started = [saga for saga, created in (r for r in results if not isinstance(r, BaseException))]
    assert len(started) == SAGAS - 1 and all(not isinstance(r, RetryableError) for r in results)
    await all_in(database, [saga.saga_id for saga in started], Status.COMPLETED)
    found = await database.transaction(lambda c: store.find_by_business_key(c, "OrderSaga", bad_key))
    assert found is None


async def test_a_business_key_postgresql_cannot_hold_fails_alone(
    postgres_database: Database, dispatchers: list[Dispatcher]
) -> None:
    dispatcher, _ = await running(postgres_database)
    dispatchers.append(dispatcher)
    keys = [f"order-{uuid.uuid4().hex[:8]}" for _ in range(SAGAS)]
    keys[5] = "nul\x00byte"  # below the edge, which refuses it: the store cannot hold it
    results = await start_many(dispatcher, keys)
    assert isinstance(results[5], NotRecorded) and "NUL" in results[5].message, results[5]
    started = [r[0].saga_id for i, r in enumerate(results) if i != 5]
    await all_in(postgres_database, started, Status.COMPLETED)


# -- outcomes and operator calls -------------------------------------------------------------------


async def test_a_refusal_whose_message_holds_a_nul_is_recorded_on_postgresql(
    postgres_database: Database, dispatchers: list[Dispatcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    database = postgres_database  # SQLite holds a NUL in text; PostgreSQL refuses it
    dispatcher, channels = await running(database)
    dispatchers.append(dispatcher)
    answer = channels.unary_unary

    def refusing(path: str, *args: Any, **kwargs: Any) -> Any:
        if not path.endswith("/ReserveStock"):
            return answer(path, *args, **kwargs)

        async def refuse(request: Any, **options: Any) -> bytes:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.FAILED_PRECONDITION, grpc.aio.Metadata(), grpc.aio.Metadata(), "out of\x00stock", None
            )

        return refuse

    monkeypatch.setattr(channels, "unary_unary", refusing)
    saga, _ = await dispatcher.start_saga(ORDER_SAGA, "order-nul", order("order-nul"), 300)
    await all_in(database, [saga.saga_id], Status.COMPENSATED)
    events = await database.transaction(lambda c: store.load_events(c, saga.saga_id))
    assert [e.message for e in events if e.type == "StepFailed"] == ["out of\ufffdstock"]


async def test_an_outcome_that_fails_to_record_is_retried_and_its_batch_is_not_held_back(
    database: Database, dispatchers: list[Dispatcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    dispatcher, channels = await running(database)
    dispatchers.append(dispatcher)
    channels.gate.clear()  # every first call waits: their outcomes arrive together
    results = await start_many(dispatcher, [f"order-{uuid.uuid4().hex[:8]}" for _ in range(SAGAS)])
    saga_ids = [saga.saga_id for saga, _ in results]
    bad_id = saga_ids[3]
    # Fails with the batch, then alone, then alone again: recorded on a later try.
    failures = poison(
        monkeypatch, "update_sagas", lambda connection, sagas: bad_id in {s.saga_id for s in list(sagas)}, times=3
    )
    channels.gate.set()
    await all_in(database, saga_ids, Status.COMPLETED)
    assert len(failures) == 3
    events = await database.transaction(lambda c: store.load_events(c, bad_id))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.type for e in events].count("StepSucceeded") == len(ORDER_SAGA.steps)
    # Every call went out once: nothing was resent after a lease expired.
    assert len(channels.keys) == len(set(channels.keys)) == SAGAS * len(ORDER_SAGA.steps)


async def test_a_batch_whose_transaction_fails_has_its_outcomes_recorded_again(
    database: Database, dispatchers: list[Dispatcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    dispatcher, channels = await running(database)
    dispatchers.append(dispatcher)
    transaction = database.transaction
    failed: list[int] = []

    async def commit_lost(work: Callable[[Any], Any]) -> Any:
        # The committer's work carries its batch as a default argument: fail the first one with outcomes.
        batch = next((d for d in work.__defaults__ or () if isinstance(d, list)), [])
        if not failed and any(type(item).__name__ == "_Result" for item in batch):
            failed.append(len(batch))
            raise ConnectionError("the connection broke at COMMIT")
        return await transaction(work)

    monkeypatch.setattr(database, "transaction", commit_lost)
    results = await start_many(dispatcher, [f"order-{uuid.uuid4().hex[:8]}" for _ in range(SAGAS)])
    saga_ids = [saga.saga_id for saga, _ in results]
    await all_in(database, saga_ids, Status.COMPLETED)
    assert failed
    assert len(channels.keys) == len(set(channels.keys))


async def test_an_operator_call_the_store_refuses_fails_alone(
    database: Database, dispatchers: list[Dispatcher], monkeypatch: pytest.MonkeyPatch
) -> None:
    dispatcher, channels = await running(database)
    dispatchers.append(dispatcher)
    channels.gate.clear()
    results = await start_many(dispatcher, [f"order-{uuid.uuid4().hex[:8]}" for _ in range(8)])
    saga_ids = [saga.saga_id for saga, _ in results]
    bad_id = saga_ids[2]
    poison(monkeypatch, "load_pendings", lambda connection, saga_id: saga_id == bad_id)
    paused = await asyncio.gather(
        *(dispatcher.operate("pause", saga_id, "ops", "look") for saga_id in saga_ids), return_exceptions=True
    )
    assert isinstance(paused[2], NotRecorded) and "pause call" in paused[2].message
    assert all(isinstance(p, SagaState) and p.paused for i, p in enumerate(paused) if i != 2), paused
    channels.gate.set()
    await all_in(database, [bad_id], Status.COMPLETED)


# -- terminate while a call is on the wire -----------------------------------------------------------


async def test_a_call_on_the_wire_at_terminate_keeps_its_row_and_is_never_sent_again(
    database: Database, dispatchers: list[Dispatcher]
) -> None:
    first, channels = await running(database)
    channels.gate.clear()  # the reserve call stays on the wire
    saga, _ = await first.start_saga(ORDER_SAGA, "order-term", order("order-term"), 300)
    terminated = await first.operate("terminate", saga.saga_id, "ops", "fraud")
    assert terminated.status == Status.TERMINATED
    pending = await database.transaction(lambda c: store.load_pending(c, saga.saga_id))
    assert pending is not None and pending.lease_owner == "replica-a"
    # Its dispatcher goes away before the call returns: the call's outcome is never known to it.
    await first.stop(0.1)

    second, second_channels = await running(database, replica_id="replica-b")
    dispatchers.append(second)

    async def recorded() -> bool:
        found = await database.transaction(lambda c: store.load_events(c, saga.saga_id))
        return any(e.type == "EffectAfterTerminate" for e in found)

    await eventually(recorded, "the outcome of the call on the wire at terminate")
    events = await database.transaction(lambda c: store.load_events(c, saga.saga_id))
    assert [(e.type, e.step, e.code) for e in events] == [
        ("SagaStarted", "", ""),
        ("SagaTerminated", "", ""),
        ("EffectAfterTerminate", "reserve_stock", "UNKNOWN"),
    ]
    assert "may stand; not compensated" in events[-1].message
    assert await database.transaction(lambda c: store.load_pending(c, saga.saga_id)) is None
    assert second_channels.keys == []  # sending it after the end could make its effect happen now
    assert (await sagas_of(database, [saga.saga_id]))[saga.saga_id].status == Status.TERMINATED
    channels.gate.set()


# -- definitions that are not loaded -----------------------------------------------------------------


async def test_in_flight_sagas_without_their_definition_are_reported_and_wait_for_an_operator(
    database: Database,
    dispatchers: list[Dispatcher],
    caplog: pytest.LogCaptureFixture,
    unretrieved: list[dict[str, Any]],
) -> None:
    first, channels = await running(database, [ORDER_SAGA, LOYALTY_SAGA])
    channels.gate.clear()  # the loyalty sagas stay at their first call
    loyal = [
        (await first.start_saga(LOYALTY_SAGA, key, order(key), 300))[0].saga_id
        for key in (f"loyal-{uuid.uuid4().hex[:8]}" for _ in range(3))
    ]
    await first.stop(0.1)
    channels.gate.set()

    observer = BrokenObserver()
    with caplog.at_level(logging.ERROR, logger="sagasuite.dispatcher"):
        second, channels = await running(database, [ORDER_SAGA], replica_id="replica-b", observer=observer)
    dispatchers.append(second)
    lines = [r.getMessage() for r in caplog.records if "no loaded definition" in r.getMessage()]
    assert len(lines) == 1 and all(saga_id in lines[0] for saga_id in loyal) and "LoyaltySaga v1" in lines[0]
    assert observer.missing == {("LoyaltySaga", 1): 3}
    sagas = await sagas_of(database, loyal)
    assert {s.status for s in sagas.values()} == {Status.NEEDS_ATTENTION}
    assert all(s.last_error.startswith("DEFINITION_MISSING") for s in sagas.values())
    events = await database.transaction(lambda c: store.load_events(c, loyal[0]))
    assert (events[-1].type, events[-1].code) == ("SagaNeedsAttention", "DEFINITION_MISSING")
    for operation in ("retry", "cancel"):
        with pytest.raises(DefinitionMissing) as refused:
            await second.operate(operation, loyal[0], "ops")
        assert refused.value.reason == "DEFINITION_MISSING"
    # Terminate needs no definition: the operator can still end it.
    assert (await second.operate("terminate", loyal[1], "ops", "retired")).status == Status.TERMINATED

    # A command of such a saga that turns up later (another replica wrote it) is never sent.
    saga = SagaState(uuid.uuid4().hex, "LoyaltySaga", 1, "loyal-late", order("loyal-late").SerializeToString(),
                     Status.RUNNING, time.time() + 300, time.time(), time.time())  # fmt: skip
    command = Command(saga.saga_id, 0, ACTION, 1, time.time(), due_at=time.time())

    def insert(connection: Any) -> None:
        store.insert_saga(connection, saga, "hash")
        store.put_command(connection, command, None, 0.0)

    await database.transaction(insert)
    await all_in(database, [saga.saga_id], Status.NEEDS_ATTENTION)
    assert not any(key.startswith(saga.saga_id) for key in channels.keys)
    # The observer's bug did not stop an order saga from completing, and no task failed unseen.
    order_saga, _ = await second.start_saga(ORDER_SAGA, "order-after", order("order-after"), 300)
    await all_in(database, [order_saga.saga_id], Status.COMPLETED)
    assert not [c for c in unretrieved if "exception" in c], unretrieved


async def test_a_call_failing_inside_the_dispatcher_is_recorded_as_unknown(
    database: Database, dispatchers: list[Dispatcher], unretrieved: list[dict[str, Any]]
) -> None:
    def broken_span(saga: SagaState, step: str, direction: str, attempt: int) -> Any:
        if direction == ACTION:
            raise RuntimeError("tracing bug")
        return contextlib.nullcontext()

    dispatcher = Dispatcher(
        database,
        DefinitionRegistry([ORDER_SAGA]),
        FakeChannels([ORDER_SAGA]),  # type: ignore[arg-type]
        replica_id="replica-a",
        lease_seconds=LEASE_SECONDS,
        poll_interval=0.05,
        wrap_call=broken_span,
    )
    await dispatcher.start()
    dispatchers.append(dispatcher)
    saga, _ = await dispatcher.start_saga(ORDER_SAGA, "order-x", order("order-x"), 300)
    # UNKNOWN: the reserve may have happened, so it is released too; the saga ends, nothing hangs.
    await all_in(database, [saga.saga_id], Status.COMPENSATED)
    events = await database.transaction(lambda c: store.load_events(c, saga.saga_id))
    assert [(e.type, e.step, e.code) for e in events if e.step] == [
        ("StepFailed", "reserve_stock", grpc.StatusCode.UNKNOWN.name),
        ("CompensationSucceeded", "reserve_stock", "OK"),
    ]
    assert not [c for c in unretrieved if "exception" in c], unretrieved
