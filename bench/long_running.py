"""Long-running sagas on a real local stack: memory and idle CPU of parked sagas, signal and timer throughput.

Run: .venv/bin/python -m bench.long_running [--sagas 100000] [--timers 10000] [--database-url URL]

What it does, on a fresh local stack (devstack; the orchestrator on SQLite unless --database-url):

1. Starts --sagas sagas of `BenchParked` (bench/long_running_definitions.py) with StartSaga,
   --concurrency calls in flight. Its only node is a signal wait (timeout one hour), so a started
   saga is parked at once and no service call is in any figure. Prints the start rate, the
   orchestrator's VmRSS before the starts and once all are parked, and its CPU over --idle-window
   seconds while they wait (utime + stime from /proc, as % of one core).
2. Signals every one of them (SignalSaga, the same concurrency): signals/s accepted, then the time
   from the first signal until none is in flight (ListSagas, polled every --poll-interval seconds
   once the signals are sent), completions/s, and GetSagaStats's counts by status then.
3. Starts --timers sagas of `BenchTimer`, whose only node is a timer until `wake_at` from the input:
   every one the same instant, a whole second far enough ahead that all are started before it.
   Lateness is the TimerFired event's time minus `wake_at`, from each saga's history (GetSaga):
   p50 / p99 / max, how long after `wake_at` the last one fired, and the orchestrator's CPU then.

A short warm-up (--warmup sagas of phase 1, started and signalled to the end) runs first, so the
"before" RSS already holds what the first calls load (code, caches), not only an idle process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import resource
import sqlite3
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2

from bench.long_running_definitions import PARKED_SAGA, PARKED_SIGNAL, TIMER_SAGA
from bench.stats import parse_status_kib, percentile, read_process
from bench.targets import CHANNEL_OPTIONS
from devstack.stack import LocalStack, StackConfig
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc

__all__ = ["LongRunningConfig", "main", "run_long_running"]

_REPO_ROOT = Path(__file__).resolve().parent.parent
_DEFINITIONS = "bench.long_running_definitions:LONG_RUNNING_DEFINITIONS"
# Answers after which the same call (same business key, same signal id) is simply sent again.
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
_ATTEMPTS = 5
_CALL_TIMEOUT = 60.0
_IN_FLIGHT = [pb.SAGA_STATUS_RUNNING, pb.SAGA_STATUS_COMPENSATING, pb.SAGA_STATUS_PAUSED]


@dataclass
class LongRunningConfig:
    """What one run does: how many sagas and timers, at what concurrency, on which database."""

    sagas: int = 100_000
    timers: int = 10_000
    concurrency: int = 64
    idle_window: float = 30.0
    poll_interval: float = 0.5
    warmup: int = 200
    database_url: str = ""
    data_dir: Path | None = None
    log_level: str = "WARNING"
    # Extra orchestrator settings (e.g. POLL_INTERVAL_SECONDS), to see what one of them changes.
    orchestrator_env: dict[str, str] = field(default_factory=dict)


@dataclass
class _Calls:
    """Latencies and failures of one batch of calls made with bounded concurrency."""

    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    elapsed: float = math.nan

    def figures(self, what: str) -> dict[str, Any]:
        count = len(self.latencies)
        return {
            what: count,
            "seconds": _round(self.elapsed),
            "per_s": _round(count / self.elapsed) if self.elapsed > 0 else None,
            "latency_p50_ms": _round(percentile(self.latencies, 0.5) * 1000),
            "latency_p99_ms": _round(percentile(self.latencies, 0.99) * 1000),
            "retries": self.retries,
            "errors": dict(self.errors),
        }


def _round(value: float, digits: int = 3) -> float | None:
    return None if math.isnan(value) else round(value, digits)


async def _bounded(count: int, concurrency: int, call: Callable[[int], Awaitable[object]]) -> _Calls:
    """call(0) .. call(count - 1), concurrency at a time; a retryable refusal is sent again (calls are idempotent)."""
    calls = _Calls()
    indexes = iter(range(count))

    async def worker() -> None:
        for index in indexes:
            for attempt in range(1, _ATTEMPTS + 1):
                sent = time.perf_counter()
                try:
                    await call(index)
                except grpc.aio.AioRpcError as error:
                    if error.code() in _RETRYABLE and attempt < _ATTEMPTS:
                        calls.retries += 1
                        await asyncio.sleep(0.1 * attempt)
                        continue
                    calls.errors[error.code().name] += 1
                    break
                calls.latencies.append(time.perf_counter() - sent)
                break

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, count) or 1)))
    calls.elapsed = time.perf_counter() - began
    return calls


def _start_request(saga_type: str, key: str, **fields: float) -> pb.StartSagaRequest:
    body = struct_pb2.Struct()
    body.update({"key": key, **fields})
    request = pb.StartSagaRequest(saga_type=saga_type, business_key=key)
    request.input.Pack(body)
    return request


# -- the orchestrator process, from /proc ------------------------------------------------------


def _memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and its parts (anonymous memory, mapped files) of a live process, in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return {key: parse_status_kib(status, key) for key in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}


def _mib(kib: int) -> float:
    return round(kib / 1024, 1)


def _cpu_ms(pid: int) -> float:
    sample = read_process(pid)
    if sample is None:
        raise RuntimeError(f"the orchestrator (pid {pid}) is gone")
    return sample.cpu_ms


def _own_cpu_ms() -> float:
    used = resource.getrusage(resource.RUSAGE_SELF)
    return (used.ru_utime + used.ru_stime) * 1000


def _load_average() -> float:
    return round(os.getloadavg()[0], 2)


# -- the run -----------------------------------------------------------------------------------


class _Run:
    """One run's client, its orchestrator's pid and the report it fills in."""

    def __init__(self, config: LongRunningConfig, stub: pb_grpc.OrchestratorServiceAsyncStub, pid: int) -> None:
        self.config = config
        self.stub = stub
        self.pid = pid
        self.prefix = uuid.uuid4().hex[:8]
        self.report: dict[str, Any] = {}

    async def counts(self) -> dict[str, int]:
        """Sagas by status (GetSagaStats): read once a phase has ended, never polled (see wait_ended)."""
        stats = await self.stub.GetSagaStats(pb.GetSagaStatsRequest(), timeout=_CALL_TIMEOUT)
        return {pb.SagaStatus.Name(c.status).removeprefix("SAGA_STATUS_"): c.count for c in stats.counts}

    async def wait_ended(self, saga_type: str, limit: float) -> float:
        """Poll until no saga of saga_type is in flight; the perf_counter time it was seen.

        ListSagas for one in-flight saga is an indexed read (status, created_at). GetSagaStats
        counts every row, which at 100,000 sagas holds a SQLite orchestrator's event loop for
        about half a second a call: polled, it would slow down what it measures.
        """
        request = pb.ListSagasRequest(saga_type=saga_type, statuses=_IN_FLIGHT, page_size=1)
        give_up = time.perf_counter() + limit
        while time.perf_counter() < give_up:
            if not (await self.stub.ListSagas(request, timeout=_CALL_TIMEOUT)).sagas:
                return time.perf_counter()
            await asyncio.sleep(self.config.poll_interval)
        raise TimeoutError(f"{saga_type} sagas still in flight after {limit:.0f} s: {await self.counts()}")

    def parked_key(self, phase: str, index: int) -> str:
        return f"lr-{self.prefix}-{phase}-{index}"

    async def start_parked(self, phase: str, count: int) -> tuple[_Calls, list[str]]:
        saga_ids: list[str] = [""] * count

        async def start(index: int) -> None:
            request = _start_request(PARKED_SAGA.name, self.parked_key(phase, index))
            saga_ids[index] = (await self.stub.StartSaga(request, timeout=_CALL_TIMEOUT)).saga_id

        return await _bounded(count, self.config.concurrency, start), saga_ids

    async def signal_all(self, saga_ids: list[str]) -> _Calls:
        async def signal(index: int) -> None:
            request = pb.SignalSagaRequest(saga_id=saga_ids[index], name=PARKED_SIGNAL, signal_id=f"go-{index}")
            await self.stub.SignalSaga(request, timeout=_CALL_TIMEOUT)

        return await _bounded(len(saga_ids), self.config.concurrency, signal)

    async def warm_up(self) -> None:
        count = self.config.warmup
        if count <= 0:
            return
        _, saga_ids = await self.start_parked("warmup", count)
        await self.signal_all([s for s in saga_ids if s])
        await self.wait_ended(PARKED_SAGA.name, 120)

    async def parked(self) -> list[str]:
        """Phase 1: start the sagas, read RSS before and after, then CPU over the idle window."""
        count = self.config.sagas
        memory_before = _memory_kib(self.pid)
        cpu_before, client_before = _cpu_ms(self.pid), _own_cpu_ms()
        load_before = _load_average()
        starts, saga_ids = await self.start_parked("parked", count)
        cpu_after, client_after = _cpu_ms(self.pid), _own_cpu_ms()
        counts = await self.counts()
        memory_parked = _memory_kib(self.pid)
        # One GetSagaStats at this table size: what a dashboard that polls the counts costs.
        stats_began = time.perf_counter()
        await self.counts()
        stats_ms = (time.perf_counter() - stats_began) * 1000
        # The idle window: nothing is asked of the orchestrator while the sagas wait.
        await asyncio.sleep(2.0)
        idle_cpu, idle_began, idle_load_before = _cpu_ms(self.pid), time.perf_counter(), _load_average()
        await asyncio.sleep(self.config.idle_window)
        idle_spent, idle_elapsed = _cpu_ms(self.pid) - idle_cpu, time.perf_counter() - idle_began
        memory_idle = _memory_kib(self.pid)
        started = len(starts.latencies)
        self.report["parked"] = {
            **starts.figures("started"),
            "orchestrator_cpu_ms_per_start": _round((cpu_after - cpu_before) / started) if started else None,
            "client_cpu_ms_per_start": _round((client_after - client_before) / started) if started else None,
            "status_counts_after_starts": counts,
            "rss_before_mib": _mib(memory_before["VmRSS"]),
            "rss_parked_mib": _mib(memory_parked["VmRSS"]),
            "rss_after_idle_mib": _mib(memory_idle["VmRSS"]),
            "rss_anon_before_mib": _mib(memory_before["RssAnon"]),
            "rss_anon_parked_mib": _mib(memory_parked["RssAnon"]),
            "rss_file_before_mib": _mib(memory_before["RssFile"]),
            "rss_file_parked_mib": _mib(memory_parked["RssFile"]),
            "peak_rss_mib": _mib(memory_idle["VmHWM"]),
            "bytes_per_parked_saga": _round((memory_parked["VmRSS"] - memory_before["VmRSS"]) * 1024 / started, 0)
            if started
            else None,
            "get_saga_stats_ms": _round(stats_ms, 1),
            "idle_window_s": _round(idle_elapsed, 1),
            "idle_cpu_percent_of_core": _round(100 * idle_spent / (idle_elapsed * 1000), 2),
            "idle_cpu_ms": _round(idle_spent, 0),
            "load_average_1m": {"starts": load_before, "idle": idle_load_before, "after": _load_average()},
        }
        return [s for s in saga_ids if s]

    async def signalled(self, saga_ids: list[str]) -> None:
        """Phase 2: signal every parked saga, then wait until none is in flight; counts by status then."""
        cpu_before, client_before, load_before = _cpu_ms(self.pid), _own_cpu_ms(), _load_average()
        began = time.perf_counter()
        # No saga can complete before its signal is accepted, so the poll starts once all are sent.
        signals = await self.signal_all(saga_ids)
        done_at = await self.wait_ended(PARKED_SAGA.name, max(600.0, len(saga_ids) / 50))
        cpu_spent, client_spent = _cpu_ms(self.pid) - cpu_before, _own_cpu_ms() - client_before
        total = done_at - began
        accepted = len(signals.latencies)
        self.report["signalled"] = {
            **signals.figures("signals"),
            "all_ended_after_s": _round(total, 2),
            "completions_per_s": _round(len(saga_ids) / total, 1),
            "orchestrator_cpu_ms_per_saga": _round(cpu_spent / accepted) if accepted else None,
            "client_cpu_ms_per_saga": _round(client_spent / accepted) if accepted else None,
            "rss_after_mib": _mib(_memory_kib(self.pid)["VmRSS"]),
            "load_average_1m": {"start": load_before, "end": _load_average()},
            "status_counts_after": await self.counts(),
        }

    async def timers(self, starts_per_s: float) -> None:
        """Phase 3: timers all due at one instant; lateness from each saga's TimerFired event."""
        count = self.config.timers
        # Far enough ahead that every start has returned before the timers are due, at half the
        # rate phase 1 measured (the timer's input is larger), and at least 10 s.
        lead = max(10.0, 2 * count / starts_per_s + 5) if starts_per_s > 0 else max(10.0, count / 200)
        wake_at = float(math.ceil(time.time() + lead))
        saga_ids: list[str] = [""] * count
        load_before = _load_average()

        async def start(index: int) -> None:
            request = _start_request(TIMER_SAGA.name, f"lr-{self.prefix}-timer-{index}", wake_at=wake_at)
            saga_ids[index] = (await self.stub.StartSaga(request, timeout=_CALL_TIMEOUT)).saga_id

        starts = await _bounded(count, self.config.concurrency, start)
        started_by = time.time()
        started = [s for s in saga_ids if s]
        # The orchestrator's CPU from the due time until the last saga ended: whether it was busy.
        await asyncio.sleep(max(0.0, wake_at - time.time()))
        cpu_at_due, due_clock = _cpu_ms(self.pid), time.perf_counter()
        ended_clock = await self.wait_ended(TIMER_SAGA.name, 600.0)
        cpu_firing = _cpu_ms(self.pid) - cpu_at_due
        firing_seconds = ended_clock - due_clock
        load_after = _load_average()
        fired: list[float] = []
        missing = 0

        async def read(index: int) -> None:
            nonlocal missing
            saga = (await self.stub.GetSaga(pb.GetSagaRequest(saga_id=started[index]), timeout=_CALL_TIMEOUT)).saga
            event = next((e for e in saga.history if e.type == "TimerFired"), None)
            if event is None:
                missing += 1
            else:
                fired.append(event.at.seconds + event.at.nanos / 1e9)

        reads = await _bounded(len(started), self.config.concurrency, read)
        lateness = [at - wake_at for at in fired]
        self.report["timers"] = {
            **starts.figures("started"),
            "all_started_before_due": started_by < wake_at,
            "started_s_before_due": _round(wake_at - started_by, 2),
            "fired": len(fired),
            "without_timer_fired": missing,
            "read_errors": dict(reads.errors),
            "lateness_p50_ms": _round(percentile(lateness, 0.5) * 1000, 1),
            "lateness_p99_ms": _round(percentile(lateness, 0.99) * 1000, 1),
            "lateness_max_ms": _round(max(lateness, default=math.nan) * 1000, 1),
            "lateness_min_ms": _round(min(lateness, default=math.nan) * 1000, 1),
            "all_fired_after_s": _round(max(lateness, default=math.nan), 2),
            "orchestrator_cpu_ms_per_timer": _round(cpu_firing / len(fired)) if fired else None,
            "orchestrator_cpu_percent_of_core_while_firing": _round(100 * cpu_firing / (firing_seconds * 1000), 1)
            if firing_seconds > 0
            else None,
            "load_average_1m": {"start": load_before, "end": load_after},
            "status_counts_after": await self.counts(),
        }


