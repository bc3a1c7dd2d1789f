"""The load generator: drives sagas through a target in a closed or open loop; measures rate, latency, CPU, memory.

A target is one way of running the order saga: through the orchestrator (`OrchestratorTarget`,
here), as the four calls alone (`bench.floor.FloorTarget`), or on a peer engine (`bench.peers`).
`run_phase` drives one target for a warm-up and a measured window and returns a `PhaseResult`;
`run_benchmark` starts the local stack and runs every target in turn, round after round, so the
ratios between them hold on a noisy machine.
"""

from __future__ import annotations

import asyncio
import math
import os
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import grpc

from bench.stats import LatencySummary, ProcessSample, clear_peak_rss, cpu_ms_per_item, read_process, summarize
from bench.targets import (
    CHANNEL_OPTIONS,
    COMPLETED,
    PeerGroup,
    ResidentGroup,
    SagaTiming,
    Target,
    TargetGroup,
    bench_order,
)
from devstack.stack import LocalStack, StackConfig
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc

__all__ = [
    "BenchConfig",
    "Load",
    "OrchestratorTarget",
    "PhaseResult",
    "SagaTiming",
    "Target",
    "WaitMode",
    "bench_order",
    "run_benchmark",
    "run_phase",
]

# Seconds a phase waits for its stragglers after the window before the next phase starts.
DRAIN_SECONDS = 60.0
# Longest wait, past the warm-up, for every closed-loop worker to finish its first saga.
MAX_EXTRA_WARMUP = 60.0
# The deadline of a call that waits for a saga's end (PlaceOrderAndWait, WatchSaga): generous, so a
# slow saga on a loaded machine is measured rather than cut off.
WAIT_DEADLINE = 120.0
_ENDED = {
    pb.SAGA_STATUS_COMPLETED: "COMPLETED",
    pb.SAGA_STATUS_COMPENSATED: "COMPENSATED",
    pb.SAGA_STATUS_NEEDS_ATTENTION: "NEEDS_ATTENTION",
    pb.SAGA_STATUS_TERMINATED: "TERMINATED",
}


@dataclass(frozen=True)
class Load:
    """Closed loop at `concurrency` sagas in flight, or (when rate is set) open loop at `rate` sagas/s."""

    concurrency: int = 32
    rate: float | None = None
    warmup: float = 2.0
    duration: float = 10.0
    max_in_flight: int = 5000

    @property
    def label(self) -> str:
        return f"rate={self.rate:g}/s" if self.rate else f"C={self.concurrency}"


@dataclass
class ProcessFigures:
    """What one process cost during a measured window."""

    name: str
    pid: int
    cpu_ms_per_saga: float
    cpu_share: float
    peak_rss_mib: float
    rss_start_mib: float
    rss_end_mib: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "cpu_ms_per_saga": _round(self.cpu_ms_per_saga),
            "cpu_share_of_one_core": _round(self.cpu_share),
            "peak_rss_mib": _round(self.peak_rss_mib),
            "rss_start_mib": _round(self.rss_start_mib),
            "rss_end_mib": _round(self.rss_end_mib),
        }


@dataclass
class PhaseResult:
    """One target under one load for one measured window."""

    target: str
    load: Load
    round: int
    window_seconds: float
    outcomes: dict[str, int]
    completed_per_second: float
    start_latency: LatencySummary | None
    completion_latency: LatencySummary
    processes: list[ProcessFigures]
    load_average: tuple[float, float]
    errors: list[str] = field(default_factory=list)
    rss_series_mib: dict[str, list[float]] = field(default_factory=dict)
    # Where the orchestrator and the services kept their state during the phase: "sqlite" or "postgresql".
    database: str = "sqlite"
    services_database: str = "sqlite"
    # Two replicas' phase: sagas each replica ran over the window, by replica (bench.replicas).
    replicas: dict[str, Any] | None = None

    @property
    def completed(self) -> int:
        return self.outcomes.get(COMPLETED, 0)

    @property
    def cpu_ms_per_saga_total(self) -> float:
        values = [p.cpu_ms_per_saga for p in self.processes if not math.isnan(p.cpu_ms_per_saga)]
        return sum(values) if values else math.nan

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "load": {
                "mode": "open" if self.load.rate else "closed",
                "concurrency": self.load.concurrency if not self.load.rate else None,
                "rate": self.load.rate,
                "warmup_s": self.load.warmup,
                "window_s": _round(self.window_seconds),
            },
            "round": self.round,
            "database": self.database,
            "services_database": self.services_database,
            "outcomes": dict(self.outcomes),
            "completed_per_s": _round(self.completed_per_second),
            "start_latency": self.start_latency.as_dict() if self.start_latency else None,
            "completion_latency": self.completion_latency.as_dict(),
            "cpu_ms_per_saga_total": _round(self.cpu_ms_per_saga_total),
            "processes": {p.name: p.as_dict() for p in self.processes},
            "load_average_1m": {"start": _round(self.load_average[0]), "end": _round(self.load_average[1])},
            "errors": self.errors[:10],
            "rss_series_mib": self.rss_series_mib,
            "replicas": self.replicas,
        }


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 3)


