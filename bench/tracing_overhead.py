"""Tracing overhead: sagas/s through the local stack with tracing off, then on (exporting to an OTLP receiver).

Run: .venv/bin/python bench/tracing_overhead.py [--sagas 500] [--concurrency 32] [--rounds 2]

Each round starts a fresh local stack (SQLite files in a temporary folder) per mode, warms it up,
places --sagas orders with --concurrency PlaceOrder calls at a time and waits until every saga has
ended; sagas/s is the count over that whole time. Modes alternate within a round so a busy machine
hurts both alike. CPU time per saga (from /proc, over the same window) is printed too: unlike
sagas/s it hardly depends on what else the machine is doing. "on" sets OTEL_EXPORTER_OTLP_ENDPOINT
for all five processes (every call traced, batch export every 200 ms); "sampled" does the same
with OTEL_TRACES_SAMPLER=parentbased_traceidratio and OTEL_TRACES_SAMPLER_ARG=0.1 (one saga in ten
recorded). The receiver runs in this process and its CPU counts against the run, as a collector on
the same machine would.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devstack.orders import order_request
from devstack.otlp_receiver import OtlpReceiver
from devstack.stack import LocalStack, StackConfig
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc

ENDED = {pb.SAGA_STATUS_COMPLETED, pb.SAGA_STATUS_COMPENSATED, pb.SAGA_STATUS_NEEDS_ATTENTION}


async def _ended(stub: pb_grpc.OrchestratorServiceAsyncStub) -> int:
    stats = await stub.GetSagaStats(pb.GetSagaStatsRequest())
    return sum(c.count for c in stats.counts if c.status in ENDED)


async def _wait_ended(stub: pb_grpc.OrchestratorServiceAsyncStub, count: int) -> None:
    while await _ended(stub) < count:  # noqa: ASYNC110 - the orchestrator is polled over gRPC
        await asyncio.sleep(0.02)


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User+system CPU seconds so far of each process (and of this one, the client and receiver)."""
    used: dict[str, float] = {}
    for name, pid in pids.items():
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        used[name] = (int(fields[11]) + int(fields[12])) / _TICK
    own = resource.getrusage(resource.RUSAGE_SELF)
    used["bench+receiver"] = own.ru_utime + own.ru_stime
    return used


async def _drive(address: str, sagas: int, concurrency: int, pids: dict[str, int]) -> tuple[float, dict[str, float]]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.OrchestratorServiceStub(channel)
        run = uuid.uuid4().hex[:6]
        await asyncio.gather(*(stub.PlaceOrder(order_request(f"warm-{run}-{i}")) for i in range(20)))
        await _wait_ended(stub, 20)
        baseline = await _ended(stub)
        gate = asyncio.Semaphore(concurrency)

        async def place(i: int) -> None:
            async with gate:
                await stub.PlaceOrder(order_request(f"bench-{run}-{i}"))

        cpu_before = _cpu_seconds(pids)
        started = time.perf_counter()
        await asyncio.gather(*(place(i) for i in range(sagas)))
        await _wait_ended(stub, baseline + sagas)
        rate = sagas / (time.perf_counter() - started)
        cpu_after = _cpu_seconds(pids)
        return rate, {name: (cpu_after[name] - cpu_before[name]) * 1000 / sagas for name in cpu_after}


def _measure(mode: str, sagas: int, concurrency: int, receiver: OtlpReceiver) -> tuple[float, dict[str, float]]:
    common = {"LOG_LEVEL": "WARNING"}
    if mode in ("on", "sampled"):
        common.update({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"})
    if mode == "sampled":
        common.update({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"})
    with tempfile.TemporaryDirectory(prefix=f"tracing-{mode}-") as folder:
        # OrderSaga v1, the four calls in a row, as the published figures were measured.
        config = StackConfig(Path(folder), common_env=common, orchestrator_env={"ORDER_SAGA_VERSION": "1"})
        with LocalStack(config) as stack:
            pids = {name: process.pid for name, process in stack.processes().items() if process.pid}
            return asyncio.run(_drive(stack.address, sagas, concurrency, pids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sagas", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default="off,on", help="comma-separated: off, on, sampled")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu: dict[str, list[float]] = {mode: [] for mode in modes}
    with OtlpReceiver() as receiver:
        for round_number in range(1, args.rounds + 1):
            for mode in modes if round_number % 2 else modes[::-1]:
                rate, cpu_ms = _measure(mode, args.sagas, args.concurrency, receiver)
                results[mode].append(rate)
                orchestrator, own = cpu_ms["orchestrator"], cpu_ms["bench+receiver"]
                services = sum(cpu_ms.values()) - orchestrator - own
                cpu[mode].append(orchestrator + services)
                print(
                    f"round {round_number} tracing {mode:7s}: {rate:6.0f} sagas/s; CPU ms per saga: "
                    f"orchestrator {orchestrator:.2f}, 4 services {services:.2f}, bench+receiver {own:.2f}",
                    flush=True,
                )
            receiver.clear()
    print(f"median of {args.rounds} rounds, {args.sagas} sagas at concurrency {args.concurrency}:")
    for mode in modes:
        print(
            f"  tracing {mode:7s}: {statistics.median(results[mode]):6.0f} sagas/s, "
            f"{statistics.median(cpu[mode]):5.2f} ms stack CPU per saga"
        )


if __name__ == "__main__":
    main()
