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
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.stats import LatencySummary, ProcessSample, clear_peak_rss, cpu_ms_per_item, read_process, summarize
from bench.targets import CHANNEL_OPTIONS, COMPLETED, SagaTiming, Target, bench_order
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
    "bench_order",
    "run_benchmark",
    "run_phase",
]

# Seconds a phase waits for its stragglers after the window before the next phase starts.
DRAIN_SECONDS = 60.0
# Longest wait, past the warm-up, for every closed-loop worker to finish its first saga.
MAX_EXTRA_WARMUP = 60.0
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
            "outcomes": dict(self.outcomes),
            "completed_per_s": _round(self.completed_per_second),
            "start_latency": self.start_latency.as_dict() if self.start_latency else None,
            "completion_latency": self.completion_latency.as_dict(),
            "cpu_ms_per_saga_total": _round(self.cpu_ms_per_saga_total),
            "processes": {p.name: p.as_dict() for p in self.processes},
            "load_average_1m": {"start": _round(self.load_average[0]), "end": _round(self.load_average[1])},
            "errors": self.errors[:10],
            "rss_series_mib": self.rss_series_mib,
        }


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 3)


# -- the orchestrator as a target -------------------------------------------------------------


class OrchestratorTarget:
    """PlaceOrder, then WatchSaga until the saga ends: start latency is PlaceOrder's, completion the stream's end.

    WatchSaga is asked only for events after `after_seq`, the history length of a saga that has
    just started, so the stream sends the last events alone (the final one carries the status)
    rather than the whole history: the orchestrator reads one saga row and a few events per wake.
    """

    has_start = True

    def __init__(self, address: str, pids: dict[str, int], *, name: str = "orchestrator") -> None:
        self.name = name
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
        response = await self._stub.PlaceOrder(bench_order(order_id), timeout=30)
        accepted = time.perf_counter()
        status = await self.wait_ended(response.saga_id)
        return SagaTiming(due, accepted, time.perf_counter(), status)

    async def wait_ended(self, saga_id: str) -> str:
        assert self._stub is not None
        status = pb.SAGA_STATUS_UNSPECIFIED
        stream = self._stub.WatchSaga(pb.WatchSagaRequest(saga_id=saga_id, after_seq=self.after_seq), timeout=120)
        async for message in stream:
            status = message.status
        if status not in _ENDED:
            # Nothing came after after_seq (it ended sooner than a normal saga could): ask once.
            saga = (await self._stub.GetSaga(pb.GetSagaRequest(saga_id=saga_id), timeout=30)).saga
            status = saga.status
        return _ENDED.get(status, pb.SagaStatus.Name(status))

    async def calibrate(self, order_id: str) -> None:
        """Run one saga, and watch later ones only for the events a completed saga adds at its end."""
        assert self._stub is not None
        response = await self._stub.PlaceOrder(bench_order(order_id), timeout=30)
        await self.wait_ended(response.saga_id)
        saga = (await self._stub.GetSaga(pb.GetSagaRequest(saga_id=response.saga_id), timeout=30)).saga
        if saga.status == pb.SAGA_STATUS_COMPLETED and saga.history:
            self.after_seq = max(0, saga.history[-1].seq - 1)


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
    peers: Sequence[str] = ()
    log_level: str = "WARNING"
    stack_env: dict[str, str] = field(default_factory=dict)

    def loads(self) -> list[Load]:
        if self.rate:
            return [Load(concurrency=0, rate=self.rate, warmup=self.warmup, duration=self.duration)]
        return [Load(concurrency=c, warmup=self.warmup, duration=self.duration) for c in self.concurrencies]


@dataclass
class BenchReport:
    """Every phase of a run, plus what the run was."""

    config: dict[str, Any]
    phases: list[PhaseResult]
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"config": self.config, "phases": [p.as_dict() for p in self.phases], "notes": self.notes}


PhaseStarted = Callable[[str, Load, int], ProgressCallback | None]


async def _run_targets(
    targets: Sequence[Target], config: BenchConfig, on_phase: PhaseStarted | None
) -> list[PhaseResult]:
    results: list[PhaseResult] = []
    for target in targets:
        await target.open()
    try:
        for target in targets:
            calibrate = getattr(target, "calibrate", None)
            if calibrate is not None:
                await calibrate(f"calibrate-{uuid.uuid4().hex[:8]}")
        for load in config.loads():
            for round_number in range(1, config.rounds + 1):
                for target in targets:
                    progress = on_phase(target.name, load, round_number) if on_phase else None
                    results.append(await run_phase(target, load, round_number=round_number, progress=progress))
    finally:
        for target in targets:
            await target.close()
    return results


