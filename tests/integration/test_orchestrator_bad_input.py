"""Hostile field values at the edge of all five servers, on SQLite and on PostgreSQL: refused, named, short, not stored.

Out-of-range timestamps, huge values and control characters in every kind of text field are
refused with INVALID_ARGUMENT naming the field, in a status that fits the metadata limit, and
nothing of a refused request is stored; afterwards an ordinary order still completes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from devstack.orders import DEMO_ADDRESS
from devstack.stack import SERVICES, LocalStack, StackConfig
from sagasuite.common.v1.common_pb2 import Address, LineItem, Money
from sagasuite.inventory.v1 import inventory_service_pb2 as inventory_pb
from sagasuite.notify.v1 import notify_service_pb2 as notify_pb
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.payment.v1 import payment_service_pb2 as payment_pb
from sagasuite.shipping.v1 import shipping_service_pb2 as shipping_pb
from tests.grpc_helpers import bad_request_fields, keyed
from tests.orchestrator_helpers import (
    OPERATOR_TOKEN,
    Clients,
    connect,
    fresh_postgres_database,
    new_order_id,
    order_request,
    refused,
    render,
    wait_for,
)

# Clients refuse trailers past 8 KiB by default: a refusal must fit well within.
METADATA_LIMIT = 8192
# One of each kind: C0 (NUL first: PostgreSQL cannot store it), a line break, DEL, C1, U+2028.
CONTROL_CHARACTERS = ["\x00", "\x1b", "\n", "\x7f", "\x85", "\u2028"]
MEGABYTE = 1_000_000  # below the 1 MiB message limit, so the server, not the transport, refuses it


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The whole stack on one backend: every process on its own SQLite file, or on its own PostgreSQL database."""
    with contextlib.ExitStack() as resources:
        urls: dict[str, str] = {}
        if request.param == "postgresql":
            admin_url = request.getfixturevalue("postgres_admin_url")
            urls = {name: resources.enter_context(fresh_postgres_database(admin_url)) for name in [*SERVICES, "orch"]}
        config = StackConfig(
            tmp_path_factory.mktemp(f"bad-input-{request.param}"),
            orchestrator_database_url=urls.get("orch", ""),
            service_env={name: {"DATABASE_URL": urls[name]} for name in SERVICES if name in urls},
            orchestrator_env={"OPERATOR_TOKENS": f"operator:{OPERATOR_TOKEN}"},
        )
        running = LocalStack(config).start()
        resources.callback(running.stop)
        yield running


@pytest.fixture
async def clients(stack: LocalStack) -> AsyncIterator[Clients]:
    async with connect(stack) as connected:
        yield connected


def trailer_bytes(error: grpc.aio.AioRpcError) -> int:
    metadata: Any = error.trailing_metadata() or ()
    return sum(len(key) + len(value) for key, value in metadata)


