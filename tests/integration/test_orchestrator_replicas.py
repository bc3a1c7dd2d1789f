"""Two orchestrator replicas sharing one PostgreSQL database: a killed one's sagas move on, a stopped one hands over."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy

from devstack.launcher import ManagedProcess
from devstack.stack import LocalStack, StackConfig
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc
from tests.integration.saga_audit import (
    COMPENSATED,
    COMPLETED,
    TOKENS,
    Clients,
    audit,
    log_lines,
    open_channel,
    order_request,
    place_order,
    stock_levels,
    wait_ended,
)

# Each forward call takes a while, so hundreds of sagas are in flight at once.
FORWARD_CALLS = {
    "inventory": "ReserveStock",
    "payment": "Charge",
    "shipping": "CreateShipment",
    "notify": "SendConfirmation",
}
OUTCOMES = {"StepSucceeded", "StepFailed", "CompensationSucceeded", "CompensationFailed"}


def service_latency(ms: int) -> dict[str, dict[str, str]]:
    return {service: {"FAULTS": f"{method}:latency_ms={ms}"} for service, method in FORWARD_CALLS.items()}


def new_orders(kind: str, count: int, declined_every: int) -> dict[str, int]:
    """Fresh order ids mapped to the status each must end in (every n-th card is declined)."""
    return {
        f"{kind}-{i}-{uuid.uuid4().hex[:8]}": COMPENSATED if i % declined_every == 0 else COMPLETED
        for i in range(count)
    }


def outcomes_since(saga: pb.Saga, since: float) -> int:
    """How many call outcomes the saga's history recorded at or after a time (seconds since the epoch)."""
    return sum(1 for e in saga.history if e.type in OUTCOMES and e.at.ToNanoseconds() / 1e9 >= since)


@pytest.fixture
def database(postgres_url: str) -> Iterator[sqlalchemy.Engine]:
    """The replicas' shared database, read directly to see which replica holds which command."""
    engine = sqlalchemy.create_engine(postgres_url)
    yield engine
    engine.dispose()


async def leased_by(database: sqlalchemy.Engine, owner: str) -> set[str]:
    """Sagas whose pending command the replica holds a lease on."""

    def query() -> set[str]:
        with database.connect() as connection:
            rows = connection.execute(
                sqlalchemy.text("select saga_id from outbox where lease_owner = :o"), {"o": owner}
            )
            return {row.saga_id for row in rows}

    return await asyncio.to_thread(query)


async def lease_owners(database: sqlalchemy.Engine) -> set[str]:
    def query() -> set[str]:
        with database.connect() as connection:
            rows = connection.execute(sqlalchemy.text("select distinct lease_owner from outbox"))
            return {row.lease_owner for row in rows if row.lease_owner}

    return await asyncio.to_thread(query)


def start_replicas(
    tmp_path: Path, postgres_url: str, lease_seconds: int, latency_ms: int
) -> tuple[LocalStack, ManagedProcess]:
    """The stack with replica-a, plus replica-b on the same database; services slowed by latency_ms per call."""
    config = StackConfig(
        tmp_path,
        orchestrator_database_url=postgres_url,
        orchestrator_env={"LEASE_SECONDS": str(lease_seconds), "REPLICA_ID": "replica-a"},
        service_env=service_latency(latency_ms),
    )
    stack = LocalStack(config).start()
    try:
        return stack, stack.add_orchestrator("orchestrator-b", {"REPLICA_ID": "replica-b"})
    except Exception:
        stack.stop()
        raise


async def test_killed_replica_sagas_are_finished_by_the_survivor(
    tmp_path: Path, postgres_url: str, database: sqlalchemy.Engine
) -> None:
    stack, replica_b = start_replicas(tmp_path, postgres_url, lease_seconds=3, latency_ms=100)
    assert stack.orchestrator is not None
    clients = Clients.of(stack, orchestrators=[replica_b.address])
    channel_a = open_channel(stack.address)
    try:
        stub_a = pb_grpc.OrchestratorServiceStub(channel_a)
        stubs = [stub_a, clients.orchestrator]
        stock_before = await stock_levels(clients.inventory)
        orders = new_orders("replicas", 200, declined_every=10)
        owners_seen: set[str] = set()
        placing = True

        async def watch_owners() -> None:
            while placing:
                owners_seen.update(await lease_owners(database))
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch_owners())
        slots = asyncio.Semaphore(32)

        async def place(index: int, order_id: str) -> str:
            async with slots:
                return await place_order(stubs[index % 2], order_request(order_id, TOKENS[orders[order_id]]))

        placed = await asyncio.gather(*(place(i, order_id) for i, order_id in enumerate(orders)))
        placing = False
        await watcher
        saga_ids = dict(zip(orders, placed, strict=True))

        stack.orchestrator.kill()
        orphaned = await leased_by(database, "replica-a")
        assert orphaned, "replica-a held no command when it was killed; the takeover was not exercised"

        ended = await wait_ended(clients.orchestrator, list(saga_ids.values()), 60.0)
        # Every step ran once: one StepSucceeded per step in each history, and the ledgers agree.
        await audit(clients, {order: ended[saga_id] for order, saga_id in saga_ids.items()}, stock_before, orders)
        assert orphaned <= {saga.saga_id for saga in ended.values()}
        # Both replicas took orders and dispatched calls (a command is leased to the replica that sends it).
        assert owners_seen >= {"replica-a", "replica-b"}, f"only {owners_seen} ever held a command"
        for replica in (stack.orchestrator, replica_b):
            assert len(log_lines(replica.log_path, "method=PlaceOrder", "code=OK")) >= 100
    finally:
        await channel_a.close(None)
        await clients.close()
        replica_b.stop()
        stack.stop()


