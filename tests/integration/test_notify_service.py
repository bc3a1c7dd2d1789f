"""The notification service as a real process: one confirmation per order, delivered once.

The service has no compensation (the saga retries the confirmation until it succeeds), so the
tombstone rule has no counterpart here; its order-level rule is that a second confirmation of an
order, under any key, returns the first one and delivers nothing. Delivery follows the call (see
test_notify_delivery.py), so the tests wait for it to show DELIVERED before counting deliveries.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from devstack.launcher import ManagedProcess, ProcessFailed
from notify_svc.channels import NOTIFICATIONS_FILE_NAME
from sagasuite.common.v1.common_pb2 import LineItem, Money
from sagasuite.notify.v1 import notify_service_pb2 as pb
from sagasuite.notify.v1 import notify_service_pb2_grpc as pb_grpc
from tests.grpc_helpers import bad_request_fields, call_logged, error_reason, keyed
from tests.orchestrator_helpers import wait_until

SLOW_KEY = "slow"


def confirm_request(
    order_id: str,
    *lines: tuple[str, int],
    recipient: str = "ada@example.com",
    amount: Money | None = None,
    tracking_number: str = "TRK-0001",
    summary: bool = True,
) -> pb.SendConfirmationRequest:
    if not summary:
        return pb.SendConfirmationRequest(order_id=order_id, recipient=recipient)
    return pb.SendConfirmationRequest(
        order_id=order_id,
        recipient=recipient,
        summary=pb.OrderSummary(
            items=[LineItem(sku=s, quantity=q) for s, q in (lines or (("LAMP-3", 2),))],
            amount=amount if amount is not None else Money(currency_code="USD", minor_units=1234),
            tracking_number=tracking_number,
        ),
    )


def unique_order(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _start(name: str, tmp: Path, **env: str) -> ManagedProcess:
    defaults = {"PORT": "0", "HOST": "127.0.0.1", "DATA_DIR": str(tmp / "data"), "LOG_LEVEL": "INFO"}
    return ManagedProcess(name, "notify_svc", {**defaults, **env}, tmp / "logs").start()


@pytest.fixture(scope="module")
def file_notify(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    """One file-channel process shared by the tests that use unique order ids."""
    process = _start("notify-file", tmp_path_factory.mktemp("notify-file"), NOTIFY_CHANNEL="file")
    yield process
    process.stop(timeout=5)


@pytest.fixture(scope="module")
def log_notify(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    """The default (log) channel; calls whose key holds SLOW_KEY take 400 ms before any work."""
    slow_calls = f"SendConfirmation:latency_ms=400,key_contains={SLOW_KEY}"
    process = _start("notify-log", tmp_path_factory.mktemp("notify-log"), FAULTS=slow_calls)
    yield process
    process.stop(timeout=5)


@pytest.fixture
async def stub(file_notify):  # type: ignore[no-untyped-def]
    async with grpc.aio.insecure_channel(file_notify.address) as channel:
        yield pb_grpc.NotifyServiceStub(channel)


def delivered(process: ManagedProcess, order_id: str | None = None) -> list[dict[str, str]]:
    """The JSON lines the file channel appended, all of them or those of one order."""
    path = Path(process.env["DATA_DIR"]) / NOTIFICATIONS_FILE_NAME
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [line for line in lines if order_id is None or line["order_id"] == order_id]


async def listed(stub: pb_grpc.NotifyServiceAsyncStub, order_id: str = "") -> list[pb.Notification]:
    response = await stub.ListNotifications(pb.ListNotificationsRequest(order_id=order_id, page_size=500))
    return list(response.notifications)


async def settled(stub: pb_grpc.NotifyServiceAsyncStub, order_id: str = "") -> list[pb.Notification]:
    """The listing once every notification in it (of one order, or all) shows DELIVERED."""

    async def all_delivered() -> bool:
        notes = await listed(stub, order_id)
        return all(n.delivery.state == pb.DELIVERY_STATE_DELIVERED for n in notes)

    await wait_until(all_delivered, f"notifications of {order_id or 'every order'} to be delivered")
    return await listed(stub, order_id)


def without_delivery(notifications: list[pb.Notification]) -> list[pb.Notification]:
    """The notifications as SendConfirmation returns them: without the delivery state."""
    copies = [pb.Notification() for _ in notifications]
    for copy, notification in zip(copies, notifications, strict=True):
        copy.CopyFrom(notification)
        copy.ClearField("delivery")
    return copies


async def test_health_and_reflection(file_notify) -> None:  # type: ignore[no-untyped-def]
    async with grpc.aio.insecure_channel(file_notify.address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="sagasuite.notify.v1.NotifyService")
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = reflection.ServerReflectionInfo(iter([listing]))
        names = [s.name async for r in responses for s in r.list_services_response.service]
        assert "sagasuite.notify.v1.NotifyService" in names
        assert "grpc.health.v1.Health" in names


async def test_send_then_replay_records_and_delivers_once(stub, file_notify) -> None:  # type: ignore[no-untyped-def]
    order = unique_order("replay")
    request = confirm_request(order, ("LAMP-3", 2), ("RARE-1", 1), tracking_number="TRK-42")
    first = await stub.SendConfirmation(request, metadata=keyed(order))
    again = await stub.SendConfirmation(request, metadata=keyed(order))
    assert first == again
    notification = first.notification
    assert notification.notification_id.startswith("ntf_")
    assert notification.order_id == order
    assert (notification.recipient, notification.channel) == ("ada@example.com", "file")
    assert notification.body == (
        f"Order {order} is confirmed: 2 x LAMP-3, 1 x RARE-1; charged 12.34 USD; tracking number TRK-42."
    )
    assert notification.sent_at.seconds > 0
    assert not notification.HasField("delivery")
    assert without_delivery(await settled(stub, order)) == [notification]
    lines = delivered(file_notify, order)
    assert len(lines) == 1
    assert lines[0]["notification_id"] == notification.notification_id
    assert lines[0]["body"] == notification.body


async def test_twenty_concurrent_identical_calls_make_one_effect(stub, file_notify) -> None:  # type: ignore[no-untyped-def]
    order = unique_order("burst")
    request = confirm_request(order)
    responses = await asyncio.gather(*(stub.SendConfirmation(request, metadata=keyed(order)) for _ in range(20)))
    assert len({r.notification.notification_id for r in responses}) == 1
    assert len(await settled(stub, order)) == 1
    assert len(delivered(file_notify, order)) == 1


async def test_concurrent_calls_with_different_keys_confirm_the_order_once(stub, file_notify) -> None:  # type: ignore[no-untyped-def]
    order = unique_order("keys")
    request = confirm_request(order)
    responses = await asyncio.gather(
        *(stub.SendConfirmation(request, metadata=keyed(f"{order}/{n}")) for n in range(20))
    )
    assert len({r.notification.notification_id for r in responses}) == 1
    assert len(await settled(stub, order)) == 1
    assert len(delivered(file_notify, order)) == 1


async def test_order_confirmed_once_returns_the_first_notification_under_a_new_key(stub, file_notify) -> None:  # type: ignore[no-untyped-def]
    order = unique_order("again")
    first = await stub.SendConfirmation(confirm_request(order), metadata=keyed(f"{order}/a"))
    # A retried saga with a fresh key, even with other details, gets the first confirmation.
    retried = confirm_request(order, recipient="grace@example.com", tracking_number="TRK-9")
    second = await stub.SendConfirmation(retried, metadata=keyed(f"{order}/b"))
    assert second.notification == first.notification
    await settled(stub, order)
    assert len(delivered(file_notify, order)) == 1


async def test_same_key_other_payload_is_refused(stub, file_notify) -> None:  # type: ignore[no-untyped-def]
    order = unique_order("reuse")
    await stub.SendConfirmation(confirm_request(order), metadata=keyed(order))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.SendConfirmation(confirm_request(order, tracking_number="TRK-2"), metadata=keyed(order))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(refused.value) == "IDEMPOTENCY_KEY_REUSED"
    assert "idempotency-key" in (refused.value.details() or "")
    await settled(stub, order)
    assert len(delivered(file_notify, order)) == 1


async def test_missing_key_is_invalid_argument_and_changes_nothing(stub, file_notify) -> None:  # type: ignore[no-untyped-def]
    order = unique_order("nokey")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.SendConfirmation(confirm_request(order))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(refused.value) == ["idempotency-key"]
    assert await listed(stub, order) == []
    assert delivered(file_notify, order) == []


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((("idempotency-key", "k" * 201),), "at most 200"),
        ((("idempotency-key-bin", "clé".encode()),), "ASCII"),
    ],
)
async def test_bad_idempotency_key_is_refused(stub, metadata, reason) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.SendConfirmation(confirm_request(unique_order("badkey")), metadata=metadata)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in (refused.value.details() or "")


def charging(currency_code: str, minor_units: int) -> pb.SendConfirmationRequest:
    return confirm_request("order-b", amount=Money(currency_code=currency_code, minor_units=minor_units))


def without(field_name: str) -> pb.SendConfirmationRequest:
    """A valid request with one summary field cleared (a message field left unset)."""
    request = confirm_request("order-b")
    request.summary.ClearField(field_name)
    return request


BAD_CONFIRMATIONS = [
    (confirm_request(""), "order_id"),
    (confirm_request("o" * 65), "order_id"),
    (confirm_request("bad id!"), "order_id"),
    (confirm_request("order-b", recipient=""), "recipient"),
    (confirm_request("order-b", recipient="not-an-address"), "recipient"),
    (confirm_request("order-b", recipient="a b@example.com"), "recipient"),
    (confirm_request("order-b", recipient="x" * 250 + "@example.com"), "recipient"),
    (confirm_request("order-b", summary=False), "summary"),
    (without("items"), "summary.items"),
    (confirm_request("order-b", ("LAMP-3", 0)), "summary.items[0].quantity"),
    (confirm_request("order-b", ("LAMP-3", -2)), "summary.items[0].quantity"),
    (confirm_request("order-b", ("LAMP-3", 10_001)), "summary.items[0].quantity"),
    (confirm_request("order-b", ("", 1)), "summary.items[0].sku"),
    (confirm_request("order-b", ("LAMP-3", 1), ("LAMP-3", 1)), "summary.items[1].sku"),
    (confirm_request("order-b", *[(f"S{i}", 1) for i in range(101)]), "summary.items"),
    (without("amount"), "summary.amount"),
    (charging("XYZ", 100), "summary.amount.currency_code"),
    (charging("", 100), "summary.amount.currency_code"),
    (charging("usd", 100), "summary.amount.currency_code"),
    (charging("USD", 0), "summary.amount.minor_units"),
    (charging("USD", -5), "summary.amount.minor_units"),
    (charging("USD", 10**13), "summary.amount.minor_units"),
    (confirm_request("order-b", tracking_number=""), "summary.tracking_number"),
    (confirm_request("order-b", tracking_number="   "), "summary.tracking_number"),
    (confirm_request("order-b", tracking_number="T" * 65), "summary.tracking_number"),
    (confirm_request("order-b", tracking_number="TRK-1\nforged log line"), "summary.tracking_number"),
]


@pytest.mark.parametrize(("request_", "field"), BAD_CONFIRMATIONS)
async def test_bad_confirmation_is_invalid_argument_naming_the_field(  # type: ignore[no-untyped-def]
    stub, file_notify, request_, field
) -> None:
    before, lines_before = await settled(stub), delivered(file_notify)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.SendConfirmation(request_, metadata=keyed(unique_order("bad")))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in bad_request_fields(refused.value)
    assert field in (refused.value.details() or "")
    assert await listed(stub) == before
    assert delivered(file_notify) == lines_before


BAD_LISTINGS = [
    (pb.ListNotificationsRequest(page_size=-1), "page_size"),
    (pb.ListNotificationsRequest(page_size=501), "page_size"),
    (pb.ListNotificationsRequest(page_token="abc"), "page_token"),
    (pb.ListNotificationsRequest(page_token="-1"), "page_token"),
    (pb.ListNotificationsRequest(page_token="0"), "page_token"),
    (pb.ListNotificationsRequest(page_token=str(2**63)), "page_token"),
    (pb.ListNotificationsRequest(page_token="9" * 30), "page_token"),
    (pb.ListNotificationsRequest(page_token="١٢"), "page_token"),
    (pb.ListNotificationsRequest(order_id="bad id!"), "order_id"),
    (pb.ListNotificationsRequest(order_id="o" * 65), "order_id"),
    (pb.ListNotificationsRequest(delivery_state=99), "delivery_state"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("request_", "field"), BAD_LISTINGS)
async def test_bad_listing_is_invalid_argument_naming_the_field(stub, request_, field) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ListNotifications(request_)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in bad_request_fields(refused.value)
    assert field in (refused.value.details() or "")


async def test_listing_is_newest_first_and_pages_without_gaps_or_repeats(stub) -> None:  # type: ignore[no-untyped-def]
    orders = [unique_order(f"page{n}") for n in range(5)]
    for order in orders:
        await stub.SendConfirmation(confirm_request(order), metadata=keyed(order))
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListNotifications(pb.ListNotificationsRequest(page_size=2, page_token=token))
        assert len(page.notifications) <= 2
        seen += [n.order_id for n in page.notifications]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) == len(await listed(stub))
    assert seen[:5] == orders[::-1]
    default_page = await stub.ListNotifications(pb.ListNotificationsRequest())
    assert len(default_page.notifications) == min(100, len(seen))
    largest_token = await stub.ListNotifications(pb.ListNotificationsRequest(page_token=str(2**63 - 1)))
    assert [n.order_id for n in largest_token.notifications][:5] == orders[::-1]
    only = await stub.ListNotifications(pb.ListNotificationsRequest(order_id=orders[2]))
    assert [n.order_id for n in only.notifications] == [orders[2]]
    assert only.next_page_token == ""


async def test_log_channel_writes_one_line_per_notification(log_notify) -> None:  # type: ignore[no-untyped-def]
    order = unique_order("log")
    request = confirm_request(order, amount=Money(currency_code="JPY", minor_units=1500))
    async with grpc.aio.insecure_channel(log_notify.address) as channel:
        stub = pb_grpc.NotifyServiceStub(channel)
        responses = await asyncio.gather(
            *(stub.SendConfirmation(request, metadata=keyed(f"{order}/{n % 2}")) for n in range(6))
        )
        await settled(stub, order)
    notification = responses[0].notification
    assert {r.notification.notification_id for r in responses} == {notification.notification_id}
    assert notification.channel == "log"
    assert "charged 1500 JPY" in notification.body
    lines = [line for line in log_notify.log_path.read_text().splitlines() if f"order={order} " in line]
    deliveries = [line for line in lines if "delivered notification=" in line]
    assert len(deliveries) == 1
    assert notification.notification_id in deliveries[0] and notification.body in deliveries[0]


async def test_call_past_its_deadline_leaves_no_effect(log_notify) -> None:  # type: ignore[no-untyped-def]
    order = unique_order("late")
    async with grpc.aio.insecure_channel(log_notify.address) as channel:
        stub = pb_grpc.NotifyServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as timed_out:
            slow_key = keyed(f"{SLOW_KEY}-{order}")
            await stub.SendConfirmation(confirm_request(order), metadata=slow_key, timeout=0.2)
        assert timed_out.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The server has finished (and rolled back) its work.
        await call_logged(log_notify, "SendConfirmation", f"{SLOW_KEY}-{order}")
        assert await listed(stub, order) == []
    assert f"order={order} " not in log_notify.log_path.read_text()


def test_unknown_channel_fails_fast_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ProcessFailed) as failed:
        _start("notify-bad-channel", tmp_path, NOTIFY_CHANNEL="pigeon")
    assert "NOTIFY_CHANNEL" in str(failed.value)


async def test_postgresql_two_processes_record_and_deliver_once(start_process, postgres_url) -> None:  # type: ignore[no-untyped-def]
    # start_process gives both processes one DATA_DIR, so they append to one notifications file.
    first = start_process("notify_svc", name="notify-a", DATABASE_URL=postgres_url, NOTIFY_CHANNEL="file")
    second = start_process("notify_svc", name="notify-b", DATABASE_URL=postgres_url, NOTIFY_CHANNEL="file")
    assert first.env["DATA_DIR"] == second.env["DATA_DIR"]
    async with grpc.aio.insecure_channel(first.address) as a, grpc.aio.insecure_channel(second.address) as b:
        stubs = [pb_grpc.NotifyServiceStub(a), pb_grpc.NotifyServiceStub(b)]
        same_key = confirm_request("pg-same-key")
        responses = await asyncio.gather(
            *(stubs[n % 2].SendConfirmation(same_key, metadata=keyed("pg-same")) for n in range(20))
        )
        assert len({r.notification.notification_id for r in responses}) == 1
        other_keys = confirm_request("pg-other-keys")
        responses = await asyncio.gather(
            *(stubs[n % 2].SendConfirmation(other_keys, metadata=keyed(f"pg-other/{n}")) for n in range(20))
        )
        assert len({r.notification.notification_id for r in responses}) == 1
        assert len(await settled(stubs[0])) == 2
        # The largest token a client may send compares as a 64-bit value, not an overflow.
        everything = await stubs[1].ListNotifications(pb.ListNotificationsRequest(page_token=str(2**63 - 1)))
        assert [n.order_id for n in everything.notifications] == ["pg-other-keys", "pg-same-key"]
    assert sorted(line["order_id"] for line in delivered(first)) == ["pg-other-keys", "pg-same-key"]