# -- the orchestrator as a target -------------------------------------------------------------


class WaitMode(StrEnum):
    """How the client learns that a saga ended."""

    # PlaceOrderAndWait: one call that answers with the outcome, the way the docs tell a client to wait.
    CALL = "call"
    # PlaceOrder, then WatchSaga until the stream carries the end: the way before PlaceOrderAndWait.
    WATCH = "watch"


class OrchestratorTarget:
    """The order saga through the orchestrator's public API, waiting for its end the way `wait` names.

    CALL: one PlaceOrderAndWait per saga (completion is its answer; no separate start). WATCH:
    PlaceOrder (start latency), then WatchSaga asked only for events after `after_seq`, the history
    length of a saga that has just started, so the stream sends the last events alone (the final
    one carries the status) rather than the whole history.
    """

    def __init__(
        self, address: str, pids: dict[str, int], *, name: str = "orchestrator", wait: WaitMode = WaitMode.CALL
    ) -> None:
        self.name = name
        self.wait = wait
        self.has_start = wait is WaitMode.WATCH
        self._address = address
        self._pids = pids
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.OrchestratorServiceAsyncStub | None = None
        self.after_seq = 0

    async def open(self) -> None:
        self._channel = grpc.aio.insecure_channel(self._address, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.OrchestratorServiceStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)

    def processes(self) -> dict[str, int]:
        return dict(self._pids)

    async def run_one(self, order_id: str, due: float) -> SagaTiming:
        assert self._stub is not None
        if self.wait is WaitMode.CALL:
            answer = await self._stub.PlaceOrderAndWait(
                pb.PlaceOrderAndWaitRequest(order=bench_order(order_id)), timeout=WAIT_DEADLINE
            )
            ended = time.perf_counter()
            return SagaTiming(due, ended, ended, _status_name(answer.saga.status))
        response = await self._stub.PlaceOrder(bench_order(order_id), timeout=30)
        accepted = time.perf_counter()
        status = await self.wait_ended(response.saga_id)
        return SagaTiming(due, accepted, time.perf_counter(), status)

    async def wait_ended(self, saga_id: str) -> str:
        assert self._stub is not None
        status = pb.SAGA_STATUS_UNSPECIFIED
        stream = self._stub.WatchSaga(
            pb.WatchSagaRequest(saga_id=saga_id, after_seq=self.after_seq), timeout=WAIT_DEADLINE
        )
        async for message in stream:
            status = message.status
        if status not in _ENDED:
            # Nothing came after after_seq (it ended sooner than a normal saga could): ask once.
            saga = (await self._stub.GetSaga(pb.GetSagaRequest(saga_id=saga_id), timeout=30)).saga
            status = saga.status
        return _status_name(status)

    async def calibrate(self, order_id: str) -> None:
        """Run one saga (warm channels); in WATCH mode, watch later ones only for the events a saga adds at its end."""
        assert self._stub is not None
        if self.wait is WaitMode.CALL:
            await self.run_one(order_id, time.perf_counter())
            return
        response = await self._stub.PlaceOrder(bench_order(order_id), timeout=30)
        await self.wait_ended(response.saga_id)
        saga = (await self._stub.GetSaga(pb.GetSagaRequest(saga_id=response.saga_id), timeout=30)).saga
        if saga.status == pb.SAGA_STATUS_COMPLETED and saga.history:
            self.after_seq = max(0, saga.history[-1].seq - 1)


def _status_name(status: int) -> str:
    return _ENDED.get(status) or pb.SagaStatus.Name(status)  # type: ignore[call-overload]


