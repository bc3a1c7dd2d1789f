"""The payment service as a real process: idempotency, one charge per order, tombstones, ledger, bad input."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from devstack.launcher import ManagedProcess
from sagasuite.common.v1.common_pb2 import Money
from sagasuite.payment.v1 import payment_service_pb2 as pb
from sagasuite.payment.v1 import payment_service_pb2_grpc as pb_grpc
from tests.grpc_helpers import bad_request_fields, call_logged, error_reason, keyed

SERVICE = "sagasuite.payment.v1.PaymentService"


def new_id(prefix: str) -> str:
    """A fresh order id or idempotency key, so tests sharing one process never collide."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def charge_request(
    order_id: str, minor_units: int = 1250, currency: str = "USD", token: str = "tok_visa"
) -> pb.ChargeRequest:
    return pb.ChargeRequest(
        order_id=order_id,
        amount=Money(currency_code=currency, minor_units=minor_units),
        payment_token=token,
    )


async def refused(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def ledger(
    stub: pb_grpc.PaymentServiceAsyncStub, order_id: str = "", page_size: int = 500
) -> list[pb.LedgerEntry]:
    """Every ledger entry (of one order, when given), newest first, walking all pages."""
    entries: list[pb.LedgerEntry] = []
    token = ""
    while True:
        page = await stub.ListPayments(pb.ListPaymentsRequest(order_id=order_id, page_size=page_size, page_token=token))
        entries += page.entries
        token = page.next_page_token
        if not token:
            return entries


def net_charged(entries: list[pb.LedgerEntry]) -> int:
    signs = {pb.LEDGER_ENTRY_KIND_CHARGE: 1, pb.LEDGER_ENTRY_KIND_REFUND: -1}
    return sum(signs[e.kind] * e.amount.minor_units for e in entries)


def kinds(entries: list[pb.LedgerEntry]) -> list[int]:
    return [e.kind for e in entries]


async def assert_no_payment(stub: pb_grpc.PaymentServiceAsyncStub, order_id: str) -> None:
    missing = await refused(stub.GetPayment(pb.GetPaymentRequest(order_id=order_id)))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(missing) == "PAYMENT_NOT_FOUND"
    assert await ledger(stub, order_id) == []


@pytest.fixture(scope="module")
def payment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    """One process shared by the tests that only touch their own orders (each uses fresh order ids)."""
    base: Path = tmp_path_factory.mktemp("payment")
    env = {"PORT": "0", "HOST": "127.0.0.1", "DATA_DIR": str(base / "data"), "LOG_LEVEL": "INFO"}
    process = ManagedProcess("payment_svc", "payment_svc", env, base / "logs").start()
    yield process
    process.stop(timeout=5)


@pytest.fixture
async def stub(payment: ManagedProcess) -> AsyncIterator[pb_grpc.PaymentServiceAsyncStub]:
    async with grpc.aio.insecure_channel(payment.address) as channel:
        yield pb_grpc.PaymentServiceStub(channel)


async def test_health_and_reflection(payment: ManagedProcess) -> None:
    async with grpc.aio.insecure_channel(payment.address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [s.name async for r in responses for s in r.list_services_response.service]
        assert SERVICE in names
        assert "grpc.health.v1.Health" in names


async def test_charge_then_replay_executes_once(stub: pb_grpc.PaymentServiceAsyncStub) -> None:
    order_id, key = new_id("order"), new_id("k")
    first = await stub.Charge(charge_request(order_id, 4999, "EUR"), metadata=keyed(key))
    again = await stub.Charge(charge_request(order_id, 4999, "EUR"), metadata=keyed(key))
    assert first == again
    assert first.payment.status == pb.PAYMENT_STATUS_CHARGED
    assert (first.payment.amount.currency_code, first.payment.amount.minor_units) == ("EUR", 4999)
    assert first.payment.payment_id.startswith("pay_")
    assert (await stub.GetPayment(pb.GetPaymentRequest(order_id=order_id))).payment == first.payment
    entries = await ledger(stub, order_id)
    assert kinds(entries) == [pb.LEDGER_ENTRY_KIND_CHARGE]
    assert entries[0].amount == first.payment.amount


async def test_twenty_concurrent_identical_calls_make_one_effect(stub: pb_grpc.PaymentServiceAsyncStub) -> None:
    order_id, key = new_id("burst"), new_id("k")
    request = charge_request(order_id)
    responses = await asyncio.gather(*(stub.Charge(request, metadata=keyed(key)) for _ in range(20)))
    assert len({r.payment.payment_id for r in responses}) == 1
    assert kinds(await ledger(stub, order_id)) == [pb.LEDGER_ENTRY_KIND_CHARGE]


async def test_same_key_other_payload_is_refused(stub: pb_grpc.PaymentServiceAsyncStub) -> None:
    order_id, key = new_id("order"), new_id("k")
    await stub.Charge(charge_request(order_id, 100), metadata=keyed(key))
    error = await refused(stub.Charge(charge_request(order_id, 900), metadata=keyed(key)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(error) == "IDEMPOTENCY_KEY_REUSED"
    assert "idempotency-key" in (error.details() or "")
    assert [e.amount.minor_units for e in await ledger(stub, order_id)] == [100]


@pytest.mark.parametrize("method", ["Charge", "Refund"])
async def test_missing_key_is_invalid_argument_and_changes_nothing(
    stub: pb_grpc.PaymentServiceAsyncStub, method: str
) -> None:
    order_id = new_id("nokey")
    request = charge_request(order_id) if method == "Charge" else pb.RefundRequest(order_id=order_id)
    error = await refused(getattr(stub, method)(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["idempotency-key"]
    assert "idempotency-key" in (error.details() or "")
    await assert_no_payment(stub, order_id)


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((("idempotency-key", "k" * 201),), "at most 200"),
        ((("idempotency-key-bin", "clé".encode()),), "ASCII"),
    ],
)
async def test_bad_idempotency_key_is_refused(
    stub: pb_grpc.PaymentServiceAsyncStub, metadata: tuple[tuple[str, Any], ...], reason: str
) -> None:
    order_id = new_id("badkey")
    error = await refused(stub.Charge(charge_request(order_id), metadata=metadata))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in (error.details() or "")
    await assert_no_payment(stub, order_id)


async def test_concurrent_charges_with_different_keys_charge_once(stub: pb_grpc.PaymentServiceAsyncStub) -> None:
    order_id = new_id("race")

    async def attempt(n: int) -> bool:
        try:
            await stub.Charge(charge_request(order_id), metadata=keyed(f"{order_id}/{n}"))
            return True
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error_reason(error) == "ORDER_ALREADY_CHARGED", error.details()
            return False

    assert sum(await asyncio.gather(*(attempt(n) for n in range(15)))) == 1
    assert kinds(await ledger(stub, order_id)) == [pb.LEDGER_ENTRY_KIND_CHARGE]


async def test_second_charge_with_another_key_is_refused(stub: pb_grpc.PaymentServiceAsyncStub) -> None:
    order_id = new_id("twice")
    first = await stub.Charge(charge_request(order_id), metadata=keyed(new_id("k")))
    error = await refused(stub.Charge(charge_request(order_id), metadata=keyed(new_id("k"))))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(error) == "ORDER_ALREADY_CHARGED"
    assert first.payment.payment_id in (error.details() or "")
    assert len(await ledger(stub, order_id)) == 1


@pytest.mark.parametrize(
    ("token", "reason"), [("tok_declined", "CARD_DECLINED"), ("tok_insufficient_funds", "INSUFFICIENT_FUNDS")]
)
async def test_declining_tokens_are_refused_and_charge_nothing(
    stub: pb_grpc.PaymentServiceAsyncStub, token: str, reason: str
) -> None:
    order_id, key = new_id("declined"), new_id("k")
    error = await refused(stub.Charge(charge_request(order_id, token=token), metadata=keyed(key)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(error) == reason
    await assert_no_payment(stub, order_id)
    # The refusal is stored with the key: the same call replays it.
    replayed = await refused(stub.Charge(charge_request(order_id, token=token), metadata=keyed(key)))
    assert error_reason(replayed) == reason
    # A decline leaves no payment, so another card may pay for the order.
    retried = await stub.Charge(charge_request(order_id, token="tok_mastercard"), metadata=keyed(new_id("k")))
    assert retried.payment.status == pb.PAYMENT_STATUS_CHARGED


async def test_refund_returns_the_charge_and_is_idempotent(stub: pb_grpc.PaymentServiceAsyncStub) -> None:
    order_id = new_id("refund")
    charged = await stub.Charge(charge_request(order_id, 3333, "GBP"), metadata=keyed(new_id("c")))
    refund_key = new_id("r")
    refunded = await stub.Refund(pb.RefundRequest(order_id=order_id, reason="out of stock"), metadata=keyed(refund_key))
    assert refunded.was_charged
    assert refunded.payment.status == pb.PAYMENT_STATUS_REFUNDED
    assert refunded.payment.payment_id == charged.payment.payment_id
    assert refunded.payment.amount == charged.payment.amount
    replayed = await stub.Refund(pb.RefundRequest(order_id=order_id, reason="out of stock"), metadata=keyed(refund_key))
    assert replayed == refunded
    again = await stub.Refund(pb.RefundRequest(order_id=order_id), metadata=keyed(new_id("r")))
    assert not again.was_charged
    assert again.payment == refunded.payment
    entries = await ledger(stub, order_id)
    assert kinds(entries) == [pb.LEDGER_ENTRY_KIND_REFUND, pb.LEDGER_ENTRY_KIND_CHARGE]
    assert entries[0].amount == charged.payment.amount
    assert entries[0].entry_id > entries[1].entry_id
    late = await refused(stub.Charge(charge_request(order_id, 3333, "GBP"), metadata=keyed(new_id("c"))))
    assert late.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(late) == "ORDER_REFUNDED"
    assert len(await ledger(stub, order_id)) == 2


async def test_refund_before_charge_leaves_tombstone_refusing_late_charge(
    stub: pb_grpc.PaymentServiceAsyncStub,
) -> None:
    order_id = new_id("early")
    refunded = await stub.Refund(pb.RefundRequest(order_id=order_id), metadata=keyed(new_id("r")))
    assert not refunded.was_charged
    assert refunded.payment.status == pb.PAYMENT_STATUS_TOMBSTONE
    assert not refunded.payment.HasField("amount")
    late = await refused(stub.Charge(charge_request(order_id), metadata=keyed(new_id("c"))))
    assert late.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(late) == "ORDER_REFUNDED"
    assert (await stub.GetPayment(pb.GetPaymentRequest(order_id=order_id))).payment == refunded.payment
    again = await stub.Refund(pb.RefundRequest(order_id=order_id), metadata=keyed(new_id("r")))
    assert (again.payment, again.was_charged) == (refunded.payment, False)
    assert await ledger(stub, order_id) == []


async def test_net_charge_per_order_is_zero_after_refund(stub: pb_grpc.PaymentServiceAsyncStub) -> None:
    amounts = {new_id("net"): (units, currency) for units, currency in [(1, "USD"), (999_999, "JPY"), (10**12, "CHF")]}
    for order_id, (units, currency) in amounts.items():
        await stub.Charge(charge_request(order_id, units, currency), metadata=keyed(new_id("c")))
        assert net_charged(await ledger(stub, order_id)) == units
    await asyncio.gather(*(stub.Refund(pb.RefundRequest(order_id=o), metadata=keyed(new_id("r"))) for o in amounts))
    for order_id, (_, currency) in amounts.items():
        entries = await ledger(stub, order_id)
        assert len(entries) == 2
        assert {e.amount.currency_code for e in entries} == {currency}
        assert net_charged(entries) == 0


async def test_concurrent_charge_and_refund_leave_the_order_settled(stub: pb_grpc.PaymentServiceAsyncStub) -> None:
    order_id = new_id("settle")
    outcomes = await asyncio.gather(
        stub.Charge(charge_request(order_id), metadata=keyed(new_id("c"))),
        stub.Refund(pb.RefundRequest(order_id=order_id), metadata=keyed(new_id("r"))),
        return_exceptions=True,
    )
    for outcome in outcomes:
        if isinstance(outcome, grpc.aio.AioRpcError):
            assert error_reason(outcome) == "ORDER_REFUNDED", outcome.details()
    payment = (await stub.GetPayment(pb.GetPaymentRequest(order_id=order_id))).payment
    assert payment.status in (pb.PAYMENT_STATUS_REFUNDED, pb.PAYMENT_STATUS_TOMBSTONE)
    assert net_charged(await ledger(stub, order_id)) == 0


async def test_ledger_pages_are_newest_first_and_complete(stub: pb_grpc.PaymentServiceAsyncStub) -> None:
    for _ in range(4):
        await stub.Charge(charge_request(new_id("page")), metadata=keyed(new_id("c")))
    whole = (await stub.ListPayments(pb.ListPaymentsRequest(page_size=500))).entries
    assert len(whole) >= 4
    ids = [e.entry_id for e in whole]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids)
    assert await ledger(stub, page_size=3) == list(whole)
    first = await stub.ListPayments(pb.ListPaymentsRequest(page_size=3))
    assert len(first.entries) == 3 and first.next_page_token
    default = await stub.ListPayments(pb.ListPaymentsRequest())
    assert len(default.entries) == min(len(whole), 100)


def _list(order_id: str = "", page_size: int = 0, page_token: str = "") -> pb.ListPaymentsRequest:
    return pb.ListPaymentsRequest(order_id=order_id, page_size=page_size, page_token=page_token)


BAD_ORDER = "order-bad"
BAD_REQUESTS = [
    pytest.param("Charge", charge_request(""), "order_id", id="charge-empty-order"),
    pytest.param("Charge", charge_request("o" * 65), "order_id", id="charge-long-order"),
    pytest.param("Charge", charge_request("bad id!"), "order_id", id="charge-odd-order"),
    pytest.param("Charge", pb.ChargeRequest(order_id=BAD_ORDER, payment_token="tok_visa"), "amount", id="no-amount"),
    pytest.param("Charge", charge_request(BAD_ORDER, currency="XYZ"), "amount.currency_code", id="unknown-currency"),
    pytest.param("Charge", charge_request(BAD_ORDER, currency=""), "amount.currency_code", id="empty-currency"),
    pytest.param("Charge", charge_request(BAD_ORDER, 0), "amount.minor_units", id="zero-amount"),
    pytest.param("Charge", charge_request(BAD_ORDER, -5), "amount.minor_units", id="negative-amount"),
    pytest.param("Charge", charge_request(BAD_ORDER, 10**12 + 1), "amount.minor_units", id="huge-amount"),
    pytest.param("Charge", charge_request(BAD_ORDER, token=""), "payment_token", id="empty-token"),
    pytest.param("Charge", charge_request(BAD_ORDER, token="card_4242"), "payment_token", id="foreign-token"),
    pytest.param("Charge", charge_request(BAD_ORDER, token="tok_" + "x" * 125), "payment_token", id="long-token"),
    pytest.param("Refund", pb.RefundRequest(order_id=""), "order_id", id="refund-empty-order"),
    pytest.param("Refund", pb.RefundRequest(order_id="o" * 65), "order_id", id="refund-long-order"),
    pytest.param("Refund", pb.RefundRequest(order_id=BAD_ORDER, reason="r" * 201), "reason", id="long-reason"),
    pytest.param("GetPayment", pb.GetPaymentRequest(order_id=""), "order_id", id="get-empty-order"),
    pytest.param("GetPayment", pb.GetPaymentRequest(order_id="o" * 65), "order_id", id="get-long-order"),
    pytest.param("ListPayments", _list(order_id="bad id!"), "order_id", id="list-odd-order"),
    pytest.param("ListPayments", _list(page_size=-1), "page_size", id="negative-page-size"),
    pytest.param("ListPayments", _list(page_size=501), "page_size", id="huge-page-size"),
    pytest.param("ListPayments", _list(page_token="abc"), "page_token", id="text-token"),
    pytest.param("ListPayments", _list(page_token="-5"), "page_token", id="negative-token"),
    pytest.param("ListPayments", _list(page_token="0"), "page_token", id="zero-token"),
    pytest.param("ListPayments", _list(page_token="9" * 19), "page_token", id="overflowing-token"),
    pytest.param("ListPayments", _list(page_token="²"), "page_token", id="unicode-digit-token"),
]


@pytest.mark.parametrize(("method", "request_", "field"), BAD_REQUESTS)
async def test_bad_request_is_invalid_argument_naming_the_field(
    stub: pb_grpc.PaymentServiceAsyncStub, method: str, request_: Any, field: str
) -> None:
    before = await ledger(stub)
    metadata = keyed(new_id("bad")) if method in ("Charge", "Refund") else None
    error = await refused(getattr(stub, method)(request_, metadata=metadata))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in bad_request_fields(error)
    assert field in (error.details() or "")
    assert await ledger(stub) == before
    await assert_no_payment(stub, BAD_ORDER)


async def test_call_past_its_deadline_leaves_no_effect(start_process) -> None:  # type: ignore[no-untyped-def]
    slow = start_process("payment_svc", FAULTS="Charge:latency_ms=400;Refund:latency_ms=400")
    async with grpc.aio.insecure_channel(slow.address) as channel:
        stub = pb_grpc.PaymentServiceStub(channel)
        charged, tombstoned = new_id("late"), new_id("late")
        charge_key, refund_key = new_id("c"), new_id("r")
        timed_out = await refused(stub.Charge(charge_request(charged), metadata=keyed(charge_key), timeout=0.2))
        assert timed_out.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        timed_out = await refused(
            stub.Refund(pb.RefundRequest(order_id=tombstoned), metadata=keyed(refund_key), timeout=0.2)
        )
        assert timed_out.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The server has finished (and rolled back) its work.
        await call_logged(slow, "Charge", charge_key)
        await call_logged(slow, "Refund", refund_key)
        await assert_no_payment(stub, charged)
        await assert_no_payment(stub, tombstoned)


async def test_postgresql_with_two_processes_charges_and_refunds_once(  # type: ignore[no-untyped-def]
    start_process, postgres_url
) -> None:
    first = start_process("payment_svc", name="payment-a", DATABASE_URL=postgres_url)
    second = start_process("payment_svc", name="payment-b", DATABASE_URL=postgres_url)
    async with grpc.aio.insecure_channel(first.address) as a, grpc.aio.insecure_channel(second.address) as b:
        stubs = [pb_grpc.PaymentServiceStub(a), pb_grpc.PaymentServiceStub(b)]
        order_id = new_id("pg")

        async def charge_attempt(n: int) -> bool:
            try:
                await stubs[n % 2].Charge(charge_request(order_id, 10**12), metadata=keyed(f"{order_id}/c{n}"))
                return True
            except grpc.aio.AioRpcError as error:
                assert error_reason(error) == "ORDER_ALREADY_CHARGED", error.details()
                return False

        assert sum(await asyncio.gather(*(charge_attempt(n) for n in range(10)))) == 1
        assert kinds(await ledger(stubs[0], order_id)) == [pb.LEDGER_ENTRY_KIND_CHARGE]

        refunds = await asyncio.gather(
            *(
                stubs[n % 2].Refund(pb.RefundRequest(order_id=order_id), metadata=keyed(f"{order_id}/r{n}"))
                for n in range(10)
            )
        )
        assert sum(r.was_charged for r in refunds) == 1
        entries = await ledger(stubs[1], order_id)
        assert kinds(entries) == [pb.LEDGER_ENTRY_KIND_REFUND, pb.LEDGER_ENTRY_KIND_CHARGE]
        assert net_charged(entries) == 0

        duplicate = charge_request(new_id("pg-dup"))
        responses = await asyncio.gather(
            *(stubs[n % 2].Charge(duplicate, metadata=keyed(duplicate.order_id)) for n in range(20))
        )
        assert len({r.payment.payment_id for r in responses}) == 1
        assert len(await ledger(stubs[0], duplicate.order_id)) == 1

        settled = new_id("pg-settle")
        await asyncio.gather(
            stubs[0].Charge(charge_request(settled), metadata=keyed(new_id("c"))),
            stubs[1].Refund(pb.RefundRequest(order_id=settled), metadata=keyed(new_id("r"))),
            return_exceptions=True,
        )
        assert net_charged(await ledger(stubs[0], settled)) == 0
