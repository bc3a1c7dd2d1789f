"""Two orchestrator replicas on one PostgreSQL database: their shared throughput, and a killed one's takeover.

`ReplicasGroup` is a target group of the bench: it starts a second replica (REPLICA_ID of its own)
beside the stack's orchestrator, on the same database, just for its phases; its target sends
alternate sagas to each replica and reports how many each one ran (from each replica's Prometheus
counters, and as its client saw them). `measure_takeover` runs a closed loop on both replicas,
kills one with SIGKILL, and measures for each saga that replica held (its command leased to it in
the outbox at its death) the time from the death to the survivor's next recorded transition of
that saga (history timestamps, GetSaga), as tests/integration/test_orchestrator_replicas.py does.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, create_engine, text

from bench.goals import REPLICAS
from bench.stats import percentile
from bench.targets import CHANNEL_OPTIONS, SagaTiming, Target, bench_order
from devstack.launcher import ManagedProcess
from devstack.stack import LocalStack
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc

__all__ = [
    "PRIMARY_REPLICA_ID",
    "REPLICAS",
    "REPLICA_ENV",
    "ReplicasGroup",
    "ReplicasTarget",
    "measure_takeover",
]

PRIMARY_REPLICA_ID = "bench-replica-a"
SECOND_REPLICA_ID = "bench-replica-b"
TAKEOVER_REPLICA_ID = "bench-replica-killed"
# The heartbeat settings the takeover is measured with (the orchestrator's defaults, docs/scaling.md),
# given to every replica of the pass so the report says what they were.
REPLICA_ENV = {"HEARTBEAT_INTERVAL_SECONDS": "0.5", "REPLICA_SILENT_AFTER_SECONDS": "2.5", "METRICS_PORT": "0"}
WAIT_DEADLINE = 120.0
_COUNTED = {"sagasuite_sagas_started_total": "started", "sagasuite_sagas_completed_total": "completed"}


def _read_counters(metrics_port: int | None) -> dict[str, float] | None:
    """Sagas started and completed by one replica so far (its Prometheus counters, every saga type)."""
    if metrics_port is None:
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    totals = {"started": 0.0, "completed": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in _COUNTED:
                totals[_COUNTED[sample.name]] += sample.value
    return totals


def _ended(status: int) -> str:
    return pb.SagaStatus.Name(status).removeprefix("SAGA_STATUS_")


class ReplicasTarget:
    """PlaceOrderAndWait, every other saga to the other replica; counts who answered and who ran them."""

    has_start = False

    def __init__(
        self,
        replicas: Mapping[str, ManagedProcess],
        service_pids: Mapping[str, int],
        *,
        name: str = REPLICAS,
    ) -> None:
        self.name = name
        self._replicas = dict(replicas)
        self._pids = {**service_pids, **{n: p.pid for n, p in self._replicas.items() if p.pid}}
        self._stubs: list[tuple[str, pb_grpc.OrchestratorServiceAsyncStub]] = []
        self._channels: list[grpc.aio.Channel] = []
        self._next = 0
        self._answered: list[tuple[float, str]] = []
        self._counters_at_open: dict[str, dict[str, float] | None] = {}

    async def open(self) -> None:
        for name, process in self._replicas.items():
            channel = grpc.aio.insecure_channel(process.address, options=CHANNEL_OPTIONS)
            self._channels.append(channel)
            self._stubs.append((name, pb_grpc.OrchestratorServiceStub(channel)))

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(None)
        self._channels.clear()
        self._stubs.clear()

    def processes(self) -> dict[str, int]:
        return dict(self._pids)

    async def calibrate(self, order_id: str) -> None:
        for _ in self._stubs:
            await self.run_one(f"{order_id}-{self._next}", time.perf_counter())

    async def run_one(self, order_id: str, due: float) -> SagaTiming:
        name, stub = self._stubs[self._next % len(self._stubs)]
        self._next += 1
        answer = await stub.PlaceOrderAndWait(
            pb.PlaceOrderAndWaitRequest(order=bench_order(order_id)), timeout=WAIT_DEADLINE
        )
        ended = time.perf_counter()
        outcome = _ended(answer.saga.status)
        if outcome == "COMPLETED":
            self._answered.append((ended, name))
        return SagaTiming(due, ended, ended, outcome)

    def _counters(self) -> dict[str, dict[str, float] | None]:
        return {name: _read_counters(process.metrics_port) for name, process in self._replicas.items()}

    async def window_opened(self) -> None:
        self._counters_at_open = await asyncio.to_thread(self._counters)

    async def window_closed(self, start: float, end: float) -> dict[str, Any]:
        """The split over the measured window: sagas each replica completed (its counters) and answered."""
        counters = await asyncio.to_thread(self._counters)
        answered = Counter(name for ended, name in self._answered if start <= ended <= end)
        split: dict[str, Any] = {}
        for name, process in self._replicas.items():
            before, after = self._counters_at_open.get(name), counters.get(name)
            split[name] = {
                "replica_id": process.env.get("REPLICA_ID", ""),
                "answered": answered[name],
                "completed": round(after["completed"] - before["completed"]) if before and after else None,
                "started": round(after["started"] - before["started"]) if before and after else None,
            }
        return split


class ReplicasGroup:
    """A second replica on the stack's database, started just for the two-replica phases and stopped after them."""

    name = "replicas"

    def __init__(self, stack: LocalStack, service_pids: Mapping[str, int]) -> None:
        self._stack = stack
        self._service_pids = dict(service_pids)
        self._second: ManagedProcess | None = None
        self.notes: list[str] = []

    def prepare(self) -> None:
        pass

    def start(self) -> Sequence[Target]:
        assert self._stack.orchestrator is not None
        self._second = self._stack.add_orchestrator("orchestrator-b", {**REPLICA_ENV, "REPLICA_ID": SECOND_REPLICA_ID})
        self.notes.append(
            f"{REPLICAS}: the stack's orchestrator ({PRIMARY_REPLICA_ID}) and orchestrator-b ({SECOND_REPLICA_ID}) "
            "on one PostgreSQL database, the client sending alternate sagas to each; the split counts the sagas "
            "each replica saw complete (its sagasuite_sagas_completed counter) over the window"
        )
        return [ReplicasTarget({"orchestrator": self._stack.orchestrator, "orchestrator-b": self._second},
                               self._service_pids)]  # fmt: skip

    def stop(self) -> None:
        if self._second is not None:
            self._second.stop()
        self._second = None


