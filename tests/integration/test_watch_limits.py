"""WatchSaga limits: MAX_WATCHERS streams per process, slots freed on end and cancel, one shared reader, replicas.

The hub is checked structurally on a real SQLite file and a real PostgreSQL database: however
many streams are open there is one reader task, a round of it is one transaction with one
statement per chunk of watched sagas, pushes from this replica's commits reach every stream
with no read at all, and with no stream open there is no reader. The cap and the stream
semantics are checked on real processes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from sqlalchemy import event

from devstack.stack import LocalStack, StackConfig
from orchestrator import store
from orchestrator.engine import Event, SagaState, Status
from orchestrator.status import EventType
from orchestrator.store import EventRecord
from orchestrator.watch import Subscription, WatchHub
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from svckit.db import Database
from tests.grpc_helpers import error_reason
from tests.orchestrator_helpers import (
    OPERATOR_TOKEN,
    BearerAuth,
    Clients,
    connect,
    new_order_id,
    order_request,
    refused,
    render,
    start_stack,
    wait_for,
)

DEADLINE = 30.0

# -- the hub, in process, on a real database ---------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'orchestrator.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def databases(database_url: str) -> Iterator[tuple[Database, Database]]:
    """The hub's database, and a second connection to it standing for another replica."""
    here, elsewhere = Database(database_url), Database(database_url)
    store.ensure_schema(here)
    yield here, elsewhere
    here.close()
    elsewhere.close()


async def add_sagas(database: Database, count: int) -> list[str]:
    saga_ids = [uuid.uuid4().hex for _ in range(count)]
    now = time.time()

    def work(connection: Any) -> None:
        rows: list[dict[str, Any]] = []
        for saga_id in saga_ids:
            saga = SagaState(saga_id, "OrderSaga", 1, f"key-{saga_id}", b"", Status.RUNNING, now + 300, now, now)
            store.append_events(saga, [Event(EventType.SAGA_STARTED, now)], rows)
            store.insert_saga(connection, saga, "hash")
        store.insert_events(connection, rows)

    await database.transaction(work)
    return saga_ids


async def commit_event(database: Database, saga_id: str, kind: EventType) -> SagaState:
    """Append one event to a saga, as the replica running it would."""

    def work(connection: Any) -> SagaState:
        saga = store.load_sagas(connection, [saga_id])[saga_id]
        rows: list[dict[str, Any]] = []
        store.append_events(saga, [Event(kind, time.time(), step="reserve_stock")], rows)
        store.update_sagas(connection, [saga])
        store.insert_events(connection, rows)
        return saga

    return await database.transaction(work)


def reader_tasks() -> int:
    tasks = asyncio.all_tasks()
    return len([task for task in tasks if getattr(task.get_coro(), "__qualname__", "") == "WatchHub._read_loop"])


async def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


class Counted:
    """Counts the hub database's transactions and its statements that ask which watched sagas changed."""

    def __init__(self, database: Database) -> None:
        self.transactions = 0
        self.change_queries = 0
        original = database.transaction

        async def transaction(work: Callable[[Any], Any]) -> Any:
            self.transactions += 1
            return await original(work)

        database.transaction = transaction  # type: ignore[method-assign]

        @event.listens_for(database.engine, "before_cursor_execute")
        def _on_statement(*args: Any) -> None:
            statement = args[2]
            if "event_seq" in statement and " IN " in statement.upper():
                self.change_queries += 1


