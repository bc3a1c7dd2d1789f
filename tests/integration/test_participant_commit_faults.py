"""A participant's commit under faults, on real processes: a lost COMMIT reply, a cut connection, a poison unit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import pytest
import sqlalchemy

from devstack.launcher import ManagedProcess
from sagasuite.common.v1.common_pb2 import Money
from sagasuite.payment.v1 import payment_service_pb2 as pb
from sagasuite.payment.v1 import payment_service_pb2_grpc as pb_grpc
from tests.grpc_helpers import keyed
from tests.pg_proxy import CommitFault, PgProxy

CALL_TIMEOUT = 60.0


def charge_request(order_id: str, minor_units: int = 1250) -> pb.ChargeRequest:
    return pb.ChargeRequest(
        order_id=order_id, amount=Money(currency_code="EUR", minor_units=minor_units), payment_token="tok_visa"
    )


async def charges_of(stub: pb_grpc.PaymentServiceAsyncStub, order_id: str) -> list[pb.LedgerEntry]:
    response = await stub.ListPayments(pb.ListPaymentsRequest(order_id=order_id, page_size=100), timeout=CALL_TIMEOUT)
    return [entry for entry in response.entries if entry.kind == pb.LEDGER_ENTRY_KIND_CHARGE]


@pytest.fixture
def proxy() -> Iterator[PgProxy]:
    proxy = PgProxy().start()
    yield proxy
    proxy.close()


@pytest.fixture
async def payment_behind_proxy(
    start_process: Callable[..., ManagedProcess], postgres_url: str, proxy: PgProxy
) -> AsyncIterator[pb_grpc.PaymentServiceAsyncStub]:
    payment = start_process("payment_svc", DATABASE_URL=proxy.url(postgres_url))
    async with grpc.aio.insecure_channel(payment.address) as channel:
        yield pb_grpc.PaymentServiceStub(channel)


async def test_charge_whose_commit_reply_is_lost_is_unavailable_and_its_retry_replays(
    payment_behind_proxy: pb_grpc.PaymentServiceAsyncStub, proxy: PgProxy
) -> None:
    stub = payment_behind_proxy
    request = charge_request("lost-ack-1")
    proxy.arm(CommitFault.DROP_COMMIT_REPLY)
    with pytest.raises(grpc.aio.AioRpcError) as lost:
        await stub.Charge(request, metadata=keyed("lost-ack-1/charge"), timeout=CALL_TIMEOUT)
    assert proxy.commits_tripped == 1
    # The charge committed, but the service cannot know: an unknown outcome, retryable, not INTERNAL.
    assert lost.value.code() == grpc.StatusCode.UNAVAILABLE, lost.value.details()
    assert "retry with the same idempotency key" in (lost.value.details() or "")

    retried = await stub.Charge(request, metadata=keyed("lost-ack-1/charge"), timeout=CALL_TIMEOUT)
    stored = await stub.GetPayment(pb.GetPaymentRequest(order_id="lost-ack-1"), timeout=CALL_TIMEOUT)
    assert retried.payment.payment_id == stored.payment.payment_id
    assert stored.payment.status == pb.PAYMENT_STATUS_CHARGED
    assert len(await charges_of(stub, "lost-ack-1")) == 1


@pytest.mark.parametrize(
    ("fault", "reached_the_server"),
    [(CommitFault.CUT_BEFORE_COMMIT, False), (CommitFault.CUT_DURING_COMMIT, None)],
    ids=["cut-before-commit", "cut-during-commit"],
)
async def test_charge_cut_at_its_commit_is_unavailable_and_its_retry_leaves_one_charge(
    payment_behind_proxy: pb_grpc.PaymentServiceAsyncStub,
    proxy: PgProxy,
    fault: CommitFault,
    reached_the_server: bool | None,
) -> None:
    """Cut before the COMMIT left: not applied, the retry runs it. Cut as it left: either way, one charge."""
    stub = payment_behind_proxy
    request = charge_request("cut-1")
    proxy.arm(fault)
    with pytest.raises(grpc.aio.AioRpcError) as cut:
        await stub.Charge(request, metadata=keyed("cut-1/charge"), timeout=CALL_TIMEOUT)
    assert proxy.commits_tripped == 1
    assert cut.value.code() == grpc.StatusCode.UNAVAILABLE, cut.value.details()
    if reached_the_server is False:
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetPayment(pb.GetPaymentRequest(order_id="cut-1"), timeout=CALL_TIMEOUT)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    retried = await stub.Charge(request, metadata=keyed("cut-1/charge"), timeout=CALL_TIMEOUT)
    assert retried.payment.status == pb.PAYMENT_STATUS_CHARGED
    assert len(await charges_of(stub, "cut-1")) == 1
    again = await stub.Charge(request, metadata=keyed("cut-1/charge"), timeout=CALL_TIMEOUT)
    assert again.payment.payment_id == retried.payment.payment_id
    assert len(await charges_of(stub, "cut-1")) == 1


def _poison_payment_table(url: str) -> None:
    """Make PostgreSQL refuse, at COMMIT, any payment whose order id starts with "poison"."""
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as connection:
            # Deferred to COMMIT: the poison's statements succeed and its batch's COMMIT fails.
            # (%% because the driver takes a lone % for a parameter marker.)
            connection.exec_driver_sql(
                "CREATE FUNCTION poison() RETURNS trigger AS $$ BEGIN IF NEW.order_id LIKE 'poison%%' "
                "THEN RAISE EXCEPTION 'the store cannot hold %%', NEW.order_id; END IF; "
                "RETURN NULL; END $$ LANGUAGE plpgsql"
            )
            connection.exec_driver_sql(
                "CREATE CONSTRAINT TRIGGER poison AFTER INSERT ON payment "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION poison()"
            )
    finally:
        engine.dispose()


async def test_a_poison_charge_fails_alone_among_concurrent_good_ones(start_process, postgres_url: str) -> None:  # type: ignore[no-untyped-def]
    """On PostgreSQL, where concurrent calls share a batch (SQLite's batches are covered in test_db_faults.py)."""
    payment = start_process("payment_svc", DATABASE_URL=postgres_url)
    _poison_payment_table(postgres_url)
    async with grpc.aio.insecure_channel(payment.address) as channel:
        stub = pb_grpc.PaymentServiceStub(channel)

        async def charge(order_id: str) -> grpc.StatusCode:
            try:
                await stub.Charge(charge_request(order_id), metadata=keyed(f"{order_id}/charge"), timeout=CALL_TIMEOUT)
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        good = [f"good-{wave}-{index}" for wave in range(3) for index in range(40)]
        for wave in range(3):
            wave_orders = good[wave * 40 : wave * 40 + 40]
            orders = [*wave_orders[:20], f"poison-{wave}", *wave_orders[20:]]
            codes = dict(zip(orders, await asyncio.gather(*(charge(order) for order in orders)), strict=True))
            assert codes.pop(f"poison-{wave}") != grpc.StatusCode.OK
            failed = {order: code for order, code in codes.items() if code != grpc.StatusCode.OK}
            assert not failed, f"good charges failed beside the poison: {failed}"
        # Every charge answered OK is on the ledger, once; the poison left nothing.
        response = await stub.ListPayments(pb.ListPaymentsRequest(page_size=500), timeout=CALL_TIMEOUT)
        charged = sorted(entry.order_id for entry in response.entries if entry.kind == pb.LEDGER_ENTRY_KIND_CHARGE)
        assert charged == sorted(good)