# -- driving a phase --------------------------------------------------------------------------


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


class _Recorder:
    def __init__(self) -> None:
        self.timings: list[SagaTiming] = []
        self.errors: Counter[str] = Counter()
        self.error_samples: list[str] = []
        self.in_flight = 0
        self.started = 0

    def failed(self, error: BaseException) -> None:
        code = error.code().name if isinstance(error, grpc.aio.AioRpcError) else type(error).__name__
        self.errors[f"ERROR_{code}"] += 1
        if len(self.error_samples) < 10:
            self.error_samples.append(f"{type(error).__name__}: {error}"[:300])


async def _one(target: Target, order_id: str, due: float, recorder: _Recorder) -> bool:
    recorder.in_flight += 1
    recorder.started += 1
    try:
        recorder.timings.append(await target.run_one(order_id, due))
        return True
    except Exception as error:
        recorder.failed(error)
        return False
    finally:
        recorder.in_flight -= 1


ProgressCallback = Callable[[float, int], None]


async def _gather_within(work: Sequence[Coroutine[Any, Any, None]], limit: float) -> None:
    await asyncio.wait_for(asyncio.gather(*work), limit)


async def run_phase(
    target: Target,
    load: Load,
    *,
    round_number: int = 1,
    progress: ProgressCallback | None = None,
    rss_every: float = 1.0,
    database: str = "sqlite",
    services_database: str = "sqlite",
) -> PhaseResult:
    """Drive target for load.warmup + load.duration seconds; figures cover sagas ended in the last load.duration."""
    prefix = f"{target.name[:3]}-{uuid.uuid4().hex[:8]}"
    pids = {**target.processes(), "bench client": os.getpid()}
    for pid in pids.values():
        clear_peak_rss(pid)
    recorder = _Recorder()
    begin = time.perf_counter()
    # The window opens after the warm-up, and (closed loop) once every worker has finished a saga,
    # so a slow target is measured in its steady state, not while its pipeline fills.
    window_start = math.inf
    window_end = math.inf
    filled = load.concurrency if not load.rate else 0
    counter = 0

    def next_id() -> str:
        nonlocal counter
        counter += 1
        return f"{prefix}-{counter}"

    async def closed_worker() -> None:
        while time.perf_counter() < window_end:
            if not await _one(target, next_id(), time.perf_counter(), recorder):
                await asyncio.sleep(0.05)  # a failing target is not hammered

    async def open_scheduler() -> None:
        assert load.rate
        tasks: set[asyncio.Task[bool]] = set()
        interval = 1.0 / load.rate
        due = begin
        while due < window_end:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if recorder.in_flight < load.max_in_flight:
                task = asyncio.create_task(_one(target, next_id(), due, recorder))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            else:
                recorder.errors["SKIPPED_MAX_IN_FLIGHT"] += 1
            due += interval
        if tasks:
            await asyncio.wait(tasks, timeout=DRAIN_SECONDS)

    samples_start: dict[str, ProcessSample | None] = {}
    rss_series: dict[str, list[float]] = {name: [] for name in pids}
    load_start = math.nan

    async def sampler() -> None:
        nonlocal samples_start, load_start, window_start, window_end
        await asyncio.sleep(load.warmup)
        give_up = time.perf_counter() + MAX_EXTRA_WARMUP
        while len(recorder.timings) < filled and time.perf_counter() < give_up:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        window_start = time.perf_counter()
        window_end = window_start + load.duration
        samples_start = {name: read_process(pid) for name, pid in pids.items()}
        load_start = _load_average()
        if window_opened is not None:
            await window_opened()
        while time.perf_counter() < window_end:
            for name, pid in pids.items():
                sample = read_process(pid)
                if sample is not None:
                    rss_series[name].append(round(sample.rss_kib / 1024, 1))
            await asyncio.sleep(min(rss_every, max(0.0, window_end - time.perf_counter())))

    async def ticker() -> None:
        while True:
            if progress is not None:
                if math.isinf(window_start):
                    fraction = 0.0
                else:
                    fraction = (time.perf_counter() - window_start) / load.duration
                progress(min(1.0, fraction), len(recorder.timings))
            await asyncio.sleep(0.25)

    # A target that reports more than the common figures (bench.replicas) hears when the window opens and closes.
    window_opened = getattr(target, "window_opened", None)
    window_closed = getattr(target, "window_closed", None)
    sampling = asyncio.create_task(sampler())
    ticking = asyncio.create_task(ticker())
    try:
        limit = load.warmup + MAX_EXTRA_WARMUP + load.duration + DRAIN_SECONDS
        work = (
            open_scheduler() if load.rate else _gather_within([closed_worker() for _ in range(load.concurrency)], limit)
        )
        driver = asyncio.create_task(work)
        await sampling
        samples_end = {name: read_process(pid) for name, pid in pids.items()}
        load_end = _load_average()
        measured_end = time.perf_counter()
        detail = await window_closed(window_start, measured_end) if window_closed is not None else None
        await driver
    finally:
        ticking.cancel()
        sampling.cancel()
    in_window = [t for t in recorder.timings if window_start <= t.ended <= measured_end]
    outcomes = Counter(t.outcome for t in in_window)
    outcomes.update(recorder.errors)
    window = measured_end - window_start
    completed = [t for t in in_window if t.outcome == COMPLETED]
    figures: list[ProcessFigures] = []
    for name, pid in pids.items():
        before, after = samples_start.get(name), samples_end.get(name)
        spent = (after.cpu_ms - before.cpu_ms) if before and after else math.nan
        series = rss_series.get(name) or [math.nan]
        figures.append(
            ProcessFigures(
                name=name,
                pid=pid,
                cpu_ms_per_saga=cpu_ms_per_item(before, after, len(completed)),
                cpu_share=spent / (window * 1000) if window > 0 else math.nan,
                peak_rss_mib=(after.peak_rss_kib / 1024) if after else math.nan,
                rss_start_mib=series[0],
                rss_end_mib=series[-1],
            )
        )
    if progress is not None:
        progress(1.0, len(recorder.timings))
    return PhaseResult(
        target=target.name,
        load=load,
        round=round_number,
        window_seconds=window,
        outcomes=dict(outcomes),
        completed_per_second=len(completed) / window if window > 0 else math.nan,
        start_latency=summarize(t.start_latency for t in completed) if target.has_start else None,
        completion_latency=summarize(t.completion_latency for t in completed),
        processes=figures,
        load_average=(load_start, load_end),
        errors=recorder.error_samples,
        rss_series_mib=rss_series if load.duration >= 60 else {},
        database=database,
        services_database=services_database,
        replicas=detail,
    )