# The suite's YAML definitions, shipped with the orchestrator package.
YAML_DEFINITIONS = Path(__file__).resolve().parent.parent / "orchestrator" / "sagas" / "yaml"


def run_benchmark(config: BenchConfig, on_phase: PhaseStarted | None = None) -> BenchReport:
    """Start the local stack (and any peer), run every target under every load, stop everything."""
    from bench.floor import FloorTarget

    notes = [f"services and orchestrator run with LOG_LEVEL={config.log_level}"]
    with ExitStack() as stack_scope:
        data_dir = config.data_dir or Path(stack_scope.enter_context(tempfile.TemporaryDirectory(prefix="saga-bench-")))
        common = {"LOG_LEVEL": config.log_level, **config.stack_env}
        # The floor and the peers make the four calls in a row: that is OrderSaga v1, not the
        # latest (v2 runs two of them in parallel and ships in a child saga).
        orchestrator_env = {"ORDER_SAGA_VERSION": "1", **config.stack_env}
        stack = LocalStack(
            StackConfig(
                data_dir / "stack",
                orchestrator_database_url=config.database_url,
                common_env=common,
                orchestrator_env=orchestrator_env,
            )
        )
        notes.append(f"PlaceOrder starts OrderSaga v{orchestrator_env['ORDER_SAGA_VERSION']} (ORDER_SAGA_VERSION)")
        stack_scope.callback(stack.stop)
        stack.start()
        service_pids = {name: process.pid for name, process in stack.services.items() if process.pid}
        addresses = {name: process.address for name, process in stack.services.items()}
        targets: list[Target] = []
        if config.floor:
            targets.append(FloorTarget(addresses, service_pids))
        if config.orchestrator:
            assert stack.orchestrator is not None and stack.orchestrator.pid
            targets.append(OrchestratorTarget(stack.address, {**service_pids, "orchestrator": stack.orchestrator.pid}))
        if config.orchestrator and config.yaml and not config.database_url:
            # Its own SQLite file, so neither replica takes the other's sagas; it idles while the
            # Python one is measured, and the other way round.
            yaml_env = {
                "SAGA_DEFINITIONS_DIR": str(YAML_DEFINITIONS),
                "DATABASE_URL": f"sqlite:///{data_dir / 'stack' / 'orchestrator-yaml.db'}",
                "REPLICA_ID": "bench-yaml",
            }
            yaml_replica = stack.add_orchestrator("orchestrator-yaml", yaml_env)
            stack_scope.callback(yaml_replica.stop)
            assert yaml_replica.pid
            notes.append(f"orchestrator-yaml runs OrderSaga v1 from {YAML_DEFINITIONS.name}/order-v1.yaml")
            pids = {**service_pids, "orchestrator": yaml_replica.pid}
            targets.append(OrchestratorTarget(yaml_replica.address, pids, name="orchestrator-yaml"))
        for peer in config.peers:
            if peer == "temporal":
                from bench.peers.temporal import TemporalPeer

                temporal = stack_scope.enter_context(TemporalPeer(data_dir / "temporal", addresses, config.log_level))
                targets.extend(temporal.targets(service_pids))
                notes.extend(temporal.notes)
            elif peer == "dbos":
                from bench.peers.dbos_peer import DbosTarget

                dbos = DbosTarget(data_dir / "dbos", config.database_url, addresses, service_pids)
                targets.append(dbos)
            else:
                raise ValueError(f"unknown peer {peer!r}; known: temporal, dbos")
        phases = asyncio.run(_run_targets(targets, config, on_phase))
        for target in targets:
            notes.extend(getattr(target, "notes", []))
    described = {
        "database": "postgresql" if config.database_url.startswith("postgresql") else "sqlite",
        "loads": [load.label for load in config.loads()],
        "warmup_s": config.warmup,
        "duration_s": config.duration,
        "rounds": config.rounds,
        "targets": [t.name for t in targets],
        "cpus": os.cpu_count(),
    }
    return BenchReport(described, phases, notes)