async def test_graceful_stop_releases_leases_to_the_other_replica(
    tmp_path: Path, postgres_url: str, database: sqlalchemy.Engine
) -> None:
    # Leases far longer than the wait below: the sagas can only finish if the stopping replica gives them up.
    stack, replica_b = start_replicas(tmp_path, postgres_url, lease_seconds=25, latency_ms=150)
    assert stack.orchestrator is not None
    clients = Clients.of(stack, orchestrators=[replica_b.address])
    channel_a = open_channel(stack.address)
    try:
        stub_a = pb_grpc.OrchestratorServiceStub(channel_a)
        stock_before = await stock_levels(clients.inventory)
        orders = new_orders("handover", 40, declined_every=8)
        placed = await asyncio.gather(
            *(place_order(stub_a, order_request(order_id, TOKENS[status])) for order_id, status in orders.items())
        )
        saga_ids = dict(zip(orders, placed, strict=True))
        assert await leased_by(database, "replica-a"), "replica-a held no command when it was stopped"

        sigterm_at = time.time()
        assert await asyncio.to_thread(stack.orchestrator.stop) == 0
        assert not await leased_by(database, "replica-a"), "the stopped replica kept leases"

        ended = await wait_ended(clients.orchestrator, list(saga_ids.values()), 15.0)
        await audit(clients, {order: ended[saga_id] for order, saga_id in saga_ids.items()}, stock_before, orders)
        # A stopping replica only records the calls it had on the wire, one per saga: a saga with more
        # outcomes after the SIGTERM was carried on by replica-b.
        carried_on = [saga for saga in ended.values() if outcomes_since(saga, sigterm_at) >= 2]
        assert carried_on, "every saga ended on the stopping replica; the handover was not exercised"
    finally:
        await channel_a.close(None)
        await clients.close()
        replica_b.stop()
        stack.stop()


async def test_a_killed_replica_is_taken_over_within_seconds_not_at_lease_expiry(
    tmp_path: Path, postgres_url: str, database: sqlalchemy.Engine
) -> None:
    # Leases of a minute: only the heartbeat can explain a takeover within seconds. The survivor takes
    # over once replica-a has been silent for REPLICA_SILENT_AFTER_SECONDS (2.5 s by default).
    stack, replica_b = start_replicas(tmp_path, postgres_url, lease_seconds=60, latency_ms=200)
    assert stack.orchestrator is not None
    clients = Clients.of(stack, orchestrators=[replica_b.address])
    channel_a = open_channel(stack.address)
    try:
        stub_a = pb_grpc.OrchestratorServiceStub(channel_a)
        orders = new_orders("takeover", 60, declined_every=10)
        stock_before = await stock_levels(clients.inventory)
        placed = await asyncio.gather(
            *(place_order(stub_a, order_request(order_id, TOKENS[orders[order_id]])) for order_id in orders)
        )
        saga_ids = dict(zip(orders, placed, strict=True))
        orphaned: set[str] = set()
        deadline = time.monotonic() + 30
        while not orphaned and time.monotonic() < deadline:
            orphaned = await leased_by(database, "replica-a")
        assert orphaned, "replica-a held no command; the takeover was not exercised"
        stack.orchestrator.kill()
        killed_at = time.time()
        ended = await wait_ended(clients.orchestrator, list(saga_ids.values()), 40.0)
        await audit(clients, {order: ended[saga_id] for order, saga_id in saga_ids.items()}, stock_before, orders)
        # How long each orphaned saga stood still: from the kill to its first recorded outcome after it.
        gaps = []
        for saga_id in orphaned:
            after = [
                e.at.ToNanoseconds() / 1e9 for e in ended[saga_id].history if e.at.ToNanoseconds() / 1e9 > killed_at
            ]
            if after:
                gaps.append(min(after) - killed_at)
        gaps.sort()
        print(f"takeover after kill -9: {len(gaps)} orphaned sagas, first move p50 {gaps[len(gaps) // 2]:.2f} s, "
              f"max {gaps[-1]:.2f} s (lease 60 s)")  # fmt: skip
        assert gaps and gaps[-1] < 30, f"an orphaned saga waited {gaps[-1]:.1f} s: the lease, not the heartbeat"
    finally:
        await channel_a.close(None)
        await clients.close()
        replica_b.stop()
        stack.stop()
