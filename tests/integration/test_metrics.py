"""Prometheus metrics over HTTP: every process of a real stack serves /metrics, with counts matching the sagas run."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack.launcher import ManagedProcess
from devstack.stack import LocalStack, StackConfig
from sagasuite.common.v1.common_pb2 import Money
from sagasuite.payment.v1 import payment_service_pb2 as payment_pb
from tests.grpc_helpers import keyed
from tests.orchestrator_helpers import connect, frozen, new_order_id, order_request, wait_for, wait_until

_METRICS_PORT = re.compile(r"METRICS port=(\d+)")
# The first confirmation of a "flaky-" order fails once and is retried.
FAULTS = {
    "notify": "SendConfirmation:fail_first=1,order_contains=flaky-",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    config = StackConfig(
        tmp_path_factory.mktemp("metrics"),
        common_env={"METRICS_PORT": "0"},
        orchestrator_env={"OUTBOX_METRICS_INTERVAL_SECONDS": "0.1"},
        service_env={name: {"FAULTS": spec} for name, spec in FAULTS.items()},
    )
    with LocalStack(config) as started:
        yield started


def metrics_port(process: ManagedProcess) -> int:
    """The port the process printed on its METRICS line (the latest start's)."""
    ports = _METRICS_PORT.findall(process.log_path.read_text())
    assert ports, f"{process.name} printed no METRICS line:\n{process.log_tail()}"
    return int(ports[-1])


class Scrape:
    """One scrape of a process's /metrics, parsed."""

    def __init__(self, process: ManagedProcess) -> None:
        url = f"http://127.0.0.1:{metrics_port(process)}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
            self.text = response.read().decode()
        self.samples = [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(self.text)
            for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of name whose labels include the given ones (0 when there is none)."""
        return sum(v for n, sample_labels, v in self.samples if n == name and labels.items() <= sample_labels.items())


def scrape_all(stack: LocalStack) -> dict[str, Scrape]:
    return {name: Scrape(process) for name, process in stack.processes().items()}


def delta(before: dict[str, Scrape], after: dict[str, Scrape], process: str, name: str, **labels: str) -> float:
    return after[process].value(name, **labels) - before[process].value(name, **labels)


async def test_counts_match_a_known_set_of_sagas(stack: LocalStack) -> None:
    before = scrape_all(stack)
    async with connect(stack) as clients:
        saga_ids = [
            await clients.place(order_request(new_order_id("plain"))),
            await clients.place(order_request(new_order_id("plain"))),
            await clients.place(order_request(new_order_id("flaky"))),
        ]
        declined = await clients.place(order_request(new_order_id("declined"), token="tok_declined"))
        for saga_id in saga_ids:
            await wait_for(clients, saga_id, {"COMPLETED"})
        await wait_for(clients, declined, {"COMPENSATED"})
    after = scrape_all(stack)

    def orchestrator(name: str, **labels: str) -> float:
        return delta(before, after, "orchestrator", name, **labels)

    saga = {"saga_type": "OrderSaga"}
    assert orchestrator("sagasuite_sagas_started_total", **saga) == 4
    assert orchestrator("sagasuite_sagas_completed_total", **saga) == 3
    assert orchestrator("sagasuite_sagas_compensated_total", **saga) == 1
    assert orchestrator("sagasuite_sagas_needs_attention_total", **saga) == 0
    assert orchestrator("sagasuite_saga_completion_seconds_count", status="COMPLETED") == 3
    assert orchestrator("sagasuite_saga_completion_seconds_count", status="COMPENSATED") == 1
    assert orchestrator("sagasuite_saga_start_seconds_count", method="PlaceOrder") == 4
    assert orchestrator("sagasuite_rpc_calls_total", method="PlaceOrder", code="OK") == 4
    assert orchestrator("sagasuite_saga_step_retries_total", step="send_confirmation", direction="action") == 1
    assert orchestrator("sagasuite_saga_step_retries_total") == 1

    def steps(step: str, direction: str, code: str) -> float:
        return orchestrator("sagasuite_saga_step_seconds_count", step=step, direction=direction, code=code)

    assert steps("reserve_stock", "action", "OK") == 4
    assert steps("charge_payment", "action", "OK") == 3
    assert steps("charge_payment", "action", "FAILED_PRECONDITION") == 1
    assert steps("reserve_stock", "compensation", "OK") == 1
    assert steps("create_shipment", "action", "OK") == 3
    assert steps("send_confirmation", "action", "UNAVAILABLE") == 1
    assert steps("send_confirmation", "action", "OK") == 3
    assert orchestrator("sagasuite_saga_step_seconds_count") == 4 + 4 + 1 + 3 + 4

    def calls(process: str, method: str, code: str) -> float:
        return delta(before, after, process, "sagasuite_rpc_calls_total", method=method, code=code)

    assert calls("inventory", "ReserveStock", "OK") == 4
    assert calls("inventory", "ReleaseStock", "OK") == 1
    assert calls("payment", "Charge", "OK") == 3
    assert calls("payment", "Charge", "FAILED_PRECONDITION") == 1
    assert calls("shipping", "CreateShipment", "OK") == 3
    assert calls("notify", "SendConfirmation", "UNAVAILABLE") == 1
    assert calls("notify", "SendConfirmation", "OK") == 3
    assert delta(before, after, "notify", "sagasuite_rpc_duration_seconds_count", method="SendConfirmation") == 4
    for name in ("inventory", "payment", "shipping", "notify"):
        assert delta(before, after, name, "sagasuite_rpc_idempotent_replays_total") == 0


async def test_a_service_counts_idempotent_replays(stack: LocalStack) -> None:
    before = scrape_all(stack)
    order_id = new_order_id("replayed")
    request = payment_pb.ChargeRequest(
        order_id=order_id, amount=Money(currency_code="EUR", minor_units=500), payment_token="tok_visa"
    )
    async with connect(stack) as clients:
        first = await clients.payment.Charge(request, metadata=keyed(f"key-{order_id}"))
        again = await clients.payment.Charge(request, metadata=keyed(f"key-{order_id}"))
    assert again == first
    after = scrape_all(stack)
    assert delta(before, after, "payment", "sagasuite_rpc_calls_total", method="Charge", code="OK") == 2
    assert delta(before, after, "payment", "sagasuite_rpc_idempotent_replays_total", method="Charge") == 1


async def test_outbox_and_in_flight_gauges_follow_a_call_on_the_wire(stack: LocalStack) -> None:
    async with connect(stack) as clients:

        async def on_the_wire() -> bool:
            scrape = Scrape(stack.processes()["orchestrator"])
            return (
                scrape.value("sagasuite_dispatcher_in_flight_calls") >= 1
                and scrape.value("sagasuite_outbox_due_commands") >= 1
                and scrape.value("sagasuite_outbox_oldest_due_age_seconds") > 0
            )

        # Shipping is frozen: the shipment call stays on the wire (and is retried) until the gauges show it.
        with frozen(stack.services["shipping"]):
            saga_id = await clients.place(order_request(new_order_id("slow")))
            await wait_until(on_the_wire, "the stuck shipment call in the orchestrator's gauges")
        await wait_for(clients, saga_id, {"COMPLETED"})

        async def drained() -> bool:
            scrape = Scrape(stack.processes()["orchestrator"])
            return (
                scrape.value("sagasuite_dispatcher_in_flight_calls") == 0
                and scrape.value("sagasuite_outbox_due_commands") == 0
                and scrape.value("sagasuite_outbox_oldest_due_age_seconds") == 0
            )

        await wait_until(drained, "empty outbox gauges once every saga has ended")


def test_metrics_are_off_unless_a_port_is_set(start_process: object) -> None:
    process = start_process("notify_svc", "notify-no-metrics")  # type: ignore[operator]
    assert "METRICS port=" not in process.log_path.read_text()