# -- a whole benchmark ------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """What `saga bench` runs: loads, targets, rounds and where the stack lives."""

    concurrencies: Sequence[int] = (32,)
    rate: float | None = None
    duration: float = 10.0
    warmup: float = 2.0
    rounds: int = 1
    database_url: str = ""
    data_dir: Path | None = None
    floor: bool = True
    orchestrator: bool = True
    # Also the same order saga from its YAML definition, on a replica of its own (SQLite only).
    yaml: bool = True
    # Also the orchestrator waited on the old way: PlaceOrder, then WatchSaga.
    watch: bool = False
    peers: Sequence[str] = ()
    # A PostgreSQL server (URL of a database to connect to): after the first pass, the stack runs
    # again with the orchestrator and the four services each on a fresh database of that server.
    compare_postgres: str = ""
    # In the pass whose orchestrator is on PostgreSQL (all-PostgreSQL when compare_postgres is set):
    # two replicas on its database, the client alternating between them (bench.replicas).
    replicas: bool = False
    # Then: kill -9 one of two loaded replicas and time the takeover of its sagas.
    takeover: bool = False
    takeover_concurrency: int = 8
    # After the passes: bench.long_running on a stack of its own with this many parked sagas (0: not run).
    long_running: int = 0
    log_level: str = "WARNING"
    stack_env: dict[str, str] = field(default_factory=dict)

    def loads(self) -> list[Load]:
        if self.rate:
            return [Load(concurrency=0, rate=self.rate, warmup=self.warmup, duration=self.duration)]
        return [Load(concurrency=c, warmup=self.warmup, duration=self.duration) for c in self.concurrencies]


