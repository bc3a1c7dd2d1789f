"""ChannelPool steers calls away from an instance whose connection failed, and back to it once it returns."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import grpc.aio

from devstack.launcher import ManagedProcess
from sagasuite.payment.v1 import payment_service_pb2 as pb
from sagasuite.payment.v1 import payment_service_pb2_grpc as pb_grpc
from svckit.channels import ChannelPool
from svckit.discovery import StaticResolver


def _served(process: ManagedProcess) -> int:
    """ListPayments calls this process has answered so far (one log line each, across restarts)."""
    return process.log_path.read_text().count("method=ListPayments")


async def _list(pool: ChannelPool) -> bool:
    try:
        await pb_grpc.PaymentServiceStub(pool.channel("payment")).ListPayments(pb.ListPaymentsRequest(), timeout=2)
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        return False
    return True


async def test_pool_routes_around_a_killed_instance_still_listed_and_back_after_its_restart(start_process: Any) -> None:
    survivor: ManagedProcess = start_process("payment_svc", "payment-a")
    victim: ManagedProcess = start_process("payment_svc", "payment-b")
    # A static list never drops the dead instance: only the channel's own state can steer calls away.
    # Quick reconnect attempts, so the restarted instance is found soon (gRPC's default backoff is 1s-120s).
    options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]
    pool = ChannelPool(StaticResolver({"payment": [survivor.address, victim.address]}), channel_options=options)
    try:
        assert all([await _list(pool) for _ in range(4)])
        assert _served(survivor) >= 1 and _served(victim) >= 1, "round-robin reaches both instances"

        victim.kill()
        outcomes = [await _list(pool) for _ in range(12)]
        # The first call that lands on the dead instance finds it refusing connections; after that the
        # channel is in TRANSIENT_FAILURE and the pool picks the other instance.
        assert outcomes.count(False) <= 1, outcomes

        victim.restart()
        served_before = _served(victim)
        deadline = time.monotonic() + 15
        while _served(victim) == served_before:
            assert time.monotonic() < deadline, "the restarted instance never got a call again"
            assert await _list(pool)
            await asyncio.sleep(0.05)
    finally:
        await pool.close()
