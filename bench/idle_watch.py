"""What idle WatchSaga streams cost: N streams on paused sagas, the orchestrator's CPU over a window.

Run: `.venv/bin/python -m bench.idle_watch --streams 1000 --window 10`. It starts a local stack on
SQLite files in a temporary folder, places and pauses ten orders (their first step held by a
latency fault so the pause lands before the saga ends), opens the streams spread over them, waits
until every stream has had its first event, then reads the orchestrator's CPU time from
/proc/<pid>/stat over the window. Printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from pathlib import Path

import grpc

from bench.targets import bench_order
from devstack.stack import LocalStack, StackConfig
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2_grpc as pb_grpc

__all__ = ["main"]

_TOKEN = "idle-watch-operator-token-0123456789"
_SAGAS = 10
_CHANNELS = 10


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _measure(address: str, pid: int, streams: int, window: float) -> float:
    metadata = (("authorization", f"Bearer {_TOKEN}"),)
    channels = [grpc.aio.insecure_channel(address) for _ in range(_CHANNELS)]
    stubs = [pb_grpc.OrchestratorServiceStub(channel) for channel in channels]
    try:
        saga_ids = []
        for _ in range(_SAGAS):
            placed = await stubs[0].PlaceOrder(bench_order(f"idle-{uuid.uuid4().hex[:12]}"), metadata=metadata)
            pause = pb.PauseSagaRequest(saga_id=placed.saga_id, reason="idle watch")
            await stubs[0].PauseSaga(pause, metadata=metadata)
            saga_ids.append(placed.saga_id)
        opened = asyncio.Event()
        first_events = 0

        async def follow(index: int) -> None:
            nonlocal first_events
            request = pb.WatchSagaRequest(saga_id=saga_ids[index % _SAGAS])
            call = stubs[index % _CHANNELS].WatchSaga(request, metadata=metadata)
            counted = False
            try:
                async for _ in call:
                    if not counted:
                        counted = True
                        first_events += 1
                        if first_events == streams:
                            opened.set()
            except grpc.aio.AioRpcError as error:
                print(f"stream {index} ended: {error.code().name} {error.details()}")

        tasks = [asyncio.create_task(follow(i)) for i in range(streams)]
        if streams == 0:
            opened.set()
        await asyncio.wait_for(opened.wait(), timeout=120)
        # Let the start-up reads settle before the window opens.
        await asyncio.sleep(2)
        before, started = _cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(window)
        used, elapsed = _cpu_seconds(pid) - before, time.monotonic() - started
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return used / elapsed
    finally:
        for channel in channels:
            await channel.close(None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--window", type=float, default=10.0)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="idle-watch-") as folder:
        config = StackConfig(
            Path(folder),
            service_env={"inventory": {"FAULTS": "ReserveStock:latency_ms=1000", "LOG_LEVEL": "WARNING"}},
            # OrderSaga v1, the four calls in a row, as the published figures were measured.
            orchestrator_env={"OPERATOR_TOKENS": f"bench:{_TOKEN}", "LOG_LEVEL": "WARNING", "ORDER_SAGA_VERSION": "1"},
        )
        stack = LocalStack(config).start()
        try:
            assert stack.orchestrator is not None and stack.orchestrator.pid is not None
            idle = asyncio.run(_measure(stack.orchestrator.address, stack.orchestrator.pid, 0, arguments.window))
            share = asyncio.run(
                _measure(stack.orchestrator.address, stack.orchestrator.pid, arguments.streams, arguments.window)
            )
        finally:
            stack.stop()
    print(f"orchestrator CPU with no stream open: {100 * idle:.1f}% of a core")
    print(f"orchestrator CPU with {arguments.streams} idle WatchSaga streams: {100 * share:.1f}% of a core")


if __name__ == "__main__":
    main()