async def _drive(config: LongRunningConfig, address: str, pid: int) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        run = _Run(config, pb_grpc.OrchestratorServiceStub(channel), pid)
        await run.warm_up()
        saga_ids = await run.parked()
        await run.signalled(saga_ids)
        await run.timers(run.report["parked"]["per_s"] or 0.0)
        return run.report


def _machine(database_url: str) -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if database_url.startswith("postgresql"):
        database = "postgresql (" + database_url.split("@")[-1] + ")"
    else:
        database = f"sqlite {sqlite3.sqlite_version} (WAL, synchronous=NORMAL)"
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "database": database,
        "load_average_1m_5m_15m": [round(value, 2) for value in os.getloadavg()],
    }


def run_long_running(config: LongRunningConfig) -> dict[str, Any]:
    """Start a local stack with the benchmark's definitions, run the three phases, stop it; the report."""
    machine = _machine(config.database_url)
    with ExitStack() as scope:
        data_dir = config.data_dir or Path(scope.enter_context(tempfile.TemporaryDirectory(prefix="long-running-")))
        python_path = os.pathsep.join(filter(None, [str(_REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        stack = LocalStack(
            StackConfig(
                data_dir / "stack",
                orchestrator_database_url=config.database_url,
                common_env={"LOG_LEVEL": config.log_level},
                orchestrator_env={
                    **config.orchestrator_env,
                    "PYTHONPATH": python_path,
                    "SAGA_DEFINITIONS": _DEFINITIONS,
                },
            )
        )
        scope.callback(stack.stop)
        stack.start()
        assert stack.orchestrator is not None and stack.orchestrator.pid is not None
        began = time.perf_counter()
        report = asyncio.run(_drive(config, stack.address, stack.orchestrator.pid))
        database_file = data_dir / "stack" / "orchestrator" / "orchestrator.db"
        on_disk = sum(p.stat().st_size for p in database_file.parent.glob("orchestrator.db*"))
    return {
        "machine": machine,
        "config": {
            "sagas": config.sagas,
            "timers": config.timers,
            "concurrency": config.concurrency,
            "idle_window_s": config.idle_window,
            "poll_interval_s": config.poll_interval,
            "warmup_sagas": config.warmup,
            "log_level": config.log_level,
            "orchestrator_env": config.orchestrator_env,
        },
        **report,
        "orchestrator_database_mib": round(on_disk / 2**20, 1) if not config.database_url else None,
        "run_seconds": round(time.perf_counter() - began, 1),
        "load_average_1m_5m_15m_at_end": [round(value, 2) for value in os.getloadavg()],
    }


def render(report: dict[str, Any]) -> str:
    """The report as the lines this script prints."""
    machine, config = report["machine"], report["config"]
    parked, signalled, timers = report["parked"], report["signalled"], report["timers"]
    lines = [
        f"machine: {machine['cpus']} CPUs ({machine['cpu_model']}), Python {machine['python']}, "
        f"{machine['platform']}; orchestrator database: {machine['database']}",
        f"load average at the start (1/5/15 min): {' / '.join(map(str, machine['load_average_1m_5m_15m']))}; "
        f"at the end: {' / '.join(map(str, report['load_average_1m_5m_15m_at_end']))}",
        f"every process at LOG_LEVEL={config['log_level']}; {config['concurrency']} calls in flight; "
        f"warm-up: {config['warmup_sagas']} sagas started and signalled first; "
        f"orchestrator settings: {config['orchestrator_env'] or 'the defaults'}",
        "",
        f"1. {parked['started']:,} sagas parked in a signal wait (BenchParked: its only node is the wait, "
        "no service call)",
        f"   StartSaga: {parked['per_s']:,.0f} starts/s ({parked['seconds']:.1f} s), "
        f"p50 {parked['latency_p50_ms']:.1f} ms, p99 {parked['latency_p99_ms']:.1f} ms; "
        f"orchestrator CPU {parked['orchestrator_cpu_ms_per_start']:.2f} ms a start, client "
        f"{parked['client_cpu_ms_per_start']:.2f} ms",
        f"   orchestrator RSS: {parked['rss_before_mib']} MiB before the starts, {parked['rss_parked_mib']} MiB "
        f"with all parked ({parked['bytes_per_parked_saga']:,.0f} bytes a saga), "
        f"{parked['rss_after_idle_mib']} MiB after the idle window; anonymous {parked['rss_anon_before_mib']} -> "
        f"{parked['rss_anon_parked_mib']} MiB, mapped files {parked['rss_file_before_mib']} -> "
        f"{parked['rss_file_parked_mib']} MiB",
        f"   orchestrator CPU while they wait: {parked['idle_cpu_percent_of_core']:.2f} % of one core "
        f"({parked['idle_cpu_ms']:.0f} ms over {parked['idle_window_s']} s)",
        f"   one GetSagaStats at this size: {parked['get_saga_stats_ms']} ms; status counts: "
        f"{parked['status_counts_after_starts']}; load average {parked['load_average_1m']}",
        "",
        f"2. all signalled: {signalled['signals']:,} signals in {signalled['seconds']:.1f} s = "
        f"{signalled['per_s']:,.0f} signals/s accepted (p50 {signalled['latency_p50_ms']:.1f} ms, "
        f"p99 {signalled['latency_p99_ms']:.1f} ms)",
        f"   all ended {signalled['all_ended_after_s']:.1f} s after the first signal = "
        f"{signalled['completions_per_s']:,.0f} completions/s (ListSagas polled every {config['poll_interval_s']} s "
        f"from the last signal on); status counts then: {signalled['status_counts_after']}",
        f"   orchestrator CPU {signalled['orchestrator_cpu_ms_per_saga']:.2f} ms a saga (signal + wake + end), "
        f"client {signalled['client_cpu_ms_per_saga']:.2f} ms; RSS after: {signalled['rss_after_mib']} MiB; "
        f"load average {signalled['load_average_1m']}",
        "",
        f"3. {timers['started']:,} timers due at the same instant (BenchTimer: its only node is the timer)",
        f"   started at {timers['per_s']:,.0f}/s, the last {timers['started_s_before_due']:.1f} s before they were "
        f"due (all before: {timers['all_started_before_due']})",
        f"   lateness (TimerFired time - due time): p50 {timers['lateness_p50_ms']:,.1f} ms, "
        f"p99 {timers['lateness_p99_ms']:,.1f} ms, max {timers['lateness_max_ms']:,.1f} ms; "
        f"all fired {timers['all_fired_after_s']:.2f} s after the due time",
        f"   orchestrator CPU from the due time until the last ended: "
        f"{timers['orchestrator_cpu_percent_of_core_while_firing']:.0f} % of one core, "
        f"{timers['orchestrator_cpu_ms_per_timer']:.2f} ms a timer",
        f"   fired: {timers['fired']:,}; without TimerFired: {timers['without_timer_fired']}; "
        f"status counts then: {timers['status_counts_after']}; load average {timers['load_average_1m']}",
    ]
    errors = {
        name: section["errors"]
        for name, section in (("starts", parked), ("signals", signalled), ("timer starts", timers))
        if section["errors"]
    }
    if errors:
        lines.append(f"errors: {errors}")
    if report["orchestrator_database_mib"] is not None:
        lines.append(f"orchestrator database on disk at the end: {report['orchestrator_database_mib']} MiB")
    lines.append(f"run took {report['run_seconds']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    defaults = LongRunningConfig()
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sagas", type=int, default=defaults.sagas, help="sagas parked, then signalled")
    parser.add_argument("--timers", type=int, default=defaults.timers, help="timers due at the same instant")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency, help="calls in flight")
    parser.add_argument("--idle-window", type=float, default=defaults.idle_window, help="seconds of idle CPU measured")
    parser.add_argument("--poll-interval", type=float, default=defaults.poll_interval, help="GetSagaStats poll")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="sagas run before the figures")
    parser.add_argument(
        "--database-url", default="", help="orchestrator database: empty for SQLite, or postgresql+psycopg://..."
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="where the stack keeps its files (default: temp)")
    parser.add_argument("--log-level", default=defaults.log_level, help="LOG_LEVEL of every process")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="an orchestrator setting (repeatable)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON to this file")
    arguments = parser.parse_args(argv)
    for name in ("sagas", "timers", "concurrency"):
        if getattr(arguments, name) < 1:
            parser.error(f"--{name} must be at least 1")
    settings = dict(item.partition("=")[::2] for item in arguments.set)
    if any(not name or not value for name, value in settings.items()):
        parser.error("--set takes NAME=VALUE")
    config = LongRunningConfig(
        sagas=arguments.sagas,
        timers=arguments.timers,
        concurrency=arguments.concurrency,
        idle_window=arguments.idle_window,
        poll_interval=arguments.poll_interval,
        warmup=arguments.warmup,
        database_url=arguments.database_url,
        data_dir=arguments.data_dir,
        log_level=arguments.log_level,
        orchestrator_env=settings,
    )
    print(f"load average before the run: {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} CPUs", file=sys.stderr)
    report = run_long_running(config)
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))


if __name__ == "__main__":
    main()