def _leased_by(engine: Engine, owner: str) -> set[str]:
    """Sagas whose pending command the replica holds a lease on (read from the shared database)."""
    with engine.connect() as connection:
        rows = connection.execute(text("select saga_id from outbox where lease_owner = :o"), {"o": owner})
        return {str(row.saga_id) for row in rows}


async def _takeover(
    survivor_address: str,
    victim: ManagedProcess,
    database: Engine,
    concurrency: int,
    before_kill: float,
    limit: float,
) -> dict[str, Any]:
    channels = [
        grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) for address in (survivor_address, victim.address)
    ]
    survivor, other = (pb_grpc.OrchestratorServiceStub(channel) for channel in channels)
    prefix = f"takeover-{uuid.uuid4().hex[:8]}"
    victim_alive = True
    counter = 0
    errors: Counter[str] = Counter()
    completed = 0

    async def worker(index: int) -> None:
        nonlocal counter, completed
        while True:
            counter += 1
            stub = other if index % 2 and victim_alive else survivor
            try:
                request = pb.PlaceOrderAndWaitRequest(order=bench_order(f"{prefix}-{counter}"))
                await stub.PlaceOrderAndWait(request, timeout=WAIT_DEADLINE)
                completed += 1
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] += 1
                await asyncio.sleep(0.05)

    workers = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    try:
        await asyncio.sleep(before_kill)
        # Killed only once it holds sagas, so the takeover is exercised.
        give_up = time.monotonic() + 30
        while not await asyncio.to_thread(_leased_by, database, victim.env["REPLICA_ID"]):
            if time.monotonic() > give_up:
                break
            await asyncio.sleep(0.05)
        await asyncio.to_thread(victim.kill)
        died_at = time.time()
        victim_alive = False
        held = await asyncio.to_thread(_leased_by, database, victim.env["REPLICA_ID"])
        # The load goes on on the survivor while it takes the dead replica's sagas over.
        moved_at: dict[str, float] = {}
        deadline = time.monotonic() + limit
        pending = set(held)
        while pending and time.monotonic() < deadline:
            for saga_id in list(pending):
                saga = (await survivor.GetSaga(pb.GetSagaRequest(saga_id=saga_id), timeout=30)).saga
                after = [e.at.ToNanoseconds() / 1e9 for e in saga.history if e.at.ToNanoseconds() / 1e9 > died_at]
                if after:
                    moved_at[saga_id] = min(after)
                    pending.discard(saga_id)
            if pending:
                await asyncio.sleep(0.1)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for channel in channels:
            await channel.close(None)
    gaps = sorted(moved - died_at for moved in moved_at.values())
    return {
        "concurrency": concurrency,
        "killed": victim.name,
        "killed_replica_id": victim.env["REPLICA_ID"],
        "held_at_death": len(held),
        "moved": len(gaps),
        "not_moved_within_s": {"count": len(held) - len(gaps), "limit_s": limit},
        "gap_p50_s": round(percentile(gaps, 0.5), 3) if gaps else None,
        "gap_max_s": round(gaps[-1], 3) if gaps else None,
        "gap_min_s": round(gaps[0], 3) if gaps else None,
        "heartbeat_interval_s": float(victim.env.get("HEARTBEAT_INTERVAL_SECONDS", "0.5")),
        "replica_silent_after_s": float(victim.env.get("REPLICA_SILENT_AFTER_SECONDS", "2.5")),
        "lease_seconds": float(victim.env.get("LEASE_SECONDS", "30")),
        "client": {"completed": completed, "errors": dict(errors)},
    }


def measure_takeover(
    stack: LocalStack, database_url: str, concurrency: int = 8, *, before_kill: float = 2.0, limit: float = 60.0
) -> dict[str, Any]:
    """Start a replica beside the stack's orchestrator, load both, kill -9 it, and time its sagas' takeover."""
    assert stack.orchestrator is not None
    # One engine for the polls of the outbox while the load runs, not one per poll.
    database = create_engine(database_url, connect_args={"connect_timeout": 5})
    victim = stack.add_orchestrator("orchestrator-killed", {**REPLICA_ENV, "REPLICA_ID": TAKEOVER_REPLICA_ID})
    try:
        return asyncio.run(_takeover(stack.address, victim, database, concurrency, before_kill, limit))
    finally:
        victim.stop()
        database.dispose()