@dataclass
class BenchReport:
    """Every phase of a run, the targets of issue 15 checked against them, plus what the run was."""

    config: dict[str, Any]
    phases: list[PhaseResult]
    notes: list[str] = field(default_factory=list)
    # bench.replicas.measure_takeover's figures, and bench.long_running's report (None: not run).
    takeover: dict[str, Any] | None = None
    long_running: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        from bench.goals import evaluate_goals

        phases = [p.as_dict() for p in self.phases]
        goals = evaluate_goals(phases, takeover=self.takeover, long_running=self.long_running)
        return {
            "config": self.config,
            "phases": phases,
            "takeover": self.takeover,
            "long_running": self.long_running,
            "targets": [goal.as_dict() for goal in goals],
            "notes": list(dict.fromkeys(self.notes)),
        }


PhaseStarted = Callable[[str, Load, int], ProgressCallback | None]


@dataclass(frozen=True)
class _Setup:
    """Where one pass keeps its state, for labels and the report."""

    database: str
    services_database: str

    @property
    def label(self) -> str:
        if self.database == self.services_database == "sqlite":
            return ""
        if self.database == self.services_database:
            return f" [{self.database}]"
        return f" [orchestrator on {self.database}]"


async def _run_groups(
    groups: Sequence[TargetGroup], config: BenchConfig, setup: _Setup, on_phase: PhaseStarted | None
) -> list[PhaseResult]:
    """Load by load, round by round, group by group: each group's processes run only for its own phases.

    A peer is started before its targets' phases of a round and stopped after them, so no idle
    server or worker (or, for DBOS, background thread in this process) shares the machine with
    another target's measured window.
    """
    results: list[PhaseResult] = []
    loop = asyncio.get_running_loop()
    # A pool of its own for the blocking starts and stops: DBOS shuts the loop's default one down.
    with ThreadPoolExecutor(1, thread_name_prefix="bench-group") as blocking:
        for load in config.loads():
            for round_number in range(1, config.rounds + 1):
                for group in groups:
                    targets = list(await loop.run_in_executor(blocking, group.start))
                    try:
                        results.extend(await _run_group(targets, load, round_number, setup, on_phase))
                    finally:
                        await loop.run_in_executor(blocking, group.stop)
    return results


async def _run_group(
    targets: Sequence[Target], load: Load, round_number: int, setup: _Setup, on_phase: PhaseStarted | None
) -> list[PhaseResult]:
    """Open a started group's targets, warm each with one saga, run each for one phase, close them."""
    results: list[PhaseResult] = []
    opened: list[Target] = []
    try:
        for target in targets:
            await target.open()
            opened.append(target)
        for target in targets:
            calibrate = getattr(target, "calibrate", None)
            if calibrate is not None:
                await calibrate(f"calibrate-{uuid.uuid4().hex[:8]}")
        for target in targets:
            progress = on_phase(target.name + setup.label, load, round_number) if on_phase else None
            phase = await run_phase(
                target,
                load,
                round_number=round_number,
                progress=progress,
                database=setup.database,
                services_database=setup.services_database,
            )
            results.append(phase)
    finally:
        for target in opened:
            await target.close()
    return results


# The suite's YAML definitions, shipped with the orchestrator package.
YAML_DEFINITIONS = Path(__file__).resolve().parent.parent / "orchestrator" / "sagas" / "yaml"
KNOWN_PEERS = ("temporal", "dbos", "restate")


def _peer_groups(config: BenchConfig, data_dir: Path) -> list[PeerGroup]:
    groups: list[PeerGroup] = []
    group: PeerGroup
    for peer in config.peers:
        if peer == "temporal":
            from bench.peers.temporal import TemporalPeer

            group = TemporalPeer(data_dir / "temporal", log_level=config.log_level)
        elif peer == "dbos":
            from bench.peers.dbos_peer import DbosPeer

            group = DbosPeer(data_dir / "dbos", config.database_url)
        elif peer == "restate":
            from bench.peers.restate_peer import RestatePeer

            group = RestatePeer(data_dir / "restate", log_level=config.log_level)
        else:
            raise ValueError(f"unknown peer {peer!r}; known: {', '.join(KNOWN_PEERS)}")
        groups.append(group)
    return groups


