"""SIGKILL of the orchestrator (and of a service) at chosen instants: every saga still ends, each effect once."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from devstack.stack import LocalStack, StackConfig
from sagasuite.orchestrator.v1 import orchestrator_service_pb2 as pb
from sagasuite.payment.v1 import payment_service_pb2 as payment
from tests.integration.saga_audit import (
    COMPENSATED,
    COMPLETED,
    TOKENS,
    Clients,
    audit,
    log_lines,
    order_request,
    place_order,
    stock_levels,
    wait_ended,
)

# Faults pick orders by a fragment of their id, so each scenario slows only its own orders:
# "-wire-": ReserveStock sleeps 1.2 s before doing anything, so the call stays on the wire that long;
# "-late-": Charge commits, then holds its reply for 1 s (the effect happened, the result is not back);
# "-burst-": Charge and SendConfirmation take 200 ms, so a burst stays in flight across kills.
SERVICE_FAULTS = {
    "inventory": {"FAULTS": "ReserveStock:latency_ms=1200,order_contains=-wire-"},
    "payment": {
        "FAULTS": "Charge:reply_delay_ms=1000,order_contains=-late-;Charge:latency_ms=200,order_contains=-burst-"
    },
    "notify": {"FAULTS": "SendConfirmation:latency_ms=200,order_contains=-burst-"},
}
# LEASE_SECONDS stays at its default (30 s), longer than any wait below: a saga finishes after a
# restart only because the restarted replica takes back its own leases at once.
WAIT_LIMIT = 25.0


def new_order(kind: str) -> str:
    return f"crash-{kind}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """One stack for the module: every test uses fresh order ids and waits for its sagas to end."""
    data_dir: Path = tmp_path_factory.mktemp("orchestrator-crash")
    with LocalStack(StackConfig(data_dir, service_env=SERVICE_FAULTS)) as running:
        yield running


@pytest.fixture
async def clients(stack: LocalStack) -> AsyncIterator[Clients]:
    opened = Clients.of(stack)
    yield opened
    await opened.close()


async def crash_and_restart(stack: LocalStack) -> None:
    """SIGKILL the orchestrator and start it again on its port (so under the same default replica id)."""
    assert stack.orchestrator is not None
    stack.orchestrator.kill()
    await asyncio.to_thread(stack.orchestrator.restart)


def recoveries(stack: LocalStack) -> int:
    assert stack.orchestrator is not None
    return len(log_lines(stack.orchestrator.log_path, "recovered", "leased by a previous run"))


async def step_state(clients: Clients, saga_id: str, step: str) -> str:
    saga = (await clients.orchestrator.GetSaga(pb.GetSagaRequest(saga_id=saga_id), timeout=5)).saga
    return next(s.state for s in saga.steps if s.name == step)


async def test_kill_right_after_place_order_returned(stack: LocalStack, clients: Clients) -> None:
    stock_before = await stock_levels(clients.inventory)
    expected: dict[str, int] = {}
    saga_ids: dict[str, str] = {}
    for _ in range(2):
        orders = {new_order("placed"): COMPLETED, new_order("placed"): COMPLETED, new_order("placed"): COMPENSATED}
        placed = await asyncio.gather(
            *(place_order(clients.orchestrator, order_request(o, TOKENS[s])) for o, s in orders.items())
        )
        # The commands are committed; their calls may or may not have gone out.
        await crash_and_restart(stack)
        expected.update(orders)
        saga_ids.update(zip(orders, placed, strict=True))
    ended = await wait_ended(clients.orchestrator, list(saga_ids.values()), WAIT_LIMIT)
    await audit(clients, {order: ended[saga_id] for order, saga_id in saga_ids.items()}, stock_before, expected)


async def test_kill_while_a_call_is_on_the_wire(stack: LocalStack, clients: Clients) -> None:
    stock_before = await stock_levels(clients.inventory)
    orders = {new_order("wire"): COMPLETED, new_order("wire"): COMPENSATED}
    saga_ids = {o: await place_order(clients.orchestrator, order_request(o, TOKENS[s])) for o, s in orders.items()}
    for saga_id in saga_ids.values():
        assert await step_state(clients, saga_id, "reserve_stock") == "running"
    # ReserveStock sleeps 1.2 s before its work: kill a little way into that window.
    await asyncio.sleep(0.4)
    recovered_before = recoveries(stack)
    await crash_and_restart(stack)

    ended = await wait_ended(clients.orchestrator, list(saga_ids.values()), WAIT_LIMIT)
    await audit(clients, {order: ended[saga_id] for order, saga_id in saga_ids.items()}, stock_before, orders)
    assert recoveries(stack) == recovered_before + 1, "the restarted replica did not take back its leases"
    inventory_log = stack.services["inventory"].log_path
    for saga_id in saga_ids.values():
        key = f"key={saga_id}/reserve_stock/action"
        # The call that was on the wire died with the orchestrator; the resend with the same key did the work.
        assert log_lines(inventory_log, "method=ReserveStock", key, "code=CANCELLED"), f"{key} was not in flight"
        assert len(log_lines(inventory_log, "method=ReserveStock", key, "code=OK")) == 1


async def test_kill_after_the_effect_but_before_its_result_is_recorded(stack: LocalStack, clients: Clients) -> None:
    stock_before = await stock_levels(clients.inventory)
    order_id = new_order("late")
    saga_id = await place_order(clients.orchestrator, order_request(order_id))
    # Charge commits and then holds its reply for 1 s: wait for the committed charge, then kill.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        try:
            found = await clients.payment.GetPayment(payment.GetPaymentRequest(order_id=order_id), timeout=5)
            assert found.payment.status == payment.PAYMENT_STATUS_CHARGED
            break
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND and loop.time() < deadline, error
        await asyncio.sleep(0.02)
    assert await step_state(clients, saga_id, "charge_payment") == "running", "the charge result was already recorded"
    await crash_and_restart(stack)

    ended = await wait_ended(clients.orchestrator, [saga_id], WAIT_LIMIT)
    await audit(clients, {order_id: ended[saga_id]}, stock_before, {order_id: COMPLETED})
    payment_log = stack.services["payment"].log_path
    key = f"key={saga_id}/charge_payment/action"
    assert log_lines(payment_log, "method=Charge", key, "code=CANCELLED"), "the reply was not pending at the kill"
    # The resend reused the original key, so the service replayed the stored charge instead of charging again.
    assert log_lines(payment_log, "method=Charge", key, "code=OK", "replayed")


async def test_repeated_kills_during_a_burst_of_sagas(stack: LocalStack, clients: Clients) -> None:
    stock_before = await stock_levels(clients.inventory)
    orders = {new_order("burst"): COMPENSATED if i % 5 == 0 else COMPLETED for i in range(100)}
    rng = random.Random()
    kill_after = [rng.uniform(0.2, 0.8) for _ in range(rng.randint(3, 5))]

    async def place(index: int, order_id: str) -> str:
        # Spread over about 4 s, so orders are placed before, during and after the kills.
        await asyncio.sleep(index * 0.04)
        return await place_order(clients.orchestrator, order_request(order_id, TOKENS[orders[order_id]]))

    async def killer() -> None:
        for pause in kill_after:
            await asyncio.sleep(pause)
            await crash_and_restart(stack)

    placed, _ = await asyncio.gather(
        asyncio.gather(*(place(i, order_id) for i, order_id in enumerate(orders))), killer()
    )
    saga_ids = dict(zip(orders, placed, strict=True))
    ended = await wait_ended(clients.orchestrator, list(saga_ids.values()), WAIT_LIMIT)
    await audit(clients, {order: ended[saga_id] for order, saga_id in saga_ids.items()}, stock_before, orders)


async def test_service_killed_mid_run_and_restarted(stack: LocalStack, clients: Clients) -> None:
    stock_before = await stock_levels(clients.inventory)
    late = [new_order("late-svc") for _ in range(8)]
    plain = [new_order("svc") for _ in range(8)]
    placed = await asyncio.gather(*(place_order(clients.orchestrator, order_request(o)) for o in late + plain))
    saga_ids = dict(zip(late + plain, placed, strict=True))
    # Wait until a late order's charge is committed with its reply held back, then kill the payment service.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        try:
            await clients.payment.GetPayment(payment.GetPaymentRequest(order_id=late[0]), timeout=5)
            break
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND and loop.time() < deadline, error
        await asyncio.sleep(0.02)
    stack.services["payment"].kill()
    await asyncio.to_thread(stack.services["payment"].restart)

    ended = await wait_ended(clients.orchestrator, list(saga_ids.values()), 30.0)
    # Whether a saga completed or was compensated depends on how long the service was gone;
    # either way the ledgers must match the outcome.
    await audit(clients, {order: ended[saga_id] for order, saga_id in saga_ids.items()}, stock_before)