async def test_one_reader_and_one_transaction_a_round_serve_every_stream(databases: tuple[Database, Database]) -> None:
    here, elsewhere = databases
    # A round only when the test asks for one (read_changes), so the counts below are exact.
    hub = WatchHub(here, max_watchers=1000, read_interval=3600, chunk_size=50)
    assert not hub.reader_running and reader_tasks() == 0
    saga_ids = await add_sagas(elsewhere, 120)
    watched = saga_ids[0]
    subscriptions = [hub.subscribe(saga_id) for saga_id in saga_ids] + [hub.subscribe(watched) for _ in range(49)]
    assert hub.open_streams == 169
    assert reader_tasks() == 1, "one reader for the whole process, not one per stream"
    received: dict[Subscription, list[int]] = {subscription: [] for subscription in subscriptions}

    async def follow(subscription: Subscription) -> None:
        async for _, record in subscription.events(0):
            received[subscription].append(record.seq)

    streams = [asyncio.create_task(follow(subscription)) for subscription in subscriptions]
    try:
        await eventually(lambda: all(seqs == [1] for seqs in received.values()), "every stream to replay its history")
        counted = Counted(here)

        await hub.read_changes()
        assert (counted.transactions, counted.change_queries) == (1, 3), "one transaction, a statement per 50"

        # Another replica commits an event of the saga fifty streams watch: one round delivers it to all.
        await commit_event(elsewhere, watched, EventType.STEP_RETRY_SCHEDULED)
        await hub.read_changes()
        of_watched = [subscription for subscription in subscriptions if subscription.saga_id == watched]
        await eventually(lambda: all(received[s] == [1, 2] for s in of_watched), "the event at every stream")
        assert (counted.transactions, counted.change_queries) == (2, 6)

        # This replica's own commit is pushed: every stream gets it without reading anything.
        saga = await commit_event(elsewhere, watched, EventType.STEP_SUCCEEDED)
        record = EventRecord(
            watched, 3, time.time(), "StepSucceeded", "reserve_stock", 1, "OK", "", 1.0, "orchestrator"
        )
        hub.publish(saga, [record])
        await eventually(lambda: all(received[s] == [1, 2, 3] for s in of_watched), "the push at every stream")
        assert counted.transactions == 2
        assert all(received[s] == [1] for s in subscriptions if s.saga_id != watched)
    finally:
        for task in streams:
            task.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
        for subscription in subscriptions:
            subscription.close()
    assert hub.open_streams == 0
    # With no stream open the reader stops at once (not after its hour-long interval): no query at all.
    await eventually(lambda: not hub.reader_running, "the reader to stop")
    assert reader_tasks() == 0


async def test_the_shared_reader_finds_other_replicas_commits_by_itself(databases: tuple[Database, Database]) -> None:
    here, elsewhere = databases
    hub = WatchHub(here, read_interval=0.05)
    (saga_id,) = await add_sagas(elsewhere, 1)
    subscription = hub.subscribe(saga_id)
    seen: list[str] = []

    async def follow() -> None:
        async for _, record in subscription.events(0):
            seen.append(record.type)

    stream = asyncio.create_task(follow())
    try:
        await eventually(lambda: seen == ["SagaStarted"], "the history")
        await commit_event(elsewhere, saga_id, EventType.STEP_RETRY_SCHEDULED)
        await eventually(lambda: seen == ["SagaStarted", "StepRetryScheduled"], "the other replica's event")
    finally:
        stream.cancel()
        await asyncio.gather(stream, return_exceptions=True)
        subscription.close()
    await eventually(lambda: not hub.reader_running, "the reader to stop")


# -- the cap, on real processes ----------------------------------------------------------------


@pytest.fixture
def capped_stack(tmp_path: Path) -> Iterator[LocalStack]:
    running = start_stack(
        tmp_path,
        # Long enough in ReserveStock for the pause to land before the step is done.
        faults={"inventory": "ReserveStock:latency_ms=1500,order_contains=held-"},
        orchestrator_env={"MAX_WATCHERS": "3"},
    )
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
async def clients(capped_stack: LocalStack) -> AsyncIterator[Clients]:
    async with connect(capped_stack) as connected:
        yield connected


async def open_stream(clients: Clients, saga_id: str) -> Any:
    """A WatchSaga stream that has delivered its first event (so it holds its slot on the server)."""
    stream = clients.orchestrator.WatchSaga(pb.WatchSagaRequest(saga_id=saga_id))
    first = await stream.read()
    assert isinstance(first, pb.WatchSagaResponse) and first.event.type == "SagaStarted"
    return stream


async def rest_of(stream: Any) -> list[str]:
    """The event types a stream opened with open_stream still delivers, until it ends."""
    types = []
    while (response := await stream.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]  # not in grpc-stubs
        types.append(response.event.type)
    return types