async def invalid(call: Awaitable[Any], *fields: str) -> grpc.aio.AioRpcError:
    """The call is refused INVALID_ARGUMENT naming exactly these fields, in a status that fits the metadata limit."""
    error = await refused(call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{error.code().name}: {(error.details() or '')[:300]!r}"
    assert bad_request_fields(error) == list(fields), error.details()
    assert trailer_bytes(error) < METADATA_LIMIT
    assert len(error.details() or "") < 2048
    return error


async def no_saga_for(clients: Clients, *business_keys: str) -> None:
    listed = await clients.orchestrator.ListSagas(pb.ListSagasRequest(page_size=500))
    stored = {saga.business_key for saga in listed.sagas}
    assert not stored & set(business_keys), "a refused request left a saga behind"


async def not_found(call: Awaitable[Any]) -> None:
    error = await refused(call)
    assert error.code() == grpc.StatusCode.NOT_FOUND, f"{error.code().name}: {error.details()!r}"


def packed(message: Any) -> any_pb2.Any:
    wrapper = any_pb2.Any()
    wrapper.Pack(message)
    return wrapper


def address(**parts: str) -> Address:
    changed = Address()
    changed.CopyFrom(DEMO_ADDRESS)
    for name, value in parts.items():
        setattr(changed, name, value)
    return changed


# -- timestamps --------------------------------------------------------------------------------

BAD_TIMESTAMPS = [
    pytest.param(Timestamp(seconds=4_611_686_018_427_387_904), "seconds", id="2^62-seconds"),
    pytest.param(Timestamp(seconds=253_402_300_800), "seconds", id="year-10000"),
    pytest.param(Timestamp(seconds=-62_135_596_801), "seconds", id="before-year-1"),
    pytest.param(Timestamp(seconds=0, nanos=-1), "nanos", id="negative-nanos"),
    pytest.param(Timestamp(seconds=0, nanos=1_000_000_000), "nanos", id="a-second-of-nanos"),
]


@pytest.mark.parametrize(("stamp", "part"), BAD_TIMESTAMPS)
async def test_an_out_of_range_timestamp_is_invalid_argument_naming_the_field(
    clients: Clients, stamp: Timestamp, part: str
) -> None:
    stub = clients.orchestrator
    await invalid(stub.ListSagas(pb.ListSagasRequest(created_after=stamp)), f"created_after.{part}")
    await invalid(stub.ListSagas(pb.ListSagasRequest(created_before=stamp)), f"created_before.{part}")
    await invalid(stub.GetSagaStats(pb.GetSagaStatsRequest(created_after=stamp)), f"created_after.{part}")


async def test_the_extreme_timestamps_are_accepted(clients: Clients) -> None:
    first = Timestamp(seconds=-62_135_596_800)
    last = Timestamp(seconds=253_402_300_799, nanos=999_999_999)
    await clients.orchestrator.ListSagas(pb.ListSagasRequest(created_after=first, created_before=last))
    await clients.orchestrator.GetSagaStats(pb.GetSagaStatsRequest(created_after=last))


# -- huge values -------------------------------------------------------------------------------


async def test_huge_values_sent_to_the_orchestrator_are_refused_short_and_named(clients: Clients) -> None:
    stub = clients.orchestrator
    order_id = new_order_id("huge")
    await invalid(stub.PlaceOrder(order_request(order_id, currency="X" * MEGABYTE)), "amount.currency_code")
    sku = "S" * 400_000
    # The duplicate check does not run on SKUs refused by their size: one violation each.
    await invalid(stub.PlaceOrder(order_request(order_id, items=[(sku, 1), (sku, 1)])), "items[0].sku", "items[1].sku")
    huge_order = order_request(order_id)
    huge_order.shipping_address.street = "x" * 200_000
    await invalid(stub.PlaceOrder(huge_order), "shipping_address.street")
    start = pb.StartSagaRequest(saga_type="OrderSaga", business_key=order_id)
    start.input.CopyFrom(any_pb2.Any(type_url="type.googleapis.com/" + "x" * MEGABYTE))
    error = await invalid(stub.StartSaga(start), "input")
    assert "type_url must be at most 256 characters" in (error.details() or "")
    start.input.CopyFrom(packed(huge_order))
    error = await invalid(stub.StartSaga(start), "input")
    assert "must be at most 65536 bytes" in (error.details() or "")
    await invalid(stub.ListSagas(pb.ListSagasRequest(business_key="k" * MEGABYTE)), "business_key")
    await invalid(stub.ListSagas(pb.ListSagasRequest(saga_type="t" * MEGABYTE)), "saga_type")
    await invalid(stub.ListSagas(pb.ListSagasRequest(page_token="1" * MEGABYTE)), "page_token")
    await invalid(stub.ListSagas(pb.ListSagasRequest(statuses=[pb.SAGA_STATUS_RUNNING] * 100_000)), "statuses")
    await invalid(stub.PauseSaga(pb.PauseSagaRequest(saga_id="a" * 32, reason="r" * MEGABYTE)), "reason")
    await no_saga_for(clients, order_id)


async def test_huge_values_sent_to_the_services_are_refused_short_and_named(clients: Clients) -> None:
    order_id = new_order_id("huge-svc")
    sku = "S" * 400_000
    reserve = inventory_pb.ReserveStockRequest(order_id=order_id, items=[LineItem(sku=sku, quantity=1)] * 2)
    await invalid(
        clients.inventory.ReserveStock(reserve, metadata=keyed(f"{order_id}/r")), "items[0].sku", "items[1].sku"
    )
    charge = payment_pb.ChargeRequest(
        order_id=order_id, amount=Money(currency_code="X" * MEGABYTE, minor_units=5), payment_token="tok_visa"
    )
    await invalid(clients.payment.Charge(charge, metadata=keyed(f"{order_id}/c")), "amount.currency_code")
    ship = shipping_pb.CreateShipmentRequest(
        order_id=order_id, address=address(street="x" * MEGABYTE), items=[LineItem(sku="BOOK-001", quantity=1)]
    )
    await invalid(clients.shipping.CreateShipment(ship, metadata=keyed(f"{order_id}/s")), "address.street")
    summary = notify_pb.OrderSummary(
        items=[LineItem(sku="BOOK-001", quantity=1)],
        amount=Money(currency_code="USD", minor_units=5),
        tracking_number="TRK1",
    )
    send = notify_pb.SendConfirmationRequest(order_id=order_id, recipient="a" * MEGABYTE, summary=summary)
    await invalid(clients.notify.SendConfirmation(send, metadata=keyed(f"{order_id}/n")), "recipient")
    # int() refuses 4,300 digits and more: a long page token was an INTERNAL error.
    for token in ("9" * 5000, "9" * MEGABYTE):
        listing = notify_pb.ListNotificationsRequest(page_token=token)
        await invalid(clients.notify.ListNotifications(listing), "page_token")
        await invalid(clients.payment.ListPayments(payment_pb.ListPaymentsRequest(page_token=token)), "page_token")
    await not_found(clients.inventory.GetReservation(inventory_pb.GetReservationRequest(order_id=order_id)))
    await not_found(clients.payment.GetPayment(payment_pb.GetPaymentRequest(order_id=order_id)))
    await not_found(clients.shipping.GetShipment(shipping_pb.GetShipmentRequest(order_id=order_id)))
    assert await clients.notifications(order_id) == []


# -- control characters ------------------------------------------------------------------------

ORDER_FIELDS = [
    "order_id",
    "customer_email",
    "items[0].sku",
    "amount.currency_code",
    "payment_token",
    *(f"shipping_address.{part}" for part in ("recipient_name", "street", "city", "postal_code", "country_code")),
]


def bad_order(field: str, order_id: str, char: str) -> pb.PlaceOrderRequest:
    """A good order but for one field, which holds char."""
    order = order_request(order_id)
    if field == "order_id":
        order.order_id = f"{order_id}{char}"
    elif field == "customer_email":
        order.customer_email = f"ada{char}@example.com"
    elif field == "items[0].sku":
        order.items[0].sku = f"BOOK{char}001"
    elif field == "amount.currency_code":
        order.amount.currency_code = f"US{char}"
    elif field == "payment_token":
        order.payment_token = f"tok_{char}visa"
    else:
        part = field.removeprefix("shipping_address.")
        setattr(order.shipping_address, part, f"{getattr(DEMO_ADDRESS, part)}{char}")
    return order


@pytest.mark.parametrize("field", ORDER_FIELDS)
async def test_a_control_character_in_an_order_is_refused_by_the_orchestrator(clients: Clients, field: str) -> None:
    for char in CONTROL_CHARACTERS:
        order_id = new_order_id("ctl")
        order = bad_order(field, order_id, char)
        await invalid(clients.orchestrator.PlaceOrder(order), field)
        # The same order packed for StartSaga, under a key the orchestrator accepts.
        start = pb.StartSagaRequest(saga_type="OrderSaga", business_key=order_id, input=packed(order))
        await invalid(clients.orchestrator.StartSaga(start), field)
        await no_saga_for(clients, order_id, order.order_id)


async def test_a_control_character_in_a_start_list_or_read_field_is_refused(clients: Clients) -> None:
    stub = clients.orchestrator
    for char in CONTROL_CHARACTERS:
        order_id = new_order_id("ctl-start")
        order = packed(order_request(order_id))
        await invalid(
            stub.StartSaga(pb.StartSagaRequest(saga_type=f"Order{char}Saga", business_key=order_id, input=order)),
            "saga_type",
        )
        await invalid(
            stub.StartSaga(pb.StartSagaRequest(saga_type="OrderSaga", business_key=f"{order_id}{char}", input=order)),
            "business_key",
        )
        await no_saga_for(clients, order_id, f"{order_id}{char}")
        await invalid(stub.ListSagas(pb.ListSagasRequest(saga_type=f"Order{char}Saga")), "saga_type")
        await invalid(stub.ListSagas(pb.ListSagasRequest(business_key=f"{order_id}{char}")), "business_key")
        await invalid(stub.ListSagas(pb.ListSagasRequest(page_token=f"1764628868.25_{char}abc")), "page_token")
        await invalid(stub.ListSagas(pb.ListSagasRequest(page_token=f"1764628868.25_abc{char}")), "page_token")
        await invalid(stub.GetSaga(pb.GetSagaRequest(saga_id=f"abc{char}")), "saga_id")
        await invalid(stub.WatchSaga(pb.WatchSagaRequest(saga_id=f"abc{char}")).read(), "saga_id")


async def test_a_control_character_in_an_operator_reason_is_refused_and_nothing_is_recorded(clients: Clients) -> None:
    saga_id = await clients.place(order_request(new_order_id("ctl-reason")))
    saga = await wait_for(clients, saga_id, ["COMPLETED"])
    stub = clients.orchestrator
    for char in CONTROL_CHARACTERS:
        reason = f"customer asked{char}audit actor=root action=terminate outcome=ok"
        await invalid(stub.PauseSaga(pb.PauseSagaRequest(saga_id=saga_id, reason=reason)), "reason")
        await invalid(stub.CancelSaga(pb.CancelSagaRequest(saga_id=saga_id, reason=reason)), "reason")
        await invalid(stub.TerminateSaga(pb.TerminateSagaRequest(saga_id=saga_id, reason=reason)), "reason")
    after = await clients.saga(saga_id)
    assert len(after.history) == len(saga.history), render(after)


async def test_a_control_character_sent_to_a_service_is_refused_and_nothing_is_stored(clients: Clients) -> None:
    line = [LineItem(sku="BOOK-001", quantity=1)]
    usd = Money(currency_code="USD", minor_units=5)
    for char in CONTROL_CHARACTERS:
        oid = new_order_id("ctl-svc")
        key = keyed(f"{oid}/{ord(char)}")
        await invalid(
            clients.inventory.ReserveStock(
                inventory_pb.ReserveStockRequest(order_id=oid, items=[LineItem(sku=f"BOOK{char}", quantity=1)]),
                metadata=key,
            ),
            "items[0].sku",
        )
        # A release or refund with nothing to undo leaves a tombstone; a refused one leaves nothing.
        release = inventory_pb.ReleaseStockRequest(order_id=oid, reason=f"why{char}")
        await invalid(clients.inventory.ReleaseStock(release, metadata=keyed(f"{oid}/release")), "reason")
        charge = payment_pb.ChargeRequest(order_id=oid, amount=usd, payment_token=f"tok_{char}visa")
        await invalid(clients.payment.Charge(charge, metadata=keyed(f"{oid}/charge")), "payment_token")
        refund = payment_pb.RefundRequest(order_id=oid, reason=f"why{char}")
        await invalid(clients.payment.Refund(refund, metadata=keyed(f"{oid}/refund")), "reason")
        for part in ("recipient_name", "street", "city", "postal_code"):
            ship = shipping_pb.CreateShipmentRequest(order_id=oid, address=address(**{part: f"x{char}y"}), items=line)
            await invalid(clients.shipping.CreateShipment(ship, metadata=keyed(f"{oid}/{part}")), f"address.{part}")
        cancel = shipping_pb.CancelShipmentRequest(order_id=oid, reason=f"why{char}")
        await invalid(clients.shipping.CancelShipment(cancel, metadata=keyed(f"{oid}/cancel")), "reason")
        summary = notify_pb.OrderSummary(items=line, amount=usd, tracking_number="TRK1")
        send = notify_pb.SendConfirmationRequest(order_id=oid, recipient=f"ada{char}@example.com", summary=summary)
        await invalid(clients.notify.SendConfirmation(send, metadata=keyed(f"{oid}/send")), "recipient")
        summary.tracking_number = f"TRK{char}1"
        send = notify_pb.SendConfirmationRequest(order_id=oid, recipient="ada@example.com", summary=summary)
        await invalid(clients.notify.SendConfirmation(send, metadata=keyed(f"{oid}/track")), "summary.tracking_number")
        notifications = notify_pb.ListNotificationsRequest(page_token=f"1{char}")
        await invalid(clients.notify.ListNotifications(notifications), "page_token")
        payments = payment_pb.ListPaymentsRequest(page_token=f"1{char}")
        await invalid(clients.payment.ListPayments(payments), "page_token")
        await not_found(clients.inventory.GetReservation(inventory_pb.GetReservationRequest(order_id=oid)))
        await not_found(clients.payment.GetPayment(payment_pb.GetPaymentRequest(order_id=oid)))
        await not_found(clients.shipping.GetShipment(shipping_pb.GetShipmentRequest(order_id=oid)))
        assert await clients.notifications(oid) == []


# -- and then ----------------------------------------------------------------------------------


async def test_after_all_that_an_ordinary_order_completes(clients: Clients) -> None:
    order = order_request(new_order_id("after-bad-input"))
    order.shipping_address.CopyFrom(address(recipient_name="Zoë Åström", street="Östra Långgatan 7"))
    saga_id = await clients.place(order)
    saga = await wait_for(clients, saga_id, ["COMPLETED", "COMPENSATED", "NEEDS_ATTENTION"])
    assert saga.status == pb.SAGA_STATUS_COMPLETED, render(saga)
