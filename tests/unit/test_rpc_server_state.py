"""svckit.server: two servers in one process keep their own faults, observers and replay reports."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from payment_svc.config import PaymentSettings
from payment_svc.server import build_process
from sagasuite.common.v1.common_pb2 import Money
from sagasuite.payment.v1 import payment_service_pb2 as pb
from sagasuite.payment.v1 import payment_service_pb2_grpc as pb_grpc
from svckit.process import ServiceProcess
from tests.grpc_helpers import keyed

Seen = list[tuple[str, str, bool]]


def _payment_process(data_dir: Path, faults: str) -> tuple[ServiceProcess, Seen]:
    data_dir.mkdir()
    process = build_process(
        PaymentSettings.model_validate({"host": "127.0.0.1", "port": 0, "data_dir": data_dir, "faults": faults})
    )
    seen: Seen = []
    process.rpc_server.observers.append(lambda method, code, _ms, replayed: seen.append((method, code, replayed)))
    return process, seen


async def test_two_servers_in_one_process_share_no_rpc_state(tmp_path: Path) -> None:
    faulty, faulty_seen = _payment_process(tmp_path / "faulty", "GetPayment:error_rate=1")
    healthy, healthy_seen = _payment_process(tmp_path / "healthy", "")
    servers = [process.build_server() for process in (faulty, healthy)]
    for server in servers:
        await server.start()
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{servers[0].port}") as faulty_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{servers[1].port}") as healthy_channel,
        ):
            faulty_stub = pb_grpc.PaymentServiceStub(faulty_channel)
            healthy_stub = pb_grpc.PaymentServiceStub(healthy_channel)
            with pytest.raises(grpc.aio.AioRpcError) as injected:
                await faulty_stub.GetPayment(pb.GetPaymentRequest(order_id="order-1"), timeout=10)
            assert injected.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await healthy_stub.GetPayment(pb.GetPaymentRequest(order_id="order-1"), timeout=10)
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            charge = pb.ChargeRequest(
                order_id="order-1", amount=Money(currency_code="USD", minor_units=1250), payment_token="tok_visa"
            )
            for _ in range(2):
                await healthy_stub.Charge(charge, metadata=keyed("order-1/charge"), timeout=10)
    finally:
        for server in servers:
            await server.stop()
        for process in (faulty, healthy):
            process.database.close()
    assert faulty_seen == [("GetPayment", "UNAVAILABLE", False)]
    assert healthy_seen == [("GetPayment", "NOT_FOUND", False), ("Charge", "OK", False), ("Charge", "OK", True)]