def _run_pass(
    config: BenchConfig,
    stack_dir: Path,
    setup: _Setup,
    database_urls: dict[str, str],
    peer_groups: Sequence[PeerGroup],
    on_phase: PhaseStarted | None,
    notes: list[str],
    extras: dict[str, Any],
) -> list[PhaseResult]:
    """Start one local stack, run its own targets and the peers' (each group only for its phases), stop it.

    In the pass whose orchestrator is on PostgreSQL (the all-PostgreSQL one when there are two), the
    two-replica phases run as a group of their own and the takeover after every phase, into extras.
    """
    from bench.floor import FloorTarget
    from bench.replicas import PRIMARY_REPLICA_ID, REPLICA_ENV, ReplicasGroup, measure_takeover

    common = {"LOG_LEVEL": config.log_level, **config.stack_env}
    # The floor and the peers make the four calls in a row: that is OrderSaga v1, not the
    # latest (v2 runs two of them in parallel and ships in a child saga).
    orchestrator_env = {"ORDER_SAGA_VERSION": "1", **config.stack_env}
    replicated = setup.database == "postgresql" and (
        setup.services_database == "postgresql" or not config.compare_postgres
    )
    if replicated and (config.replicas or config.takeover):
        orchestrator_env = {**REPLICA_ENV, "REPLICA_ID": PRIMARY_REPLICA_ID, **orchestrator_env}
    stack = LocalStack(
        StackConfig(
            stack_dir,
            orchestrator_database_url=database_urls.get("orchestrator", ""),
            service_env={name: {"DATABASE_URL": url} for name, url in database_urls.items() if name != "orchestrator"},
            common_env=common,
            orchestrator_env=orchestrator_env,
        )
    )
    with ExitStack() as scope:
        scope.callback(stack.stop)
        stack.start()
        service_pids = {name: process.pid for name, process in stack.services.items() if process.pid}
        addresses = {name: process.address for name, process in stack.services.items()}
        ours: list[Target] = []
        if config.floor:
            ours.append(FloorTarget(addresses, service_pids))
        if config.orchestrator:
            assert stack.orchestrator is not None and stack.orchestrator.pid
            pids = {**service_pids, "orchestrator": stack.orchestrator.pid}
            ours.append(OrchestratorTarget(stack.address, pids))
            if config.watch:
                ours.append(OrchestratorTarget(stack.address, pids, name="orchestrator-watch", wait=WaitMode.WATCH))
        if config.orchestrator and config.yaml and setup.database == "sqlite":
            # Its own SQLite file, so neither replica takes the other's sagas; it idles while the
            # Python one is measured, and the other way round.
            yaml_env = {
                "SAGA_DEFINITIONS_DIR": str(YAML_DEFINITIONS),
                "DATABASE_URL": f"sqlite:///{stack_dir / 'orchestrator-yaml.db'}",
                "REPLICA_ID": "bench-yaml",
            }
            yaml_replica = stack.add_orchestrator("orchestrator-yaml", yaml_env)
            scope.callback(yaml_replica.stop)
            assert yaml_replica.pid
            notes.append(f"orchestrator-yaml runs OrderSaga v1 from {YAML_DEFINITIONS.name}/order-v1.yaml")
            pids = {**service_pids, "orchestrator": yaml_replica.pid}
            ours.append(OrchestratorTarget(yaml_replica.address, pids, name="orchestrator-yaml"))
        groups: list[TargetGroup] = [ResidentGroup("suite", ours)]
        if replicated and config.replicas:
            groups.append(ReplicasGroup(stack, service_pids))
        for group in peer_groups:
            # The peers learn the services' addresses only now that they run.
            group.bind(addresses, service_pids)
            groups.append(group)
        phases = asyncio.run(_run_groups(groups, config, setup, on_phase))
        if replicated and config.takeover:
            load = Load(concurrency=config.takeover_concurrency)
            progress = on_phase(f"takeover (kill -9){setup.label}", load, 1) if on_phase else None
            extras["takeover"] = measure_takeover(stack, database_urls["orchestrator"], config.takeover_concurrency)
            if progress is not None:
                progress(1.0, extras["takeover"]["client"]["completed"])
        for ran in groups:
            notes.extend(ran.notes)
        for target in ours:
            notes.extend(getattr(target, "notes", []))
    return phases


class _PostgresDatabases:
    """Fresh databases on one PostgreSQL server, one per process, dropped at the end."""

    def __init__(self, url: str, names: Sequence[str]) -> None:
        import sqlalchemy

        self._admin = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
        run = uuid.uuid4().hex[:8]
        base = url.rsplit("/", 1)[0]
        self.databases = {name: f"sagabench_{run}_{name}" for name in names}
        self.urls = {name: f"{base}/{database}" for name, database in self.databases.items()}

    def __enter__(self) -> dict[str, str]:
        try:
            with self._admin.connect() as connection:
                for database in self.databases.values():
                    connection.exec_driver_sql(f'CREATE DATABASE "{database}"')
        except Exception as error:
            self.__exit__()
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise RuntimeError(f"--compare-postgres: cannot create the bench databases: {first}") from None
        return self.urls

    def __exit__(self, *exc: object) -> None:
        try:
            with self._admin.connect() as connection:
                for database in self.databases.values():
                    connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        except Exception:
            pass  # the server went away: nothing more to clean
        self._admin.dispose()