async def open_when_free(clients: Clients, saga_id: str, within: float) -> Any:
    """A stream opened as soon as the server has a slot free, and kept (a refused try holds no slot).

    Kept rather than probed: a probe that closes its own stream would hold the slot until the server
    saw that close, and the next open could be refused for it.
    """
    deadline = time.monotonic() + within
    while True:
        try:
            return await open_stream(clients, saga_id)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {within:.0f}s waiting for a slot after a cancel")
            await asyncio.sleep(0.05)


async def test_streams_past_max_watchers_are_refused_until_one_ends(clients: Clients) -> None:
    saga_id = await clients.place(order_request(new_order_id("held-watch")))
    await clients.orchestrator.PauseSaga(pb.PauseSagaRequest(saga_id=saga_id, reason="held for watching"))
    streams = [await open_stream(clients, saga_id) for _ in range(3)]

    error = await refused(clients.orchestrator.WatchSaga(pb.WatchSagaRequest(saga_id=saga_id)).read())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert error_reason(error) == "WATCHERS_EXHAUSTED"
    assert "MAX_WATCHERS" in (error.details() or "")
    # A refused stream holds no slot, and neither does a refused request.
    bad = await refused(clients.orchestrator.WatchSaga(pb.WatchSagaRequest(saga_id=saga_id, after_seq=-1)).read())
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT

    # A cancelled stream frees its slot.
    streams.pop().cancel()
    streams.append(await open_when_free(clients, saga_id, DEADLINE))

    # Streams end with the saga (it is resumed and completes), and their slots are free again.
    await clients.orchestrator.ResumeSaga(pb.ResumeSagaRequest(saga_id=saga_id))
    for stream in streams:
        types = await rest_of(stream)
        assert types[-1] == "SagaCompleted", types
    saga = await wait_for(clients, saga_id, ["COMPLETED"])
    again = [await open_stream(clients, saga_id) for _ in range(3)]
    for stream in again:
        replayed = await rest_of(stream)
        assert replayed[-1] == "SagaCompleted", render(saga)


# -- across replicas -----------------------------------------------------------------------------


async def test_a_watch_on_one_replica_follows_a_saga_another_replica_runs(tmp_path: Path, postgres_url: str) -> None:
    config = StackConfig(
        tmp_path,
        orchestrator_database_url=postgres_url,
        orchestrator_env={"REPLICA_ID": "replica-a", "OPERATOR_TOKENS": f"operator:{OPERATOR_TOKEN}"},
        service_env={
            "inventory": {"FAULTS": "ReserveStock:latency_ms=500"},
            "payment": {"FAULTS": "Charge:latency_ms=500"},
        },
    )
    stack = LocalStack(config).start()
    try:
        replica_b = stack.add_orchestrator("orchestrator-b", {"REPLICA_ID": "replica-b", "MAX_WATCHERS": "5"})
        # grpc-stubs leaves client interceptors opaque, to be cast.
        bearer = cast("grpc.aio.ClientInterceptor", BearerAuth(OPERATOR_TOKEN))
        channel_b = grpc.aio.insecure_channel(replica_b.address, interceptors=[bearer])
        try:
            async with connect(stack) as clients:
                # Placed on replica A, which leases its commands to itself: B only ever reads the store.
                saga_id = await clients.place(order_request(new_order_id("cross-replica")))
                stub_b = pb_grpc.OrchestratorServiceStub(channel_b)
                followers = [
                    _collect(stub_b.WatchSaga(pb.WatchSagaRequest(saga_id=saga_id, after_seq=after)))
                    for after in (0, 0, 2)
                ]
                whole, again, tail = await asyncio.wait_for(asyncio.gather(*followers), DEADLINE)
                saga = await clients.saga(saga_id)
                assert [event.seq for event in whole] == list(range(1, len(saga.history) + 1)), render(saga)
                assert [event.type for event in whole] == [event.type for event in saga.history]
                assert whole[-1].type == "SagaCompleted"
                assert again == whole
                assert tail == whole[2:]
        finally:
            await channel_b.close(None)
            replica_b.stop()
    finally:
        stack.stop()


async def _collect(stream: Any) -> list[pb.HistoryEvent]:
    return [response.event async for response in stream]