def run_benchmark(config: BenchConfig, on_phase: PhaseStarted | None = None) -> BenchReport:
    """Start the local stack, run every target under every load (peers only for their own phases), stop everything.

    With compare_postgres, a second pass then runs the floor and the orchestrator on a stack whose
    orchestrator and services each have a fresh PostgreSQL database, as compose runs them.
    """
    from svckit.discovery import SUITE_SERVICES

    notes = [f"services and orchestrator run with LOG_LEVEL={config.log_level}"]
    notes.append(
        "PlaceOrder starts OrderSaga v1 (ORDER_SAGA_VERSION); orchestrator targets wait with PlaceOrderAndWait "
        f"(deadline {WAIT_DEADLINE:.0f} s), orchestrator-watch with PlaceOrder + WatchSaga"
    )
    with ExitStack() as scope:
        data_dir = config.data_dir or Path(scope.enter_context(tempfile.TemporaryDirectory(prefix="saga-bench-")))
        peer_groups = _peer_groups(config, data_dir)
        for group in peer_groups:
            # Before any stack starts: a missing package or a failed install ends the run at once.
            group.prepare()
        first_db = "postgresql" if config.database_url.startswith("postgresql") else "sqlite"
        first_urls = {"orchestrator": config.database_url} if config.database_url else {}
        extras: dict[str, Any] = {}
        phases = _run_pass(
            config, data_dir / "stack", _Setup(first_db, "sqlite"), first_urls, peer_groups, on_phase, notes, extras
        )
        if config.compare_postgres:
            databases = scope.enter_context(
                _PostgresDatabases(config.compare_postgres, ["orchestrator", *SUITE_SERVICES])
            )
            second = replace(config, yaml=False, peers=(), database_url=databases["orchestrator"])
            all_postgresql = _Setup("postgresql", "postgresql")
            more = _run_pass(
                second, data_dir / "stack-postgresql", all_postgresql, databases, [], on_phase, notes, extras
            )
            phases.extend(more)
            notes.append("the [postgresql] pass ran after the first, on a stack of its own: the orchestrator and "
                         "each service on a fresh database of the --compare-postgres server")  # fmt: skip
        if config.long_running > 0:
            extras["long_running"] = _long_running(config, data_dir / "long-running", on_phase)
    described = {
        "database": first_db,
        "compare_postgres": bool(config.compare_postgres),
        "loads": [load.label for load in config.loads()],
        "warmup_s": config.warmup,
        "duration_s": config.duration,
        "rounds": config.rounds,
        "targets": list(dict.fromkeys(p.target for p in phases)),
        "peers": list(config.peers),
        "replicas": config.replicas,
        "takeover": config.takeover,
        "long_running_sagas": config.long_running,
        "cpus": os.cpu_count(),
    }
    return BenchReport(described, phases, notes, extras.get("takeover"), extras.get("long_running"))


def _long_running(config: BenchConfig, data_dir: Path, on_phase: PhaseStarted | None) -> dict[str, Any]:
    """A short bench.long_running on a stack of its own, after every other phase (the orchestrator's database)."""
    from bench.long_running import LongRunningConfig, run_long_running

    progress = on_phase(f"long-running ({config.long_running} parked)", Load(concurrency=64), 1) if on_phase else None
    short = LongRunningConfig(
        sagas=config.long_running,
        timers=max(1, config.long_running // 2),
        concurrency=64,
        # 5 s of idle CPU for the 2,000 parked sagas of a real run; a second for a test's few dozen.
        idle_window=min(5.0, max(1.0, config.long_running / 400)),
        warmup=min(200, config.long_running // 10),
        database_url=config.database_url,
        data_dir=data_dir,
        log_level=config.log_level,
    )
    report = run_long_running(short)
    if progress is not None:
        progress(1.0, config.long_running + short.timers)
    return report
